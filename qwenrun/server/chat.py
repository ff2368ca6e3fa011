"""Chat completions: from a validated request to the agent or the engine, and back to OpenAI JSON.

Both modes produce the same small stream of *pieces* (:class:`Text`, :class:`Call`, :class:`Step`,
then one :class:`Finish`); :func:`completion` folds them into a ``chat.completion`` object and
:func:`chunks` turns them into ``chat.completion.chunk`` objects, so a streamed answer and a
non-streamed one always agree.

* pass-through (``model`` = the served model name): the client's messages and tools go to
  ``agent.engine.generate``; Hermes tool calls in the output become OpenAI ``tool_calls``.
* agent (``model`` = the agent name): the agent loop runs one turn with the YAML's tools; its tool
  steps are reported in the extension fields ``message.qwenrun_steps`` / ``chunk.qwenrun_step``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from qwenrun import hermes
from qwenrun.agent import Agent, Session, forced_call
from qwenrun.config import OpenAIFrontend
from qwenrun.engine import Constraint, TokenLogprob
from qwenrun.events import Final, Repair, TextDelta, ToolCall, ToolResult, to_dict
from qwenrun.server.schemas import APIError, ChatCompletionRequest, UserMessage, engine_message, text_of
from qwenrun.store import valid_session_id

SESSION_HEADER = "X-Qwenrun-Session"  # agent mode: continue this stored session (see docs/sessions.md)
_busy: set[str] = set()  # stored sessions with a turn in progress in this process

__all__ = [
    "Call", "Finish", "Logprobs", "Piece", "Pieces", "Reply", "Step", "Text", "agent_turn", "chunks",
    "closing", "completion", "passthrough", "passthrough_choices",
]  # fmt: skip

# Every piece belongs to one choice (``n`` > 1 in pass-through mode); ``choice`` is its index.


@dataclass(frozen=True, slots=True)
class Text:
    text: str
    choice: int = 0


@dataclass(frozen=True, slots=True)
class Call:
    """An OpenAI tool call of the answer (pass-through mode)."""

    index: int
    call: hermes.ToolCall
    choice: int = 0


@dataclass(frozen=True, slots=True)
class Logprobs:
    """The log probabilities of generated tokens (pass-through mode, ``logprobs: true``)."""

    tokens: list[TokenLogprob]
    choice: int = 0


@dataclass(frozen=True, slots=True)
class Step:
    """A server-side tool step of the agent (agent mode): a ``to_dict`` of the event."""

    data: dict[str, Any]
    choice: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    prompt_tokens: int
    completion_tokens: int
    choice: int = 0


Piece = Text | Call | Logprobs | Step | Finish
Pieces = AsyncGenerator[Piece, None]


@asynccontextmanager
async def closing(stream: AsyncIterator[Any]) -> AsyncIterator[None]:
    """Close an async generator when the block ends, so that a client that goes away stops the
    generation at once (``Engine.generate`` and ``Session.stream`` are typed as AsyncIterators)."""
    try:
        yield
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass(slots=True)
class Reply:
    """The identity of one completion: every chunk of a stream repeats it."""

    model: str
    include_usage: bool = False
    choices: int = 1
    logprobs: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


class _Trim:
    """Drops leading whitespace and holds trailing whitespace back until more text follows, so
    that streamed content equals the stripped content of the non-streamed answer."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def __call__(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        out, self.held = self.held + body, text[len(body) :]
        return out


# -- request -> sampling overrides ---------------------------------------------------------------


def overrides(request: ChatCompletionRequest, agent: Agent, frontend: OpenAIFrontend) -> dict[str, Any]:
    """The request's sampling parameters (None = the spec's); max_tokens is clamped to the cap."""
    max_tokens = request.max_new_tokens()
    cap = frontend.max_tokens_cap
    if cap is not None:
        max_tokens = min(max_tokens or agent.spec.sampling.max_tokens, cap)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    most = max_tokens or agent.spec.sampling.max_tokens
    if request.min_tokens is not None and request.min_tokens > most:
        raise APIError(400, f"min_tokens ({request.min_tokens}) is larger than max_tokens ({most})",
                       param="min_tokens")  # fmt: skip
    values = {
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": stop,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
        "min_tokens": request.min_tokens,
        "ignore_eos": request.ignore_eos,
    }
    return {key: value for key, value in values.items() if value is not None}


