"""``/v1/responses`` on the scripted engine: a real uvicorn server on 127.0.0.1 (a task of the test
loop), the official ``openai`` client and the OpenAI Agents SDK, raw HTTP for bad requests; the
SQLite store for ``store`` / ``previous_response_id`` across restarts, keys and retention."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from loopback import serve_in_loop
from openai import AsyncOpenAI
from weather import get_current_weather

from agents import Agent as SdkAgent
from agents import ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import EngineError, RequestError
from qwenrun.events import Reasoning, TextDelta
from qwenrun.frontends.openai import chat, create_app, responses
from qwenrun.frontends.openai.items import to_messages
from qwenrun.frontends.openai.output import ResponseBuilder
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec

SERVED = "Qwen2.5-7B-Instruct"
AGENT = "weather"
QUESTION = "深圳天气如何?"
CALL = tool_call_text("get_current_weather", {"city": "深圳"})
ANSWER = "深圳今天多云到晴，气温28~31℃。"
TOOL: Any = {
    "type": "function", "name": "get_current_weather", "description": "Get the current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}  # fmt: skip
NO_TRACES = RunConfig(tracing_disabled=True)



def make_spec(**frontend: Any) -> AgentSpec:
    return AgentSpec.from_dict(
        {
            "model": {"path": "/models/qwen", "served_model_name": SERVED},
            "sampling": {"max_tokens": 1024, "temperature": 0.3, "top_p": 0.8},
            "agent": {"name": AGENT, "system_prompt": "You are the weather agent."},
            "frontend": {"kind": "openai", "max_tokens_cap": 512, "max_request_bytes": 20_000, **frontend},
        },
        source="tests/responses.yaml",
    )


@dataclass
class Server:
    url: str
    engine: ScriptedEngine
    agent: Agent

    def client(self, key: str = "unused") -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)


Script = list[str] | Callable[[ModelRequest], str]


@asynccontextmanager
async def serving(
    script: Script, store: SQLiteStore | None = None, *, tool_call_format: str = "hermes", **frontend: Any
) -> AsyncIterator[Server]:
    engine = ScriptedEngine(script, tool_call_format=tool_call_format)
    agent = Agent(make_spec(**frontend), engine, tools=[get_current_weather], store=store)
    async with serve_in_loop(create_app(agent)) as url:
        yield Server(url, engine, agent)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "sessions.db"


def kinds(events: list[Any]) -> list[str]:
    return [event.type for event in events]


# -- pass-through --------------------------------------------------------------------------------


async def test_text_input_and_instructions() -> None:
    async with serving([ANSWER]) as srv, srv.client() as client:
        out = await client.responses.create(model=SERVED, input=QUESTION, instructions="Be brief.",
                                            max_output_tokens=100, temperature=0.1)  # fmt: skip
    assert out.id.startswith("resp_") and out.object == "response" and out.model == SERVED
    assert out.status == "completed" and out.output_text == ANSWER
    (message,) = out.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert (out.instructions, out.max_output_tokens, out.temperature, out.top_p) == (
        "Be brief.",
        100,
        0.1,
        0.8,
    )
    request = srv.engine.calls[0]
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
    ]
    assert request.overrides == {"max_tokens": 100, "temperature": 0.1}
    assert out.usage is not None and out.usage.input_tokens == len("Be brief.") + len(QUESTION)
    assert (
        out.usage.output_tokens == -(-len(ANSWER) // 3)
        and out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    )


async def test_function_call_items_round_trip_without_store() -> None:
    async with serving(["我查一下。" + CALL, ANSWER]) as srv, srv.client() as client:
        first = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL], store=False)
        assert [item.type for item in first.output] == ["message", "function_call"]
        call = first.output[1]
        assert call.type == "function_call" and call.id and call.id.startswith("fc_")
        assert call.call_id.startswith("call_") and call.name == "get_current_weather"
        assert json.loads(call.arguments) == {"city": "深圳"} and call.status == "completed"
        replay: Any = [
            {"role": "user", "content": QUESTION},
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "晴"},
        ]
        second = await client.responses.create(model=SERVED, input=replay, tools=[TOOL], store=False)
        with pytest.raises(openai.NotFoundError):  # store=False: nothing kept
            await client.responses.retrieve(first.id)
    assert second.output_text == ANSWER
    assert srv.engine.calls[1].messages == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "我查一下。", "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "晴"},
    ]  # fmt: skip
    assert srv.engine.calls[1].tools == [
        {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
    ]


async def test_previous_response_id_continues_the_stored_conversation(db: Path) -> None:
    async with serving([CALL, ANSWER, "再见"], SQLiteStore(db)) as srv, srv.client() as client:
        first = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL], instructions="Old.")
        call = first.output[0]
        assert call.type == "function_call"
        output: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "晴"}]
        second = await client.responses.create(
            model=SERVED, input=output, tools=[TOOL], previous_response_id=first.id
        )
        third = await client.responses.create(model=SERVED, input="谢谢", previous_response_id=second.id)
        again = await client.responses.retrieve(second.id)
    assert (second.previous_response_id, second.output_text, third.output_text) == (first.id, ANSWER, "再见")
    assert again.model_dump() == second.model_dump()
    # the instructions of an earlier response are not carried over (as OpenAI does)
    assert srv.engine.calls[2].messages == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "晴"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "谢谢"},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("tool_choice", "forced"),
    [("auto", "auto"), ("none", "none"), ("required", "required"),
     ({"type": "function", "name": "get_current_weather"}, "get_current_weather")],
)  # fmt: skip
async def test_tool_choice_reaches_the_engine(tool_choice: Any, forced: str) -> None:
    async with serving(lambda request: CALL if request.tools else "no tools") as srv, srv.client() as client:
        out = await client.responses.create(
            model=SERVED, input=QUESTION, tools=[TOOL], tool_choice=tool_choice
        )
    request = srv.engine.calls[0]
    assert request.tool_choice == forced and (request.tools is None) == (forced == "none")
    assert [item.type for item in out.output] == (["message"] if forced == "none" else ["function_call"])
    assert out.model_dump()["tool_choice"] == tool_choice


async def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    two = CALL + "\n" + CALL.replace("深圳", "广州")
    async with serving(lambda request: two) as srv, srv.client() as client:
        both = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL])
        one = await client.responses.create(
            model=SERVED, input=QUESTION, tools=[TOOL], parallel_tool_calls=False
        )
    assert [json.loads(item.arguments)["city"] for item in both.output if item.type == "function_call"] == [
        "深圳",
        "广州",
    ]
    assert [json.loads(item.arguments)["city"] for item in one.output if item.type == "function_call"] == [
        "深圳"
    ]
    assert one.parallel_tool_calls is False


async def test_text_format_json_schema_constrains_the_answer() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    async with serving(['{"city": "深圳"}']) as srv, srv.client() as client:
        out = await client.responses.create(
            model=SERVED, input=QUESTION,
            text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
        )  # fmt: skip
    constraint = srv.engine.calls[0].constraint
    assert constraint is not None and constraint.json == schema
    assert json.loads(out.output_text) == {"city": "深圳"}


async def test_agent_mode_text_format_is_the_turns_output_schema() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    async with serving(["It is 深圳.", '{"city": "深圳"}']) as srv, srv.client() as client:
        out = await client.responses.create(
            model=AGENT, input=QUESTION,
            text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
        )  # fmt: skip
    constraint = srv.engine.calls[-1].constraint
    assert constraint is not None and constraint.json == schema and srv.engine.calls[-1].tools is None
    assert json.loads(out.output_text) == {"city": "深圳"}
    assert out.text is not None and out.text.format.type == "json_schema"


async def test_max_output_tokens_cut_is_incomplete() -> None:
    async with serving(lambda request: "x" * 30) as srv, srv.client() as client:
        srv.engine.generate = _cut(srv.engine.generate)  # type: ignore[method-assign]
        out = await client.responses.create(model=SERVED, input="hi", max_output_tokens=5)
        async with client.responses.stream(model=SERVED, input="hi", max_output_tokens=5) as stream:
            events = [event async for event in stream]
    assert out.status == "incomplete" and out.incomplete_details is not None
    assert out.incomplete_details.reason == "max_output_tokens"
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


def _cut(generate: Any) -> Any:
    """The engine's deltas with the last one's finish reason set to 'length'."""

    async def cut(request: Any) -> AsyncIterator[Any]:
        async for delta in generate(request):
            if delta.finish_reason is not None:
                delta.finish_reason = "length"
            yield delta

    return cut


# -- streaming -----------------------------------------------------------------------------------

TEXT_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
TEXT_DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]  # fmt: skip


async def test_stream_events_in_the_documented_order() -> None:
    reply = "Hello there!" + CALL
    async with serving(lambda request: reply) as srv, srv.client() as client:
        stream = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL], stream=True)
        events = [event async for event in stream]
        whole = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL])
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    kinds_ = [kind for kind in kinds(events) if kind != "response.output_text.delta"]
    assert kinds_ == ["response.created", "response.in_progress", *TEXT_EVENTS[:2], *TEXT_DONE, *CALL_EVENTS,
                      "response.completed"]  # fmt: skip
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert (
        deltas == "Hello there!"
        and events[0].response.status == "in_progress"
        and events[0].response.output == []
    )
    final = events[-1].response
    assert final.status == "completed" and final.output_text == whole.output_text == "Hello there!"
    strip = ("id", "call_id")
    assert [item.model_dump(exclude=set(strip)) for item in final.output] == [
        item.model_dump(exclude=set(strip)) for item in whole.output
    ]
    added = events[2].item
    assert added.type == "message" and added.status == "in_progress" and added.content == []
    call_added, call_delta = events[-5], events[-4]
    assert call_added.item.type == "function_call" and call_added.item.arguments == ""
    assert json.loads(call_delta.delta) == {"city": "深圳"} and call_delta.item_id == call_added.item.id


async def test_responses_stream_helper_and_sync_client() -> None:
    async with serving(lambda request: ANSWER) as srv, srv.client() as client:
        async with client.responses.stream(model=SERVED, input=QUESTION) as stream:
            texts = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            final = await stream.get_final_response()

        def sync() -> str:
            with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as sync_client:
                return sync_client.responses.create(model=SERVED, input=QUESTION).output_text

        assert await asyncio.to_thread(sync) == ANSWER
    assert "".join(texts) == final.output_text == ANSWER and len(texts) > 1


# -- agent mode ---------------------------------------------------------------------------------


async def test_agent_mode_returns_the_servers_tool_steps() -> None:
    async with serving([CALL, ANSWER, CALL, ANSWER]) as srv, srv.client() as client:
        out = await client.responses.create(model=AGENT, input=QUESTION, instructions="ignored")
        stream = await client.responses.create(model=AGENT, input=QUESTION, stream=True)
        events = [event async for event in stream]
    tool, message = out.output
    assert tool.type == "mcp_call" and tool.server_label == AGENT and tool.name == "get_current_weather"
    assert json.loads(tool.arguments) == {"city": "深圳"} and tool.output == get_current_weather("深圳")
    assert tool.status == "completed" and tool.error is None and message.type == "message"
    assert (
        out.output_text == ANSWER
        and srv.engine.calls[0].messages[0]["content"] == "You are the weather agent."
    )
    mcp = ["response.output_item.added", "response.mcp_call.in_progress", "response.mcp_call_arguments.delta",
           "response.mcp_call_arguments.done", "response.mcp_call.completed", "response.output_item.done"]  # fmt: skip
    assert [kind for kind in kinds(events) if kind != "response.output_text.delta"] == [
        "response.created", "response.in_progress", *mcp, *TEXT_EVENTS[:2], *TEXT_DONE, "response.completed",
    ]  # fmt: skip
    assert events[-1].response.output_text == ANSWER


async def test_agent_mode_continues_with_its_tool_history(db: Path) -> None:
    async with serving([CALL, ANSWER, "不客气"], SQLiteStore(db)) as srv, srv.client() as client:
        first = await client.responses.create(model=AGENT, input=QUESTION)
        await client.responses.create(model=AGENT, input="谢谢", previous_response_id=first.id)
    history = srv.engine.calls[2].messages
    assert [message["role"] for message in history] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    assert history[2]["tool_calls"][0]["function"]["name"] == "get_current_weather"
    assert history[3]["content"] == get_current_weather("深圳") and history[4]["content"] == ANSWER


@pytest.mark.parametrize(
    ("body", "message"),
    [({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}, {"role": "user", "content": "q"}]},
      "send no function_call_output"),
     ({"input": [{"role": "assistant", "content": "hi"}]}, "last input item must be a user message"),
     ({"input": "q", "tools": [TOOL]}, "send no `tools`"),
     ({"input": "q", "structured_outputs": {"regex": "a+"}}, "pass-through mode only")],
)  # fmt: skip
async def test_agent_mode_refuses_what_it_cannot_run(body: dict[str, Any], message: str) -> None:
    async with serving([]) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        reply = await http.post("/v1/responses", json={"model": AGENT, **body})
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]


async def test_agent_mode_records_its_turns_in_the_session_of_the_header(db: Path) -> None:
    """As the chat route does: with ``X-Qwenrun-Session`` the session's history is loaded, only
    the last user input is used, and the turn is recorded (JSON and streamed alike)."""
    store = SQLiteStore(db)
    header = {chat.SESSION_HEADER: "ticket-1"}
    async with serving(lambda r: ANSWER if r.messages[-1]["role"] == "tool" else CALL, store) as srv, srv.client() as c:
        first = await c.responses.with_raw_response.create(model=AGENT, input=QUESTION, extra_headers=header)
        assert first.headers["x-qwenrun-session"] == "ticket-1" and first.parse().output_text == ANSWER
        input_: Any = [{"role": "user", "content": "ignored"}, {"role": "user", "content": "广州呢?"}]
        async with c.responses.with_streaming_response.create(
            model=AGENT, input=input_, stream=True, extra_headers=header
        ) as second:
            assert second.headers["x-qwenrun-session"] == "ticket-1"
            lines = [line async for line in second.iter_lines()]
        assert "event: response.completed" in lines
        assert [m["content"] for m in srv.engine.calls[-1].messages if m["role"] == "user"] == [QUESTION, "广州呢?"]
        plain = await c.responses.with_raw_response.create(model=AGENT, input="北京?")  # stateless
        assert "x-qwenrun-session" not in plain.headers
    stored = store.get("ticket-1")
    assert stored is not None and (stored.info.frontend, stored.info.turns) == ("openai", 2)
    kinds = [r.data["role"] if r.kind == "message" else r.data["type"] for r in stored.records]
    assert kinds == ["user", "assistant", "tool", "assistant", "final"] * 2
    assert [r.data["content"] for r in stored.records if r.data.get("role") == "user"] == [QUESTION, "广州呢?"]
    assert [info.id for info in store.list()] == ["ticket-1"]
    store.close()


async def test_a_session_runs_one_turn_at_a_time_across_both_apis(db: Path) -> None:
    """A turn of the session in progress on the chat route (its tool waits): a response for the
    same session is a 409 until that turn ends."""
    started, release = asyncio.Event(), asyncio.Event()

    async def wait_here() -> str:
        """Wait until the test says so."""
        started.set()
        await release.wait()
        return "released"

    store = SQLiteStore(db)
    script = lambda r: "done" if r.messages[-1]["role"] == "tool" else tool_call_text("wait_here", {})  # noqa: E731
    agent = Agent(make_spec(), ScriptedEngine(script), tools=[wait_here], store=store)
    header = {chat.SESSION_HEADER: "shared"}
    async with serve_in_loop(create_app(agent)) as url:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        async with client:
            turn = asyncio.ensure_future(client.chat.completions.create(
                model=AGENT, messages=[{"role": "user", "content": "wait"}], extra_headers=header))  # fmt: skip
            await asyncio.wait_for(started.wait(), 30)
            with pytest.raises(openai.ConflictError, match="has a turn in progress"):
                await client.responses.create(model=AGENT, input="and now?", extra_headers=header)
            release.set()
            assert (await turn).choices[0].message.content == "done"
            after = await client.responses.create(model=AGENT, input="and now?", extra_headers=header)
    assert after.output_text == "done"
    stored = store.get("shared")
    assert stored is not None and stored.info.turns == 2
    store.close()


async def test_the_session_header_is_refused_where_it_cannot_apply(db: Path) -> None:
    header = {chat.SESSION_HEADER: "s-1"}
    async with serving([ANSWER], SQLiteStore(db)) as srv, srv.client() as client:
        first = await client.responses.create(model=AGENT, input=QUESTION)
        with pytest.raises(openai.BadRequestError, match="X-Qwenrun-Session needs agent mode"):
            await client.responses.create(model=SERVED, input=QUESTION, extra_headers=header)
        with pytest.raises(openai.BadRequestError, match=r"X-Qwenrun-Session .* or previous_response_id .*not both"):
            await client.responses.create(model=AGENT, input="x", previous_response_id=first.id, extra_headers=header)
        with pytest.raises(openai.BadRequestError, match="expected 1 to 128 characters"):
            await client.responses.create(model=AGENT, input="x", extra_headers={chat.SESSION_HEADER: "a b"})
    async with serving([]) as srv, srv.client() as client:
        with pytest.raises(openai.BadRequestError, match="records no sessions") as error:
            await client.responses.create(model=AGENT, input="x", extra_headers=header)
    assert error.value.code == "sessions_disabled"


# -- reasoning -----------------------------------------------------------------------------------


async def test_reasoning_pieces_become_reasoning_items(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    """A reasoning piece (what the chat pass-through yields for a Qwen3 <think> block) is a
    ``reasoning`` item with a ``reasoning_text`` part, before the message; the next turn sends it
    back as the assistant message's ``reasoning_content``."""
    real = chat.passthrough

    def thinking(agent: Any, request: Any, frontend: Any, request_id: str) -> chat.Pieces:
        async def pieces() -> chat.Pieces:
            for part in (Reasoning("The user "), Reasoning("greets me."), TextDelta("Hello!")):
                yield chat.Piece(part)
            yield chat.Piece(chat.Finish("stop", 7, 5))

        return (
            pieces() if request.messages[-1].content == "hi" else real(agent, request, frontend, request_id)
        )

    monkeypatch.setattr(chat, "passthrough", thinking)
    async with serving(["ok"], SQLiteStore(db)) as srv, srv.client() as client:
        out = await client.responses.create(model=SERVED, input="hi")
        stream = await client.responses.create(model=SERVED, input="hi", stream=True)
        events = [event async for event in stream]
        await client.responses.create(model=SERVED, input="and?", previous_response_id=out.id)
    reasoning, message = out.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert reasoning.content is not None and [part.text for part in reasoning.content] == [
        "The user greets me."
    ]
    assert message.type == "message" and out.output_text == "Hello!"
    assert kinds(events)[2:9] == ["response.output_item.added", "response.content_part.added",
                                  "response.reasoning_text.delta", "response.reasoning_text.delta",
                                  "response.reasoning_text.done", "response.content_part.done",
                                  "response.output_item.done"]  # fmt: skip
    assert events[-1].response.output[0].content[0].text == "The user greets me."
    assert [m["content"] for m in srv.engine.calls[0].messages] == ["hi", "Hello!", "and?"]


