"""The agent loop: model call -> tool calls -> tools -> tool messages -> ... -> answer.

One bounded async loop per user turn (``max_iterations`` model calls), yielding the typed events of
:mod:`qwenrun.events`. The model's output is read in its engine's tool-call format (Hermes JSON or
Qwen3-Coder XML); its thinking becomes :class:`~qwenrun.events.Reasoning` events and the
assistant message's ``reasoning_content`` (a ``<tool_call>`` inside ``<think>`` is not run, unless
the answer after the block is empty: ``agent.calls_in_thinking``). ``agent.enable_thinking`` goes
to the chat template, ``agent.thinking_budget`` to vLLM.
Tool calls of one model answer run in parallel, each under its time limit; every tool failure
becomes an ``Error: ...`` tool result the model can read. ``tool_choice`` ``required`` / a tool
name is enforced with structured outputs on the first model call of a turn (then it falls back to
``auto`` so the model can answer), and a malformed call is retried once with a grammar-forced call.
Calls written as bare JSON are read too (``agent.lenient_tool_calls``); arguments a tool's schema
does not declare are dropped (``agent.extra_arguments``); identical calls of one answer run once; a
call repeated in one turn is not run again: its model call stops there (``agent.stop_repeated_calls``)
and the model is asked for its answer with the tools off. A tool with ``approval: ask``
runs only if the session's approver (a callback its front end gives, :mod:`qwenrun.approval`) says
yes; ``deny`` never runs. The agent's MCP servers (:mod:`qwenrun.mcp`) start and stop with it and add
their tools to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qwenrun.agent.answer import Answer, answer_notes
from qwenrun.agent.model_call import ANSWER_NOTE, ModelCall, answer_request
from qwenrun.agent.observability import Telemetry, TurnTelemetry
from qwenrun.agent.steps import (
    Step,
    TurnOptions,
    assistant_message,
    call_key,
    seen_calls,
    with_reasoning,
)
from qwenrun.agent.team import Team
from qwenrun.approval import Approver, review
from qwenrun.engines.base import Constraint, Engine, Request
from qwenrun.engines.registry import create_engine
from qwenrun.errors import ConfigError
from qwenrun.events import Event, Final, ParsedCall, TextDelta, ToolCall, ToolResult, Usage
from qwenrun.events import to_dict as event_dict
from qwenrun.mcp.toolset import McpToolset
from qwenrun.permissions import Permissions, Verdict
from qwenrun.sessions.store import MemoryStore, session_info, turn_record, usage_meta
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.spec.output import OutputSchema, answer_schema
from qwenrun.tools import Tool, declared_only, dropped_notice, run_call

if TYPE_CHECKING:
    from qwenrun.sessions.store import RecordKind, SessionStore

__all__ = ["Agent", "Session"]

log = logging.getLogger(__name__)


class Agent:
    """An agent spec bound to an engine and its tools. Cheap to share between sessions."""

    def __init__(
        self,
        spec: AgentSpec,
        engine: Engine | None = None,
        tools: Sequence[Tool | Callable[..., Any]] | None = None,
        *,
        strict_plugins: bool = True,
        store: SessionStore | None = None,
        telemetry: Telemetry | None = None,
        mcp: McpToolset | None = None,
    ) -> None:
        self.spec = spec
        self.store = store  # sessions record every message here (None: in memory only)
        self.telemetry = telemetry or Telemetry.from_environment()
        self.engine: Engine = engine if engine is not None else create_engine(spec)
        if tools is None:
            from qwenrun.agent.plugins import load_tools

            memory = store if isinstance(store, MemoryStore) else None  # the memory toolset's facts
            tools = load_tools(spec, strict=strict_plugins, store=memory)
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            built = tool if isinstance(tool, Tool) else Tool.from_function(tool)
            self.tools[built.name] = built
        self.mcp = McpToolset(spec) if mcp is None else mcp.attach(self.tools)  # tools join at start
        self.system_prompt = spec.system_prompt()
        folder = Path(spec.source).parent if spec.source not in ("<dict>", "<string>") else None
        self.permissions = Permissions(spec.permissions.rules(), folder)  # checked before each call
        self._schemas: tuple[tuple[Tool, ...], list[dict[str, Any]]] = ((), [])
        self.team: Team | None = Team(self) if spec.members else None  # agents: (its tools join these)

    def verdict(self, call: ToolCall) -> Verdict:
        """What happens to ``call`` of one of :attr:`tools`: ``permissions:`` rules, else the tool's
        own ``approval`` (the one check that every call of every tool passes before it runs)."""
        tool = self.tools[call.name]
        extra = tool.undeclared(call.arguments)
        return self.permissions.decide(call.name, call.arguments, default=tool.approval, undeclared=extra)

    @classmethod
    def from_file(cls, path: str, overrides: Sequence[str] = (), **kwargs: Any) -> Agent:
        return cls(AgentSpec.from_file(path, overrides), **kwargs)

    @property
    def name(self) -> str:
        return self.spec.agent.name

    def chat_template_kwargs(self) -> dict[str, Any]:
        """The chat template variables of every model call (``agent.enable_thinking``)."""
        thinking = self.spec.agent.enable_thinking
        return {} if thinking is None else {"enable_thinking": thinking}

    def sampling_overrides(self) -> dict[str, Any]:
        """Sampling parameters of every model call beyond ``sampling`` (``agent.thinking_budget``)."""
        budget = self.spec.agent.thinking_budget
        return {} if budget is None else {"thinking_token_budget": budget}

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The tools as OpenAI ``tools`` (the same list object while the tools stay the same, so
        that an engine can cache what it derives from them, such as a forced call's grammar)."""
        tools, schemas = self._schemas
        current = tuple(self.tools.values())
        if len(current) != len(tools) or any(a is not b for a, b in zip(current, tools, strict=True)):
            schemas = [tool.openai_schema() for tool in current]
            self._schemas = current, schemas
        return schemas

    async def start(self) -> None:
        """Start the engine and the MCP servers (at the same time); on a failure, stop the servers."""
        try:
            starts = self.engine.start(), self._start_mcp(), *Team.starts(self)  # a team's: its agents'
            results = await asyncio.gather(*starts, return_exceptions=True)
            failed = next((result for result in results if isinstance(result, BaseException)), None)
            if failed is not None:
                raise failed
        except BaseException:
            await self.mcp.close()
            raise

    async def _start_mcp(self) -> None:
        if not self.mcp:
            return
        await self.mcp.start(self.tools)
        for where, choice in self.spec.tool_choices():
            if choice not in ("auto", "none", "required") and choice not in self.tools:
                down = [c.name for c in self.mcp.connections if c.state != "ready"]
                raise ConfigError(
                    f"{self.spec.source}: {where}: {choice!r} is not a tool of this agent "
                    f"(tools: {', '.join(self.tools) or 'none'}"
                    + (f"; MCP servers that did not start: {', '.join(down)})" if down else ")")
                )

    async def shutdown(self) -> None:
        try:
            await self.engine.shutdown()
        finally:
            await asyncio.gather(self.mcp.close(), *Team.stops(self))
        if self.store is not None:
            await asyncio.to_thread(self.store.flush)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def session(
        self, session_id: str | None = None, *, record: bool = True, approver: Approver | None = None
    ) -> Session:
        """A new session, or the stored one of that id (resumed from :attr:`store`). ``approver``
        decides the calls of ``approval: ask`` tools (without one they are refused)."""
        return Session(self, session_id, record=record, approver=approver)

    async def ask(self, prompt: str) -> Final:
        """Answer one question in a fresh session."""
        return await self.session().ask(prompt)


