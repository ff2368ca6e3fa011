"""A scripted engine for fast tests of the agent loop and the front ends (no vLLM, no model), and
pinning a real random-weight engine's output to exact text.

Like pydantic-ai's ``FunctionModel``: each model call is answered by a script, either a list of
replies consumed in order or a function of the request. Replies are streamed in small chunks so
streaming code paths run for real. Every request is recorded in ``calls``. :class:`PinnedEngine`
wraps a real engine and forces its tool calls (either format, after an optional think block) and
its answers to exact text with structured outputs; :func:`tool_call_text` writes a call as Qwen
models do, in either format.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenrun.engines.base import Constraint, Delta, Engine, Health, Request, TokenLogprob
from qwenrun.errors import EngineError
from qwenrun.toolcalls import FORCED_PREFILL, forced_call

__all__ = [
    "ModelRequest", "PinnedEngine", "ScriptedEngine", "literal_regex", "tool_call_body", "tool_call_text",
]  # fmt: skip


@dataclass(slots=True)
class ModelRequest:
    """What the agent asked the engine for in one call (a plain copy of the :class:`Request`)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    constraint: Constraint | None
    prefill: str
    overrides: dict[str, Any] = field(default_factory=dict)
    incremental: bool = True
    tool_choice: str = "auto"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    logprobs: int | None = None


Script = Sequence[str] | Callable[[ModelRequest], str]


class ScriptedEngine:
    """An :class:`qwenrun.engines.vllm.Engine` whose answers come from a script."""

    def __init__(
        self,
        script: Script,
        *,
        chunk_size: int = 3,
        delay_s: float = 0.0,
        model_name: str = "scripted",
        tool_call_format: str = "hermes",
    ) -> None:
        self._script = script
        self.tool_call_format = tool_call_format
        self._replies = list(script) if not callable(script) else []
        self.chunk_size = chunk_size
        self.delay_s = delay_s
        self.model_name = model_name
        self.calls: list[ModelRequest] = []
        self.started = False
        self.dead = False
        self.active = 0

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    def health(self) -> Health:
        if self.dead:
            return "dead"
        return "ready" if self.started else "stopped"

    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        if self.dead:
            raise EngineError("the scripted engine is dead")
        constraint, prefill = request.constraint, request.prefill
        if constraint is None and not prefill and request.tools:  # as VLLMEngine forces a call
            parallel = request.parallel_tool_calls
            forced = forced_call(self.tool_call_format, request.tools, request.tool_choice, parallel=parallel)
            if forced is not None:
                constraint = Constraint(json=forced.json_schema, structural_tag=forced.structural_tag)
                prefill = forced.prefill
        record = ModelRequest(
            list(request.messages),
            list(request.tools) if request.tools is not None else None,
            constraint,
            prefill,
            dict(request.overrides),
            request.incremental,
            request.tool_choice,
            dict(request.chat_template_kwargs),
            request.logprobs,
        )
        self.calls.append(record)
        if callable(self._script):
            reply = self._script(record)
        elif self._replies:
            reply = self._replies.pop(0)
        else:
            raise EngineError(f"the script has no reply left for call {len(self.calls)}")
        reply = reply.removeprefix(prefill)  # the answer starts with the prefill, sent as one delta
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in record.messages)
        self.active += 1
        try:
            sent = 0
            if prefill:
                yield Delta(prefill, None, prompt_tokens, 0)
            for start in range(0, len(reply), self.chunk_size):
                await asyncio.sleep(self.delay_s)
                chunk = reply[start : start + self.chunk_size]
                sent += 1
                top = record.logprobs
                scores = None if top is None else [_scripted_logprob(chunk, top)]
                yield Delta(chunk, None, prompt_tokens, sent, logprobs=scores)
            yield Delta("", "stop", prompt_tokens, sent)
        finally:
            self.active -= 1


def _scripted_logprob(chunk: str, top: int) -> TokenLogprob:
    """A made-up log probability of a chunk (one chunk, one "token"): -0.5 per character."""
    alternatives = [(chunk, -0.5 * len(chunk)), *((f"{chunk}{i}", -1.0 - i) for i in range(top))]
    return TokenLogprob(chunk, -0.5 * len(chunk), tuple(alternatives[:top]))


