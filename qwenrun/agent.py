"""The agent loop: model call -> Hermes tool calls -> tools -> tool messages -> ... -> answer.

One bounded async loop per user turn (``max_iterations`` model calls), yielding the typed events of
:mod:`qwenrun.events`. Tool calls of one model answer run in parallel, each under its time limit;
every tool failure becomes an ``Error: ...`` tool result the model can read. ``tool_choice``
``required`` / a tool name is enforced with structured outputs on the first model call of a turn
(then it falls back to ``auto`` so the model can answer), and a malformed call is retried once with
a grammar-forced call. Calls written as bare JSON are read too (``agent.lenient_tool_calls``), and a
call the model repeats with the same arguments in one turn is not run again: the model is asked for
its answer with the tools off.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from qwenrun import hermes
from qwenrun.config import AgentSpec
from qwenrun.engine import Constraint, Engine
from qwenrun.errors import ToolError
from qwenrun.events import Event, Final, Repair, TextDelta, ToolCall, ToolResult, Usage
from qwenrun.observability import Telemetry, TurnTelemetry
from qwenrun.store import session_info, turn_record, usage_meta
from qwenrun.tools import Tool, format_result

if TYPE_CHECKING:
    from qwenrun.store import RecordKind, SessionStore

__all__ = ["Agent", "Session", "forced_call"]

log = logging.getLogger(__name__)

FORCED_PREFILL = "<tool_call>\n"
# Sent (not recorded) with the tools off when the model repeats a call it already made this turn:
# small models copy the call again instead of answering from its result.
ANSWER_NOTE = (
    "Answer the user's question now from the tool results above, in plain language, without calling a tool."
)


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
    ) -> None:
        self.spec = spec
        self.store = store  # sessions record every message here (None: in memory only)
        self.telemetry = telemetry or Telemetry.from_environment()
        if engine is None:
            from qwenrun.engine import VLLMEngine

            engine = VLLMEngine(spec)
        self.engine: Engine = engine
        if tools is None:
            from qwenrun.plugins import load_tools

            tools = load_tools(spec, strict=strict_plugins)
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            built = tool if isinstance(tool, Tool) else Tool.from_function(tool)
            self.tools[built.name] = built
        self.system_prompt = spec.system_prompt()
        self._forced_for: tuple[Tool, ...] = ()
        self._forced_cache: dict[str, tuple[Constraint | None, str]] = {}

    @classmethod
    def from_file(cls, path: str, overrides: Sequence[str] = (), **kwargs: Any) -> Agent:
        return cls(AgentSpec.from_file(path, overrides), **kwargs)

    @property
    def name(self) -> str:
        return self.spec.agent.name

    @property
    def lenient_names(self) -> frozenset[str] | None:
        """The tool names whose bare JSON calls are read (``agent.lenient_tool_calls``), or None."""
        if not self.spec.agent.lenient_tool_calls or not self.tools:
            return None
        return frozenset(self.tools)

    def tool_schemas(self) -> list[dict[str, Any]]:
        return [tool.openai_schema() for tool in self.tools.values()]

    def forced_call(self, choice: str) -> tuple[Constraint | None, str]:
        """:func:`forced_call` for this agent's tools, cached per ``choice`` while the tools stay."""
        tools = tuple(self.tools.values())  # kept alive in _forced_for, so ids are not reused
        same = len(tools) == len(self._forced_for) and all(
            a is b for a, b in zip(tools, self._forced_for, strict=True)
        )
        if not same:
            self._forced_cache.clear()
            self._forced_for = tools
        if choice not in self._forced_cache:
            self._forced_cache[choice] = forced_call(self.tool_schemas(), choice)
        return self._forced_cache[choice]

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self) -> None:
        await self.engine.shutdown()
        if self.store is not None:
            await asyncio.to_thread(self.store.flush)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def session(self, session_id: str | None = None, *, record: bool = True) -> Session:
        """A new session, or the stored one of that id (resumed from :attr:`store`)."""
        return Session(self, session_id, record=record)

    async def ask(self, prompt: str) -> Final:
        """Answer one question in a fresh session."""
        return await self.session().ask(prompt)


