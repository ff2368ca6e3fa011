"""A scripted engine for fast tests of the agent loop and the front ends (no vLLM, no model).

Like pydantic-ai's ``FunctionModel``: each model call is answered by a script, either a list of
replies consumed in order or a function of the request. Replies are streamed in small chunks so
streaming code paths run for real. Every request is recorded in ``calls``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenrun.agent import FORCED_PREFILL
from qwenrun.config import SamplingSpec
from qwenrun.engine import Constraint, Delta, Engine, TokenLogprob
from qwenrun.errors import EngineError

__all__ = ["ModelRequest", "PinnedEngine", "ScriptedEngine", "literal_regex", "tool_call_text"]


@dataclass(slots=True)
class ModelRequest:
    """What the agent asked the engine for in one call."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    constraint: Constraint | None
    prefill: str
    overrides: dict[str, Any] = field(default_factory=dict)
    incremental: bool = True
    logprobs: int | None = None


Script = Sequence[str] | Callable[[ModelRequest], str]


class ScriptedEngine:
    """An :class:`qwenrun.engine.Engine` whose answers come from a script."""

    def __init__(
        self,
        script: Script,
        *,
        chunk_size: int = 3,
        delay_s: float = 0.0,
        model_name: str = "scripted",
    ) -> None:
        self._script = script
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

    async def generate(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        sampling: SamplingSpec | None = None,
        overrides: Mapping[str, Any] | None = None,
        constraint: Constraint | None = None,
        prefill: str = "",
        request_id: str | None = None,
        incremental: bool = True,
        logprobs: int | None = None,
    ) -> AsyncIterator[Delta]:
        if self.dead:
            raise EngineError("the scripted engine is dead")
        request = ModelRequest(
            list(messages), tools, constraint, prefill, dict(overrides or {}), incremental, logprobs
        )
        self.calls.append(request)
        if callable(self._script):
            reply = self._script(request)
        elif self._replies:
            reply = self._replies.pop(0)
        else:
            raise EngineError(f"the script has no reply left for call {len(self.calls)}")
        if prefill and reply.startswith(prefill):
            reply = reply[len(prefill) :]
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in messages)
        self.active += 1
        try:
            sent = 0
            for start in range(0, len(reply), self.chunk_size):
                await asyncio.sleep(self.delay_s)
                chunk = reply[start : start + self.chunk_size]
                sent += 1
                scores = None if logprobs is None else [_scripted_logprob(chunk, logprobs)]
                yield Delta(chunk, None, prompt_tokens, sent, scores)
            yield Delta("", "stop", prompt_tokens, sent)
        finally:
            self.active -= 1


def _scripted_logprob(chunk: str, top: int) -> TokenLogprob:
    """A made-up log probability of a chunk (one chunk, one "token"): -0.5 per character."""
    alternatives = [(chunk, -0.5 * len(chunk)), *((f"{chunk}{i}", -1.0 - i) for i in range(top))]
    return TokenLogprob(chunk, -0.5 * len(chunk), tuple(alternatives[:top]))


def tool_call_text(name: str, arguments: Mapping[str, Any], text: str = "") -> str:
    """A well-formed Hermes tool call, as Qwen2.5 writes it."""
    import json

    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{text}<tool_call>\n{body}\n</tool_call>"


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

    A call the agent forces (it prefills ``<tool_call>\\n`` under a constraint) must continue
    with ``continuation`` (the call's JSON, or several blocks) by a regex; with ``every_call``, an
    unforced call must write the whole block. Other calls get ``answer_overrides`` (e.g.
    ``{"max_tokens": 128, "ignore_eos": True}`` for answers of a fixed length). The wrapped
    engine's stream is returned as is, so pinning adds no per-token cost. Every request's
    messages are kept in ``requests``.
    """

    def __init__(
        self,
        engine: Engine,
        continuation: str,
        *,
        every_call: bool = False,
        call_max_tokens: int = 160,
        answer_overrides: Mapping[str, Any] | None = None,
        keep_requests: bool = True,
    ) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.continuation = continuation
        self.every_call = every_call
        self.requests: list[list[dict[str, Any]]] = []
        self._keep = keep_requests
        self._forced = Constraint(regex=literal_regex(continuation))
        self._whole = Constraint(regex=literal_regex(f"{FORCED_PREFILL}{continuation}\n</tool_call>"))
        self._prefill = FORCED_PREFILL
        self._call_max_tokens = call_max_tokens
        self._answer = dict(answer_overrides or {})

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self) -> None:  # the owner of the wrapped engine shuts it down
        pass

    def generate(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        sampling: SamplingSpec | None = None,
        overrides: Mapping[str, Any] | None = None,
        constraint: Constraint | None = None,
        prefill: str = "",
        request_id: str | None = None,
        incremental: bool = True,
        logprobs: int | None = None,
    ) -> AsyncIterator[Delta]:
        if self._keep:
            self.requests.append(messages)
        extra = {"max_tokens": self._call_max_tokens}
        if constraint is not None:  # the agent prefilled "<tool_call>\n": pin the rest
            constraint, prefill = self._forced, self._prefill
        elif self.every_call:  # a call the agent did not force: the model writes the whole block
            constraint, prefill = self._whole, ""
        else:
            extra = self._answer
        return self.engine.generate(
            messages,
            tools=tools,
            sampling=sampling,
            overrides={**(overrides or {}), **extra},
            constraint=constraint,
            prefill=prefill,
            request_id=request_id,
            incremental=incremental,
            logprobs=logprobs,
        )
