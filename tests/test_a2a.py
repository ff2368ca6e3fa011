"""The A2A front end (``frontend.kind: a2a``) with the scripted engine, for exact behaviour: the
official A2A client (``a2a-sdk``) against a real uvicorn server on 127.0.0.1, in the test's loop.

Covered: the agent card (skills from the tools, the bearer scheme), ``SendMessage`` and
``SendStreamingMessage`` (the answer artifact and the tool steps), ``GetTask``, ``CancelTask`` of a
running turn, multi-turn contexts recorded as qwenrun sessions, ``input-required`` for
``approval: ask`` tools (approve, reject, a bad answer, no answer in time), protocol 0.3's method
names, and the errors for bad requests (API key, body size, file parts, a busy context, limits).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import A2ACardResolver, A2AClientError, Client, ClientConfig, ClientFactory
from a2a.helpers import get_artifact_text, get_data_parts, get_message_text, new_data_part, new_message
from a2a.server.agent_execution import RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue_v2 import EventQueueSource
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.utils.constants import PROTOCOL_VERSION_0_3
from a2a.utils.errors import (
    ContentTypeNotSupportedError,
    InvalidParamsError,
    InvalidRequestError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict
from loopback import serve_in_loop
from test_server import get_current_weather

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError, EngineError
from qwenrun.frontends.a2a import create_app
from qwenrun.frontends.a2a.turns import TurnExecutor
from qwenrun.frontends.base import Launch
from qwenrun.frontends.registry import launch
from qwenrun.frontends.settings import A2AFrontend
from qwenrun.sessions import open_store
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool

CALL = tool_call_text("get_current_weather", {"city": "深圳"})
ANSWER = "深圳今天多云到晴。"
KEY = "sk-a2a-test-key"


def make_agent(
    script: Any,
    *,
    approval: str = "auto",
    delay_s: float = 0.0,
    tools: bool = True,
    sessions: str = ":memory:",
    **frontend: Any,
) -> tuple[Agent, ScriptedEngine]:
    spec = AgentSpec.from_dict(
        {
            "model": {"path": "/models/qwen", "served_model_name": "Qwen2.5-7B-Instruct"},
            "agent": {"name": "weather", "description": "Answers questions about the weather."},
            "frontend": {"kind": "a2a", **frontend},
            "sessions": {"path": sessions},
        },
        source="tests/a2a.yaml",
    )
    engine = ScriptedEngine(script, delay_s=delay_s)
    weather = [Tool.from_function(get_current_weather, approval=approval)] if tools else []  # type: ignore[arg-type]
    return Agent(spec, engine, tools=weather, store=open_store(spec)), engine


@asynccontextmanager
async def serving(agent: Agent) -> AsyncIterator[str]:
    async with serve_in_loop(create_app(agent)) as url:
        yield url


@asynccontextmanager
async def connected(
    url: str, *, streaming: bool = True, polling: bool = False, key: str | None = None, version: str = ""
) -> AsyncIterator[Client]:
    """The official client of the agent at ``url`` (its card fetched); ``version``: the protocol
    version of the card's interface to use (default: the client's choice, 1.0)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        config = ClientConfig(streaming=streaming, polling=polling, httpx_client=http)
        factory = ClientFactory(config)
        card = await A2ACardResolver(http, url).get_agent_card()
        if version:
            kept = [i for i in card.supported_interfaces if i.protocol_version == version]
            del card.supported_interfaces[:]
            card.supported_interfaces.extend(kept)
        client = factory.create(card)
        try:
            yield client
        finally:
            await client.close()


def user(
    text: str | None = None, *, parts: Sequence[Part] = (), context: str = "", task: str = ""
) -> SendMessageRequest:
    from a2a.helpers import new_text_part

    message = new_message([new_text_part(text)] if text is not None else list(parts), role=Role.ROLE_USER,
                          context_id=context or None, task_id=task or None)  # fmt: skip
    return SendMessageRequest(message=message)


async def events(client: Client, request: SendMessageRequest) -> list[StreamResponse]:
    return [event async for event in client.send_message(request)]


async def send(client: Client, request: SendMessageRequest) -> Task:
    """The task a non-streaming send returns."""
    (only,) = await events(client, request)
    assert only.HasField("task"), only
    return only.task


