"""The XML tool-call format of Qwen3-Coder: model text -> answer text + typed tool calls.

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    value, as many lines as it takes
    </parameter>
    </function>
    </tool_call>

Values are typed by the tool's JSON schema (:mod:`qwenrun.toolcalls.values`); exactly the one
newline the format adds after ``<parameter=ARG>`` and before ``</parameter>`` is removed. One state
machine serves ``parse`` and :class:`Qwen3CoderParser`, so streaming equals one-shot at every
chunking; work is linear in the text; nothing raises. Arguments stream as JSON fragments
(:class:`~qwenrun.events.CallDelta`): a string value as it is written, others when
complete (vLLM #30439); a call without parameters streams ``{}`` (vLLM #28806).

Where a value ends (a value may quote the tags, as code does; the XML analogue of vLLM PR
#45310): inside a value, a closing tag is structural only when what follows it, past
whitespace, continues the format: ``</parameter>`` before ``<parameter=``, ``</function>``,
``</tool_call>``, ``<tool_call>`` or the end; ``</function>`` before ``</tool_call>``,
``<tool_call>`` or the end; ``</tool_call>`` before ``<tool_call>`` or the end. Otherwise it is
text of the value (``if s == "</tool_call>":`` stays in the code). A nested example opened by a
``<tool_call>`` or ``<parameter=`` at a line start of a value is text up to its own closing tag.
A forgotten ``</parameter>`` is recovered at a line-start ``<parameter=`` of another, not yet
given parameter of the tool's schema.

Malformed calls are ToolCalls with ``error`` set and ``arguments == {}``: no ``<function=NAME>``
(a Hermes JSON body is accepted instead), a parameter given twice, a value or a function left
open at the end (output cut by ``max_tokens``). Text after ``</function>`` that is not
``</tool_call>`` ends the call (a forgotten closing tag) and is answer text again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum
from typing import Any

from qwenrun.events import CallDelta, ParsedCall
from qwenrun.toolcalls.base import CallEvent, IdFactory, ParseResult, new_call_id
from qwenrun.toolcalls.values import tool_parameter_types
from qwenrun.toolcalls.xml_call import XmlCall

__all__ = ["Qwen3CoderParser", "parse"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNC, FUNC_END = "<function=", "</function>"
PARAM, PARAM_END = "<parameter=", "</parameter>"
_MAX_NAME = 256
_NAME_RX = re.compile(r"[^\s<>=\"'{}]*")
_WS_RX = re.compile(r"\s*")
_LITERAL_TAGS = (("open", OPEN), ("close", CLOSE), ("func_end", FUNC_END), ("param_end", PARAM_END))
_NAMED_TAGS = (("func", FUNC), ("param", PARAM))
_ALL_TAGS = (OPEN, CLOSE, FUNC_END, PARAM_END, FUNC, PARAM)
# The tags that, after a closing tag inside a value, show that the closing tag is structural.
_CONTINUATIONS = {
    "param_end": ("param", "func_end", "close", "open"),
    "func_end": ("close", "open"),
    "close": ("open",),
}


class _State(Enum):
    OUT = 0  # answer text
    HEAD = 1  # after <tool_call>, before <function=NAME>
    BODY = 2  # inside <function=NAME>, between parameters
    VALUE = 3  # inside <parameter=NAME>
    AFTER = 4  # after </function>, before </tool_call>


class _More:
    """The text ends inside what may be a tag: wait for more."""


_MORE = _More()


def _tag(data: str, i: int, final: bool) -> tuple[str, int, str] | _More | None:
    """The tag at ``data[i] == "<"``: (kind, end, name), None if it is no tag, or _MORE."""
    rest = len(data) - i
    for kind, literal in _LITERAL_TAGS:
        if data.startswith(literal, i):
            return kind, i + len(literal), ""
    for kind, prefix in _NAMED_TAGS:
        if data.startswith(prefix, i):
            start = i + len(prefix)
            end = _NAME_RX.match(data, start, start + _MAX_NAME + 1).end()  # type: ignore[union-attr]
            if end < len(data) and data[end] == ">" and start < end <= start + _MAX_NAME:
                return kind, end + 1, data[start:end]
            if end == len(data) and end - start <= _MAX_NAME and not final:
                return _MORE
            return "bad_" + kind, start, ""
    if not final and rest < len(CLOSE):
        fragment = data[i:]
        if any(tag.startswith(fragment) for tag in _ALL_TAGS):
            return _MORE
    return None


def _held_prefix(s: str, start: int) -> int:
    """Length of the longest suffix of ``s[start:]`` that is a proper prefix of OPEN."""
    for n in range(min(len(OPEN) - 1, len(s) - start), 0, -1):
        if s.endswith(OPEN[:n]):
            return n
    return 0


class Qwen3CoderParser:
    """Incremental parser of Qwen3-Coder output. ``tools``: the OpenAI tools of the request (their
    schemas type the values; without them every value is a string). A Hermes JSON body inside
    ``<tool_call>`` is read too; bare JSON calls are read over any format
    (:mod:`qwenrun.toolcalls.lenient`)."""

    def __init__(
        self, tools: Sequence[dict[str, Any]] | None = None, new_id: IdFactory = new_call_id
    ) -> None:
        self._types = tool_parameter_types(tools)
        self._new_id = new_id
        self._state = _State.OUT
        self._tail = ""
        self._text: list[str] = []
        self._calls: list[ParsedCall] = []
        self._call: XmlCall | None = None
        self._pending: str | None = None  # a closing tag inside a value, its role not decided yet
        self._pending_text: list[str] = []
        self._nested_calls = self._nested_params = 0  # open tags of an example quoted in a value
        self._out: list[CallEvent] = []
        self._finished = False

    def feed(self, chunk: str) -> list[CallEvent]:
        if self._finished:
            raise RuntimeError("Qwen3CoderParser.feed() called after finish()")
        if self._tail or "<" in chunk or not chunk:
            return self._run(self._tail + chunk, final=False)
        if self._state is _State.OUT:  # plain text: the hot path
            self._text.append(chunk)
            return [chunk]
        if self._state is _State.VALUE and self._pending is None:  # a value going on: the other one
            assert self._call is not None
            self._out = []
            self._call.value_text(chunk)
            return self._out
        return self._run(chunk, final=False)

    def finish(self) -> list[CallEvent]:
        if self._finished:
            return []
        self._finished = True
        return self._run(self._tail, final=True)

    def result(self) -> ParseResult:
        """The parse so far; after ``finish()`` equal to ``parse(full_text)``."""
        return ParseResult("".join(self._text).strip(), list(self._calls))

    # -- the state machine ----------------------------------------------------------------------

    def _run(self, data: str, final: bool) -> list[CallEvent]:
        self._out, self._tail = [], ""
        i, n = 0, len(data)
        while True:
            state = self._state
            if state is _State.OUT:
                k = data.find(OPEN, i)
                end = k if k >= 0 else n - (0 if final else _held_prefix(data, i))
                self._emit_text(data[i:end])
                if k < 0:
                    self._tail = data[end:]
                    return self._out
                self._open()
                i = k + len(OPEN)
                continue
            if state is _State.VALUE and self._pending is not None:
                i = self._resolve(data, i, final)
            elif state is _State.AFTER:
                i = self._after(data, i, final)
            else:
                k = data.find("<", i)
                if k < 0:
                    self._consume(data[i:])
                    i = n
                else:
                    self._consume(data[i:k])
                    tag = _tag(data, k, final)
                    if isinstance(tag, _More):
                        self._tail = data[k:]
                        return self._out
                    i = self._on_tag(data, k, tag)
            if i < 0:  # waiting for more text
                return self._out
            if i >= n and self._state is not _State.OUT:
                if final:
                    self._end_of_text()
                    continue  # back in OUT with nothing left
                return self._out

    def _consume(self, text: str) -> None:
        """Text inside a call that is not a tag: part of a value, or ignored (kept in ``raw``)."""
        assert self._call is not None
        if not text:
            return
        if self._state is _State.VALUE:
            self._call.value_text(text)
        else:
            self._call.raw.append(text)

    def _on_tag(self, data: str, k: int, tag: tuple[str, int, str] | None) -> int:
        """Handle what starts at ``data[k] == "<"`` in HEAD, BODY or VALUE; return where to go on."""
        call = self._call
        assert call is not None
        kind, end, name = tag if tag is not None else ("text", k + 1, "")
        written = data[k:end]
        state = self._state
        if state is _State.VALUE:
            return self._value_tag(kind, end, name, written)
        if kind == "open":
            self._close()
            self._open()
            return end
        if kind == "close":
            self._close()
            return end
        call.raw.append(written)
        if state is _State.HEAD:
            if kind == "func":
                call.start_function(name)
                self._state = _State.BODY
            elif kind == "bad_func":
                call.fail("malformed <function=NAME> tag")
            return end
        if kind == "param":  # BODY
            self._start_value(name)
        elif kind == "bad_param":
            call.fail("malformed <parameter=NAME> tag")
        elif kind == "func_end":
            self._state = _State.AFTER
        return end

    def _value_tag(self, kind: str, end: int, name: str, written: str) -> int:
        call = self._call
        assert call is not None
        line_start = call.line_start
        if self._nested_calls or self._nested_params:  # inside a quoted example: count its tags
            if kind == "open" and line_start:
                self._nested_calls += 1
            elif kind == "close" and self._nested_calls:
                self._nested_calls -= 1
            elif kind == "param" and line_start:
                self._nested_params += 1
            elif kind == "param_end" and self._nested_params:
                self._nested_params -= 1
        elif kind in ("param_end", "func_end", "close"):
            self._pending, self._pending_text = kind, [written]
            return end
        elif kind == "param" and line_start:
            if call.is_next_param(name):  # a forgotten </parameter>
                call.raw.append(written)
                call.end_value()
                self._start_value(name)
                return end
            self._nested_params += 1
        elif kind == "open" and line_start:
            self._nested_calls += 1
        call.value_text(written)
        return end

    def _resolve(self, data: str, i: int, final: bool) -> int:
        """Decide a closing tag seen inside a value by what follows it."""
        call, pending = self._call, self._pending
        assert call is not None and pending is not None
        j = _WS_RX.match(data, i).end()  # type: ignore[union-attr]
        self._pending_text.append(data[i:j])
        if j == len(data) and not final:
            return j
        structural = j == len(data)
        if not structural and data[j] == "<":
            tag = _tag(data, j, final)
            if isinstance(tag, _More):
                self._tail = data[j:]
                return -1
            structural = tag is not None and tag[0] in _CONTINUATIONS[pending]
        text = "".join(self._pending_text)
        self._pending, self._pending_text = None, []
        if not structural:
            call.value_text(text)
            return j
        if pending == "close":  # the call ends here; the whitespace after the tag is answer text
            self._close()
            self._emit_text(text[len(CLOSE) :])
            return j
        call.raw.append(text)
        call.end_value()
        self._state = _State.BODY if pending == "param_end" else _State.AFTER
        return j

    def _after(self, data: str, i: int, final: bool) -> int:
        """After ``</function>``: whitespace, then ``</tool_call>``; anything else ends the call."""
        call = self._call
        assert call is not None
        j = _WS_RX.match(data, i).end()  # type: ignore[union-attr]
        call.raw.append(data[i:j])
        if j == len(data):
            return j
        if data[j] == "<":
            tag = _tag(data, j, final)
            if isinstance(tag, _More):
                self._tail = data[j:]
                return -1
            if tag is not None and tag[0] == "close":
                self._close()
                return tag[1]
        self._close()
        return j

    def _end_of_text(self) -> None:
        """The text ended inside a call."""
        call = self._call
        assert call is not None
        if self._state is _State.VALUE:
            call.fail(f"parameter {call.value_name!r} is not closed (the output was cut?)")
        elif self._state is _State.BODY:
            call.fail(f"<function={call.name}> is not closed (the output was cut?)")
        self._close()

    # -- events and calls -----------------------------------------------------------------------

    def _emit_text(self, text: str) -> None:
        if text:
            self._text.append(text)
            self._out.append(text)

    def _emit_delta(self, delta: CallDelta) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, CallDelta) and last.index == delta.index:  # one delta per feed
            self._out[-1] = CallDelta(last.index, last.id, last.name, last.arguments + delta.arguments)
        else:
            self._out.append(delta)

    def _open(self) -> None:
        self._call = XmlCall(len(self._calls), self._new_id(), self._types, self._emit_delta)
        self._state = _State.HEAD

    def _start_value(self, name: str) -> None:
        assert self._call is not None
        self._call.start_value(name)
        self._state = _State.VALUE
        self._nested_calls = self._nested_params = 0

    def _close(self) -> None:
        """The current call is complete (or as complete as it will get)."""
        assert self._call is not None
        done = self._call.finish(headless=self._state is _State.HEAD)
        self._calls.append(done)
        self._out.append(done)
        self._call, self._pending, self._state = None, None, _State.OUT


def parse(
    text: str, tools: Sequence[dict[str, Any]] | None = None, new_id: IdFactory = new_call_id
) -> ParseResult:
    """Split Qwen3-Coder output into answer text and tool calls. Never raises."""
    parser = Qwen3CoderParser(tools, new_id)
    parser.feed(text)
    parser.finish()
    return parser.result()
