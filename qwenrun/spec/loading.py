"""Reading an agent file: safe YAML, ``${ENV}`` interpolation, ``--set`` overrides, and error
messages that name the file, the path in the document and the problem.

:mod:`qwenrun.spec.agent_file` holds the models and uses these; this module knows nothing of them (the
tags of the ``engine`` and ``frontend`` unions are read from the models). Files of an older
``version:`` are upgraded step by step (:data:`UPGRADES`). It must not import vLLM or torch.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, Tag, ValidationError

from qwenrun.errors import ConfigError

__all__ = [
    "apply_overrides",
    "describe_yaml_error",
    "format_validation_error",
    "interpolate",
    "safe_load",
    "secret_from_env",
    "upgrade",
]

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ESCAPED = "$${"


_MAX_DEPTH = 100
_MAX_VALUES = 100_000


def interpolate(value: Any, path: tuple[str | int, ...], source: str) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; ``$${`` is a literal ``${``.

    Also bounds the document, whose YAML aliases may make it cyclic (``a: &a [*a]``) or huge
    (nested aliases, "billion laughs"): a cycle, more than ``_MAX_DEPTH`` levels or more than
    ``_MAX_VALUES`` values with the aliases expanded is a ConfigError naming where it happens."""
    count = 0

    def walk(node: Any, path: tuple[str | int, ...], parents: tuple[int, ...]) -> Any:
        nonlocal count
        count += 1
        if count > _MAX_VALUES:
            raise ConfigError(
                f"{source}: {_dotted(path)}: more than {_MAX_VALUES:,} values once YAML aliases are expanded"
            )
        if isinstance(node, dict | list):
            if id(node) in parents:
                raise ConfigError(f"{source}: {_dotted(path)}: a YAML alias refers to a node containing it")
            if len(parents) >= _MAX_DEPTH:
                where = _dotted(path[:8]) + ("..." if len(path) > 8 else "")
                raise ConfigError(f"{source}: {where}: nested more than {_MAX_DEPTH} levels deep")
            inner = (*parents, id(node))
            if isinstance(node, dict):
                return {key: walk(item, (*path, str(key)), inner) for key, item in node.items()}
            return [walk(item, (*path, index), inner) for index, item in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            return _substitute(node, path, source)
        return node

    return walk(value, path, ())


def _substitute(value: str, path: tuple[str | int, ...], source: str) -> str:
    parts = value.split(_ESCAPED)

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is not None and (found or default is None):
            return found
        if default is not None:
            return default
        raise ConfigError(
            f"{source}: {_dotted(path)}: environment variable {name} is not set "
            f"(write ${{{name}:-default}} to give a default)"
        )

    return "${".join(_ENV_PATTERN.sub(substitute, part) for part in parts)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply ``--set key.path=value`` overrides; values are parsed as YAML (``8`` is an int)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. engine.max_num_seqs=8")
        try:
            value = safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {override!r}: {describe_yaml_error(exc)}") from None
        node: Any = data
        parts = key.strip().split(".")
        for index, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: index + 1])
                raise ConfigError(f"{source}: --set {key}: {where} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
"""Version N -> the function that rewrites a document of version N as version N + 1. Version 1 is
the first format, so the chain is empty; a change of the format adds a version and its step here."""


def upgrade(data: dict[str, Any], current: int, source: str) -> dict[str, Any]:
    """``data`` as a document of version ``current`` (its ``version:``, default current)."""
    version = data.get("version", current)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(
            f"{source}: version: expected a format version from 1 to {current}, got {version!r}"
        )
    if version > current:
        raise ConfigError(
            f"{source}: version: {version} is newer than this qwenrun reads (up to {current}); "
            "upgrade qwenrun"
        )
    while version < current:
        data = {**UPGRADES[version](data), "version": version + 1}
        version += 1
    return data


_PLAIN_KEY = re.compile(r"[\w\-]+")


def _dotted(path: Sequence[str | int]) -> str:
    """``("tools", 0, "settings", "a b")`` -> ``tools[0].settings['a b']`` (odd keys quoted)."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(str(part)):
            text += f"[{str(part)!r}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "<top level>"


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no tag builds a Python object), whose constructors
    crash with IndexError, ValueError, ... on some explicitly tagged scalars (``!!int ""``,
    ``!!float :``, ``!!timestamp x``): those become YAML errors at the value's line and column."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as exc:
            shown = repr(node.value[:40]) if isinstance(node, yaml.ScalarNode) else "the value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown} as {node.tag} ({type(exc).__name__})",
                node.start_mark,
            ) from None  # fmt: skip

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """PyYAML keeps the last of two equal keys and drops the first silently (a second
        ``agent:`` block would replace the first, system prompt and all): a key written twice in
        one mapping is an error naming both lines. Keys merged in with ``<<`` may be overridden."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: pydantic reports the key
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {str(key)!r} (first at line {first.start_mark.line + 1}): "
                        "write it once",
                        key_node.start_mark,
                    )  # fmt: skip
        return super().construct_mapping(node, deep)