# -- store, keys, restart, retention --------------------------------------------------------------


async def test_get_and_delete(db: Path) -> None:
    async with serving([ANSWER], SQLiteStore(db)) as srv, srv.client() as client:
        out = await client.responses.create(model=SERVED, input=QUESTION, metadata={"topic": "weather"})
        got = await client.responses.retrieve(out.id)
        async with httpx.AsyncClient(base_url=srv.url) as http:
            deleted = (await http.delete(f"/v1/responses/{out.id}")).json()
            again = await http.delete(f"/v1/responses/{out.id}")
            streamed = await http.get(f"/v1/responses/{got.id}?stream=true")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.retrieve(out.id)
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.responses.create(model=SERVED, input="x", previous_response_id=out.id)
    assert got.output_text == ANSWER and got.metadata == {"topic": "weather"} and got.store is True
    assert deleted == {"id": out.id, "object": "response.deleted", "deleted": True}
    assert again.status_code == 404 and again.json()["error"]["code"] == "response_not_found"
    assert streamed.status_code == 400
    assert missing.value.body["code"] == "response_not_found"  # type: ignore[index]
    error: Any = unknown.value.body
    assert (error["param"], error["code"]) == ("previous_response_id", "previous_response_not_found")
    assert len(srv.engine.calls) == 1  # the unknown previous_response_id never reached the engine


