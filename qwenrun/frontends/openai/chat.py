"""Chat completions: from a validated request to the agent or the engine, and back to OpenAI JSON.

Both modes produce the same small stream of :class:`Piece` objects, each a part of one choice's
answer (``n`` > 1 in pass-through mode: ``choice``) in the words of :mod:`qwenrun.events`
(:class:`~qwenrun.events.TextDelta`, :class:`~qwenrun.events.Reasoning`, a call's
:class:`~qwenrun.events.CallDelta` pieces then the :class:`~qwenrun.events.ParsedCall` itself) or of
the server (:class:`Logprobs`, an agent :class:`StepPart`, then one :class:`Finish` per choice);
:mod:`qwenrun.frontends.openai.completions` folds them into a ``chat.completion`` object or turns
them into ``chat.completion.chunk`` objects, so a streamed answer and a non-streamed one agree.
Reasoning is returned as ``reasoning`` and ``reasoning_content`` (on the message, on the deltas),
as ``vllm serve --reasoning-parser qwen3`` does (newer vLLM: ``reasoning``, older clients read
``reasoning_content``).

* pass-through (``model`` = the served model name): the client's messages and tools go to
  ``agent.engine.generate``; tool calls in the output (the engine's format: Hermes JSON or
  Qwen3-Coder XML; sent once complete and well-formed, a malformed one as text) become OpenAI
  ``tool_calls``. As ``vllm serve`` does: ``n`` choices (``seed + i`` each), ``logprobs``, a JSON
  ``response_format`` or vLLM's ``structured_outputs``, several calls for ``tool_choice: required`` unless
  ``parallel_tool_calls`` is false. A call the messages hold with its result, written again, gets
  the answer with the tools off instead (:mod:`~qwenrun.frontends.openai.repeats`).
* agent (``model`` = the agent name): the agent loop runs one turn with the YAML's tools; its tool
  steps are reported in the extension fields ``message.qwenrun_steps`` / ``chunk.qwenrun_step``.
  A JSON ``response_format`` is the turn's output schema (over ``agent.output_schema``): the
  answer is generated under it and validated (:mod:`qwenrun.agent.answer`).
  Nobody is there to approve a call: an agent with ``approval: ask`` tools needs the request header
  ``X-Qwenrun-Approval: approve`` (they run) or ``reject`` (they are refused), else 400.
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

from qwenrun.agent import Agent, Session
from qwenrun.agent.model_call import ModelCall
from qwenrun.approval import Approver, fixed_approver
from qwenrun.engines.base import Constraint, Request, TokenLogprob
from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.events import (
    CallDelta,
    Final,
    Notice,
    ParsedCall,
    Reasoning,
    Repair,
    TextDelta,
    ToolCall,
    ToolResult,
    to_dict,
)
from qwenrun.frontends.openai.repeats import RepeatedCalls, answered_seen
from qwenrun.frontends.openai.schemas import (
    APIError,
    ChatCompletionRequest,
    UserMessage,
    engine_message,
    text_of,
)
from qwenrun.frontends.settings import OpenAIFrontend
from qwenrun.sampling import knob_values
from qwenrun.sessions.store import valid_session_id
from qwenrun.toolcalls import OutputEvent, hermes

SESSION_HEADER = "X-Qwenrun-Session"  # agent mode: continue this stored session (see docs/sessions.md)
APPROVAL_HEADER = "X-Qwenrun-Approval"  # agent mode: approve | reject the calls of `approval: ask` tools

__all__ = [
    "APPROVAL_HEADER", "Finish", "Logprobs", "Part", "Piece", "Pieces", "Reply", "StepPart", "agent_turn",
    "passthrough", "passthrough_choices",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Logprobs:
    """The log probabilities of generated tokens (pass-through mode, ``logprobs: true``)."""

    tokens: list[TokenLogprob]


@dataclass(frozen=True, slots=True)
class StepPart:
    """A server-side tool step of the agent (agent mode): a ``to_dict`` of the event."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    prompt_tokens: int
    completion_tokens: int


# Answer text, reasoning (both modes); a call (pass-through mode) as its CallDelta pieces, numbered
# by ``index`` among the answer's calls, then the complete ParsedCall; log probabilities; the end.
Part = TextDelta | Reasoning | CallDelta | ParsedCall | Logprobs | StepPart | Finish


