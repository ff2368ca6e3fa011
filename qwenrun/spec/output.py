"""Structured answers: ``agent.output_schema``, the JSON Schema the final answer of a turn must match.

The key holds either a JSON Schema (a mapping) or ``module:Class``, a pydantic model the answer is
validated with. :func:`output_schema` resolves it once, when the agent file loads: a schema that is
not a valid JSON Schema, a module that does not import or a class that is not a pydantic
``BaseModel`` is a :class:`~qwenrun.errors.ConfigError` naming the key. The resolved
:class:`OutputSchema` gives the JSON Schema the engine constrains the answer with (vLLM's
structured outputs) and :meth:`OutputSchema.parse`, which reads an answer back and checks it
(``jsonschema``, or the model's own validation), so that an invalid answer is never passed on.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from qwenrun.errors import ConfigError

__all__ = ["OutputSchema", "answer_schema"]

KEY = "agent.output_schema"


@dataclass(frozen=True)
class OutputSchema:
    """The schema of a structured answer: ``json_schema`` (what the engine's constraint and the
    prompt use), and the pydantic ``model`` it came from, if any."""

    json_schema: dict[str, Any]
    name: str = "answer"
    model: type[BaseModel] | None = None
    _validator: Any = field(default=None, repr=False, compare=False)

    def parse(self, text: str) -> Any:
        """The answer ``text`` read as JSON and checked against the schema: a pydantic model's
        ``model_dump(mode="json")``, else the JSON value. ValueError says what is wrong and where."""
        if self.model is not None:
            try:
                return self.model.model_validate_json(text).model_dump(mode="json")
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in error['loc']) or 'the top level'}: {error['msg']}"
                    for error in exc.errors()[:3]
                )
                raise ValueError(f"not a valid {self.model.__name__}: {problems}") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg} at character {exc.pos})") from None
        error = next(iter(self._validator.iter_errors(value)), None) if self._validator is not None else None
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "the top level"
            raise ValueError(f"does not match the schema at {where}: {error.message[:200]}")
        return value

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any], name: str = "answer") -> OutputSchema:
        """The schema of a JSON Schema (an API request's ``response_format``); ValueError when it is
        not a valid JSON Schema."""
        from jsonschema import Draft202012Validator, SchemaError  # type: ignore[import-untyped]
        from jsonschema.validators import validator_for  # type: ignore[import-untyped]
        from referencing import Registry

        document = dict(schema)
        try:
            checker = validator_for(document, default=Draft202012Validator)
            checker.check_schema(document)
            validator = checker(document, registry=Registry())  # no $ref is fetched from anywhere
        except SchemaError as exc:
            where = "/".join(str(part) for part in exc.path) or "the top level"
            raise ValueError(f"not a valid JSON Schema (at {where}: {exc.message[:200]})") from None
        except Exception as exc:  # an unknown $schema
            raise ValueError(f"cannot read the JSON Schema: {exc}") from None
        return cls(document, name=name, _validator=validator)

    def instruction(self) -> str:
        """The note that asks the model for the answer as JSON of this schema."""
        schema = json.dumps(self.json_schema, ensure_ascii=False, separators=(",", ":"))
        return f"Give your final answer now, as JSON only, matching this JSON Schema: {schema}"


def _model(reference: str, source: str) -> type[BaseModel]:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{source}: {KEY}: expected a JSON Schema (a mapping) or 'module:Class', "
                          f"got {reference!r}")  # fmt: skip
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"{source}: {KEY}: cannot import module {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from None  # fmt: skip
    found: Any = module
    for part in attribute.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ConfigError(f"{source}: {KEY}: module {module_name!r} has no {attribute!r}")
    if not (isinstance(found, type) and issubclass(found, BaseModel)):
        raise ConfigError(f"{source}: {KEY}: {reference!r} is a {type(found).__name__}, not a "
                          "pydantic BaseModel class")  # fmt: skip
    return found


def output_schema(value: str | Mapping[str, Any] | None, source: str = "<dict>") -> OutputSchema | None:
    """The resolved ``agent.output_schema`` (None when it is not set); ConfigError when it is
    unusable. ``source`` names the agent file in the message."""
    if value is None:
        return None
    if isinstance(value, str):
        model = _model(value, source)
        try:
            schema = model.model_json_schema()
        except Exception as exc:  # a field pydantic cannot describe in JSON Schema
            raise ConfigError(f"{source}: {KEY}: {value!r} has no JSON Schema: {exc}") from None
        return OutputSchema(schema, name=model.__name__, model=model)
    title = value.get("title")
    name = title if isinstance(title, str) and title.isidentifier() else "answer"
    try:
        return OutputSchema.from_json_schema(value, name)
    except ValueError as exc:
        raise ConfigError(f"{source}: {KEY}: {exc}") from None


_RESOLVED: dict[tuple[str, str | None], OutputSchema | None] = {}


def answer_schema(spec: Any) -> OutputSchema | None:
    """The resolved ``agent.output_schema`` of an :class:`~qwenrun.spec.agent_file.AgentSpec`
    (resolved once per file and value: a turn does not check the schema again)."""
    value = spec.agent.output_schema
    text = value if isinstance(value, str) or value is None else json.dumps(value, sort_keys=True)
    key = (str(spec.source), text)
    if key not in _RESOLVED:
        if len(_RESOLVED) >= 256:
            _RESOLVED.clear()
        _RESOLVED[key] = output_schema(value, spec.source)
    return _RESOLVED[key]