async def test_a_restart_keeps_conversations_and_they_belong_to_their_key(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWENRUN_TEST_KEY", "key-one")
    first_store = SQLiteStore(db)
    async with (
        serving([ANSWER], first_store, api_key_env="QWENRUN_TEST_KEY") as srv,
        srv.client("key-one") as c,
    ):
        first = await c.responses.create(model=SERVED, input=QUESTION)
    first_store.close()
    assert not any(b"key-one" in path.read_bytes() for path in db.parent.iterdir())  # only its hash is kept
    second_store = SQLiteStore(db)
    async with serving(
        ["再见"], second_store, api_key_env="QWENRUN_TEST_KEY"
    ) as srv:  # a new process, in effect
        async with srv.client("key-one") as client:
            assert (await client.responses.retrieve(first.id)).output_text == ANSWER
            second = await client.responses.create(model=SERVED, input="谢谢", previous_response_id=first.id)
        assert second.output_text == "再见"
        assert [m["content"] for m in srv.engine.calls[0].messages] == [QUESTION, ANSWER, "谢谢"]
    second_store.close()
    monkeypatch.setenv("QWENRUN_TEST_KEY", "key-two")  # the same file served with another key
    third_store = SQLiteStore(db)
    async with serving([], third_store, api_key_env="QWENRUN_TEST_KEY") as srv, srv.client("key-two") as c:
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            await c.responses.create(model=SERVED, input="x", previous_response_id=second.id)
        with pytest.raises(openai.NotFoundError):
            await c.responses.delete(first.id)
    third_store.close()


async def test_retention_deletes_old_responses(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(db)
    async with (
        serving(lambda request: "ok", store, response_retention_days=1 / 86400) as srv,
        srv.client() as c,
    ):
        old = await c.responses.create(model=SERVED, input="first")
        assert (await c.responses.retrieve(old.id)).status == "completed"
        await asyncio.sleep(1.2)
        with pytest.raises(openai.NotFoundError):  # past retention: gone at once for readers
            await c.responses.retrieve(old.id)
        monkeypatch.setattr(responses, "PRUNE_EVERY_S", 0.0)  # the next write prunes (else once a minute)
        new = await c.responses.create(model=SERVED, input="second")
    store.flush()
    assert store.get_response(old.id) is None and store.get_response(new.id) is not None
    store.close()


async def test_without_a_session_store_responses_live_in_memory() -> None:
    async with serving(["a", "b"]) as srv, srv.client() as client:
        first = await client.responses.create(model=SERVED, input="one")
        await client.responses.create(model=SERVED, input="two", previous_response_id=first.id)
    assert [m["content"] for m in srv.engine.calls[1].messages] == ["one", "a", "two"]


async def test_concurrent_conversations_never_mix(db: Path) -> None:
    def echo(request: ModelRequest) -> str:
        return f"answer to {request.messages[-1]['content']}"

    async with serving(echo, SQLiteStore(db)) as srv, srv.client() as client:
        srv.engine.delay_s = 0.002

        async def conversation(number: int) -> list[str]:
            previous, texts = None, []
            for turn in range(3):
                kwargs: Any = {"previous_response_id": previous} if previous else {}
                if turn == 1:  # one streamed turn in the middle
                    stream = await client.responses.create(
                        model=SERVED, input=f"c{number} t{turn}", stream=True, **kwargs
                    )
                    out = [event async for event in stream][-1].response
                else:
                    out = await client.responses.create(model=SERVED, input=f"c{number} t{turn}", **kwargs)
                previous = out.id
                texts.append(out.output_text)
            return texts

        results = await asyncio.gather(*(conversation(number) for number in range(8)))
    for number, texts in enumerate(results):
        assert texts == [f"answer to c{number} t{turn}" for turn in range(3)]
    assert len(srv.engine.calls) == 24
    for call in srv.engine.calls:  # each model call saw its own conversation, and only that
        conversation, turn = call.messages[-1]["content"].split()
        expected: list[dict[str, Any]] = []
        for earlier in range(int(turn[1:])):
            asked = f"{conversation} t{earlier}"
            expected += [
                {"role": "user", "content": asked},
                {"role": "assistant", "content": f"answer to {asked}"},
            ]
        assert call.messages == [*expected, call.messages[-1]]


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [({"model": "gpt-4o", "input": "x"}, 404, "model", "does not exist"),
     ({"model": SERVED}, 400, "input", "required field is missing"),
     ({"model": SERVED, "input": []}, 400, "input", "at least 1 item"),
     ({"model": SERVED, "input": [{"type": "web_search_call", "id": "w"}]}, 400, "input[0]", "unsupported item"),
     ({"model": SERVED, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
      400, "input[0].content[0]", "'input_image' content is not supported"),
     ({"model": SERVED, "input": [{"type": "function_call_output", "output": "x"}]}, 400, "input[0].call_id",
      "required field is missing"),
     ({"model": SERVED, "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0]",
      "only function tools are supported"),
     ({"model": SERVED, "input": "x", "tools": [{"type": "function", "name": "f",
       "parameters": {"type": "string"}}]}, 400, "tools[0].parameters", "type 'object'"),
     ({"model": SERVED, "input": "x", "tool_choice": {"type": "allowed_tools", "tools": []}}, 400, "tool_choice",
      "only 'auto'"),
     ({"model": SERVED, "input": "x", "tool_choice": "required"}, 400, "tool_choice", "at least one tool"),
     ({"model": SERVED, "input": "x", "background": True}, 400, None, "background responses are not supported"),
     ({"model": SERVED, "input": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
     ({"model": SERVED, "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens", "greater than or equal to 1"),
     ({"model": SERVED, "input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id", "not found")],
)  # fmt: skip
async def test_bad_requests_get_openai_errors(
    body: Any, status: int, param: str | None, message: str
) -> None:
    async with serving([]) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        reply = await http.post("/v1/responses", json=body)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert (
            message in error["message"]
            and error["param"] == param
            and error["type"] == "invalid_request_error"
        )
        assert (await http.get("/health")).status_code == 200
    assert srv.engine.calls == []


async def test_api_key_and_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENRUN_TEST_KEY", "secret")
    async with (
        serving([], api_key_env="QWENRUN_TEST_KEY") as srv,
        httpx.AsyncClient(base_url=srv.url) as http,
    ):
        missing = await http.post("/v1/responses", json={"model": SERVED, "input": "x"})
        wrong = await http.get("/v1/responses/resp_1", headers={"Authorization": "Bearer nope"})
        huge = await http.post("/v1/responses", json={"model": SERVED, "input": "x" * 30_000},
                               headers={"Authorization": "Bearer secret"})  # fmt: skip
    assert missing.status_code == wrong.status_code == 401 and huge.status_code == 413


async def test_metrics_count_the_responses_endpoint() -> None:
    async with serving([CALL, ANSWER]) as srv, srv.client() as client:
        await client.responses.create(model=AGENT, input=QUESTION)
        async with httpx.AsyncClient(base_url=srv.url) as http:
            text = (await http.get("/metrics")).text
    assert 'endpoint="/v1/responses",mode="agent",status="200"' in text.replace(", ", ",")
    assert 'qwenrun_tool_calls_total{mode="agent",tool="get_current_weather"} 1.0' in text


# -- the OpenAI Agents SDK ----------------------------------------------------------------------


@function_tool
def get_weather(city: str) -> str:
    """Get the current weather of a city."""
    return f"{city}: sunny, 25°C"


@pytest.mark.parametrize("streamed", [False, True])
async def test_agents_sdk_runs_its_function_tool_in_pass_through(streamed: bool) -> None:
    call = tool_call_text("get_weather", {"city": "深圳"})
    async with serving([call, ANSWER]) as srv, srv.client() as client:
        sdk = SdkAgent(name="helper", instructions="Answer with the weather.", tools=[get_weather],
                       model=OpenAIResponsesModel(model=SERVED, openai_client=client),
                       model_settings=ModelSettings(tool_choice="required"))  # fmt: skip
        if streamed:
            run = Runner.run_streamed(sdk, QUESTION, run_config=NO_TRACES)
            kinds_ = [event.type async for event in run.stream_events()]
            assert "raw_response_event" in kinds_ and "run_item_stream_event" in kinds_
            final = run.final_output
        else:
            final = (await Runner.run(sdk, QUESTION, run_config=NO_TRACES)).final_output
    assert final == ANSWER
    first, second = srv.engine.calls
    assert first.tool_choice == "required" and second.tool_choice == "auto"  # the SDK resets it after a call
    assert second.messages[0] == {"role": "system", "content": "Answer with the weather."}
    assert second.messages[-1]["role"] == "tool" and second.messages[-1]["content"] == "深圳: sunny, 25°C"


@pytest.mark.parametrize("streamed", [False, True])
async def test_agents_sdk_in_agent_mode(streamed: bool, db: Path) -> None:
    async with serving([CALL, ANSWER, "不客气"], SQLiteStore(db)) as srv, srv.client() as client:
        sdk = SdkAgent(name="asker", model=OpenAIResponsesModel(model=AGENT, openai_client=client))
        if streamed:
            run = Runner.run_streamed(sdk, QUESTION, run_config=NO_TRACES)
            items = [
                event.item.type
                async for event in run.stream_events()
                if event.type == "run_item_stream_event"
            ]
            result: Any = run
        else:
            result = await Runner.run(sdk, QUESTION, run_config=NO_TRACES)
            items = [item.type for item in result.new_items]
        assert result.final_output == ANSWER and items == ["tool_call_item", "message_output_item"]
        # the next turn replays the items (no previous_response_id): the server's mcp_call is history
        follow = await Runner.run(sdk, [*result.to_input_list(), {"role": "user", "content": "谢谢"}],
                                  run_config=NO_TRACES)  # fmt: skip
    assert follow.final_output == "不客气"
    assert [m["role"] for m in srv.engine.calls[2].messages] == ["system", "user", "assistant", "tool", "assistant",
                                                                 "user"]  # fmt: skip


async def test_agents_sdk_chains_responses_with_previous_response_id(db: Path) -> None:
    call = tool_call_text("get_weather", {"city": "深圳"})
    async with serving([call, ANSWER], SQLiteStore(db)) as srv, srv.client() as client:
        sdk = SdkAgent(name="helper", tools=[get_weather], model=OpenAIResponsesModel(model=SERVED, openai_client=client),
                       model_settings=ModelSettings(tool_choice="required"))  # fmt: skip
        result = await Runner.run(sdk, QUESTION, run_config=NO_TRACES, auto_previous_response_id=True)
    assert result.final_output == ANSWER and result.last_response_id is not None
    assert [m["role"] for m in srv.engine.calls[1].messages] == ["user", "assistant", "tool"]


# -- the pieces: output items and events; items: chat messages -----------------------------------


def test_builder_items_and_events_for_every_piece() -> None:
    response: dict[str, Any] = {"id": "resp_x", "output": [], "status": "in_progress"}
    builder = ResponseBuilder(response, server_label=AGENT)
    step = {"type": "tool_call", "name": "get_current_weather", "arguments": {"city": "深圳"}}
    pieces: list[Any] = [
        Reasoning("\n想一想"), TextDelta(" 我查一下。"), Reasoning("再想"),
        chat.StepPart({**step, "id": "call_a"}), chat.StepPart({**step, "id": "call_b"}),
        chat.StepPart({"type": "tool_result", "id": "call_b", "name": "x", "content": "Error: boom", "is_error": True}),
        chat.StepPart({"type": "repair", "reason": "malformed"}),
        chat.StepPart({"type": "tool_result", "id": "call_a", "name": "x", "content": "晴", "is_error": False}),
        TextDelta("\n\n"), TextDelta("晴。"), chat.Finish("stop", 10, 4),
    ]  # fmt: skip
    events = builder.start() + [event for piece in pieces for event in builder.feed(piece)]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    items = response["output"]
    assert [item["type"] for item in items] == [
        "reasoning",
        "message",
        "reasoning",
        "mcp_call",
        "mcp_call",
        "message",
    ]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "想一想"}]  # blank start dropped
    assert items[1]["content"][0]["text"] == "我查一下。" and items[5]["content"][0]["text"] == "晴。"
    assert (items[3]["status"], items[3]["output"], items[3]["error"]) == ("completed", "晴", None)
    assert (items[4]["status"], items[4]["error"]) == (
        "failed",
        {"type": "mcp_tool_execution_error", "content": "Error: boom"},
    )
    assert all(item["status"] == "completed" for item in items if item["type"] != "mcp_call")
    done = [event["output_index"] for event in events if event["type"] == "response.output_item.done"]
    assert done == [0, 1, 2, 4, 3, 5]  # the second call failed first
    assert [e["type"] for e in events if "mcp_call." in e["type"]] == [
        "response.mcp_call.in_progress", "response.mcp_call.in_progress", "response.mcp_call.failed",
        "response.mcp_call.completed",
    ]  # fmt: skip
    added = [event["item"] for event in events if event["type"] == "response.output_item.added"]
    assert all(item["status"] == "in_progress" for item in added) and added[3]["arguments"] == ""
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["status"] == "completed"
    assert response["usage"]["total_tokens"] == 14 and response["incomplete_details"] is None


def test_builder_failure_ends_with_response_failed() -> None:
    builder = ResponseBuilder({"id": "resp_x", "output": [], "status": "in_progress"}, server_label=AGENT)
    builder.start()
    builder.feed(TextDelta("half"))
    (failed,) = builder.fail("server_error", "the engine died")
    assert failed["type"] == "response.failed" and failed["sequence_number"] == 5
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "the engine died"}


def test_items_become_chat_messages() -> None:
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"}
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "let me see"}]},
        call, {**call, "call_id": "call_2"},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2", "output": "two"},
        {"type": "mcp_call", "id": "mcp_3", "name": "g", "arguments": "{}", "output": None, "error": "boom"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]},
    ]  # fmt: skip
    assert to_messages(items) == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "let me see", "reasoning_content": "hmm", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": "two"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "mcp_3", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "mcp_3", "content": "Error: boom"},
        {"role": "assistant", "content": "done"},
    ]  # fmt: skip