@dataclass(frozen=True, slots=True)
class Piece:
    """A part of the answer of choice ``choice``."""

    part: Part
    choice: int = 0


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
    chosen = knob_values(request, "chat")
    cap = frontend.max_tokens_cap
    if cap is not None:
        chosen["max_tokens"] = min(chosen.get("max_tokens") or agent.spec.sampling.max_tokens, cap)
    most = chosen.get("max_tokens") or agent.spec.sampling.max_tokens
    if request.min_tokens is not None and request.min_tokens > most:
        raise APIError(400, f"min_tokens ({request.min_tokens}) is larger than max_tokens ({most})",
                       param="min_tokens")  # fmt: skip
    if request.thinking_token_budget is not None:
        chosen["thinking_token_budget"] = request.thinking_token_budget
    if request.thinking_token_budget == -1:  # no limit, even where the agent file sets one
        chosen["thinking_token_budget"] = None
    return chosen


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


def _constraint(request: ChatCompletionRequest, forced: bool) -> Constraint | None:
    """The request's constraint on the answer: a JSON ``response_format`` (as ``vllm serve``), or
    vLLM's ``structured_outputs``; neither beside a forced tool call."""
    wanted = request.structured_outputs
    if wanted is not None and request.json_format():
        raise APIError(400, "give response_format or structured_outputs, not both", param="response_format")
    if (wanted is not None or request.json_format()) and forced:
        raise APIError(400, "a JSON response_format or structured_outputs cannot be combined with a "
                       "forced tool call (tool_choice 'required' or a named tool)",
                       param="response_format")  # fmt: skip
    if wanted is not None:
        return Constraint(regex=wanted.regex, json=wanted.json_schema, grammar=wanted.grammar,
                          choice=wanted.choice)  # fmt: skip
    if not request.json_format():
        return None
    spec = request.response_format
    if spec is not None and spec.json_schema is not None:
        return Constraint(json=spec.json_schema.json_schema)
    return Constraint(json_object=True)


def passthrough(
    agent: Agent, request: ChatCompletionRequest, frontend: OpenAIFrontend, request_id: str
) -> Pieces:
    """Validate a pass-through request, then return its pieces (nothing runs until iterated)."""
    tools = request.tool_dicts()
    names = [tool["function"]["name"] for tool in tools]
    choice = _choice(request, names, "auto" if tools else "none")
    sent_tools = tools if tools and choice != "none" else None
    constraint = _constraint(request, forced=bool(sent_tools) and choice not in ("auto", "none"))
    messages = [engine_message(message) for message in request.messages]
    single = request.parallel_tool_calls is False
    sampling = {**agent.sampling_overrides(), **overrides(request, agent, frontend)}
    template = {**agent.chat_template_kwargs(), **(request.chat_template_kwargs or {})}
    reasoning_wanted = request.include_reasoning

    async def pieces() -> Pieces:
        trim, think_trim, finish, prompt, completion = _Trim(), _Trim(), "stop", 0, 0
        # The argument deltas of a call being written, held until it is complete: a call that ends
        # malformed (a parameter given twice, an answer cut by max_tokens) must not have reached
        # the client as a call, since a stream cannot take back what it sent (the non-streamed
        # answer has it as text). A well-formed call then goes out as its deltas, in order.
        # A call the parser read whole (no deltas) goes out as one delta with all its arguments.
        writing: dict[str, list[CallDelta]] = {}
        complete = 0  # well-formed calls returned (the next one's index)

        def translate(items: list[OutputEvent]) -> list[Piece]:
            nonlocal complete
            out: list[Part] = []
            for item in items:
                if isinstance(item, str):
                    if text := trim(item):
                        out.append(TextDelta(text))
                elif isinstance(item, Reasoning):
                    if reasoning_wanted and (text := think_trim(item.text)):
                        out.append(Reasoning(text))
                elif isinstance(item, CallDelta):
                    writing.setdefault(item.id, []).append(item)
                elif item.ok:
                    whole = [CallDelta(0, item.id, item.name, item.arguments_json())]
                    deltas = writing.pop(item.id, []) or whole
                    if not (single and complete):
                        out += [dataclasses.replace(delta, index=complete) for delta in deltas]
                        out.append(item)
                        complete += 1
                else:  # a malformed call is returned as text, as vLLM does
                    writing.pop(item.id, None)
                    if text := trim(item.raw if item.bare else f"{hermes.OPEN}{item.raw}{hermes.CLOSE}"):
                        out.append(TextDelta(text))
            return [Piece(part) for part in out]

        generation = Request(
            messages=messages, tools=sent_tools, tool_choice=choice, parallel_tool_calls=not single,
            sampling=agent.spec.sampling, overrides=sampling, constraint=constraint,
            chat_template_kwargs=template, request_id=request_id,
            incremental=bool(request.stream),  # non-streaming: one delta
            logprobs=request.wanted_logprobs(),
        )  # fmt: skip
        watched = frontend.answer_repeated_calls and choice == "auto" and request.wanted_logprobs() is None
        settings = agent.spec.agent
        call = ModelCall(agent.engine, generation, calls=bool(sent_tools),
                         lenient=settings.lenient_tool_calls,
                         calls_in_thinking=settings.calls_in_thinking == "run",
                         seen=answered_seen(messages) if watched and sent_tools else None)  # fmt: skip
        repeats = RepeatedCalls(call)
        async with aclosing(repeats.deltas()) as deltas:
            async for delta, items in deltas:
                prompt, completion = delta.prompt_tokens, delta.completion_tokens
                finish = delta.finish_reason or finish
                for piece in translate(items):
                    yield piece
                if delta.logprobs:
                    yield Piece(Logprobs(delta.logprobs))
        for piece in translate(repeats.finish()):
            yield piece
        reason = "tool_calls" if complete else ("length" if finish == "length" else "stop")
        yield Piece(Finish(reason, prompt, completion))

    return pieces()


