"""A tool: a typed Python function, its JSON schema, argument validation and the call itself, and
:func:`run_call`, which runs one call of the model under a time limit and always returns a result.

The schema comes from the signature and the Google/NumPy/reST docstring through pydantic's public
API (``create_model`` + ``model_json_schema``). A keyword-only parameter named ``settings`` annotated
with a pydantic model is hidden from the model and filled from the agent YAML
(``tools: [{name: ..., settings: {...}}]``). A ``**kwargs`` parameter makes the tool accept
arguments its schema does not list (``additionalProperties``). A tool can also be a JSON schema plus
an async call (:meth:`Tool.from_schema`, what an MCP server's tools become); ``jsonschema`` checks
its arguments. :meth:`Tool.undeclared` names the arguments of a call that the schema does not
declare; :func:`declared_only` drops them from a call (the agent loop: ``agent.extra_arguments``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import docstring_parser
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo

from qwenrun.approval import Approval
from qwenrun.errors import PluginError, ToolError
from qwenrun.events import Notice, ParsedCall, ToolResult

__all__ = ["Tool", "declared_only", "dropped_notice", "format_result", "run_call"]

log = logging.getLogger(__name__)

SETTINGS_PARAMETER = "settings"
# Top-level keywords of a JSON schema under which an object may hold keys its `properties` do not
# list: whoever can tell which keys such a schema declares has to evaluate it; qwenrun keeps them all.
_OPEN_KEYWORDS = ("patternProperties", "allOf", "anyOf", "oneOf", "$ref", "if", "dependentSchemas")


@dataclass(slots=True)
class Tool:
    """A callable tool with the JSON schema the model sees."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    arguments_model: type[BaseModel] | None  # None: checked by ``_validator`` (a JSON schema tool)
    settings_model: type[BaseModel] | None = None
    settings: BaseModel | None = None
    timeout_s: float | None = None
    origin: str = ""
    _is_async: bool = field(default=False, repr=False)
    approval: Approval = "auto"
    _validator: Any = field(default=None, repr=False)  # a jsonschema validator of the arguments
    _extra: TypeAdapter[Any] | None = field(default=None, repr=False)  # a **kwargs parameter's values

    @classmethod
    def from_function(
        cls,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        settings: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        origin: str = "",
        approval: Approval = "auto",
    ) -> Tool:
        """Build a tool from a typed function. Raises PluginError for an unusable signature and
        pydantic's ValidationError for bad settings (the caller knows where they came from)."""
        tool_name: str = name or str(getattr(function, "__name__", ""))
        if not callable(function):
            raise PluginError(f"tool {tool_name!r}: {function!r} is not callable")
        try:
            signature = inspect.signature(function)
            hints = get_type_hints(function, include_extras=True)
        except (TypeError, ValueError, NameError) as exc:
            raise PluginError(f"tool {tool_name!r}: cannot read its signature: {exc}") from None
        docstring = docstring_parser.parse(inspect.getdoc(function) or "")
        described = {param.arg_name: param.description or "" for param in docstring.params}
        fields: dict[str, Any] = {}
        settings_model: type[BaseModel] | None = None
        extra: TypeAdapter[Any] | None = None  # a **kwargs parameter: any other key, of its type
        for param in signature.parameters.values():
            if param.kind == param.VAR_POSITIONAL:
                raise PluginError(f"tool {tool_name!r}: *args is not supported ({param.name!r})")
            if param.name not in hints:
                raise PluginError(f"tool {tool_name!r}: parameter {param.name!r} has no type annotation")
            annotation = hints[param.name]
            if param.kind == param.VAR_KEYWORD:
                extra = TypeAdapter(annotation)
                continue
            if param.name == SETTINGS_PARAMETER:
                if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                    raise PluginError(
                        f"tool {tool_name!r}: parameter 'settings' must be annotated with a pydantic model"
                    )
                settings_model = annotation
                continue
            default = ... if param.default is param.empty else param.default
            info = FieldInfo.merge_field_infos(
                FieldInfo.from_annotated_attribute(annotation, default),
                description=described.get(param.name) or None,
            )
            fields[param.name] = (info.annotation, info)
        description = "\n\n".join(
            part for part in (docstring.short_description, docstring.long_description) if part
        )
        try:
            arguments_model = create_model(
                f"{tool_name}_arguments",
                __config__=ConfigDict(extra="forbid" if extra is None else "allow"),
                **fields,
            )
            parameters = _clean_schema(arguments_model.model_json_schema())
        except Exception as exc:  # pydantic cannot build a schema for some annotation
            raise PluginError(f"tool {tool_name!r}: cannot build a JSON schema: {exc}") from None
        settings_value = settings_model.model_validate(dict(settings or {})) if settings_model else None
        if settings and settings_model is None:
            raise PluginError(f"tool {tool_name!r} takes no settings, got: {', '.join(settings)}")
        function_to_call = function
        if settings_value is not None:
            function_to_call = functools.partial(function, **{SETTINGS_PARAMETER: settings_value})
        return cls(
            name=tool_name,
            description=description,
            parameters=parameters,
            function=function_to_call,
            arguments_model=arguments_model,
            settings_model=settings_model,
            settings=settings_value,
            timeout_s=timeout_s,
            origin=origin,
            _is_async=inspect.iscoroutinefunction(function),
            approval=approval,
            _extra=extra,
        )

    @classmethod
    def from_schema(
        cls,
        name: str,
        description: str,
        parameters: Any,
        call: Callable[[dict[str, Any]], Awaitable[Any]],
        *,
        timeout_s: float | None = None,
        origin: str = "",
        approval: Approval = "auto",
    ) -> Tool:
        """A tool whose arguments a JSON schema describes (an MCP server's ``inputSchema``) and
        that ``call(arguments)`` runs. PluginError when ``parameters`` is not a valid JSON Schema
        of an object (a schema the model and the engine's grammar could not use)."""
        from jsonschema import Draft202012Validator, SchemaError
        from jsonschema.validators import validator_for
        from referencing import Registry

        if not isinstance(parameters, dict):
            kind = type(parameters).__name__
            raise PluginError(f"tool {name!r}: its input schema is a {kind}, not an object")
        if parameters.get("type", "object") != "object":
            declared = parameters.get("type")
            raise PluginError(f"tool {name!r}: its input schema has type {declared!r}, not 'object'")
        try:
            checker = validator_for(parameters, default=Draft202012Validator)
            checker.check_schema(parameters)
            validator = checker(parameters, registry=Registry())  # no $ref is fetched from anywhere
        except SchemaError as exc:
            where = "/".join(str(part) for part in exc.path) or "the top level"
            raise PluginError(
                f"tool {name!r}: its input schema is not a valid JSON Schema "
                f"(at {where}: {exc.message[:200]})"
            ) from None
        except Exception as exc:  # an unknown $schema, a schema jsonschema cannot read at all
            problem = _describe(exc)[:200]
            raise PluginError(f"tool {name!r}: cannot read its input schema: {problem}") from None

        async def function(**arguments: Any) -> Any:
            return await call(arguments)

        return cls(
            name=name,
            description=description,
            parameters={"type": "object", "properties": {}, **parameters},
            function=function,
            arguments_model=None,
            timeout_s=timeout_s,
            origin=origin,
            _is_async=True,
            approval=approval,
            _validator=validator,
        )

    def openai_schema(self) -> dict[str, Any]:
        """The tool as OpenAI's ``tools`` entry (what Qwen's chat template renders)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def undeclared(self, arguments: Mapping[str, Any]) -> list[str]:
        """The keys of ``arguments`` that the tool's schema does not declare, in order; none when
        the tool accepts any key (``additionalProperties`` true or a schema, a ``**kwargs``
        parameter, or a schema whose keys only evaluating it could tell)."""
        schema = self.parameters
        accepts_more = schema.get("additionalProperties") not in (None, False)
        if accepts_more or any(keyword in schema for keyword in _OPEN_KEYWORDS):
            return []
        declared = schema.get("properties")
        if not isinstance(declared, Mapping):
            return []
        return [key for key in arguments if key not in declared]

    def validate_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Check the model's arguments against the schema; ToolError names each bad argument."""
        if self.arguments_model is None:
            return self._check_json(dict(arguments))
        try:
            model = self.arguments_model.model_validate(dict(arguments))
            extra = {key: self._extra_value(key, value) for key, value in (model.model_extra or {}).items()}
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
            raise ToolError(f"invalid arguments for {self.name}: {problems}") from None
        return {**{name: getattr(model, name) for name in type(model).model_fields}, **extra}

    def _extra_value(self, key: str, value: Any) -> Any:
        """A value for the ``**kwargs`` parameter, checked against its annotation."""
        if key == SETTINGS_PARAMETER:  # filled from the YAML; the model never sets it
            raise ToolError(f"invalid arguments for {self.name}: {key}: not an argument of this tool")
        assert self._extra is not None  # only a **kwargs tool's model allows extra keys
        try:
            return self._extra.validate_python(value)
        except ValidationError as exc:
            problems = "; ".join(str(err["msg"]) for err in exc.errors(include_url=False))
            raise ToolError(f"invalid arguments for {self.name}: {key}: {problems}") from None

    def _check_json(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self._validator is None:
            return arguments
        try:
            errors = sorted(self._validator.iter_errors(arguments), key=lambda error: list(error.path))
        except Exception as exc:  # e.g. a $ref that cannot be resolved
            reason = str(exc)[:200] or type(exc).__name__  # e.g. "Unresolvable: https://..."
            raise ToolError(f"cannot check the arguments of {self.name}: {reason}") from None
        if errors:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error.path) or 'arguments'}: {error.message[:200]}"
                for error in errors[:8]
            )
            raise ToolError(f"invalid arguments for {self.name}: {problems}")
        return arguments

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        """Validate, then run the tool (a sync one on a daemon thread of its own). Exceptions
        propagate; a tool that tries to end the process or its thread (SystemExit, or any other
        BaseException a sync tool raises) gets a ToolError instead."""
        values = self.validate_arguments(arguments)
        try:
            if self._is_async:
                return await self.function(**values)
            return await _in_thread(self.function, values, f"qwenrun-tool-{self.name}")
        except (SystemExit, _ThreadExit) as exc:
            raised = exc.exc if isinstance(exc, _ThreadExit) else exc
            shown = repr(raised)[:200]
            message = f"{self.name} raised {shown}; a tool must return a value or raise an Exception"
            raise ToolError(message) from None