async def test_an_engine_failure_mid_stream_ends_with_response_failed() -> None:
    async with serving(lambda request: ANSWER) as srv, srv.client() as client:
        real = srv.engine.generate

        async def dies(request: Any) -> AsyncIterator[Any]:
            async for delta in real(request):
                yield delta
                raise EngineError("the engine died")

        srv.engine.generate = dies  # type: ignore[method-assign]
        stream = await client.responses.create(model=SERVED, input=QUESTION, stream=True)
        events = [event async for event in stream]
        srv.engine.dead = True
        with pytest.raises(openai.InternalServerError) as refused:  # before the headers: a real 503
            await client.responses.create(model=SERVED, input=QUESTION, stream=True)
        with pytest.raises(openai.NotFoundError):  # a failed response is not kept
            await client.responses.retrieve(events[-1].response.id)
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error is not None and "the engine died" in failed.response.error.message
    assert [event.type for event in events[:3]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]
    assert refused.value.status_code == 503


async def test_a_refused_request_mid_stream_is_an_invalid_prompt() -> None:
    async with serving(lambda request: ANSWER) as srv, srv.client() as client:
        real = srv.engine.generate

        async def refuses(request: Any) -> AsyncIterator[Any]:
            async for delta in real(request):
                yield delta
                raise RequestError("the prompt has 3000 tokens; max_model_len is 2048")

        srv.engine.generate = refuses  # type: ignore[method-assign]
        stream = await client.responses.create(model=SERVED, input=QUESTION, stream=True)
        failed = [event async for event in stream][-1]
    assert failed.type == "response.failed" and failed.response.error is not None
    assert failed.response.error.code == "invalid_prompt" and "max_model_len" in failed.response.error.message