def passthrough_choices(
    agent: Agent, request: ChatCompletionRequest, frontend: OpenAIFrontend, request_id: str
) -> Pieces:
    """:func:`passthrough` with ``n`` choices: ``n`` requests to the engine, as vLLM runs them
    (choice ``i`` gets ``seed + i`` when a seed is given), their pieces merged as they come."""
    n = request.n or 1
    if n == 1:
        return passthrough(agent, request, frontend, request_id)
    engine = agent.spec.engine
    most = engine.max_num_seqs if isinstance(engine, VLLMEngineSpec) else None
    if most is not None and n > most:
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
    agent: Agent,
    request: ChatCompletionRequest,
    frontend: OpenAIFrontend,
    session_id: str | None = None,
    busy: set[str] | None = None,
    approval: str | None = None,
    approver: Approver | None = None,
) -> Pieces:
    """Validate an agent-mode request, then return the pieces of one agent turn.

    With ``session_id`` (the ``X-Qwenrun-Session`` header) the turn continues that stored session
    (a new one if the id is unknown) and is recorded; the request's earlier messages are ignored.
    ``busy``: the app's stored sessions with a turn in progress (a second request for one is a 409).
    ``approval``: the ``X-Qwenrun-Approval`` header (:func:`approver_for`); ``approver``, when
    given, answers instead (the Responses route's pending approvals).
    """
    busy = set() if busy is None else busy
    if request.tools:
        raise APIError(400, f"model {agent.name!r} runs the agent with its own tools; send no `tools` "
                       f"(or use model {agent.spec.served_model_name!r} for pass-through)",
                       param="tools")  # fmt: skip
    passthrough_only = {"n": (request.n or 1) > 1, "logprobs": bool(request.logprobs),
                        "structured_outputs": request.structured_outputs is not None}  # fmt: skip
    for param, given in passthrough_only.items():
        if given:
            raise APIError(400, f"{param} is supported in pass-through mode only (model "
                           f"{agent.spec.served_model_name!r}), not by the agent {agent.name!r}",
                           param=param)  # fmt: skip
    approver = approver if approver is not None else approver_for(agent, approval)
    last = request.messages[-1]
    if not isinstance(last, UserMessage):
        raise APIError(400, "in agent mode the last message must be the user's", param="messages")
    choice = _choice(request, list(agent.tools), agent.spec.agent.turn_tool_choice(text_of(last.content)))
    stateless = agent.session(record=False)
    # The agent's system prompt comes from its YAML: client system/developer messages are dropped.
    history = [message for message in request.messages[:-1] if message.role not in ("system", "developer")]
    stateless.messages = [engine_message(message) for message in history]
    if session_id is not None:
        _check_session_id(agent, session_id)
    sampling = overrides(request, agent, frontend)
    template, reasoning_wanted = request.chat_template_kwargs, request.include_reasoning
    schema = request.output_schema()

    async def pieces() -> Pieces:
        trim, think_trim = _Trim(), _Trim()
        session = stateless if session_id is None else await _claim(agent, session_id, busy)
        session.approver = approver
        events = session.stream(
            text_of(last.content), tool_choice=choice, overrides=sampling, chat_template_kwargs=template,
            output_schema=schema,
        )
        gap = False  # reasoning was returned, then something else: the next model call's is apart
        async with closing(events), _released(session_id, busy):
            async for event in events:
                if isinstance(event, TextDelta):
                    if text := trim(event.text):
                        gap = gap or think_trim.started
                        yield Piece(TextDelta(text))
                elif isinstance(event, Reasoning):
                    if reasoning_wanted and (text := think_trim(event.text)):
                        yield Piece(Reasoning(f"\n\n{text}" if gap else text))
                        gap = False
                elif isinstance(event, ToolCall | ToolResult | Repair) or (
                    isinstance(event, Notice) and event.code == "handoff"  # a team's; steps name their agent
                ):
                    gap = gap or think_trim.started
                    yield Piece(StepPart(to_dict(event)))
                elif isinstance(event, Final):
                    if event.stop_reason == "max_iterations" and (text := trim(event.text)):
                        yield Piece(TextDelta(text))  # the loop's note; it was not streamed as text
                    reason = "stop" if event.stop_reason == "answer" else "length"
                    yield Piece(Finish(reason, event.usage.prompt_tokens, event.usage.completion_tokens))

    return pieces()