class _ThreadExit(Exception):
    """A SystemExit, KeyboardInterrupt, ... that a sync tool raised in its thread."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


async def _in_thread(function: Callable[..., Any], values: Mapping[str, Any], name: str) -> Any:
    """``function(**values)`` on a new daemon thread, awaited.

    Not ``asyncio.to_thread``: the default executor has few workers (CPUs + 4), which sync tools
    that never return would take from every later call, and the process joins its threads at exit,
    so one hung tool would keep ``qwenrun run`` from ever ending. A thread abandoned after the time
    limit costs only itself. StopIteration, which a Future cannot carry, becomes a ToolError."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller stopped waiting (time limit, cancelled turn)
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = context.run(function, **values)
        except StopIteration as exc:
            error = ToolError(f"StopIteration: {exc}")
        except Exception as exc:
            error = exc
        except BaseException as exc:  # SystemExit, _thread.exit(), KeyboardInterrupt
            error = _ThreadExit(exc)
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def format_result(value: Any, limit: int) -> str:
    """Turn any tool return value into bounded text for the model."""
    if isinstance(value, str):
        text = value
    elif value is None:
        text = "(the tool returned nothing)"
    elif isinstance(value, bytes | bytearray | memoryview):
        text = f"(the tool returned {len(bytes(value))} bytes of binary data, not shown)"
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError) as exc:
            text = f"(the tool returned an unprintable {type(value).__name__}: {exc})"
    if len(text) > limit:
        dropped = len(text) - limit
        text = f"{text[:limit]}\n[truncated: {dropped} more characters of {len(text)} not shown]"
    return text


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop pydantic's generated titles; keep everything that constrains the arguments."""

    def clean(node: Any, in_properties: bool = False) -> Any:
        if isinstance(node, dict):
            return {
                key: clean(value, key in ("properties", "$defs", "definitions") and not in_properties)
                for key, value in node.items()
                if in_properties or not (key == "title" and isinstance(value, str))
            }
        if isinstance(node, list):
            return [clean(item) for item in node]
        return node

    cleaned: dict[str, Any] = clean(schema)
    cleaned.setdefault("properties", {})
    return cleaned


