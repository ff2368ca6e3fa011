"""Hermes-format tool-call parser for Qwen2.5 output: model text -> plain text + tool calls.

Pure and stdlib-only (no vLLM import); used by the agent loop and the OpenAI-compatible server.
``parse`` is the one-shot form, ``StreamParser`` the incremental one; both run the same state
machine, so for any chunking ``StreamParser.result()`` equals ``parse(full_text)``. Nothing here
raises on any input string: a block that cannot be understood becomes a
:class:`~qwenrun.events.ParsedCall` with ``error`` set (the caller turns it into a repair attempt).

Block boundaries (lessons from vLLM's hermes_tool_parser, issues #45167/#38168):

* ``<tool_call>`` opens a block; text outside blocks (a stray ``</tool_call>`` too) is content.
* Inside a block, double-quoted JSON strings are tracked. A ``</tool_call>`` outside a string
  closes the block. One inside a string whose closing quote comes on the same line is part of
  the string (a tool argument may quote the tag). A raw newline ends string tracking, so a
  stray quote cannot swallow Qwen's usual ``\\n</tool_call>``; and a tag inside a string left
  unterminated on its line (or at the end) does close the block, the rest being re-read.
  After ``_MAX_RESCUES`` such re-reads the first tag seen closes the block (linear time bound).
* ``<tool_call>`` outside a string inside a block closes it and opens a new one (a forgotten
  closing tag); an unclosed last block (e.g. cut by max_tokens) is parsed at the end.

Bare JSON calls: :func:`bare_calls` reads an answer that is nothing but JSON calls of declared
tools, ``{"name": ..., "arguments": {...}}`` (several, a list, in ```` ```json ```` fences); a broken
object that still names a declared tool is a malformed call (the agent repairs it). Reading them
from a stream, in any format, is :mod:`qwenrun.toolcalls.lenient`.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from qwenrun.events import ParsedCall
from qwenrun.toolcalls.base import IdFactory, ParseResult, new_call_id

__all__ = ["FORCED_PREFILL", "StreamParser", "bare_calls", "forced_call", "intended_tool", "parse"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_KEEP = len(CLOSE) - 1  # longest tag prefix that may be cut at a chunk border
_OUT_RX = re.compile(r'"|<tool_call>|</tool_call>')  # tokens outside a JSON string
_IN_RX = re.compile(r'\\[^\n]|"|\n|</tool_call>')  # tokens inside one
_FENCE_RX = re.compile(r"\A```[\w+.-]*")
_MAX_LITERAL = 100_000
_FENCED_RX = re.compile(r"```[\w+.-]*[ \t]*\n?(.*?)```", re.DOTALL)  # one fenced block, lazily
_BARE_NAME_RX = re.compile(r"""\A[\s\[]*\{\s*["']name["']\s*:\s*["']([^"'\n]{1,200})["']""")
_MAX_RESCUES = 16
_JSON = json.JSONDecoder(strict=False)  # strict=False: raw control chars (newlines) in strings


def _decode(s: str) -> tuple[Any, str | None]:
    """JSON (trailing garbage ignored), else a Python literal (single quotes); (obj, error)."""
    try:
        return _JSON.raw_decode(s)[0], None
    except json.JSONDecodeError as e:
        err = f"invalid JSON at char {e.pos}: {e.msg}"
    except Exception as e:  # RecursionError, MemoryError, ...
        err = f"invalid JSON: {type(e).__name__}"
    end = s.rfind("}") + 1
    for cand in (s, s[:end]) if 0 < end < len(s) else (s,):
        if len(cand) <= _MAX_LITERAL:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # odd escapes warn; process-global, harmless
                    return ast.literal_eval(cand), None
            except Exception:  # literal_eval raises ValueError, SyntaxError, RecursionError, ...
                pass
    return None, err


def _interpret(raw: str) -> tuple[str, dict[str, Any], str | None]:
    """Recover (name, arguments, error) from the text of one block."""
    s = raw.strip()
    if s.startswith("```"):
        s = _FENCE_RX.sub("", s, count=1).strip()
        s = s[:-3].strip() if s.endswith("```") else s
    if not s:
        return "", {}, "empty tool call"
    obj, err = _decode(s)
    if err is not None:
        return "", {}, err
    return _fields(obj)


def _fields(obj: Any) -> tuple[str, dict[str, Any], str | None]:
    """(name, arguments, error) of a decoded call object."""
    if not isinstance(obj, dict):
        return "", {}, f"expected a JSON object, got {type(obj).__name__}"
    if "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]  # OpenAI style {"type": "function", "function": {...}}
    name = obj.get("name")
    if "name" not in obj:
        return "", {}, 'missing "name"'
    if not isinstance(name, str) or not name.strip():
        return "", {}, '"name" must be a non-empty string'
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        if not args.strip():
            args = {}
        else:
            args, error = _decode(args.strip())
            if error is not None:
                return name, {}, f"arguments string: {error}"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return name, {}, "arguments is not an object"
    try:  # normalise to plain JSON (tuples, NaN, non-str keys from literal_eval)
        args = json.loads(json.dumps(args, ensure_ascii=False, allow_nan=False))
    except ValueError:
        return name, {}, "arguments contain NaN or Infinity"
    except Exception as e:  # TypeError (a set, bytes, ...), RecursionError
        return name, {}, f"arguments are not JSON-serialisable: {type(e).__name__}"
    return name, args, None


def _json_values(text: str) -> list[Any] | None:
    """The JSON values ``text`` consists of (whitespace or commas between them), else None. A last
    value cut off at the end of the text (the answer reached ``max_tokens`` while the model wrote
    its call again) is dropped when complete values come before it."""
    values: list[Any] = []
    i, end = 0, len(text)
    while True:
        while i < end and (text[i].isspace() or text[i] == ","):
            i += 1
        if i == end:
            return values
        try:
            value, i = _JSON.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            cut = text[i] in "{[" and (exc.pos >= end - 1 or exc.msg.startswith("Unterminated string"))
            return values if values and cut else None
        except (ValueError, RecursionError):
            return None
        values.append(value)


def _unfenced(text: str) -> str | None:
    """The bodies of the ```` ``` ```` blocks that ``text`` (stripped) consists of, joined; None if
    there is anything but whitespace around them. Text that does not start with a fence is itself.
    A last block left open (the answer was cut) counts with what it holds."""
    if not text.startswith("```"):
        return text
    bodies, at = [], 0
    for match in _FENCED_RX.finditer(text):
        if text[at : match.start()].strip():
            return None
        bodies.append(match.group(1))
        at = match.end()
    rest = text[at:].strip()
    if rest.startswith("```"):  # an open last block: its body so far
        rest = _FENCE_RX.sub("", rest, count=1)
        bodies.append(rest)
        rest = ""
    if rest or not bodies:
        return None
    return "\n".join(bodies)


def _literal(text: str) -> Any:
    """A Python literal (``{'name': 'f'}``), or None; never raises."""
    if len(text) > _MAX_LITERAL:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.literal_eval(text.strip())
    except Exception:
        return None


def bare_calls(text: str, tools: Collection[str], new_id: IdFactory = new_call_id) -> list[ParsedCall] | None:
    """The calls of an answer that is nothing but bare JSON calls of declared ``tools``: objects
    ``{"name": <declared>, "arguments"|"parameters": {...}}`` (the arguments may be a JSON string of
    an object), lists of them, in ```` ``` ```` fences or not. None when it is anything else, which
    then stays text. Never raises."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[`" or not tools:
        return None
    body = _unfenced(stripped)
    if body is None:
        return None
    values = _json_values(body) if len(body) <= 10 * _MAX_LITERAL else None
    if values is None:
        literal = _literal(body)
        values = None if literal is None else [literal]
    if values is None:  # broken JSON that clearly meant a declared tool: a malformed call
        named = _BARE_NAME_RX.match(body)
        if named and named.group(1) in tools:
            _, error = _decode(body.strip())
            problem = error or "text after the call's JSON"
            return [ParsedCall(new_id(), named.group(1), {}, text, problem, bare=True)]
        return None
    objects = [item for value in values for item in (value if isinstance(value, list) else [value])]
    calls = []
    for obj in objects:
        if isinstance(obj, dict) and "name" not in obj and isinstance(obj.get("function"), dict):
            obj = obj["function"]
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in tools:
            return None
        if not isinstance(obj.get("arguments", obj.get("parameters")), dict | str):
            return None
        name, args, error = _fields(obj)
        if error is not None:
            return None
        calls.append(ParsedCall(new_id(), name, args, text, bare=True))
    return calls or None


def _held_prefix(s: str, start: int) -> int:
    """Length of the longest suffix of ``s[start:]`` that is a proper prefix of OPEN."""
    for n in range(min(len(OPEN) - 1, len(s) - start), 0, -1):
        if s.endswith(OPEN[:n]):
            return n
    return 0


class StreamParser:
    """Incremental parser. ``feed`` returns events: ``str`` is text safe to show now (never part
    of a tag), ``ParsedCall`` a block just closed. Work is linear in the total input length."""

    def __init__(self, new_id: IdFactory = new_call_id) -> None:
        self._new_id = new_id
        self._tail = ""  # unscanned carry-over (a possible partial tag, a trailing backslash)
        self._in_block = False
        self._blk: list[str] = []  # text of the current block before the current chunk
        self._blk_len = 0
        self._in_str = False
        self._pending: tuple[int, int] | None = None  # CLOSE seen inside a string (block offsets)
        self._rescues = 0
        self._text: list[str] = []
        self._calls: list[ParsedCall] = []
        self._finished = False

    def feed(self, chunk: str) -> list[str | ParsedCall]:
        if self._finished:
            raise RuntimeError("StreamParser.feed() called after finish()")
        if not self._in_block and not self._tail and "<" not in chunk:
            if chunk:  # plain text: the hot path
                self._text.append(chunk)
                return [chunk]
            return []
        return self._run(self._tail + chunk, final=False)

    def finish(self) -> list[str | ParsedCall]:
        if self._finished:
            return []
        self._finished = True
        return self._run(self._tail, final=True)

    def _say(self, text: str, out: list[str | ParsedCall]) -> None:
        """Text outside blocks."""
        self._text.append(text)
        out.append(text)

    def result(self) -> ParseResult:
        """The parse so far; after ``finish()`` equal to ``parse(full_text)``."""
        return ParseResult("".join(self._text).strip(), list(self._calls))

    def _close(self, raw: str, out: list[str | ParsedCall]) -> None:
        name, args, err = _interpret(raw)
        call = ParsedCall(self._new_id(), name, args, raw, err)
        self._calls.append(call)
        out.append(call)
        self._blk, self._blk_len, self._in_str, self._pending = [], 0, False, None

    def _run(self, data: str, final: bool) -> list[str | ParsedCall]:
        out: list[str | ParsedCall] = []
        i = bs = 0  # scan position; start of the current block's text within data
        while True:
            if not self._in_block:
                k = data.find(OPEN, i)
                end = k if k >= 0 else len(data) - (0 if final else _held_prefix(data, i))
                if end > i:
                    self._say(data[i:end], out)
                if k < 0:
                    self._tail = data[end:]
                    return out
                self._in_block, i = True, k + len(OPEN)
                bs = i
                continue
            m = (_IN_RX if self._in_str else _OUT_RX).search(data, i)
            if m is None:
                if not final:
                    keep = max(i, len(data) - _KEEP)
                    self._blk.append(data[bs:keep])
                    self._blk_len += keep - bs
                    self._tail = data[keep:]
                    return out
                if self._pending is None:
                    self._close("".join(self._blk) + data[bs:], out)
                    self._in_block, self._tail = False, ""
                    return out
                data, i = self._rescue(data, bs, len(data), out), 0
                continue
            tok, i = m.group(), m.end()
            if tok == '"':
                self._in_str = not self._in_str
                self._pending = None
            elif tok == "\n" and self._pending is not None:
                data, i = self._rescue(data, bs, m.start(), out), 0
            elif tok == "\n":
                self._in_str = False
            elif tok == CLOSE and self._in_str and self._rescues < _MAX_RESCUES:
                if self._pending is None:
                    at = self._blk_len + m.start() - bs
                    self._pending = (at, at + len(CLOSE))
            elif tok in (OPEN, CLOSE):
                self._close("".join(self._blk) + data[bs : m.start()], out)
                self._in_block = tok == OPEN
                bs = i

    def _rescue(self, data: str, bs: int, upto: int, out: list[str | ParsedCall]) -> str:
        """Close the block at the pending tag; return the data left to re-read as plain text."""
        assert self._pending is not None
        start, end = self._pending
        text = "".join(self._blk) + data[bs:upto]
        self._rescues += 1
        self._close(text[:start], out)
        self._in_block = False
        return text[end:] + data[upto:]


def parse(text: str, new_id: IdFactory = new_call_id) -> ParseResult:
    """Split Hermes-format model output into content and tool calls. Never raises."""
    sp = StreamParser(new_id)
    sp.feed(text)
    sp.finish()
    return sp.result()


# -- forcing a call ---------------------------------------------------------------------------------

FORCED_PREFILL = "<tool_call>\n"


def forced_call(tools: Sequence[Mapping[str, Any]], choice: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON schema and the prompt prefill that force a Hermes tool call (for structured outputs).

    ``tools`` are OpenAI tool dicts, ``choice`` is ``required`` or a tool's name. The prompt ends
    with ``<tool_call>\n`` and the model must continue with one JSON object ``{"name": <a tool>,
    "arguments": <its schema>}``. ``auto``, ``none`` and an unknown name force nothing: (None, "").
    """
    if choice in ("auto", "none") or not tools:
        return None, ""
    functions = [tool.get("function", tool) for tool in tools]
    chosen = [f for f in functions if choice == "required" or f.get("name") == choice]
    options = [
        {
            "type": "object",
            "properties": {"name": {"enum": [f.get("name")]}, "arguments": _arguments_schema(f)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    if not options:
        return None, ""
    return (options[0] if len(options) == 1 else {"anyOf": options}), FORCED_PREFILL


def _arguments_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    # A function declared without parameters takes none (OpenAI's meaning): {} is its one call.
    schema = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
    if "$defs" in json.dumps(schema) or "$ref" in json.dumps(schema):
        return {"type": "object"}  # references cannot be nested under anyOf; accept any object
    return dict(copy.deepcopy(schema))


_NAME_IN_RAW = re.compile(r"""["']name["']\s*:\s*["']([^"']+)["']""")


def intended_tool(call: ParsedCall, tools: Collection[str]) -> str:
    """The tool a malformed call meant, if its name can be read; else ``required`` (any tool)."""
    if call.name in tools:
        return call.name
    match = _NAME_IN_RAW.search(call.raw)
    return match.group(1) if match and match.group(1) in tools else "required"