# -- the model's own reasoning and streamed call arguments (Qwen3 and Qwen3-Coder output) ---------

THINK = "<think>\nThe user wants the weather.\n</think>\n\n"


async def test_thinking_and_a_streamed_xml_call(db: Path) -> None:
    call = tool_call_text("get_current_weather", {"city": "深圳"}, format="qwen3_coder")
    script = [THINK + call, THINK + call, THINK + ANSWER]
    async with (
        serving(script, SQLiteStore(db), tool_call_format="qwen3_coder") as srv,
        srv.client() as client,
    ):
        whole = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL])
        stream = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL], stream=True)
        events = [event async for event in stream]
        first = events[-1].response
        output: Any = [{"type": "function_call_output", "call_id": first.output[1].call_id, "output": "晴"}]
        answer = await client.responses.create(
            model=SERVED, input=output, tools=[TOOL], previous_response_id=first.id
        )
    for out in (whole, first):
        reasoning, function_call = out.output
        assert reasoning.type == "reasoning" and reasoning.content is not None
        assert reasoning.content[0].text == "The user wants the weather."
        assert function_call.type == "function_call" and json.loads(function_call.arguments) == {
            "city": "深圳"
        }
    fragments = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(fragments) > 1 and "".join(fragments) == first.output[1].arguments  # its values' pieces
    kinds_ = [kind for kind in kinds(events) if not kind.endswith(".delta")]
    assert kinds_ == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert answer.output[0].type == "reasoning" and answer.output_text == ANSWER
    assistant = srv.engine.calls[2].messages[1]  # the call's turn, with its thinking for the template
    assert assistant["reasoning_content"] == "The user wants the weather."
    assert assistant["tool_calls"][0]["function"]["name"] == "get_current_weather"