def declared_only(tools: Mapping[str, Tool], call: ParsedCall) -> tuple[ParsedCall, dict[str, Any]]:
    """``call`` without the arguments its tool's schema does not declare, and those (name: value);
    the call itself when there are none (or its tool is not among ``tools``)."""
    tool = tools.get(call.name)
    extra = tool.undeclared(call.arguments) if tool is not None else []
    if not extra:
        return call, {}
    dropped = {key: call.arguments[key] for key in extra}
    kept = {key: value for key, value in call.arguments.items() if key not in dropped}
    return dataclasses.replace(call, arguments=kept), dropped


def dropped_notice(call: ParsedCall, dropped: Mapping[str, Any]) -> Notice:
    """The notice that ``dropped`` were taken out of ``call`` before it ran."""
    shown = ", ".join(
        f"{key}={json.dumps(value, ensure_ascii=False)[:200]}" for key, value in dropped.items()
    )
    message = (
        f"{call.name}: dropped {shown}: not in the tool's schema (agent.extra_arguments: reject keeps it)"
    )
    return Notice("extra_arguments", message, call.id, call.name, {"dropped": dict(dropped)})


CANCEL_GRACE_S = 0.5


async def run_call(
    tools: Mapping[str, Tool], call: ParsedCall, *, timeout_s: float, limit: int
) -> ToolResult:
    """Run the model's ``call`` of one of ``tools`` under its time limit (the tool's own, else
    ``timeout_s``). Every failure (unknown tool, bad arguments, an exception, the time limit)
    becomes an ``Error: ...`` result the model can read; only cancelling the caller propagates."""
    tool = tools.get(call.name)
    started = time.perf_counter()
    if tool is None:
        known = ", ".join(tools) or "none"
        return ToolResult(call.id, call.name, f"Error: unknown tool {call.name!r}; available: {known}", True)
    timeout = tool.timeout_s or timeout_s
    task = asyncio.ensure_future(tool.call(call.arguments))
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:  # the turn is cancelled, and with it the tool call
        task.cancel()
        raise
    if not done:
        await _abandon(task, tool.name)
        content, is_error = f"Error: {tool.name} timed out after {timeout:g} s", True
    else:
        try:
            content, is_error = format_result(task.result(), limit), False
        except asyncio.CancelledError:  # raised by the tool itself: this turn was not cancelled
            content, is_error = f"Error: {tool.name} was cancelled", True
        except ToolError as exc:
            content, is_error = format_result(f"Error: {exc}", limit), True
        except Exception as exc:  # a tool's own failure is data for the model, not a crash
            content, is_error = format_result(f"Error: {_describe(exc)}", limit), True
    return ToolResult(call.id, call.name, content, is_error, time.perf_counter() - started)


async def _abandon(task: asyncio.Future[Any], name: str) -> None:
    """Cancel a tool call past its time limit and give it a moment to clean up; unlike
    ``asyncio.wait_for``, never wait longer: a tool that swallows the cancellation would hold
    the turn forever. It is left running (and logged); the turn goes on."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # nothing unretrieved
    finished, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    if not finished:
        log.warning("tool %s ignores cancellation; it was abandoned and may still be running", name)


def _describe(exc: BaseException) -> str:
    """``TypeName: message``, even for an exception whose ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception as problem:
        text = f"(the message cannot be printed: {type(problem).__name__})"
    return f"{type(exc).__name__}: {text}"