# Private copies of PyYAML's tables, taken when qwenrun is imported (before vLLM): vLLM's
# dependency lm-format-enforcer rewrites the global SafeLoader (timestamps load as strings), which
# would otherwise change how agent files read once an engine has started.
_SafeLoader.yaml_constructors = dict(yaml.SafeLoader.yaml_constructors)
_SafeLoader.yaml_implicit_resolvers = {
    key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)


def describe_yaml_error(exc: yaml.YAMLError, text: str = "") -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        at = exc.position  # an index into the text: a control character, a lone surrogate, ...
        line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        return (
            f"YAML syntax error at line {line}, column {column}: "
            f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        )
    return f"YAML syntax error: {' '.join(problem.split())}"


def _tagged(annotation: Any) -> dict[str, Any]:
    """The members of a tagged union (``Annotated[X, Tag("x")] | ...``) by tag, also of the items of a
    list of them; {} for other types. A member is a model, or a tagged union itself (``toolset:``)."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    members: dict[str, Any] = {}
    for arg in typing.get_args(annotation):
        model = typing.get_args(arg)[0] if typing.get_origin(arg) is typing.Annotated else arg
        for meta in getattr(arg, "__metadata__", ()):
            is_model = isinstance(model, type) and issubclass(model, BaseModel)
            if isinstance(meta, Tag) and (is_model or _tagged(model)):
                members[meta.tag] = model
    return members


def _member(tagged: Any) -> tuple[type[BaseModel] | None, dict[str, Any]]:
    """A tagged union's member as (its model, {}) or, for a nested tagged union, (None, its members)."""
    if isinstance(tagged, type) and issubclass(tagged, BaseModel):
        return tagged, {}
    return None, _tagged(tagged)


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (for 'did you mean' suggestions)."""
    options: list[Any] = [model]
    tags: dict[str, type[BaseModel]] = {}
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in tags:  # pydantic names the member of a tagged union it tried
            member, tags = _member(tags[part])
            options = [member] if member is not None else []
            continue
        owner = next((m for m in options if isinstance(m, type) and issubclass(m, BaseModel)), None)
        field = owner.model_fields.get(part) if owner else None
        if field is None:
            return None
        tags = _tagged(field.annotation)
        options = _models_in(field.annotation)
    return next((m for m in options if isinstance(m, type) and issubclass(m, BaseModel)), None)


def _models_in(annotation: Any) -> list[Any]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _drop_tags(model: type[BaseModel], loc: Sequence[str | int]) -> list[str | int]:
    """``loc`` without the union tags pydantic puts in it: ``frontend.openai.port`` -> ``frontend.port``."""
    out: list[str | int] = []
    tags: dict[str, type[BaseModel]] = {}
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, str) and part in tags:
            current, tags = _member(tags[part])
            continue
        out.append(part)
        field = current.model_fields.get(part) if current is not None and isinstance(part, str) else None
        if field is not None:
            tags = _tagged(field.annotation)
            models = _models_in(field.annotation)
            current = models[0] if len(models) == 1 else None
        elif not isinstance(part, int):
            current, tags = None, {}
    return out


def format_validation_error(
    exc: ValidationError, source: str, model: type[BaseModel], overrides: Sequence[str] = ()
) -> str:
    """One line per problem: ``file: path.in.document: message``, or ``--set KEY=VALUE: path:
    message`` for a value that came from that override."""
    lines = []
    for error in exc.errors(include_url=False):
        full_loc = list(error["loc"])
        loc = _drop_tags(model, full_loc)
        message = error["msg"]
        override = _override_of(loc, overrides)
        if error["type"] == "union_tag_invalid":  # engine.kind, frontend.kind
            ctx = error.get("ctx") or {}
            tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
            field = str(ctx.get("discriminator", "kind")).strip("'")
            field = "kind" if field.endswith("()") else field  # a callable discriminator reads `kind`
            loc, message = [*loc, field], f"unknown {field} {ctx.get('tag')!r}"
            override = _override_of(loc, overrides)
            close = difflib.get_close_matches(str(ctx.get("tag")), tags, n=1, cutoff=0.6)
            message += f"; did you mean {close[0]!r}?" if close else ""
            message += f" (valid: {', '.join(tags)})"
        elif (
            error["type"] == "string_type"
            and isinstance(error.get("input"), bool | int | float)
            and loc[-1:] != ["[key]"]
        ):
            value = error["input"]
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            kind = "a boolean" if isinstance(value, bool) else "a number"
            message += f" ({shown} reads as {kind}: quote it to make it a string, "
            if override is not None:
                key = override.partition("=")[0].strip()
                message += f"""--set '{key}="{shown}"')"""
            else:
                message += f'"{shown}")'
        elif error["type"] == "invalid_key":  # a YAML key that is not a string: 1:, true:, 2024-01-01:
            loc, message = loc[:-1], f"key {loc[-1]} is not a string (quote it)"
        elif len(loc) > 1 and loc[-1] == "[key]":  # pydantic's marker: the key itself is invalid
            loc, message = loc[:-2], f"key {loc[-2]!r}: {message}"
        elif error["type"] == "extra_forbidden":
            owner = _model_at(model, full_loc)
            known = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            message = f"unknown key {str(loc[-1])!r}"
            message += f"; did you mean {close[0]!r}?" if close else ""
            if known:
                message += f" (valid keys: {', '.join(known)})"
        elif error["type"] == "missing":
            message = "required key is missing"
        where = f"{source}: --set {override.strip()}" if override is not None else source
        lines.append(f"{where}: {_dotted(loc)}: {message}")
    return "\n".join(lines)


def _override_of(loc: Sequence[str | int], overrides: Sequence[str]) -> str | None:
    """The last ``--set`` override whose key is ``loc`` or a mapping above it."""
    found = None
    for override in overrides:
        key = override.partition("=")[0].strip().split(".")
        if [str(part) for part in loc[: len(key)]] == key:
            found = override
    return found


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def secret_from_env(name: str, where: str, what: str, example: str, unset_hint: str) -> str:
    """The value of the environment variable ``name`` that a file names for a secret.

    ``where`` is ``<file>: <key>`` and ``what`` names the secret (``key``, ``password``). A ``name``
    that is not a variable name, or that equals the value of some variable, is most likely the
    secret itself (``api_key_env: ${KEY}`` interpolates it): the error says so without printing it.
    An unset or empty variable is an error that names it and ends with ``unset_hint``."""
    value = os.environ.get(name)
    if value:
        return value
    if not _ENV_NAME.fullmatch(name) or name in os.environ.values():
        raise ConfigError(
            f"{where}: must be the name of the environment variable that holds the {what} "
            f"(e.g. {example}), not the {what} itself"
        )
    raise ConfigError(f"{where}: environment variable {name} is not set or empty; {unset_hint}")