async def test_a_streamed_xml_call_that_ends_malformed_is_a_message() -> None:
    """A Qwen3-Coder call cut inside its value (max_tokens) is the message's text, streamed or not:
    no ``function_call`` item is opened for it (before, one stayed ``in_progress`` in both)."""
    cut = "Checking.\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\n深"
    async with serving([cut, cut], tool_call_format="qwen3_coder") as srv, srv.client() as client:
        whole = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL])
        stream = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL], stream=True)
        events = [event async for event in stream]
    streamed = events[-1].response
    for out in (whole, streamed):
        assert [item.type for item in out.output] == ["message"] and out.output_text == cut + "</tool_call>"
    assert not [event for event in events if "function_call" in event.type]


async def test_agent_mode_reasoning_comes_before_each_step() -> None:
    async with serving([THINK + CALL, THINK + ANSWER]) as srv, srv.client() as client:
        out = await client.responses.create(model=AGENT, input=QUESTION)
    assert [item.type for item in out.output] == ["reasoning", "mcp_call", "reasoning", "message"]
    assert out.output_text == ANSWER


def test_agent_mode_responses_ask_the_client_or_take_the_approval_header_for_ask_tools() -> None:
    """An agent with an `approval: ask` tool: without the header /v1/responses answers with an
    mcp_approval_request that the client's mcp_approval_response resolves (tests/test_server_approval.py
    tells more); `approve` runs the call; the header is refused in pass-through mode."""
    spec = AgentSpec.from_dict(
        {
            "model": {"path": "scripted", "served_model_name": SERVED},
            "agent": {"name": AGENT},
            "tools": [{"name": "get_current_weather", "approval": "ask"}],
            "frontend": {"kind": "openai"},
            "sessions": {"enabled": False},
        }
    )
    replies = [tool_call_text("get_current_weather", {"city": "广州"}), "广州多云。"]
    agent = Agent(spec, ScriptedEngine(lambda request: replies.pop(0)), load_tools(spec))
    with TestClient(create_app(agent)) as http:
        pending = http.post("/v1/responses", json={"model": AGENT, "input": "广州天气?"})
        assert pending.status_code == 200, pending.text
        assert [item["type"] for item in pending.json()["output"]] == ["mcp_call", "mcp_approval_request"]
        asked = pending.json()["output"][1]
        answer = {"type": "mcp_approval_response", "approval_request_id": asked["id"], "approve": False}
        rejected = http.post("/v1/responses", json={"model": AGENT, "input": [answer],
                                                    "previous_response_id": pending.json()["id"]})  # fmt: skip
        assert rejected.status_code == 200, rejected.text
        assert "the user rejected this call" in rejected.json()["output"][0]["error"]["content"]
        replies[:] = [tool_call_text("get_current_weather", {"city": "广州"}), "广州多云。"]
        approved = http.post(
            "/v1/responses",
            json={"model": AGENT, "input": "广州天气?"},
            headers={"X-Qwenrun-Approval": "approve"},
        )
        assert approved.status_code == 200, approved.text
        kinds = [item["type"] for item in approved.json()["output"]]
        assert kinds == ["mcp_call", "message"]
        assert "多云" in approved.json()["output"][0]["output"]
        passthrough = http.post(
            "/v1/responses",
            json={"model": SERVED, "input": "hi"},
            headers={"X-Qwenrun-Approval": "approve"},
        )
        assert passthrough.status_code == 400
