"""One Qwen3-Coder tool call as it is read: its name, typed arguments and their streamed JSON.

The parser (:mod:`qwenrun.toolcalls.qwen3_coder`) finds the tags; :class:`XmlCall` turns what
lies between them into a :class:`~qwenrun.events.ParsedCall` and, on the way, into the JSON
fragments of its arguments (:class:`~qwenrun.events.CallDelta`): ``{`` with the
name, each string value as it is written (all but a trailing newline, which may be the one the
format adds; a nullable string only once it cannot be ``null``), other values when complete, ``}``
at the end. Concatenated, the fragments are ``ParsedCall.arguments_json()`` of a well-formed call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # C-accelerated
from typing import Any

from qwenrun.events import CallDelta, ParsedCall
from qwenrun.toolcalls import hermes
from qwenrun.toolcalls.values import OMIT, STRING, ParamType, convert

__all__ = ["XmlCall"]

_NULLS = ("null", "none")


def _escape(text: str) -> str:
    """``text`` as the inside of a JSON string (as ``json.dumps(..., ensure_ascii=False)`` writes it)."""
    return str(encode_basestring(text))[1:-1]


class _Value:
    """The parameter value being read."""

    def __init__(self, name: str, ptype: ParamType) -> None:
        self.name, self.ptype = name, ptype
        self.parts: list[str] = []
        self.started = False  # its first character (a newline to drop?) has been seen
        self.line_start = True
        self.unsent = ""  # string values: text held back (a trailing newline, a maybe-null)
        self.quoted = False  # the opening quote was sent


class XmlCall:
    """The call between ``<tool_call>`` and its end. ``types``: ``{function: {param: type}}``;
    ``emit`` receives the argument deltas as they become certain."""

    def __init__(
        self,
        index: int,
        call_id: str,
        types: dict[str, dict[str, ParamType]],
        emit: Callable[[CallDelta], None],
    ) -> None:
        self.index, self.id = index, call_id
        self.name = ""
        self.raw: list[str] = []  # everything between the tags, as written
        self.error: str | None = None
        self._all_types = types
        self._types: dict[str, ParamType] = {}
        self._args: dict[str, Any] = {}
        self._value: _Value | None = None
        self._emit = emit
        self._streaming = False  # the header was sent and nothing went wrong since
        self._keys = 0

    @property
    def value_name(self) -> str:
        return self._value.name if self._value is not None else ""

    @property
    def line_start(self) -> bool:
        """The value so far is empty or ends with a newline."""
        return self._value is None or self._value.line_start

    def is_next_param(self, name: str) -> bool:
        """``name`` is a parameter of the tool's schema other than the current one, not yet given."""
        current = self._value.name if self._value is not None else None
        return name in self._types and name != current and name not in self._args

    def fail(self, error: str) -> None:
        self.error = self.error or error
        self._streaming = False

    def start_function(self, name: str) -> None:
        self.name, self._types = name, self._all_types.get(name, {})
        if self.error is None:
            self._streaming = True
            self._emit(CallDelta(self.index, self.id, name, "{"))

    def start_value(self, name: str) -> None:
        value = self._value = _Value(name, self._types.get(name, STRING))
        if name in self._args:
            self.fail(f"parameter {name!r} is given twice")
        else:
            self._args[name] = OMIT  # a placeholder that keeps the order; removed if omitted
        if value.ptype.streams:
            self._send(self._key(name))
            if not value.ptype.nullable:
                value.quoted = True
                self._send('"')

    def value_text(self, text: str) -> None:
        value = self._value
        assert value is not None
        self.raw.append(text)
        if not value.started:
            value.started = True
            text = text[1:] if text.startswith("\n") else text
            if not text:
                return
        value.parts.append(text)
        value.line_start = text.endswith("\n")
        if value.ptype.streams:
            value.unsent += text
            self._flush(value, final=False)

    def end_value(self) -> None:
        value = self._value
        assert value is not None
        text = "".join(value.parts)
        text = text[:-1] if text.endswith("\n") else text
        converted = convert(text, value.ptype)
        if self._args.get(value.name) is OMIT:  # the first value of this name
            if converted is OMIT:
                del self._args[value.name]
            else:
                self._args[value.name] = converted
        if value.ptype.streams:
            self._flush(value, final=True)
        elif converted is not OMIT:
            self._send(self._key(value.name) + json.dumps(converted, ensure_ascii=False))
        self._value = None

    def finish(self, headless: bool = False) -> ParsedCall:
        """The completed call. ``headless``: no ``<function=NAME>`` was found; the body may be
        Hermes JSON (``{"name": ..., "arguments": ...}``), which is accepted."""
        if self._value is not None:
            self.end_value()
        raw = "".join(self.raw)
        if headless and self.error is None:
            self._from_json(raw)
        elif not self.name:
            self.fail("no <function=NAME> in the tool call")
        if self.error is None and self._streaming:
            self._send("}")
        return ParsedCall(self.id, self.name, {} if self.error else self._args, raw, self.error)

    def _from_json(self, raw: str) -> None:
        calls = hermes.parse(f"<tool_call>{raw}</tool_call>", lambda: self.id).tool_calls
        if len(calls) == 1 and calls[0].ok:
            self.name, self._args = calls[0].name, dict(calls[0].arguments)
            self._emit(CallDelta(self.index, self.id, self.name, calls[0].arguments_json()))
        else:
            self.fail("no <function=NAME> in the tool call")

    def _send(self, fragment: str) -> None:
        if self._streaming and fragment:
            self._emit(CallDelta(self.index, self.id, None, fragment))

    def _key(self, name: str) -> str:
        comma = ", " if self._keys else ""
        self._keys += 1
        return f"{comma}{json.dumps(name, ensure_ascii=False)}: "

    def _flush(self, value: _Value, final: bool) -> None:
        text = value.unsent
        body = text[:-1] if text.endswith("\n") else text
        if not value.quoted:  # a nullable string: "null" / "None" is JSON null
            maybe_null = len(body) <= 4 and any(word.startswith(body.lower()) for word in _NULLS)
            if maybe_null and not final:
                return
            if final and body.lower() in _NULLS:
                value.unsent = ""
                self._send("null")
                return
            value.quoted = True
            self._send('"')
        value.unsent = "" if final else text[len(body) :]
        self._send(_escape(body))
        if final:
            self._send('"')