def may_ask(agent: Agent) -> list[str]:
    """What may ask a person about a call: the ``approval: ask`` tools and the ``ask`` rules."""
    asking = sorted(name for name, tool in agent.tools.items() if tool.approval == "ask")
    return asking + [rule.where for rule in agent.permissions.rules if rule.kind == "ask"]


def approver_for(agent: Agent, approval: str | None) -> Approver | None:
    """The approver of an agent-mode request from its ``X-Qwenrun-Approval`` header: ``approve``
    runs the calls of ``approval: ask`` tools, ``reject`` refuses them (``deny`` tools never run).
    Without the header, an agent with such tools is a 400: nobody could approve their calls."""
    if approval is None:
        if asking := may_ask(agent):
            raise APIError(400, f"tools of agent {agent.name!r} need a person's approval "
                           f"({', '.join(asking)}) and nobody can give it here; send the header "
                           f"{APPROVAL_HEADER}: approve (they run) or reject (they are refused)",
                           code="approval_required")  # fmt: skip
        return None
    mode = approval.strip().lower()
    if mode not in ("approve", "reject"):
        raise APIError(400, f"{APPROVAL_HEADER}: expected approve or reject, got {approval[:40]!r}",
                       code="invalid_approval")  # fmt: skip
    return fixed_approver(mode == "approve")


def _check_session_id(agent: Agent, session_id: str) -> None:
    if agent.store is None:
        raise APIError(400, f"{SESSION_HEADER}: agent {agent.name!r} records no sessions "
                       "(sessions.enabled is false in its file)", code="sessions_disabled")  # fmt: skip
    if not valid_session_id(session_id):
        raise APIError(400, f"{SESSION_HEADER}: expected 1 to 128 characters of A-Z a-z 0-9 _ . : -",
                       code="invalid_session_id")  # fmt: skip


async def _claim(agent: Agent, session_id: str, busy: set[str]) -> Session:
    """The stored session, resumed (read in a thread); 409 while a request runs a turn of it."""
    if session_id in busy:
        raise APIError(409, f"session {session_id!r} has a turn in progress; retry when it ends",
                       type="conflict_error", code="session_busy")  # fmt: skip
    busy.add(session_id)
    try:
        return await asyncio.to_thread(agent.session, session_id)
    except BaseException:
        busy.discard(session_id)
        raise


@asynccontextmanager
async def _released(session_id: str | None, busy: set[str]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if session_id is not None:
            busy.discard(session_id)
