"""Lenient reading: an answer written as bare JSON calls is read as calls, in every format.

Small Qwen models, taught tags (Hermes ``<tool_call>`` JSON or Qwen3-Coder XML), often answer with
the call itself: ``{"name": ..., "arguments": {...}}``, several, a list, in a ```` ```json ````
fence. :class:`LenientParser` wraps the parser of any format (``new_parser(..., lenient=True)``)
and reads such an answer as calls of the *declared* tools (``tools``) in two shapes only:

* the whole answer is such JSON (:func:`~qwenrun.toolcalls.hermes.bare_calls`: every object names
  a declared tool with an object, or no, argument list; a broken object that names one is a
  malformed call, which the agent repairs);
* one line of prose (at most ``MAX_PROSE`` characters) and then such JSON, with nothing but
  whitespace after it: ``Here is the call: {...}``. Here every call must be well-formed, and the
  prose is the answer's text.

Anything else stays text: a name that is not declared, JSON inside prose, text after it, a second
line of prose, a tagged call anywhere in the answer (tags win). The JSON must open as a call does
(``{`` then a quoted key, possibly inside ``[`` or a fence), so ``[1]`` or a fenced block of code is
told apart early. While streaming, the answer's text is held back only from where such JSON may
begin (``{``, ``[`` or ```` ``` ```` within the first line of prose): to the end when it opens as a
call, else until it cannot; the prose before it is text either way and streams. So streaming
equals one-shot at every chunking.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from qwenrun.events import CallDelta, ParsedCall
from qwenrun.toolcalls.base import CallEvent, IdFactory, ParseResult, ToolCallParser, new_call_id
from qwenrun.toolcalls.hermes import bare_calls

__all__ = ["MAX_PROSE", "LenientParser", "lenient_calls"]

MAX_PROSE = 200
"""The longest line of prose before a bare call (``Here is the call:``) that is read with it."""

_LANG = re.compile(r"[\w+.-]")  # a character of a fence's language name


class _Opening:
    """Reads the start of an answer (no leading blank), one character at a time, until it can tell
    whether the answer may be bare calls: ``verdict`` True (one line of prose at most, then ``{``,
    ``[`` or a fence that opens as a JSON call does: a fence header, ``{`` after whitespace, commas
    and ``[``, then a quoted key), False (it cannot be), None (cannot tell yet). ``opener`` is where
    the JSON starts. Linear: each character is looked at once, and none after the verdict."""

    __slots__ = ("newline", "opener", "phase", "pos", "ticks", "verdict")

    def __init__(self) -> None:
        self.pos = 0  # characters read
        self.phase = "prose"  # prose | lang (a fence's language) | before (the "{") | key
        self.newline = False  # a newline in the prose: only blank text may follow before the JSON
        self.ticks = 0  # the backticks at the end of the prose (3 open a fence)
        self.opener = -1
        self.verdict: bool | None = None

    def feed(self, text: str) -> bool | None:
        for char in text:
            if self.verdict is not None:
                break
            self._step(char)
            self.pos += 1
        return self.verdict

    def _step(self, char: str) -> None:
        phase = self.phase
        if phase == "prose":
            self._prose(char)
        elif phase == "lang" and _LANG.match(char):
            pass
        elif phase in ("lang", "before") and (char.isspace() or char in ",["):
            self.phase = "before"
        elif phase in ("lang", "before"):
            self.phase, self.verdict = ("key", None) if char == "{" else (phase, False)
        elif not char.isspace():  # key: the first key of the object must be quoted
            self.verdict = char in "\"'"

    def _prose(self, char: str) -> None:
        if char == "`":
            self.ticks += 1
            if self.ticks == 3:
                self._open(self.pos - 2, "lang")
            elif self.pos - self.ticks + 1 > MAX_PROSE:
                self.verdict = False
            return
        if self.ticks and self.newline:  # a second line of prose, starting with `
            self.verdict = False
            return
        self.ticks = 0
        if char in "{[":
            self._open(self.pos, "key" if char == "{" else "before")
        elif char == "\n":
            self.newline = True
        elif not char.isspace() and self.newline:  # a second line of prose
            self.verdict = False
        if self.verdict is None and self.phase == "prose" and self.pos + 1 > MAX_PROSE:
            self.verdict = False  # the JSON would come after more than MAX_PROSE characters

    def _open(self, at: int, phase: str) -> None:
        if at > MAX_PROSE:
            self.verdict = False
        else:
            self.opener, self.phase = at, phase


def lenient_calls(
    text: str, tools: Collection[str], new_id: IdFactory = new_call_id
) -> tuple[str, list[ParsedCall]] | None:
    """(prose, calls) when the answer ``text`` is bare JSON calls of the declared ``tools``, alone
    or after one line of prose (see the module doc); None when it is anything else. Never raises."""
    stripped = text.strip()
    opening = _Opening()
    if not tools or opening.feed(stripped) is not True:
        return None
    prose, body = stripped[: opening.opener], stripped[opening.opener :]
    calls = bare_calls(body, tools, new_id)
    if calls is None or (prose and not all(call.ok for call in calls)):
        return None
    return prose.rstrip(), calls


class LenientParser:
    """A format's parser that also reads an answer of bare JSON calls of ``tools`` (their names).
    The inner parser's text passes on, but from where bare JSON may begin (``{``, ``[``, a fence)
    it is held back while the answer may still be such calls; a tagged call (any other event)
    releases it. A line of prose before the JSON is the answer's text either way: it streams."""

    def __init__(
        self, inner: ToolCallParser, tools: Collection[str], new_id: IdFactory = new_call_id
    ) -> None:
        self._inner = inner
        self._tools = frozenset(tools)
        self._new_id = new_id
        self._held: list[str] | None = [] if self._tools else None  # None: not holding (any more)
        self._opening = _Opening()  # reads the answer until it can tell
        self._prose: list[str] = []  # the answer's text passed on so far (at most a line)
        self._passed = 0  # its length (the answer's leading blank not counted)
        self._started = False  # the answer's first non-blank text came
        self._found: tuple[str, list[ParsedCall]] | None = None

    def feed(self, chunk: str) -> list[CallEvent]:
        events = self._inner.feed(chunk)
        return events if self._held is None else self._hold(events)

    def finish(self) -> list[CallEvent]:
        events = self._inner.finish()
        if self._held is None:
            return events
        out = self._hold(events)
        if self._held is None:
            return out
        found = lenient_calls("".join(self._prose + self._held), self._tools, self._new_id)
        if found is None:
            self._release(out)
            return out
        self._found, self._held = found, None
        for index, call in enumerate(found[1]):  # the prose before them is passed on already
            if call.ok:
                out.append(CallDelta(index, call.id, call.name, call.arguments_json()))
            out.append(call)
        return out

    def result(self) -> ParseResult:
        """The parse so far; after ``finish()`` equal to the one-shot parse of the whole text."""
        if self._found is not None:
            prose, calls = self._found
            return ParseResult(prose, list(calls))
        return self._inner.result()

    def _hold(self, events: list[CallEvent]) -> list[CallEvent]:
        out: list[CallEvent] = []
        for event in events:
            held = self._held
            if held is None:
                out.append(event)
            elif not isinstance(event, str):  # a tagged call: the answer is no bare call
                self._release(out)
                out.append(event)
            else:
                self._text(event, held, out)
        return out

    def _text(self, text: str, held: list[str], out: list[CallEvent]) -> None:
        """Pass on what is prose for sure, hold back what may begin bare JSON."""
        if not self._started:  # the answer's leading blank is text either way
            body = text.lstrip()
            if len(body) < len(text):
                out.append(text[: len(text) - len(body)])
            if not body:
                return
            text, self._started = body, True
        opening = self._opening
        opened = opening.opener >= 0  # the JSON began earlier: all of it is held
        verdict = opening.feed(text)
        if verdict is False:
            held.append(text)
            self._release(out)
            return
        if opened:
            held.append(text)
            return
        begins = opening.opener if opening.opener >= 0 else opening.pos - opening.ticks
        pending = "".join(held) + text  # short: held before an opener are at most two backticks
        cut = begins - self._passed
        if cut > 0:
            self._prose.append(pending[:cut])
            out.append(pending[:cut])
            self._passed = begins
        held[:] = [pending[cut:]] if cut < len(pending) else []

    def _release(self, out: list[CallEvent]) -> None:
        """Stop holding text back: pass on what was held and stream from now on."""
        if self._held:
            out.append("".join(self._held))
        self._held = None
