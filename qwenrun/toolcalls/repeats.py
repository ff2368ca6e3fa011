"""Telling, while a completion streams, that it writes again a call that has already run.

Given a tool's result, small models often write the same call again and again until ``max_tokens``
instead of answering. :class:`RepeatWatch` reads a completion as it streams and says as soon as its
answer holds a complete call equal (name and arguments) to one that ``seen`` knows, so that the
caller can stop the generation there and ask for the answer with the tools off. It reads:

* every JSON object ``{"name": ..., "arguments"|"parameters": {...}}`` (or OpenAI's
  ``{"function": {...}}``) of the answer, the moment its closing brace is written: bare, in a
  ```` ```json ```` fence or inside ``<tool_call>`` tags alike (Hermes; an arguments string holding
  JSON counts too), in a list or not, with prose around it or not;
* the complete calls an output parser found (:meth:`saw`): any format, Qwen3-Coder XML included.

Text before a ``</think>`` is reasoning and is not read, nor is an open ``<think>`` block (or a
completion that starts inside one: ``starts_in_reasoning``). Linear in the length of the
completion; pure and stdlib-only, like the rest of :mod:`qwenrun.toolcalls`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from qwenrun.events import ParsedCall

__all__ = ["RepeatWatch", "Seen"]

Seen = Callable[[str, dict[str, Any]], bool]
"""``seen(name, arguments)``: whether this call has already run."""

_OPEN_THINK, _CLOSE_THINK = "<think>", "</think>"
_IN_STRING = re.compile(r'\\|"|\n')  # a raw newline ends a string (as the Hermes parser reads one)
_OUTSIDE = re.compile(r'[{}"]')
_MAX_OBJECT = 100_000  # characters of an open object kept at most (a "{" in prose may never close)
_JSON = json.JSONDecoder(strict=False)


class RepeatWatch:
    """Feed each piece of a completion's text (:meth:`feed`) and each complete call its parser
    returns (:meth:`saw`), or both at once (:meth:`read`); they answer True from the moment a call
    that ``seen`` knows is complete, which :attr:`call` then holds as ``(name, arguments)``."""

    __slots__ = ("_buffer", "_escaped", "_head", "_in_string", "_opens", "_reasoning", "_seen", "_started",
                 "_tail", "call")  # fmt: skip

    def __init__(self, seen: Seen) -> None:
        self._seen = seen
        self._started = False
        self._reasoning = False  # inside a think block: nothing is read until its "</think>"
        self._head: str | None = ""  # the first characters, while they may still open a think block
        self._tail = ""  # the last characters read (a "</think>" cut between two pieces)
        self._buffer = ""  # the answer from the oldest "{" not closed yet
        self._opens: list[int] = []  # where the "{" not closed yet are in the buffer
        self._in_string = self._escaped = False
        self.call: tuple[str, dict[str, Any]] | None = None

    def read(self, text: str, items: Iterable[object], starts_in_reasoning: bool = False) -> bool:
        """:meth:`saw` the complete calls among ``items`` (what an output parser returned for this
        piece), then :meth:`feed` the piece's ``text``."""
        for item in items:
            if isinstance(item, ParsedCall):
                self.saw(item)
        return self.feed(text, starts_in_reasoning)

    def feed(self, text: str, starts_in_reasoning: bool = False) -> bool:
        """Read the next piece of the completion (``starts_in_reasoning``: on the first piece, the
        prompt left a think block open)."""
        if self.call is not None:
            return True
        if not self._started:
            self._started, self._reasoning = True, starts_in_reasoning
        if self._head is not None:
            if self._reasoning:
                self._head = None
            else:
                head = self._head + text
                opening = head.lstrip()
                if len(opening) < len(_OPEN_THINK) and _OPEN_THINK.startswith(opening):
                    self._head = head  # "", "<", "<th", ...: not decided yet
                    return False
                self._head, self._reasoning, text = None, opening.startswith(_OPEN_THINK), head
        read = self._tail + text
        self._tail = read[1 - len(_CLOSE_THINK) :]
        end = read.rfind(_CLOSE_THINK)
        if end >= 0:  # everything before it was reasoning: the answer starts after it
            self._reasoning, self._buffer, self._opens, self._in_string = False, "", [], False
            text = read[end + len(_CLOSE_THINK) :]
        elif self._reasoning:
            return False
        return self._scan(text)

    def saw(self, call: ParsedCall) -> bool:
        """A complete call that the completion's parser read."""
        if self.call is None and call.ok and self._seen(call.name, call.arguments):
            self.call = (call.name, call.arguments)
        return self.call is not None

    def _scan(self, text: str) -> bool:
        if not self._opens:
            self._buffer = ""
        at = len(self._buffer)
        self._buffer += text
        buffer, opens = self._buffer, self._opens
        if self._escaped and at < len(buffer):  # a backslash ended the last piece
            at, self._escaped = at + 1, False
        while at < len(buffer):
            if self._in_string:
                token = _IN_STRING.search(buffer, at)
                if token is None:
                    break
                at = token.end()
                if token.group() == "\\":
                    if at < len(buffer):
                        at += 1
                    else:
                        self._escaped = True
                else:
                    self._in_string = False
                continue
            if not opens:
                start = buffer.find("{", at)
                if start < 0:
                    break
                opens.append(start)
                at = start + 1
                continue
            token = _OUTSIDE.search(buffer, at)
            if token is None:
                break
            at = token.end()
            if token.group() == "{":
                opens.append(token.start())
            elif token.group() == '"':
                self._in_string = True
            elif self._check(buffer[opens.pop() : at]):
                return True
        self._keep()
        return False

    def _keep(self) -> None:
        """Drop the text before the oldest open "{", and a "{" open for too long."""
        opens = self._opens
        while opens and len(self._buffer) - opens[0] > _MAX_OBJECT:
            opens.pop(0)
        if not opens:
            self._buffer, self._in_string, self._escaped = "", False, False
        elif opens[0]:
            cut = opens[0]
            self._buffer = self._buffer[cut:]
            self._opens = [start - cut for start in opens]

    def _check(self, text: str) -> bool:
        if '"name"' not in text:  # not a call: arguments objects, JSON of the answer, ...
            return False
        try:
            value = _JSON.decode(text)
        except (ValueError, RecursionError):
            return False
        call = _call_of(value)
        if call is not None and self._seen(*call):
            self.call = call
        return self.call is not None


def _call_of(value: Any) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of a decoded JSON call object, else None."""
    if not isinstance(value, dict):
        return None
    if "name" not in value and isinstance(value.get("function"), dict):
        value = value["function"]
    name, arguments = value.get("name"), value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = _JSON.decode(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return name, arguments