class Session:
    """One conversation: its history (without the system prompt) and its turns."""

    def __init__(
        self,
        agent: Agent,
        session_id: str | None = None,
        *,
        record: bool = True,
        approver: Approver | None = None,
    ) -> None:
        self.agent = agent
        self.approver = approver  # asked before each call of an `approval: ask` tool
        self.id = session_id or uuid.uuid4().hex
        self.messages: list[dict[str, Any]] = []
        self.store = agent.store if record else None  # each message is recorded as it is added
        self.stored = False  # whether the store knows this session
        if self.store is not None and session_id is not None:
            history = self.store.load(session_id)
            if history is not None:
                self.messages, self.stored = history, True
        self._turn = 0
        self._trace: TurnTelemetry | None = None

    def reset(self) -> None:
        """Forget the history; a recorded session goes on as a new one (a new ``id``)."""
        self.messages.clear()
        if self.stored:
            self.id, self.stored = uuid.uuid4().hex, False

    def _record(self, message: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
        """Add ``message`` to the history and, if the session is recorded, to the store."""
        self.messages.append(message)
        self._write("message", message, meta)

    def _write(self, kind: RecordKind, data: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
        if self.store is None:
            return
        try:
            if not self.stored:
                self.store.create(session_info(self.agent.spec, self.id, str(data.get("content") or "")))
                self.stored = True
            self.store.append(self.id, self._turn, kind, data, meta or {})
        except Exception:  # a failing store is logged; the conversation goes on
            log.exception("session %s: cannot record to %r", self.id, self.store)

    async def _written(self) -> None:
        """Wait until the store has written the turn (before its Final: a replica on the same
        database may resume the session next, and a crash after the answer loses nothing)."""
        if self.store is None:
            return
        try:
            await asyncio.to_thread(self.store.flush)
        except Exception:  # a failing store is logged; the conversation goes on
            log.exception("session %s: cannot flush %r", self.id, self.store)

    async def ask(self, prompt: str, **kwargs: Any) -> Final:
        final: Final | None = None
        async for event in self._events(prompt, text=False, **kwargs):  # no TextDelta: cheaper
            if isinstance(event, Final):
                final = event
        assert final is not None  # stream() always ends with Final unless an exception escapes
        return final

    def stream(
        self,
        prompt: str,
        *,
        tool_choice: str | None = None,
        overrides: dict[str, Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        output_schema: OutputSchema | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Run one user turn, yielding events; the last one is :class:`Final` (``output_schema``:
        of this turn's answer instead of ``agent.output_schema``).

        ``overrides`` (sampling) and ``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}``)
        apply to every model call of the turn, over the agent's own.

        Cancelling the consumer (Ctrl-C, a stop button, a closed HTTP stream) aborts the model call
        and keeps the session usable: the partial answer is kept in the history. Each message is
        recorded in the agent's store as it is added, and the turn's end (or error) after it.
        """
        return self._events(prompt, tool_choice=tool_choice, overrides=overrides,
                            template=chat_template_kwargs, schema=output_schema, text=True)  # fmt: skip

    async def _events(
        self,
        prompt: str,
        *,
        tool_choice: str | None = None,
        overrides: dict[str, Any] | None = None,
        template: Mapping[str, Any] | None = None,
        schema: OutputSchema | None = None,
        text: bool,
    ) -> AsyncGenerator[Event, None]:
        """:meth:`stream`; without :class:`TextDelta` events unless ``text`` (``ask`` needs none,
        and skipping them saves three generator hops per streamed token)."""
        self._turn = 1 + sum(1 for message in self.messages if message.get("role") == "user")
        trace = self._trace = self.agent.telemetry.turn(self.id, self.agent.name, self._turn)
        try:
            calls = TurnOptions(
                {**self.agent.sampling_overrides(), **(overrides or {})},
                {**self.agent.chat_template_kwargs(), **(template or {})},
                schema or answer_schema(self.agent.spec),
            )
            # closed here, not by the garbage collector: a consumer that stops listening ends the
            # model call now, and the partial answer is recorded before the turn's end
            async with aclosing(Team.turn(self, prompt, tool_choice, calls, text)) as steps:
                async for event in steps:
                    if isinstance(event, Final):
                        trace.end(event)
                        self._write("event", *turn_record(event, trace.started))
                        await self._written()
                    yield event
        except BaseException as exc:
            if not trace.done:  # an error, a cancellation, or a consumer that stopped listening
                trace.fail(exc)
                self._write("event", *turn_record(exc, trace.started))
            raise

    async def _steps(
        self, prompt: str, tool_choice: str | None, options: TurnOptions, text: bool, continued: bool = False
    ) -> AsyncGenerator[Event, None]:
        spec = self.agent.spec.agent
        if not continued:  # continued: a handoff, this turn's user message is in the history
            self._record({"role": "user", "content": prompt})
        choice = tool_choice or spec.turn_tool_choice(prompt)  # the request's, a rule's, or the file's
        total = Usage()
        tool_calls = 0
        iteration = 0
        done: set[tuple[str, str]] = set()  # the calls run in this turn (name, arguments)
        checked = self.agent.tools if spec.extra_arguments == "drop" else {}  # undeclared arguments drop
        answering = False  # the model repeated a call: ask for the answer (a transient note, tools off)
        schema = options.schema  # the answer is JSON of it: only the validated JSON is streamed as text
        while iteration < spec.max_iterations:
            iteration += 1
            step = Step(seen_calls(done, checked) if done and spec.stop_repeated_calls else None)
            try:
                step.structured = schema is not None and (choice == "none" or not self.agent.tools)
                notes = answer_notes(None, schema, step)
                async with aclosing(self._model_call(choice, options, step, text, answering, notes)) as model:
                    async for event in model:
                        if schema is None or not isinstance(event, TextDelta):
                            yield event
            finally:
                if not step.done and (step.text or step.reasoning):  # interrupted: keep what the user saw
                    partial = with_reasoning({"role": "assistant", "content": step.text}, step.reasoning)
                    self._record(partial, {"interrupted": True})
            total += step.usage
            pairs = [declared_only(checked, call) for call in step.result.tool_calls if call.ok]
            calls, dropped = [call for call, _ in pairs], {call.id: extra for call, extra in pairs if extra}
            if (calls or step.repeated) and choice != "none":
                fresh = [call for call in calls if call_key(call) not in done]
                if not fresh:  # the same call again (small models loop): answer with tools off
                    log.debug("session %s: repeated tool call(s) %s; asking for the answer", self.id,
                              ", ".join(call.name for call in calls))  # fmt: skip
                    choice, answering = "none", True
                    continue
                calls = fresh
            if (not calls or choice == "none") and schema is not None:
                answer = Answer(step, schema, ANSWER_NOTE if answering else None)
                answered = answer.events(lambda s, m: self._model_call("none", options, s, text, extra=m))
                async with aclosing(answered) as events:
                    async for event in events:
                        yield event
                total += answer.usage
                content, step = answer.content, answer.step
                self._record(with_reasoning({"role": "assistant", "content": content}, step.reasoning),
                             usage_meta(step.usage, step.finish_reason))  # fmt: skip
                if text:
                    yield TextDelta(content)
                iteration += answer.calls
                yield Final(content, "answer", iteration, tool_calls, total, output=answer.value)
                return
            if not calls or choice == "none":
                content = step.result.content
                meta = usage_meta(step.usage, step.finish_reason)
                self._record(with_reasoning({"role": "assistant", "content": content}, step.reasoning), meta)
                stop: Literal["answer", "length"] = "length" if step.finish_reason == "length" else "answer"
                yield Final(content, stop, iteration, tool_calls, total)
                return
            if not spec.parallel_tool_calls:
                calls = calls[:1]
            message = with_reasoning(assistant_message(step.result.content, calls), step.reasoning)
            meta = usage_meta(step.usage)
            if thought := [call.id for call in calls if call.from_thinking]:  # made while thinking
                meta["from_thinking"] = thought
            self._record(message, meta)
            for notice in (dropped_notice(call, dropped[call.id]) for call in calls if call.id in dropped):
                self._write("event", event_dict(notice))
                yield notice
            shown = [ToolCall(call.id, call.name, call.arguments, call.from_thinking) for call in calls]
            for event in shown:
                yield event
            results = await self._run_calls(calls, shown)
            for result in results:
                self._record(
                    {
                        "role": "tool",
                        "tool_call_id": result.id,
                        "name": result.name,
                        "content": result.content,
                    },
                    {"duration_s": result.duration_s, "is_error": result.is_error},
                )
                yield result
            tool_calls += len(calls)
            done.update(call_key(call) for call in calls)
            choice = "auto"  # a forced tool_choice applies to the first call of a turn only
        note = f"(stopped after {spec.max_iterations} model calls without a final answer)"
        self._record({"role": "assistant", "content": note}, {"note": "max_iterations"})
        yield Final(note, "max_iterations", iteration, tool_calls, total)

    async def _model_call(
        self, choice: str, options: TurnOptions, step: Step, text: bool, answering: bool = False,
        extra: Sequence[dict[str, Any]] = (),
    ) -> AsyncGenerator[Event, None]:
        """One model call (:mod:`qwenrun.agent.model_call`; plus at most one repair), streaming its
        visible text and its reasoning if ``text``; it stops as soon as the output holds a call that
        ``step.seen`` knows; ``answering``: it asks for the answer with the tools off. ``extra``:
        transient messages; ``step.structured``: the answer is under the turn's output schema."""
        agent, trace, settings = self.agent, self._trace, self.agent.spec.agent
        assert trace is not None  # set by stream()
        repaired = False
        schema = options.schema if step.structured else None
        while True:
            span = trace.model_call(int(repaired))
            tools = agent.tool_schemas() if choice != "none" and agent.tools and schema is None else None
            request = Request(
                messages=[{"role": "system", "content": agent.system_prompt}, *self.messages, *extra],
                tools=tools,
                tool_choice="none" if schema is not None else choice,
                sampling=agent.spec.sampling,
                overrides=options.overrides,
                constraint=Constraint(json=schema.json_schema) if schema is not None else None,
                chat_template_kwargs=options.template,
            )
            call = ModelCall(agent.engine, answer_request(request) if answering else request,
                             calls=schema is None, lenient=settings.lenient_tool_calls, seen=step.seen,
                             calls_in_thinking=settings.calls_in_thinking == "run")  # fmt: skip
            try:
                async with aclosing(call.deltas()) as deltas:
                    async for _, items in deltas:
                        for event in step.take(items):
                            if text:
                                yield event
                        if call.repeated:  # no repair; closing the stream aborts the generation
                            step.repeated = repaired = True
                            log.info("session %s: stopped a model call at its repeat of %s", self.id,
                                     call.watch and call.watch.call)  # fmt: skip
            except BaseException as exc:
                span.fail(exc)
                raise
            for event in step.take(call.finish()):
                if text:
                    yield event
            span.end_model(call.usage)
            step.usage += call.usage
            step.finish_reason = call.finish_reason
            yield call.usage
            repair = None if repaired or not settings.repair_malformed_calls else call.repair(agent.tools)
            if repair is None:
                step.result = call.result()
                step.done = True
                return
            repaired = True
            choice, notice = repair
            yield notice

    async def _run_calls(self, calls: list[ParsedCall], shown: list[ToolCall]) -> list[ToolResult]:
        """Ask the approver about each call that needs it (one at a time, in order), then run the
        approved calls in parallel; a refused call's result says why it did not run. Identical calls
        (name and arguments) are asked about and run once: each of their ids gets the result."""
        keys = [call_key(call) for call in calls]
        first = [keys.index(key) for key in keys]  # the index of each call's first identical one
        results: list[ToolResult | None] = [None] * len(calls)
        for index, event in enumerate(shown):
            tool = self.agent.tools.get(event.name)
            if tool is None or first[index] != index:
                continue
            verdict = self.agent.verdict(event)
            if verdict.rule is not None:  # the session records what a rule decided
                self._write("event", {"type": "permission", "id": event.id, "name": event.name,
                                      **verdict.record()})  # fmt: skip
            if verdict.mode != "auto":
                why = verdict.reason()
                results[index] = await review(event, verdict.mode, tool.origin, self.approver, why)
        runnable = [index for index, result in enumerate(results) if result is None and first[index] == index]
        if len(runnable) == 1:  # no gather task: under load each task hop is a loop iteration
            results[runnable[0]] = await self._run_tool(calls[runnable[0]])
        elif runnable:
            ran = await asyncio.gather(*(self._run_tool(calls[index]) for index in runnable))
            for index, result in zip(runnable, ran, strict=True):
                results[index] = result
        return [dataclasses.replace(got, id=call.id) for call, index in zip(calls, first, strict=True)
                if (got := results[index]) is not None]  # fmt: skip

    async def _run_tool(self, call: ParsedCall) -> ToolResult:
        assert self._trace is not None  # set by stream()
        span = self._trace.tool_call(call.id, call.name)
        settings = self.agent.spec.agent
        try:
            result = await run_call(
                self.agent.tools, call, timeout_s=settings.timeout_s, limit=settings.max_tool_output_chars
            )
        except BaseException as exc:  # cancelled
            span.fail(exc)
            raise
        span.end_tool(result)
        return result