def _choice(request: ChatCompletionRequest, names: list[str], default: str) -> str:
    """``tool_choice`` as the agent spells it: auto, none, required or a tool name."""
    choice = request.tool_choice
    if choice is None:
        return default
    wanted = choice if isinstance(choice, str) else choice.function.name
    if wanted == "required" and not names:
        raise APIError(400, "tool_choice 'required' needs at least one tool", param="tool_choice")
    if wanted not in ("auto", "none", "required") and wanted not in names:
        known = ", ".join(names) or "none"
        raise APIError(400, f"tool_choice names {wanted!r}, which is not a tool (tools: {known})",
                       param="tool_choice")  # fmt: skip
    return wanted


# -- pass-through mode ----------------------------------------------------------------------------


def passthrough(
    agent: Agent, request: ChatCompletionRequest, frontend: OpenAIFrontend, request_id: str
) -> Pieces:
    """Validate a pass-through request, then return its pieces (nothing runs until iterated)."""
    tools = request.tool_dicts()
    names = [tool["function"]["name"] for tool in tools]
    choice = _choice(request, names, "auto" if tools else "none")
    constraint, prefill = forced_call(tools, choice, parallel=request.parallel_tool_calls is not False)
    if request.json_format():
        if constraint is not None:
            raise APIError(400, "a JSON response_format cannot be combined with a forced tool call "
                           "(tool_choice 'required' or a named tool)", param="response_format")  # fmt: skip
        constraint = _format_constraint(request)
    sent_tools = tools if tools and choice != "none" else None
    messages = [engine_message(message) for message in request.messages]
    single = request.parallel_tool_calls is False

    async def pieces() -> Pieces:
        lenient = names if sent_tools and agent.spec.agent.lenient_tool_calls else None
        parser = hermes.StreamParser(tools=lenient) if sent_tools else None
        if parser is not None:
            parser.feed(prefill)  # the engine continues after the prefill <tool_call>\n
        trim, calls, finish, prompt, completion = _Trim(), 0, "stop", 0, 0

        def translate(items: list[str | hermes.ToolCall]) -> list[Piece]:
            nonlocal calls
            out: list[Piece] = []
            for item in items:
                if isinstance(item, hermes.ToolCall) and item.ok:
                    if not (single and calls):
                        out.append(Call(calls, item))
                        calls += 1
                    continue
                if isinstance(item, str) or item.bare:
                    text = item if isinstance(item, str) else item.raw
                else:
                    text = f"{hermes.OPEN}{item.raw}{hermes.CLOSE}"
                if text := trim(text):  # a malformed call is returned as text, as vLLM does
                    out.append(Text(text))
            return out

        stream = agent.engine.generate(
            messages, tools=sent_tools, sampling=agent.spec.sampling,
            overrides=overrides(request, agent, frontend), constraint=constraint, prefill=prefill,
            request_id=request_id, incremental=bool(request.stream),  # non-streaming: one delta
            logprobs=request.wanted_logprobs(),
        )  # fmt: skip
        async with closing(stream):
            async for delta in stream:
                prompt, completion = delta.prompt_tokens, delta.completion_tokens
                finish = delta.finish_reason or finish
                for piece in translate(parser.feed(delta.text) if parser else [delta.text]):
                    yield piece
                if delta.logprobs:
                    yield Logprobs(delta.logprobs)
        for piece in translate(parser.finish() if parser else []):
            yield piece
        reason = "tool_calls" if calls else ("length" if finish == "length" else "stop")
        yield Finish(reason, prompt, completion)

    return pieces()


def _format_constraint(request: ChatCompletionRequest) -> Constraint:
    """The structured-output constraint of a JSON ``response_format`` (as ``vllm serve``)."""
    spec = request.response_format
    if spec is not None and spec.json_schema is not None:
        return Constraint(json=spec.json_schema.json_schema)
    return Constraint(json_object=True)


