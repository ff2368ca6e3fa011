"""The OpenAI JSON of chat completions: :func:`completion` folds the pieces of
:mod:`qwenrun.frontends.openai.chat` into one ``chat.completion`` object, :func:`chunks` turns them
into ``chat.completion.chunk`` objects, as OpenAI (and ``vllm serve``) send them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from qwenrun.engines.base import TokenLogprob
from qwenrun.events import CallDelta, ParsedCall, Reasoning, TextDelta
from qwenrun.frontends.openai.chat import Finish, Logprobs, Piece, Reply, StepPart

__all__ = ["chunks", "completion"]


def _usage(finishes: list[Finish]) -> dict[str, int]:
    """The usage of a completion: the prompt once (every choice shares it), every choice's tokens."""
    prompt = max((finish.prompt_tokens for finish in finishes), default=0)
    completion = sum(finish.completion_tokens for finish in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_call(call: ParsedCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments_json()}
    return {"id": call.id, "type": "function", "function": function}


def _logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object of a choice (or of a chunk's tokens)."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*top) for top in t.top]}
                        for t in tokens]}  # fmt: skip


def completion(reply: Reply, pieces: list[Piece]) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` object."""
    choices = []
    finishes = [piece.part for piece in pieces if isinstance(piece.part, Finish)]
    for index in range(max(reply.choices, 1)):
        mine = [piece.part for piece in pieces if piece.choice == index]
        text = "".join(part.text for part in mine if isinstance(part, TextDelta))
        reasoning = "".join(part.text for part in mine if isinstance(part, Reasoning))
        calls = [_tool_call(part) for part in mine if isinstance(part, ParsedCall)]
        steps = [part.data for part in mine if isinstance(part, StepPart)]
        scored = [token for part in mine if isinstance(part, Logprobs) for token in part.tokens]
        finish = next(part for part in mine if isinstance(part, Finish))
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if reasoning:
            message["reasoning"] = message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        if steps:
            message["qwenrun_steps"] = steps
        logprobs = _logprobs(scored) if reply.logprobs else None
        choices.append(
            {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish.reason}
        )
    return {
        "id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
        "choices": choices, "usage": _usage(finishes),
    }  # fmt: skip


def _call_header(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}


def _chunk(
    reply: Reply,
    delta: dict[str, Any],
    finish: str | None = None,
    *,
    choice: int = 0,
    logprobs: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model,
        "choices": [{"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }  # fmt: skip
    if reply.include_usage:
        chunk["usage"] = None
    chunk.update(extra)
    return chunk


async def chunks(reply: Reply, pieces: AsyncIterator[Piece]) -> AsyncGenerator[dict[str, Any], None]:
    """The ``chat.completion.chunk`` objects of a stream, as OpenAI sends them: a role chunk per
    choice, the reasoning (``reasoning`` and ``reasoning_content`` deltas) and the content as they
    come, each tool call as a header chunk (id, name) then its arguments (its
    :class:`~qwenrun.events.CallDelta` fragments as they are written), the tokens' ``logprobs`` (in
    chunks of their own), a finish chunk per choice, and the usage chunk (empty ``choices``) when
    ``stream_options.include_usage`` asks."""
    for index in range(max(reply.choices, 1)):
        yield _chunk(reply, {"role": "assistant", "content": ""}, choice=index)
    finishes: list[Finish] = []
    async for piece in pieces:
        part, index = piece.part, piece.choice
        if isinstance(part, TextDelta):
            yield _chunk(reply, {"content": part.text}, choice=index)
        elif isinstance(part, Reasoning):
            yield _chunk(reply, {"reasoning": part.text, "reasoning_content": part.text}, choice=index)
        elif isinstance(part, CallDelta):
            if part.name is not None:
                header = _call_header(part.index, part.id, part.name)
                yield _chunk(reply, {"tool_calls": [header]}, choice=index)
            if part.arguments:
                arguments = {"index": part.index, "function": {"arguments": part.arguments}}
                yield _chunk(reply, {"tool_calls": [arguments]}, choice=index)
        elif isinstance(part, ParsedCall):
            continue  # its CallDelta pieces came before it
        elif isinstance(part, Logprobs):
            yield _chunk(reply, {}, choice=index, logprobs=_logprobs(part.tokens))
        elif isinstance(part, StepPart):
            yield _chunk(reply, {}, choice=index, qwenrun_step=part.data)
        else:
            finishes.append(part)
            yield _chunk(reply, {}, part.reason, choice=index)
    if reply.include_usage and finishes:
        yield {**_chunk(reply, {}), "choices": [], "usage": _usage(finishes)}