class Session:
    """One conversation: its history (without the system prompt) and its turns."""

    def __init__(self, agent: Agent, session_id: str | None = None, *, record: bool = True) -> None:
        self.agent = agent
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
    ) -> AsyncGenerator[Event, None]:
        """Run one user turn, yielding events; the last one is :class:`Final`.

        Cancelling the consumer (Ctrl-C, a stop button, a closed HTTP stream) aborts the model call
        and keeps the session usable: the partial answer is kept in the history. Each message is
        recorded in the agent's store as it is added, and the turn's end (or error) after it.
        """
        return self._events(prompt, tool_choice=tool_choice, overrides=overrides, text=True)

    async def _events(
        self,
        prompt: str,
        *,
        tool_choice: str | None = None,
        overrides: dict[str, Any] | None = None,
        text: bool,
    ) -> AsyncGenerator[Event, None]:
        """:meth:`stream`; without :class:`TextDelta` events unless ``text`` (``ask`` needs none,
        and skipping them saves three generator hops per streamed token)."""
        self._turn = 1 + sum(1 for message in self.messages if message.get("role") == "user")
        trace = self._trace = self.agent.telemetry.turn(self.id, self.agent.name, self._turn)
        try:
            async for event in self._steps(prompt, tool_choice, overrides, text):
                if isinstance(event, Final):
                    trace.end(event)
                    self._write("event", *turn_record(event, trace.started))
                yield event
        except BaseException as exc:
            if not trace.done:  # an error, a cancellation, or a consumer that stopped listening
                trace.fail(exc)
                self._write("event", *turn_record(exc, trace.started))
            raise

    async def _steps(
        self, prompt: str, tool_choice: str | None, overrides: dict[str, Any] | None, text: bool
    ) -> AsyncIterator[Event]:
        spec = self.agent.spec.agent
        self._record({"role": "user", "content": prompt})
        choice = tool_choice or spec.tool_choice
        total = Usage()
        tool_calls = 0
        iteration = 0
        done: set[tuple[str, str]] = set()  # the calls run in this turn (name, arguments)
        note: str | None = None  # a transient instruction for the next model call only
        while iteration < spec.max_iterations:
            iteration += 1
            step = _Step()
            try:
                async for event in self._model_call(choice, overrides, step, text, note):
                    yield event
            finally:
                if not step.done and step.text:  # interrupted: keep what the user saw
                    self._record({"role": "assistant", "content": step.text}, {"interrupted": True})
            total += step.usage
            calls = [call for call in step.result.tool_calls if call.ok]
            if calls and choice != "none":
                fresh = [call for call in calls if _call_key(call) not in done]
                if not fresh:  # the same call again (small models loop): answer with tools off
                    log.debug("session %s: repeated tool call(s) %s; asking for the answer", self.id,
                              ", ".join(call.name for call in calls))  # fmt: skip
                    choice, note = "none", ANSWER_NOTE
                    continue
                calls = fresh
            if not calls or choice == "none":
                content = step.result.content
                meta = usage_meta(step.usage, step.finish_reason)
                self._record({"role": "assistant", "content": content}, meta)
                stop: Literal["answer", "length"] = "length" if step.finish_reason == "length" else "answer"
                yield Final(content, stop, iteration, tool_calls, total)
                return
            if not spec.parallel_tool_calls:
                calls = calls[:1]
            self._record(_assistant_message(step.result.content, calls), usage_meta(step.usage))
            for call in calls:
                yield ToolCall(call.id, call.name, call.arguments)
            if len(calls) == 1:  # no gather task: under load each task hop is a loop iteration
                results = [await self._run_tool(calls[0])]
            else:
                results = await asyncio.gather(*(self._run_tool(call) for call in calls))
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
            done.update(_call_key(call) for call in calls)
            choice = "auto"  # a forced tool_choice applies to the first call of a turn only
        note = f"(stopped after {spec.max_iterations} model calls without a final answer)"
        self._record({"role": "assistant", "content": note}, {"note": "max_iterations"})
        yield Final(note, "max_iterations", iteration, tool_calls, total)

    async def _model_call(
        self, choice: str, overrides: dict[str, Any] | None, step: _Step, text: bool, note: str | None = None
    ) -> AsyncIterator[Event]:
        """One model call (plus at most one repair), streaming its visible text if ``text``."""
        agent, trace = self.agent, self._trace
        assert trace is not None  # set by stream()
        constraint, prefill = agent.forced_call(choice)
        repaired = False
        while True:
            span = trace.model_call(int(repaired))
            parser = hermes.StreamParser(tools=agent.lenient_names if choice != "none" else None)
            parser.feed(prefill)
            started = time.perf_counter()
            last_prompt = last_completion = 0
            tools = agent.tool_schemas() if choice != "none" and agent.tools else None
            extra = [{"role": "system", "content": note}] if note else []
            deltas = agent.engine.generate(
                [{"role": "system", "content": agent.system_prompt}, *self.messages, *extra],
                tools=tools,
                sampling=agent.spec.sampling,
                overrides=overrides,
                constraint=constraint,
                prefill=prefill,
            )
            try:
                async for delta in deltas:
                    last_prompt, last_completion = delta.prompt_tokens, delta.completion_tokens
                    step.finish_reason = delta.finish_reason or step.finish_reason
                    for item in parser.feed(delta.text):
                        if isinstance(item, str):
                            step.text += item
                            if text:
                                yield TextDelta(item)
            except BaseException as exc:
                span.fail(exc)
                raise
            finally:  # a consumer that stops early aborts the model call now, not at GC
                close = getattr(deltas, "aclose", None)
                if close is not None:
                    await close()
            for item in parser.finish():
                if isinstance(item, str):
                    step.text += item
                    if text:
                        yield TextDelta(item)
            usage = Usage(last_prompt, last_completion, time.perf_counter() - started, 1)
            span.end_model(usage)
            step.usage += usage
            yield usage
            result = parser.result()
            bad = result.malformed
            if not bad or repaired or not agent.spec.agent.repair_malformed_calls or not agent.tools:
                step.result = result
                step.done = True
                return
            repaired = True
            target = _intended_tool(bad[0], agent.tools)
            yield Repair(f"malformed tool call ({bad[0].error}); retrying with a forced {target} call")
            constraint, prefill = agent.forced_call(target)

    async def _run_tool(self, call: hermes.ToolCall) -> ToolResult:
        assert self._trace is not None  # set by stream()
        span = self._trace.tool_call(call.id, call.name)
        try:
            result = await self._call_tool(call)
        except BaseException as exc:  # cancelled
            span.fail(exc)
            raise
        span.end_tool(result)
        return result

    async def _call_tool(self, call: hermes.ToolCall) -> ToolResult:
        agent = self.agent
        tool = agent.tools.get(call.name)
        started = time.perf_counter()
        limit = agent.spec.agent.max_tool_output_chars
        if tool is None:
            known = ", ".join(agent.tools) or "none"
            return ToolResult(
                call.id, call.name, f"Error: unknown tool {call.name!r}; available: {known}", True
            )
        timeout = tool.timeout_s or agent.spec.agent.timeout_s
        task = asyncio.ensure_future(tool.call(call.arguments))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except BaseException:  # the turn is cancelled, and with it the tool call
            task.cancel()
            raise
        if not done:
            await _abandon(task, tool.name)
            content, is_error = f"Error: {tool.name} timed out after {timeout:g} s", True
        else:
            try:
                content, is_error = format_result(task.result(), limit), False
            except asyncio.CancelledError:  # raised by the tool itself: this turn was not cancelled
                content, is_error = f"Error: {tool.name} was cancelled", True
            except ToolError as exc:
                content, is_error = f"Error: {exc}", True
            except Exception as exc:  # a tool's own failure is data for the model, not a crash
                content, is_error = format_result(f"Error: {_describe(exc)}", limit), True
        return ToolResult(call.id, call.name, content, is_error, time.perf_counter() - started)


