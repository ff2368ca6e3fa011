"""The case format of ``qwenrun eval``: one JSON object a line (JSONL), validated with pydantic.

A case is a conversation to answer, the tools the model may call (OpenAI ``tools``) and what it
should call, in the ground-truth shape of BFCL: ``expected`` is a list of ``{function: {argument:
[acceptable values]}}``, one item per expected call; an acceptable value ``""`` means the argument
may be left out. ``expected: []`` means the model should call nothing (BFCL's "irrelevance").
See ``docs/eval.md``. A bad line is an :class:`~qwenrun.errors.EvalError` naming ``file:line``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qwenrun.errors import EvalError

__all__ = [
    "Case",
    "CaseTool",
    "Function",
    "dump_cases",
    "load_cases",
    "problem_text",
    "select",
]

Expected = dict[str, dict[str, list[Any]]]


class Message(BaseModel):
    """An OpenAI chat message (other fields, e.g. ``tool_calls``, are kept as they are)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Any] | None = None


class Function(BaseModel):
    """The ``function`` of an OpenAI tool: its name, description and JSON Schema of arguments."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=256)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @model_validator(mode="after")
    def _object_schema(self) -> Function:
        params = self.parameters
        if params.get("type", "object") != "object":
            kind = params.get("type")
            raise ValueError(f"parameters of {self.name!r} must be an object schema, not {kind!r}")
        properties = params.get("properties", {})
        if not isinstance(properties, dict):
            raise ValueError(f"parameters.properties of {self.name!r} must be an object")
        required = params.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise ValueError(f"parameters.required of {self.name!r} must be a list of names")
        unknown = [name for name in required if name not in properties]
        if unknown:
            raise ValueError(f"parameters.required of {self.name!r} names undeclared {', '.join(unknown)}")
        return self

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self.parameters.get("properties", {}))

    @property
    def required(self) -> list[str]:
        return list(self.parameters.get("required", []))


class CaseTool(BaseModel):
    """One entry of OpenAI's ``tools``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: Function


class Case(BaseModel):
    """One eval case (one line of a cases file)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    category: str = Field("default", min_length=1, description="Scores are reported per category.")
    messages: list[Message] = Field(min_length=1)
    tools: list[CaseTool] = Field(default_factory=list)
    expected: list[Expected] = Field(
        description='[{function: {argument: [acceptable values]}}]; "" = may be omitted; [] = no call.'
    )

    @model_validator(mode="after")
    def _consistent(self) -> Case:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's (the model answers it)")
        names = [tool.function.name for tool in self.tools]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"tools: {', '.join(twice)} declared twice")
        for index, call in enumerate(self.expected):
            if len(call) != 1:
                raise ValueError(f"expected[{index}] must name exactly one function, got {len(call)}")
            ((name, arguments),) = call.items()
            function = self.function(name)
            if function is None:
                raise ValueError(f"expected[{index}] calls {name!r}, which is not in tools")
            for argument, values in arguments.items():
                if argument not in function.properties:
                    raise ValueError(f"expected[{index}].{name}.{argument}: not a parameter of {name!r}")
                if not values:
                    raise ValueError(f"expected[{index}].{name}.{argument}: no acceptable value")
        return self

    def function(self, name: str) -> Function | None:
        """The declared function of that name, if any."""
        return next((tool.function for tool in self.tools if tool.function.name == name), None)

    @property
    def tool_names(self) -> list[str]:
        return [tool.function.name for tool in self.tools]

    def openai_messages(self) -> list[dict[str, Any]]:
        return [message.model_dump(exclude_none=True) for message in self.messages]

    def openai_tools(self) -> list[dict[str, Any]]:
        return [tool.model_dump() for tool in self.tools]


def problem_text(exc: ValidationError) -> str:
    """A pydantic error as ``path: message; ...``."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def load_cases(path: str | os.PathLike[str]) -> list[Case]:
    """Read and validate a cases file; the first bad line is an EvalError naming ``file:line``."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"{where}: cannot read the cases file: {exc}") from None
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise EvalError(f"{where}:{number}: not a JSON object: {exc}") from None
        if not isinstance(data, dict):
            raise EvalError(f"{where}:{number}: expected a JSON object, got {type(data).__name__}")
        try:
            case = Case.model_validate(data)
        except ValidationError as exc:
            name = f" (case {data['id']!r})" if isinstance(data.get("id"), str) else ""
            raise EvalError(f"{where}:{number}{name}: {problem_text(exc)}") from None
        if case.id in seen:
            raise EvalError(f"{where}:{number}: id {case.id!r} is already used on line {seen[case.id]}")
        seen[case.id] = number
        cases.append(case)
    if not cases:
        raise EvalError(f"{where}: no cases (expected one JSON object a line)")
    return cases


def select(cases: Sequence[Case], categories: Iterable[str] = (), limit: int | None = None) -> list[Case]:
    """The cases of ``categories`` (all if empty), at most the first ``limit`` of each category."""
    wanted = set(categories)
    unknown = wanted - {case.category for case in cases}
    if unknown:
        known = ", ".join(sorted({case.category for case in cases}))
        raise EvalError(f"no case has category {', '.join(sorted(unknown))} (categories: {known})")
    taken: dict[str, int] = {}
    chosen = []
    for case in cases:
        if wanted and case.category not in wanted:
            continue
        if limit is not None and taken.get(case.category, 0) >= limit:
            continue
        taken[case.category] = taken.get(case.category, 0) + 1
        chosen.append(case)
    return chosen


def dump_cases(cases: Iterable[Case]) -> str:
    """Cases as JSONL text (one line each, non-ASCII kept)."""
    return "".join(
        json.dumps(case.model_dump(mode="json", exclude_defaults=False), ensure_ascii=False) + "\n"
        for case in cases
    )