def tool_call_body(name: str, arguments: Mapping[str, Any], *, format: str = "hermes") -> str:
    """What a well-formed call of ``format`` holds between ``<tool_call>\n`` and ``\n</tool_call>``:
    Hermes JSON, or Qwen3-Coder's ``<function=...>`` XML (strings as written, other values as JSON)."""
    import json

    if format == "hermes":
        return json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    parameters = "".join(
        f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
        "\n</parameter>\n"
        for key, value in arguments.items()
    )
    return f"<function={name}>\n{parameters}</function>"


def tool_call_text(name: str, arguments: Mapping[str, Any], text: str = "", *, format: str = "hermes") -> str:
    """A well-formed tool call as Qwen models write it (``format``: ``hermes`` or ``qwen3_coder``),
    after ``text``."""
    return f"{text}<tool_call>\n{tool_call_body(name, arguments, format=format)}\n</tool_call>"


_REGEX_SPECIAL = re.compile(r"[.^$*+?{}\[\]\\|()]")
_REGEX_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def literal_regex(text: str) -> str:
    """A regex that matches exactly ``text``, in the syntax structured-output backends read.

    Unlike ``re.escape`` it leaves spaces, ``#``, ``&``, ``~`` and ``-`` alone (xgrammar warns
    about ``\\ `` on every request) and writes newlines and tabs as ``\\n`` and ``\\t``.
    """
    escaped = _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(), text)
    return "".join(_REGEX_CONTROL.get(char, char) for char in escaped)


class PinnedEngine:
    """A real engine whose tool calls are pinned to exact text (for random-weight models).

    A call the agent forces (``tool_choice`` required or a name) is prefilled with ``<tool_call>\n``
    and continues with ``continuation`` (:func:`tool_call_body` of either format, or several
    blocks) by a regex; with ``every_call``, an unforced call must write the whole block. With
    ``reasoning``, a pinned call is the whole block after ``<think>\nREASONING\n</think>\n\n``
    (no prefill). Other calls are pinned to ``answer`` when given (it may hold a think block), else
    get ``answer_overrides`` (e.g. ``{"max_tokens": 128, "ignore_eos": True}`` for answers of a
    fixed length). ``prefill=False`` for an engine that cannot prefill (``engine.kind: openai``): a
    forced call is then the whole block by a regex, with the endpoint's ``tool_choice`` left at
    ``auto``. The wrapped engine's stream is returned as is, so pinning adds no per-token cost.
    Every request's messages are kept in ``requests``.
    """

    def __init__(
        self,
        engine: Engine,
        continuation: str,
        *,
        reasoning: str | None = None,
        answer: str | None = None,
        every_call: bool = False,
        call_max_tokens: int = 160,
        answer_overrides: Mapping[str, Any] | None = None,
        keep_requests: bool = True,
        prefill: bool = True,
    ) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.continuation = continuation
        self.every_call = every_call
        self.requests: list[list[dict[str, Any]]] = []
        self._keep = keep_requests
        think = f"<think>\n{reasoning}\n</think>\n\n" if reasoning is not None else ""
        self._forced = Constraint(regex=literal_regex(continuation))
        self._whole = Constraint(regex=literal_regex(f"{think}{FORCED_PREFILL}{continuation}\n</tool_call>"))
        self._pinned_answer = Constraint(regex=literal_regex(answer)) if answer is not None else None
        self._prefill = FORCED_PREFILL
        self._call_max_tokens = call_max_tokens
        self._answer = dict(answer_overrides or {})
        if answer is not None:
            self._answer.setdefault("max_tokens", call_max_tokens)
        self._can_prefill = prefill and reasoning is None

    @property
    def tool_call_format(self) -> str:
        return self.engine.tool_call_format

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self) -> None:  # the owner of the wrapped engine shuts it down
        pass

    def health(self) -> Health:
        return self.engine.health()

    def generate(self, request: Request) -> AsyncIterator[Delta]:
        if self._keep:
            self.requests.append(list(request.messages))
        extra = {"max_tokens": self._call_max_tokens}
        constraint: Constraint | None
        choice = request.tool_choice
        forced = choice not in ("auto", "none") and bool(request.tools)
        if forced and self._can_prefill:  # pin what follows the prefilled "<tool_call>\n"
            constraint, prefill = self._forced, self._prefill
        elif forced or self.every_call:  # the model writes the whole block
            constraint, prefill, choice = self._whole, "", "auto"
        else:
            constraint, prefill, extra = (
                self._pinned_answer or request.constraint,
                request.prefill,
                self._answer,
            )
        pinned = dataclasses.replace(
            request,
            tool_choice=choice,
            constraint=constraint,
            prefill=prefill,
            overrides={**request.overrides, **extra},
        )
        return self.engine.generate(pinned)