def passthrough_choices(
    agent: Agent, request: ChatCompletionRequest, frontend: OpenAIFrontend, request_id: str
) -> Pieces:
    """:func:`passthrough` with ``n`` choices: ``n`` requests to the engine, as vLLM runs them
    (choice ``i`` gets ``seed + i`` when a seed is given), their pieces merged as they come."""
    n = request.n or 1
    if n == 1:
        return passthrough(agent, request, frontend, request_id)
    most = agent.spec.engine.max_num_seqs
    if n > most:
        raise APIError(400, f"n ({n}) is larger than the sequences the engine runs at once "
                       f"(engine.max_num_seqs, {most})", param="n")  # fmt: skip
    streams = []
    for index in range(n):
        seed = None if request.seed is None else request.seed + index
        one = request.model_copy(update={"n": 1, "seed": seed})
        streams.append(passthrough(agent, one, frontend, f"{request_id}-{index}"))
    return _merged(streams)


async def _merged(streams: list[Pieces]) -> Pieces:
    """The pieces of several streams as they come, each marked with its stream's index."""
    queue: asyncio.Queue[tuple[int, Piece | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: Pieces) -> None:
        try:
            async with aclosing(stream):
                async for piece in stream:
                    await queue.put((index, piece))
        except Exception as exc:  # given to the consumer
            await queue.put((index, exc))
        else:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield dataclasses.replace(item, choice=index)
    finally:  # a failure, or a client that went away: stop every generation now
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- agent mode -----------------------------------------------------------------------------------


def agent_turn(
    agent: Agent, request: ChatCompletionRequest, frontend: OpenAIFrontend, session_id: str | None = None
) -> Pieces:
    """Validate an agent-mode request, then return the pieces of one agent turn.

    With ``session_id`` (the ``X-Qwenrun-Session`` header) the turn continues that stored session
    (a new one if the id is unknown) and is recorded; the request's earlier messages are ignored.
    """
    if request.tools:
        raise APIError(400, f"model {agent.name!r} runs the agent with its own tools; send no `tools` "
                       f"(or use model {agent.spec.served_model_name!r} for pass-through)",
                       param="tools")  # fmt: skip
    passthrough_only = {"n": (request.n or 1) > 1, "logprobs": bool(request.logprobs),
                        "response_format": request.json_format()}  # fmt: skip
    for param, given in passthrough_only.items():
        if given:
            raise APIError(400, f"{param} is supported in pass-through mode only (model "
                           f"{agent.spec.served_model_name!r}), not by the agent {agent.name!r}",
                           param=param)  # fmt: skip
    choice = _choice(request, list(agent.tools), agent.spec.agent.tool_choice)
    last = request.messages[-1]
    if not isinstance(last, UserMessage):
        raise APIError(400, "in agent mode the last message must be the user's", param="messages")
    stateless = agent.session(record=False)
    # The agent's system prompt comes from its YAML: client system/developer messages are dropped.
    history = [message for message in request.messages[:-1] if message.role not in ("system", "developer")]
    stateless.messages = [engine_message(message) for message in history]
    if session_id is not None:
        _check_session_id(agent, session_id)
    sampling = overrides(request, agent, frontend)

    async def pieces() -> Pieces:
        trim = _Trim()
        session = stateless if session_id is None else await _claim(agent, session_id)
        events = session.stream(text_of(last.content), tool_choice=choice, overrides=sampling)
        async with closing(events), _released(session_id):
            async for event in events:
                if isinstance(event, TextDelta):
                    if text := trim(event.text):
                        yield Text(text)
                elif isinstance(event, ToolCall | ToolResult | Repair):
                    yield Step(to_dict(event))
                elif isinstance(event, Final):
                    if event.stop_reason == "max_iterations" and (text := trim(event.text)):
                        yield Text(text)  # the loop's note; it was not streamed as text
                    reason = "stop" if event.stop_reason == "answer" else "length"
                    yield Finish(reason, event.usage.prompt_tokens, event.usage.completion_tokens)

    return pieces()


def _check_session_id(agent: Agent, session_id: str) -> None:
    if agent.store is None:
        raise APIError(400, f"{SESSION_HEADER}: agent {agent.name!r} records no sessions "
                       "(sessions.enabled is false in its file)", code="sessions_disabled")  # fmt: skip
    if not valid_session_id(session_id):
        raise APIError(400, f"{SESSION_HEADER}: expected 1 to 128 characters of A-Z a-z 0-9 _ . : -",
                       code="invalid_session_id")  # fmt: skip


async def _claim(agent: Agent, session_id: str) -> Session:
    """The stored session, resumed (read in a thread); 409 while a request runs a turn of it."""
    if session_id in _busy:
        raise APIError(409, f"session {session_id!r} has a turn in progress; retry when it ends",
                       type="conflict_error", code="session_busy")  # fmt: skip
    _busy.add(session_id)
    try:
        return await asyncio.to_thread(agent.session, session_id)
    except BaseException:
        _busy.discard(session_id)
        raise


@asynccontextmanager
async def _released(session_id: str | None) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if session_id is not None:
            _busy.discard(session_id)


# -- pieces -> OpenAI JSON ------------------------------------------------------------------------


def _usage(finishes: list[Finish]) -> dict[str, int]:
    """The usage of a completion: the prompt once (every choice shares it), every choice's tokens."""
    prompt = max((finish.prompt_tokens for finish in finishes), default=0)
    completion = sum(finish.completion_tokens for finish in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_call(piece: Call) -> dict[str, Any]:
    function = {"name": piece.call.name, "arguments": piece.call.arguments_json()}
    return {"id": piece.call.id, "type": "function", "function": function}


def _logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object of a choice (or of a chunk's tokens)."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*top) for top in t.top]}
                        for t in tokens]}  # fmt: skip


def completion(reply: Reply, pieces: list[Piece]) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` object."""
    choices = []
    finishes = [piece for piece in pieces if isinstance(piece, Finish)]
    for index in range(max(reply.choices, 1)):
        mine = [piece for piece in pieces if piece.choice == index]
        text = "".join(piece.text for piece in mine if isinstance(piece, Text))
        calls = [_tool_call(piece) for piece in mine if isinstance(piece, Call)]
        steps = [piece.data for piece in mine if isinstance(piece, Step)]
        scored = [token for piece in mine if isinstance(piece, Logprobs) for token in piece.tokens]
        finish = next(piece for piece in mine if isinstance(piece, Finish))
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
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
    choice, the content, each tool call as a header chunk (id, name) then an arguments chunk, the
    tokens' ``logprobs`` (in chunks of their own), a finish chunk per choice, and the usage chunk
    (empty ``choices``) when ``stream_options.include_usage`` asks for it."""
    for index in range(max(reply.choices, 1)):
        yield _chunk(reply, {"role": "assistant", "content": ""}, choice=index)
    finishes: list[Finish] = []
    async for piece in pieces:
        index = piece.choice
        if isinstance(piece, Text):
            yield _chunk(reply, {"content": piece.text}, choice=index)
        elif isinstance(piece, Call):
            header = {"index": piece.index, "id": piece.call.id, "type": "function",
                      "function": {"name": piece.call.name, "arguments": ""}}  # fmt: skip
            yield _chunk(reply, {"tool_calls": [header]}, choice=index)
            arguments = {"index": piece.index, "function": {"arguments": piece.call.arguments_json()}}
            yield _chunk(reply, {"tool_calls": [arguments]}, choice=index)
        elif isinstance(piece, Logprobs):
            yield _chunk(reply, {}, choice=index, logprobs=_logprobs(piece.tokens))
        elif isinstance(piece, Step):
            yield _chunk(reply, {}, choice=index, qwenrun_step=piece.data)
        else:
            finishes.append(piece)
            yield _chunk(reply, {}, piece.reason, choice=index)
    if reply.include_usage and finishes:
        yield {**_chunk(reply, {}), "choices": [], "usage": _usage(finishes)}