CANCEL_GRACE_S = 0.5


async def _abandon(task: asyncio.Future[Any], name: str) -> None:
    """Cancel a tool call past its time limit and give it a moment to clean up; unlike
    ``asyncio.wait_for``, never wait longer: a tool that swallows the cancellation would hold
    the turn forever. It is left running (and logged); the turn goes on."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # nothing unretrieved
    finished, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    if not finished:
        log.warning("tool %s ignores cancellation; it was abandoned and may still be running", name)


def _describe(exc: BaseException) -> str:
    """``TypeName: message``, even for an exception whose ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception as problem:
        text = f"(the message cannot be printed: {type(problem).__name__})"
    return f"{type(exc).__name__}: {text}"


class _Step:
    """What one model call produced (filled in while streaming)."""

    def __init__(self) -> None:
        self.text = ""
        self.done = False
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.result = hermes.ParseResult("", [])


def forced_call(
    tools: Sequence[dict[str, Any]], choice: str, *, parallel: bool = False
) -> tuple[Constraint | None, str]:
    """The structured-output constraint and prompt prefill that force a Hermes tool call.

    ``tools`` are OpenAI tool dicts. The prompt ends with ``<tool_call>\\n`` and the model must
    continue with one JSON object ``{"name": <a tool>, "arguments": <its schema>}``; ``auto`` and
    ``none`` force nothing. With ``parallel`` and ``required`` the model may go on with more
    ``<tool_call>`` blocks (an xgrammar structural tag), as ``vllm serve`` allows several calls.
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
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    if parallel and choice == "required":
        return Constraint(structural_tag=json.dumps(_several_calls(schema))), FORCED_PREFILL
    return Constraint(json=schema), FORCED_PREFILL


def _several_calls(schema: dict[str, Any]) -> dict[str, Any]:
    """One or more Hermes calls after the prefill: ``{call}\\n</tool_call>``, then any number of
    ``\\n<tool_call>\\n{call}\\n</tool_call>``; compact JSON (at most one space in a row)."""

    def call() -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}

    close = {"type": "const_string", "value": "\n</tool_call>"}
    more = {
        "type": "sequence",
        "elements": [{"type": "const_string", "value": "\n<tool_call>\n"}, call(), close],
    }
    return {
        "type": "structural_tag",
        "format": {"type": "sequence", "elements": [call(), close, {"type": "star", "content": more}]},
    }


def _arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    schema = function.get("parameters") or {"type": "object"}
    if "$defs" in json.dumps(schema) or "$ref" in json.dumps(schema):
        return {"type": "object"}  # references cannot be nested under anyOf; accept any object
    return copy.deepcopy(schema)


_NAME_IN_RAW = re.compile(r"""["']name["']\s*:\s*["']([^"']+)["']""")


def _intended_tool(call: hermes.ToolCall, tools: dict[str, Tool]) -> str:
    """The tool a malformed call meant, if its name can be read; else any tool ('required')."""
    if call.name in tools:
        return call.name
    match = _NAME_IN_RAW.search(call.raw)
    return match.group(1) if match and match.group(1) in tools else "required"


def _call_key(call: hermes.ToolCall) -> tuple[str, str]:
    return call.name, json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)


def _assistant_message(content: str, calls: Sequence[hermes.ToolCall]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json()},
            }
            for call in calls
        ],
    }