def steps(task: Task) -> list[dict[str, Any]]:
    """The data parts of the task's status messages (its history and its status), in order."""
    messages = [*task.history, task.status.message]
    return [
        data
        for message in messages
        if message.role == Role.ROLE_AGENT
        for data in get_data_parts(message.parts)
    ]


def weather_script(request: ModelRequest) -> str:
    return CALL if request.messages[-1]["role"] == "user" else ANSWER


# -- the card ---------------------------------------------------------------------------------------


async def test_the_card_names_the_agent_its_tools_and_the_bearer_scheme(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("A2A_TEST_KEY", KEY)
    agent, _ = make_agent(weather_script, approval="ask", api_key_env="A2A_TEST_KEY")
    async with serving(agent) as url, httpx.AsyncClient() as http:
        card = await A2ACardResolver(http, url).get_agent_card()  # no key needed for the card
        health = await http.get(f"{url}/health")
    assert (card.name, card.description) == ("weather", "Answers questions about the weather.")
    assert [(skill.id, list(skill.tags)) for skill in card.skills] == [
        ("get_current_weather", ["tool", "approval:ask"])
    ]
    assert card.skills[0].description.startswith("Get the current weather of a city.")
    assert [(i.url, i.protocol_binding, i.protocol_version) for i in card.supported_interfaces] == [
        (f"{url}/", "JSONRPC", "1.0"), (f"{url}/", "JSONRPC", "0.3")
    ]  # fmt: skip
    assert card.capabilities.streaming and not card.capabilities.push_notifications
    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    assert [dict(r.schemes) for r in card.security_requirements] == [
        {"bearer": card.security_requirements[0].schemes["bearer"]}
    ]
    assert health.json() == {"status": "ok"}


async def test_an_agent_without_tools_is_one_skill_and_public_url_is_the_cards() -> None:
    agent, _ = make_agent(["hi"], tools=False, public_url="https://agents.example/weather/")
    async with serving(agent) as url, httpx.AsyncClient() as http:
        card = await A2ACardResolver(http, url).get_agent_card()
    assert [(skill.id, list(skill.tags)) for skill in card.skills] == [("weather", ["chat"])]
    assert {i.url for i in card.supported_interfaces} == {"https://agents.example/weather/"}
    assert not card.security_schemes


# -- send, stream, get, cancel ------------------------------------------------------------------------


async def test_send_returns_the_completed_task_with_the_answer_and_the_tool_steps() -> None:
    agent, engine = make_agent(weather_script)
    async with serving(agent) as url, connected(url, streaming=False) as client:
        task = await send(client, user("深圳天气如何?"))
        again = await client.get_task(GetTaskRequest(id=task.id))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert [(a.artifact_id, get_artifact_text(a)) for a in task.artifacts] == [("answer", ANSWER)]
    assert [(s["type"], s["name"]) for s in steps(task)] == [
        ("tool_call", "get_current_weather"), ("tool_result", "get_current_weather")
    ]  # fmt: skip
    assert steps(task)[0]["arguments"] == {"city": "深圳"}
    assert steps(task)[1]["content"] == get_current_weather("深圳")
    prompt = sum(len(str(m.get("content") or "")) for call in engine.calls for m in call.messages)
    chunks = -(-len(CALL) // engine.chunk_size) - (-len(ANSWER) // engine.chunk_size)  # one a token
    assert MessageToDict(task.metadata) == {
        "stop_reason": "answer", "iterations": 2, "tool_calls": 1,
        "usage": {"prompt_tokens": prompt, "completion_tokens": chunks, "model_calls": 2},
    }  # fmt: skip
    assert again.status.state == TaskState.TASK_STATE_COMPLETED and again.artifacts == task.artifacts
    assert get_message_text(again.history[0]) == "深圳天气如何?"
    assert engine.calls[0].messages[-1] == {"role": "user", "content": "深圳天气如何?"}
    # the context is a recorded qwenrun session of this front end
    assert agent.store is not None
    agent.store.flush()
    stored = agent.store.get(task.context_id)
    assert stored is not None and stored.info.frontend == "a2a" and stored.info.agent == "weather"
    assert [m["role"] for m in stored.messages()] == ["user", "assistant", "tool", "assistant"]
    assert stored.records[-1].data["type"] == "final"


async def test_stream_sends_the_steps_the_answer_in_chunks_then_whole_then_completed() -> None:
    agent, _ = make_agent(weather_script)
    async with serving(agent) as url, connected(url) as client:
        stream = await events(client, user("深圳天气如何?"))
    kinds = [event.WhichOneof("payload") for event in stream]
    assert kinds[0] == "task" and stream[0].task.status.state == TaskState.TASK_STATE_SUBMITTED
    states = [e.status_update.status.state for e in stream if e.HasField("status_update")]
    assert states[0] == TaskState.TASK_STATE_WORKING and states[-1] == TaskState.TASK_STATE_COMPLETED
    updates = [e.status_update for e in stream if e.HasField("status_update")]
    data = [get_data_parts(u.status.message.parts)[0]["type"] for u in updates if u.status.message.parts]
    assert data == ["tool_call", "tool_result"]
    chunks = [e.artifact_update for e in stream if e.HasField("artifact_update")]
    assert len(chunks) > 2  # the scripted engine streams three characters at a time
    assert [c.append for c in chunks[:-1]] == [False] + [True] * (len(chunks) - 2)
    assert "".join(get_artifact_text(c.artifact) for c in chunks[:-1]) == ANSWER
    assert (chunks[-1].append, chunks[-1].last_chunk, get_artifact_text(chunks[-1].artifact)) == (
        False,
        True,
        ANSWER,
    )
    final = updates[-1]
    assert dict(final.metadata)["stop_reason"] == "answer"
    assert dict(final.metadata)["tool_calls"] == 1


async def test_a_client_that_goes_away_can_follow_its_task_again() -> None:
    """A task outlives the stream that started it: a new client subscribes to it (SubscribeToTask)
    and sees it to the end."""
    text = "abcdefghij" * 120
    agent, _ = make_agent(lambda request: text, tools=False, delay_s=0.01)  # 400 chunks: 4 s
    async with serving(agent) as url:
        async with connected(url) as client:
            stream = client.send_message(user("go"))
            first = await anext(stream)
            await stream.aclose()  # the client goes away after the first event
        async with connected(url) as client:
            followed = [event async for event in client.subscribe(SubscribeToTaskRequest(id=first.task.id))]
            task = await client.get_task(GetTaskRequest(id=first.task.id))
    assert followed[0].task.id == first.task.id
    assert followed[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert task.status.state == TaskState.TASK_STATE_COMPLETED and get_artifact_text(task.artifacts[0]) == text


async def test_the_context_id_continues_the_session() -> None:
    def script(request: ModelRequest) -> str:
        return f"turn {sum(1 for m in request.messages if m['role'] == 'user')}"

    agent, engine = make_agent(script, tools=False)
    async with serving(agent) as url, connected(url, streaming=False) as client:
        first = await send(client, user("one"))
        second = await send(client, user("two", context=first.context_id))
        other = await send(client, user("three"))
    assert [get_artifact_text(t.artifacts[0]) for t in (first, second, other)] == [
        "turn 1",
        "turn 2",
        "turn 1",
    ]
    assert second.context_id == first.context_id != other.context_id and second.id != first.id
    assert [m["content"] for m in engine.calls[1].messages[1:]] == ["one", "turn 1", "two"]
    assert agent.store is not None
    stored = agent.store.get(first.context_id)
    assert stored is not None and [m["content"] for m in stored.messages()] == [
        "one",
        "turn 1",
        "two",
        "turn 2",
    ]


async def test_a_context_outlives_a_restart_of_the_server(tmp_path: Path) -> None:
    def script(request: ModelRequest) -> str:
        return " / ".join(str(m["content"]) for m in request.messages[1:])

    database = str(tmp_path / "sessions.db")
    first_agent, _ = make_agent(script, tools=False, sessions=database)
    async with serving(first_agent) as url, connected(url, streaming=False) as client:
        first = await send(client, user("one"))
    assert first_agent.store is not None
    first_agent.store.close()
    agent, _ = make_agent(script, tools=False, sessions=database)  # a new server, the same store
    async with serving(agent) as url, connected(url, streaming=False) as client:
        second = await send(client, user("two", context=first.context_id))
        with pytest.raises(TaskNotFoundError):  # tasks live in memory: the old one is gone
            await client.get_task(GetTaskRequest(id=first.id))
    assert get_artifact_text(second.artifacts[0]) == "one / one / two"


async def test_get_and_cancel_a_running_task_stop_its_turn() -> None:
    agent, engine = make_agent(["x" * 3000], tools=False, delay_s=0.02)  # 1000 chunks: 20 s
    async with serving(agent) as url, connected(url, streaming=False, polling=True) as client:
        submitted = await send(client, user("write a lot"))
        for _ in range(500):  # until the engine streams
            if engine.active:
                break
            await asyncio.sleep(0.01)
        running = await client.get_task(GetTaskRequest(id=submitted.id))
        canceled = await client.cancel_task(CancelTaskRequest(id=submitted.id))
        after = await client.get_task(GetTaskRequest(id=submitted.id))
        with pytest.raises(TaskNotCancelableError, match="Task cannot be canceled"):
            await client.cancel_task(CancelTaskRequest(id=submitted.id))
    assert submitted.status.state == TaskState.TASK_STATE_SUBMITTED
    assert running.status.state == TaskState.TASK_STATE_WORKING
    assert canceled.status.state == after.status.state == TaskState.TASK_STATE_CANCELED
    assert engine.active == 0  # the model call was aborted
    assert agent.store is not None
    stored = agent.store.get(submitted.context_id)
    assert stored is not None and stored.records[-1].data["type"] == "cancelled"
    assert stored.messages()[-1]["content"].startswith("x") and stored.records[-2].meta == {
        "interrupted": True
    }


async def test_an_engine_failure_fails_the_task_with_the_reason() -> None:
    agent, _ = make_agent([], tools=False)  # no reply: the engine raises EngineError
    async with serving(agent) as url, connected(url, streaming=False) as client:
        task = await send(client, user("hi"))
        again = await send(client, user("hi again", context=task.context_id))  # the context goes on
    assert task.status.state == again.status.state == TaskState.TASK_STATE_FAILED
    assert get_message_text(task.status.message) == "engine error: the script has no reply left for call 1"
    assert agent.store is not None
    stored = agent.store.get(task.context_id)
    assert stored is not None and [r.data["type"] for r in stored.records if r.kind == "event"] == ["error"] * 2


async def test_reasoning_is_one_step_per_model_call() -> None:
    agent, _ = make_agent(["<think>\nlet me see\n</think>\n\nhello"], tools=False)
    async with serving(agent) as url, connected(url, streaming=False) as client:
        task = await send(client, user("hi"))
    assert steps(task) == [{"type": "reasoning", "text": "let me see"}]
    assert get_artifact_text(task.artifacts[0]) == "hello"


async def test_turns_of_different_contexts_run_at_once() -> None:
    agent, engine = make_agent(lambda request: "x" * 3000, tools=False, delay_s=0.02)
    most = 0
    async with serving(agent) as url, connected(url, streaming=False, polling=True) as client:
        first = await send(client, user("one"))
        second = await send(client, user("two"))
        for _ in range(1000):  # 10 s; each turn alone takes 20 s
            most = max(most, engine.active)
            if most == 2:
                break
            await asyncio.sleep(0.01)
        for task in (first, second):
            await client.cancel_task(CancelTaskRequest(id=task.id))
    assert most == 2  # both model calls were streaming at the same time
    assert engine.active == 0


# -- approvals: input-required --------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "approved"), [("approve", True), ("Reject.", False)])
async def test_an_ask_tool_parks_the_task_in_input_required_until_answered(
    answer: str, approved: bool
) -> None:
    def script(request: ModelRequest) -> str:
        last = request.messages[-1]
        return CALL if last["role"] == "user" else f"tool said: {last['content']}"

    agent, _ = make_agent(script, approval="ask")
    async with serving(agent) as url, connected(url, streaming=False) as client:
        asking = await send(client, user("深圳天气如何?"))
        parked = await client.get_task(GetTaskRequest(id=asking.id))
        done = await send(client, user(answer, context=asking.context_id, task=asking.id))
    assert asking.status.state == parked.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    question = asking.status.message
    assert (
        get_message_text(question) == 'Run get_current_weather({"city": "深圳"})? Answer approve or reject.'
    )
    (request,) = get_data_parts(question.parts)
    assert (request["type"], request["name"], request["arguments"]) == (
        "approval_request",
        "get_current_weather",
        {"city": "深圳"},
    )
    assert done.id == asking.id and done.status.state == TaskState.TASK_STATE_COMPLETED
    result = get_current_weather("深圳") if approved else (
        "Error: the user rejected this call of get_current_weather; it was not run."
    )  # fmt: skip
    assert get_artifact_text(done.artifacts[0]) == f"tool said: {result}"


async def test_a_data_part_answers_too_and_a_stream_ends_at_input_required() -> None:
    agent, _ = make_agent(weather_script, approval="ask")
    async with serving(agent) as url, connected(url) as client:
        first = await events(client, user("深圳天气如何?"))
        task_id, context_id = first[0].task.id, first[0].task.context_id
        second = await events(
            client, user(parts=[new_data_part({"approved": True})], context=context_id, task=task_id)
        )
    assert first[-1].status_update.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    assert second[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert get_artifact_text(second[-2].artifact_update.artifact) == ANSWER


async def test_an_unclear_answer_is_an_error_and_the_task_still_waits() -> None:
    agent, _ = make_agent(weather_script, approval="ask")
    async with serving(agent) as url, connected(url, streaming=False) as client:
        asking = await send(client, user("深圳天气如何?"))
        with pytest.raises(InvalidParamsError) as unclear:
            await send(client, user("maybe", context=asking.context_id, task=asking.id))
        with pytest.raises(InvalidRequestError, match=f"context {asking.context_id} has a turn in progress"):
            await send(client, user("another question", context=asking.context_id))
        still = await client.get_task(GetTaskRequest(id=asking.id))
        done = await send(client, user("yes", context=asking.context_id, task=asking.id))
    assert unclear.value.message == (
        f'task {asking.id} waits for the approval of get_current_weather({{"city": "深圳"}}): answer with '
        'the text approve or reject, or a data part {"approved": true} or {"approved": false}'
    )
    assert still.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    assert done.status.state == TaskState.TASK_STATE_COMPLETED


async def test_an_approval_nobody_answers_in_time_cancels_the_task() -> None:
    agent, _ = make_agent(weather_script, approval="ask", approval_timeout_s=1)
    async with serving(agent) as url, connected(url, streaming=False) as client:
        asking = await send(client, user("深圳天气如何?"))
        for _ in range(200):  # 10 s: ten times the timeout
            task = await client.get_task(GetTaskRequest(id=asking.id))
            if task.status.state != TaskState.TASK_STATE_INPUT_REQUIRED:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(
            UnsupportedOperationError, match=f"Task {asking.id} is in terminal state: TASK_STATE_CANCELED"
        ):
            await send(client, user("approve", context=asking.context_id, task=asking.id))
        later = await send(client, user("深圳天气如何?", context=asking.context_id))  # the context goes on
    assert task.status.state == TaskState.TASK_STATE_CANCELED
    assert get_message_text(task.status.message) == (
        'nobody answered the approval of get_current_weather({"city": "深圳"}) within 1 s '
        "(frontend.approval_timeout_s)"
    )
    assert later.status.state == TaskState.TASK_STATE_INPUT_REQUIRED


# -- protocol 0.3 ----------------------------------------------------------------------------------------


async def test_protocol_0_3_message_send_stream_get_and_cancel() -> None:
    agent, engine = make_agent(weather_script)
    async with serving(agent) as url:
        async with connected(url, streaming=False, version=PROTOCOL_VERSION_0_3) as client:
            task = await send(client, user("深圳天气如何?"))
            got = await client.get_task(GetTaskRequest(id=task.id))
        async with connected(url, version=PROTOCOL_VERSION_0_3) as client:
            stream = await events(client, user("深圳天气如何?"))
        async with httpx.AsyncClient() as http:  # the method names of 0.3, as raw JSON-RPC
            body = {"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"id": task.id}}
            raw = (await http.post(f"{url}/", json=body)).json()
            body = {"jsonrpc": "2.0", "id": 2, "method": "tasks/cancel", "params": {"id": task.id}}
            refused = (await http.post(f"{url}/", json=body)).json()
    assert task.status.state == got.status.state == TaskState.TASK_STATE_COMPLETED
    assert get_artifact_text(got.artifacts[0]) == ANSWER
    assert stream[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert raw["result"]["status"]["state"] == "completed" and raw["result"]["kind"] == "task"
    assert refused["error"]["code"] == -32002  # TaskNotCancelableError: it has completed
    assert len(engine.calls) == 4


# -- bad requests ---------------------------------------------------------------------------------------


async def test_bad_messages_are_errors_that_say_what_is_wrong() -> None:
    agent, engine = make_agent(["x" * 600], tools=False, delay_s=0.02, max_running_tasks=1)
    async with serving(agent) as url, connected(url, streaming=False) as client:
        with pytest.raises(
            ContentTypeNotSupportedError, match=r"message.parts\[1\]: a file part is not supported"
        ):
            await send(client, user(parts=[Part(text="look"), Part(url="https://example.com/a.png")]))
        with pytest.raises(InvalidParamsError, match="there is no text to answer"):
            await send(client, user("  "))
        with pytest.raises(InvalidParamsError, match=r"message\.contextId: expected 1 to 128 characters"):
            await send(client, user("hi", context="a b"))
        with pytest.raises(TaskNotFoundError, match="Task no-such-task not found"):
            await send(client, user("approve", task="no-such-task"))
        async with connected(url, streaming=False, polling=True) as polling:
            running = await send(polling, user("write"))
            with pytest.raises(
                InvalidRequestError, match=f"context {running.context_id} has a turn in progress"
            ):
                await send(client, user("more", context=running.context_id))
            with pytest.raises(
                InvalidRequestError, match=r"runs 1 tasks already \(frontend.max_running_tasks\)"
            ):
                await send(client, user("another"))
            with pytest.raises(InvalidRequestError, match="is running and waits for no input"):
                await send(client, user("approve", context=running.context_id, task=running.id))
            await polling.cancel_task(CancelTaskRequest(id=running.id))
    assert len(engine.calls) == 1  # only the running task reached the engine


def test_an_unset_api_key_variable_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("A2A_TEST_KEY", raising=False)
    agent, _ = make_agent([ANSWER], tools=False, api_key_env="A2A_TEST_KEY")
    with pytest.raises(ConfigError) as info:
        create_app(agent)
    assert str(info.value) == (
        "tests/a2a.yaml: frontend.api_key_env: environment variable A2A_TEST_KEY is not set or empty; "
        "export A2A_TEST_KEY=<key> or remove api_key_env to run without an API key"
    )


async def test_two_messages_at_once_to_one_context_start_one_turn() -> None:
    agent, engine = make_agent(lambda request: "x" * 3000, tools=False, delay_s=0.02)
    async with serving(agent) as url, connected(url, streaming=False, polling=True) as client:
        both = await asyncio.gather(
            send(client, user("one", context="ctx-1")), send(client, user("two", context="ctx-1")),
            return_exceptions=True,
        )  # fmt: skip
        tasks = [task for task in both if isinstance(task, Task)]
        refused = [error for error in both if not isinstance(error, Task)]
        for task in tasks:
            await client.cancel_task(CancelTaskRequest(id=task.id))
    assert len(tasks) == 1 and len(refused) == 1, both
    assert isinstance(refused[0], InvalidRequestError) and "context ctx-1 has a turn in progress" in str(refused[0])
    assert [call.messages[-1]["content"] for call in engine.calls] == [tasks[0].history[0].parts[0].text]


async def test_execute_refuses_a_context_that_another_request_took_since_the_check() -> None:
    """The handler checks a message before the library makes its task; between that check and the
    executor's start another request may take the context: the executor checks again."""
    agent, engine = make_agent(["unused"], tools=False)
    executor = TurnExecutor(agent, A2AFrontend.model_validate({"kind": "a2a"}))
    executor.busy["ctx-1"] = "task-0"  # the other request's turn
    request = user("two", context="ctx-1")
    context = RequestContext(ServerCallContext(), request, task_id="task-1", context_id="ctx-1")
    with pytest.raises(InvalidRequestError, match="context ctx-1 has a turn in progress \\(task task-0\\)"):
        await executor.execute(context, EventQueueSource())
    assert executor.turns == {} and executor.busy == {"ctx-1": "task-0"} and engine.calls == []


async def test_the_api_key_and_the_body_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("A2A_TEST_KEY", KEY)
    agent, _ = make_agent([ANSWER], tools=False, api_key_env="A2A_TEST_KEY", max_request_bytes=2000)
    async with serving(agent) as url:
        async with connected(url, streaming=False) as client:
            with pytest.raises(A2AClientError, match="401"):
                await send(client, user("hi"))
        async with connected(url, streaming=False, key="wrong") as client:
            with pytest.raises(A2AClientError, match="401"):
                await send(client, user("hi"))
        async with connected(url, streaming=False, key=KEY) as client:
            task = await send(client, user("hi"))
            with pytest.raises(A2AClientError, match="413"):
                await send(client, user("x" * 3000))
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
            big = await http.post(
                f"{url}/", content=b"{" + b" " * 3000 + b"}", headers={"content-type": "application/json"}
            )
            missing = await http.post(f"{url}/", json={"jsonrpc": "2.0", "id": 1, "method": "SendMessage",
                                                       "params": {"message": {"role": "ROLE_USER"}}},
                                      headers={"A2A-Version": "1.0"})  # fmt: skip
        async with httpx.AsyncClient() as http:
            unauthorized = await http.post(f"{url}/", json={"jsonrpc": "2.0", "id": 1, "method": "GetTask"})
    assert get_artifact_text(task.artifacts[0]) == ANSWER
    assert big.status_code == 413
    assert (
        big.json()["error"]["message"]
        == "the request body is larger than 2000 bytes (frontend.max_request_bytes)"
    )
    assert missing.json()["error"]["code"] == -32602  # the library's check of required fields
    assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"
    assert (
        unauthorized.json()["error"]["message"]
        == "Missing API key: send the header 'Authorization: Bearer <key>'"
    )


# -- docs/a2a.md --------------------------------------------------------------------------------------


async def test_the_client_example_of_docs_a2a_md_runs(capsys: pytest.CaptureFixture[str]) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "a2a.md").read_text(encoding="utf-8")
    example = page.split("```python\n", 1)[1].split("```", 1)[0]
    assert example.rstrip().endswith("asyncio.run(main())")
    namespace: dict[str, Any] = {}
    exec(compile(example.rstrip().removesuffix("asyncio.run(main())"), "docs/a2a.md", "exec"), namespace)
    agent, engine = make_agent(weather_script)
    async with serving(agent) as url:
        await namespace["main"](f"{url}/")
    assert capsys.readouterr().out == f"{ANSWER}\n{ANSWER}\n"
    assert [call.messages[-1]["content"] for call in engine.calls[::2]] == ["深圳天气如何?", "广州呢?"]
    assert engine.calls[2].messages[1]["content"] == "深圳天气如何?"  # the follow-up continues the context


# -- qwenrun up -------------------------------------------------------------------------------------------


def test_qwenrun_up_prints_the_url_and_stops_when_the_engine_dies(capsys: pytest.CaptureFixture[str]) -> None:
    """``qwenrun up``'s path: the registry row of ``a2a``, its ``run``, uvicorn on the configured
    host and port (0: a free one), the URL on stderr once it listens; exit 1 when the engine dies."""
    agent, engine = make_agent([ANSWER], tools=False, port=0)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            launch(Launch(agent.spec, make_agent=lambda spec: agent))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    printed, deadline = "", time.monotonic() + 30
    while "(agent card: " not in printed:
        assert time.monotonic() < deadline and thread.is_alive(), f"serve() printed no URL: {printed}"
        time.sleep(0.05)
        printed += capsys.readouterr().err
    url = printed.split("A2A agent 'weather' at ")[1].split(" ")[0]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    assert f"(agent card: {url}.well-known/agent-card.json)" in printed
    assert httpx.get(f"{url}.well-known/agent-card.json").json()["name"] == "weather"
    engine.dead = True  # the watchdog stops the server; serve() raises
    thread.join(30)
    assert not thread.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], EngineError)
    assert "the engine died, so the server stopped" in str(failure[0])
