"""Qwen3's thinking: ``<think>…</think>`` read as reasoning, apart from the answer text.

Qwen3 writes one thinking block at the very start of its output, then the answer (and tool
calls). Two template styles exist, so the caller says where the output starts:

* ``start_in_reasoning=False`` (Qwen3, Qwen3-2507 Instruct, Qwen2.5, Qwen3-Coder): the output is
  answer text unless its first non-blank text is ``<think>``; that block is reasoning up to
  ``</think>``. With ``enable_thinking=False`` the template already holds an empty
  ``<think>\\n\\n</think>\\n\\n`` and the model writes the answer only.
* ``start_in_reasoning=True`` (Qwen3 Thinking-2507 and later templates, whose prompt ends with
  ``<think>\\n``): the output starts inside the block and only ``</think>`` appears (a repeated
  opening ``<think>`` is dropped). :func:`prompt_opens_thinking` tells from the rendered prompt.
* ``start_in_reasoning=None``: nobody can tell (a remote endpoint's template, ``qwenrun parse``
  without ``--model``). As above when the output starts with ``<think>``; else everything before a
  *lone* ``</think>`` (one before any ``<think>`` or ``<tool_call>``) is reasoning, as vLLM's
  ``qwen3`` reasoning parser reads it. Until the first of those three tags (or the end) the text
  cannot be told apart, so it is held back: it comes out as reasoning at a ``</think>``, as answer
  text at a ``<think>``, a ``<tool_call>`` or the end. (vLLM streams it as reasoning and calls it
  all reasoning when no ``</think>`` comes, which is wrong for a model that does not think.)

A block left open at the end (output cut by ``max_tokens``) is all reasoning. After the block
everything is answer text, tags included: only the first block counts, as in vLLM's ``qwen3``
reasoning parser, so a tool argument that quotes ``<think>`` is not cut. Text inside the block is
never a tool call: ``<tool_call>`` there is reasoning (a model thinking about a call has not
made it). Leading blank text of each part and trailing blank text of the reasoning are dropped.
Streaming and one-shot agree at every chunking; linear time; never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from qwenrun.events import Reasoning

__all__ = ["ThinkingParser", "ThinkingResult", "prompt_opens_thinking", "split_thinking"]

THINK, END_THINK = "<think>", "</think>"
_BLANK = re.compile(r"\s*")
_DECIDING = re.compile(r"</think>|<think>|<tool_call>")  # the tags that end undecided text
_DECIDING_TAGS = (END_THINK, THINK, "<tool_call>")


@dataclass(frozen=True, slots=True)
class ThinkingResult:
    reasoning: str  # without the tags, stripped
    content: str  # everything else, as written (leading blank text dropped)


class _State(Enum):
    START = 0  # before the first non-blank text: a <think> opens reasoning, else answer
    REASON_START = 1  # inside reasoning, before its first non-blank text: a <think> is dropped
    REASON = 2
    CONTENT = 3
    UNDECIDED = 4  # start_in_reasoning=None, after the first non-blank text: reasoning or answer?


def _held(s: str, start: int, tag: str) -> int:
    """Length of the longest suffix of ``s[start:]`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(s) - start), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0


def _held_deciding(s: str, start: int) -> int:
    """Length of the suffix of ``s[start:]`` that is a proper prefix of a deciding tag (a tag has
    one ``<``, its first character, so only the last ``<`` can start one)."""
    k = s.rfind("<", max(start, len(s) - len(_DECIDING_TAGS[2]) + 1))
    if k < 0:
        return 0
    rest = s[k:]
    return len(rest) if any(tag.startswith(rest) for tag in _DECIDING_TAGS) else 0


def prompt_opens_thinking(prompt: str) -> bool:
    """True when a rendered prompt ends inside an open ``<think>`` block (Qwen3 Thinking-2507
    templates), so the model's output starts as reasoning."""
    return prompt[-256:].rstrip().endswith(THINK)  # the tail only: prompts are long, this runs per call


class ThinkingParser:
    """Incremental splitter. ``feed`` returns ``str`` (answer text) and
    :class:`~qwenrun.events.Reasoning` (a piece of the thinking).
    ``start_in_reasoning``: True, False, or None where nobody can tell (see the module doc)."""

    def __init__(self, *, start_in_reasoning: bool | None = False) -> None:
        self._state = _State.REASON_START if start_in_reasoning else _State.START
        self._unknown = start_in_reasoning is None
        self._undecided: list[str] = []  # UNDECIDED: the text held back so far
        self._tail = ""
        self._lead = True  # at the start of a part: blank text is dropped
        self._blank: list[str] = []  # trailing blank reasoning held back
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._out: list[str | Reasoning] = []
        self._finished = False

    def feed(self, chunk: str) -> list[str | Reasoning]:
        if self._finished:
            raise RuntimeError("ThinkingParser.feed() called after finish()")
        if self._state is _State.CONTENT and not self._lead:  # the answer: the hot path
            if chunk:
                self._content.append(chunk)
                return [chunk]
            return []
        return self._run(self._tail + chunk, final=False)

    def finish(self) -> list[str | Reasoning]:
        if self._finished:
            return []
        self._finished = True
        return self._run(self._tail, final=True)

    @property
    def answering(self) -> bool:
        """In the answer for good: every later chunk is answer text as it is."""
        return self._state is _State.CONTENT and not self._lead

    def result(self) -> ThinkingResult:
        return ThinkingResult("".join(self._reasoning), "".join(self._content))

    def _run(self, data: str, final: bool) -> list[str | Reasoning]:
        self._out, self._tail = [], ""
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state is _State.CONTENT:
                self._answer(data[i:])
                return self._out
            if state is _State.UNDECIDED:
                i = self._undecided_text(data, i, final)
                if i < 0:
                    return self._out
                continue
            if state is _State.REASON:
                k = data.find(END_THINK, i)
                end = k if k >= 0 else n - (0 if final else _held(data, i, END_THINK))
                self._think(data[i:end])
                if k < 0:
                    self._tail = data[end:]
                    return self._out
                self._state, self._lead, self._blank = _State.CONTENT, True, []
                i = k + len(END_THINK)
                continue
            j = _BLANK.match(data, i).end()  # type: ignore[union-attr]  # START or REASON_START
            if j == n:
                return self._out  # blank text so far: dropped either way
            if data.startswith(THINK, j):
                self._state, self._lead = _State.REASON, True
                i = j + len(THINK)
            elif not final and THINK.startswith(data[j : j + len(THINK)]):
                self._tail = data[j:]  # "<thi" at the end: wait
                return self._out
            elif state is _State.REASON_START:
                self._state, i = _State.REASON, j
            else:
                self._state, i = (_State.UNDECIDED if self._unknown else _State.CONTENT), j
        if final and self._state is _State.UNDECIDED:  # the end decides: answer text
            self._undecided_text(data, n, final)
        return self._out

    def _undecided_text(self, data: str, i: int, final: bool) -> int:
        """UNDECIDED: hold the text back up to the first deciding tag, then read it as reasoning
        (a lone ``</think>``, dropped) or as answer text (``<think>``, ``<tool_call>``: kept, or
        the end). Returns where to go on, or -1 when all of ``data`` is used up."""
        m = _DECIDING.search(data, i)
        if m is None:
            end = len(data) - (0 if final else _held_deciding(data, i))
            self._undecided.append(data[i:end])
            if not final:
                self._tail = data[end:]
                return -1
        else:
            self._undecided.append(data[i : m.start()])
        held, self._undecided = "".join(self._undecided), []
        if m is not None and m.group() == END_THINK:
            self._state, self._lead = _State.REASON, True
            self._think(held)
            self._state, self._lead, self._blank = _State.CONTENT, True, []
            return m.end()
        self._state, self._lead = _State.CONTENT, True
        self._answer(held)
        return len(data) if m is None else m.start()

    def _answer(self, text: str) -> None:
        if self._lead:
            text = text.lstrip()
            self._lead = not text
        if text:
            self._content.append(text)
            self._out.append(text)

    def _think(self, text: str) -> None:
        if self._lead:
            text = text.lstrip()
            self._lead = not text
        if not text:
            return
        body = text.rstrip()
        if not body:  # blank: held until more reasoning shows it is not trailing
            self._blank.append(text)
            return
        piece = "".join(self._blank) + body
        self._blank = [text[len(body) :]] if len(body) < len(text) else []
        self._reasoning.append(piece)
        self._out.append(Reasoning(piece))


def split_thinking(text: str, *, start_in_reasoning: bool | None = False) -> ThinkingResult:
    """One-shot :class:`ThinkingParser`: the reasoning and the answer text of one output."""
    parser = ThinkingParser(start_in_reasoning=start_in_reasoning)
    parser.feed(text)
    parser.finish()
    return parser.result()
