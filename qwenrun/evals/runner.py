"""Running eval cases through qwenrun: the agent loop, or the OpenAI server in pass-through mode.

Every model call goes through :class:`Recorder`, which keeps the raw text of each completion, so
the same text can be read a second time by vLLM's own Hermes parser. Both paths stop at the first
model call's tool calls:

* ``agent``: the case's tools become tools the agent declares but never runs (a stub that returns
  an error); the turn is stopped when the agent has read the first call's tool calls (before any
  tool result goes back to the model) or has answered.
* ``server``: qwenrun's OpenAI-compatible app on a free port of 127.0.0.1 (uvicorn, in this event
  loop), asked by the official ``openai`` client with the case's messages and tools, as a client of
  ``vllm serve`` would; the ``tool_calls`` of the response are what qwenrun read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, create_model

from qwenrun.agent import Agent
from qwenrun.agent.observability import Telemetry
from qwenrun.engines.base import Delta, Engine, Health, Request
from qwenrun.errors import MissingExtraError, QwenrunError, ToolError
from qwenrun.evals.cases import Case, CaseTool
from qwenrun.evals.checker import CheckedCall
from qwenrun.events import Final, Repair, ToolCall, ToolResult, Usage
from qwenrun.frontends.settings import OpenAIFrontend
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool

__all__ = ["Outcome", "Via", "run_cases"]

Via = Literal["agent", "server"]
_case_key: contextvars.ContextVar[str] = contextvars.ContextVar("qwenrun_eval_case", default="")


@dataclass(slots=True)
class Outcome:
    """One case through one path: the first model call's raw text, the calls qwenrun read, the
    time from the request to qwenrun's reading of the calls (or the answer), and any error."""

    case: Case
    text: str
    calls: list[CheckedCall]
    latency_s: float
    model_calls: int = 1
    repaired: bool = False
    error: str | None = None


class Recorder:
    """An :class:`~qwenrun.engines.base.Engine` that passes everything to ``engine`` and keeps the
    text of each completion (its prefill included), under the request id or the running case's id."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.texts: dict[str, list[str]] = {}

    @property
    def tool_call_format(self) -> str:
        return self.engine.tool_call_format

    def health(self) -> Health:
        return self.engine.health()

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self) -> None:  # the owner of the wrapped engine shuts it down
        pass

    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        key = request.request_id or _case_key.get()
        pieces: list[str] = []
        stream = self.engine.generate(request)
        try:
            async for delta in stream:
                pieces.append(delta.text)
                yield delta
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
            self.texts.setdefault(key, []).append("".join(pieces))

    def first_text(self, key: str) -> str:
        texts = self.texts.get(key)
        return texts[0] if texts else ""


_AnyArguments = create_model("eval_arguments", __config__=ConfigDict(extra="allow"))


async def _not_run(**arguments: Any) -> str:
    raise ToolError("qwenrun eval declares this tool but does not run it")


def _declared(tool: CaseTool) -> Tool:
    """A tool the agent shows the model with the case's own schema, but never runs."""
    function = tool.function
    return Tool(function.name, function.description, dict(function.parameters), _not_run, _AnyArguments,
                _is_async=True)  # fmt: skip


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)


async def _via_agent(spec: AgentSpec, recorder: Recorder, case: Case, telemetry: Telemetry) -> Outcome:
    _case_key.set(case.id)
    agent = Agent(spec, engine=recorder, tools=[_declared(tool) for tool in case.tools], telemetry=telemetry)
    session = agent.session(record=False)
    messages = case.openai_messages()
    session.messages = messages[:-1]  # the case's own system messages follow the agent's prompt
    calls: list[CheckedCall] = []
    repaired = False
    model_calls = 0
    started = time.perf_counter()
    decided = 0.0
    events = session.stream(_text(messages[-1].get("content")))
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, ToolCall):
                decided = decided or time.perf_counter()
                calls.append((event.name, event.arguments))
            elif isinstance(event, Usage):  # one per model call, a repair included
                model_calls += 1
            elif isinstance(event, Repair):
                repaired = True
            elif isinstance(event, Final | ToolResult):
                decided = decided or time.perf_counter()
                break
    text = recorder.first_text(case.id)
    return Outcome(case, text, calls, decided - started, max(model_calls, 1), repaired)


class _QuietServer:
    """uvicorn on a socket of 127.0.0.1 as a task of this loop; signals stay with the caller."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def capture_signals(self) -> Any:
                return contextlib.nullcontext()

        self.server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        task = asyncio.create_task(self.server.serve(sockets=[sock]))
        try:
            while not self.server.started and not task.done():
                await asyncio.sleep(0.01)
            if task.done():
                task.result()  # raises what stopped it
                raise QwenrunError("the eval's OpenAI server stopped while starting")
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            sock.close()


def _tool_choice(spec: AgentSpec, case: Case) -> Any:
    """The agent's ``tool_choice`` for the case's question (its ``tool_choice_rules`` applied)."""
    choice = spec.agent.turn_tool_choice(_text(case.messages[-1].content))
    if not case.tools:
        return None
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


@contextlib.asynccontextmanager
async def _server(spec: AgentSpec, recorder: Recorder) -> AsyncIterator[Callable[[Case], Awaitable[Outcome]]]:
    try:
        import openai

        from qwenrun.frontends.openai import create_app
    except ImportError as exc:
        raise MissingExtraError(exc.name or "openai", "eval") from exc
    frontend = OpenAIFrontend.model_validate({"kind": "openai", "host": "127.0.0.1"})
    agent = Agent(spec.model_copy(update={"frontend": frontend}), engine=recorder, tools=[])
    app = create_app(agent, shutdown_engine=False)
    async with _QuietServer(app).running() as url:  # uvicorn runs the app's lifespan (engine start)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="qwenrun-eval", max_retries=0, timeout=3600)

        async def ask(case: Case) -> Outcome:
            extra: dict[str, Any] = {}
            if case.tools:
                extra = {
                    "tools": case.openai_tools(),
                    "tool_choice": _tool_choice(spec, case),
                    "parallel_tool_calls": spec.agent.parallel_tool_calls,
                }
            started = time.perf_counter()
            response = await client.chat.completions.create(
                model=spec.served_model_name,
                messages=case.openai_messages(),  # type: ignore[arg-type]
                **extra,
            )
            latency = time.perf_counter() - started
            message = response.choices[0].message
            calls: list[CheckedCall] = []
            for call in message.tool_calls or []:
                function = getattr(call, "function", None)
                if function is not None:
                    calls.append((function.name, json.loads(function.arguments or "{}")))
            return Outcome(case, recorder.first_text(response.id), calls, latency)

        try:
            yield ask
        finally:
            await client.close()


async def run_cases(
    spec: AgentSpec,
    engine: Engine,
    cases: Sequence[Case],
    *,
    via: Via = "agent",
    concurrency: int = 1,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run every case (``concurrency`` at a time) through ``via``; outcomes in the cases' order.
    A case that fails (an engine error, a bad request) is an outcome with ``error`` set."""
    recorder = Recorder(engine)
    gate = asyncio.Semaphore(max(1, concurrency))
    telemetry = Telemetry.from_environment()

    async def guarded(run: Callable[[Case], Awaitable[Outcome]], case: Case) -> Outcome:
        async with gate:
            started = time.perf_counter()
            try:
                outcome = await run(case)
            except Exception as exc:  # one broken case is reported, the others go on
                detail = f"{type(exc).__name__}: {exc}"
                outcome = Outcome(case, "", [], time.perf_counter() - started, error=detail)
            if on_outcome is not None:
                on_outcome(outcome)
            return outcome

    if via == "agent":
        await recorder.start()
        return list(await asyncio.gather(
            *(guarded(lambda case: _via_agent(spec, recorder, case, telemetry), case) for case in cases)
        ))  # fmt: skip
    async with _server(spec, recorder) as ask:
        return list(await asyncio.gather(*(guarded(ask, case) for case in cases)))
