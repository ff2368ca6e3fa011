"""Calls written inside the thinking with nothing after ``</think>`` (vLLM #39056: such calls are
lost): read by the output reader, run by the agent loop and marked ``from_thinking`` in its events
and its session, returned by the OpenAI server's pass-through; ``agent.calls_in_thinking: ignore``
turns it off. On the scripted engine (the real tiny engine: ``test_toolcalls_engine.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chunking import bounds
from test_server import SERVED, WEATHER_TOOL, scripted_server

from qwenrun.agent import Agent
from qwenrun.engines.base import Delta, OutputReader
from qwenrun.engines.scripted import ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError
from qwenrun.events import CallDelta, Final, ParsedCall, ToolCall, ToolResult
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls import parse_output
from qwenrun.toolcalls.output import thinking_calls

WEATHER = {"type": "function", "function": {"name": "get_current_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TOOLS = [WEATHER]


def think(body: str, answer: str = "") -> str:
    return f"<think>\nThe user wants the weather.\n{body}\n</think>\n\n{answer}"


def call(city: str, format: str = "hermes") -> str:
    return tool_call_text("get_current_weather", {"city": city}, format=format)


def read(text: str, cuts: list[int], *, format: str = "hermes", recover: bool = True, **delta: Any) -> Any:
    """The reader's events and result for ``text`` cut at ``cuts``."""
    reader = OutputReader(format, tools=TOOLS, lenient=True, calls_in_thinking=recover)
    events: list[Any] = []
    pieces = bounds(text, cuts)
    for index, (a, b) in enumerate(pieces):
        events += reader.feed(Delta(text[a:b], "stop" if index == len(pieces) - 1 else None, **delta))
    events += reader.finish()
    return events, reader.result()


@pytest.mark.parametrize("format", ["hermes", "qwen3_coder"])
def test_a_call_made_while_thinking_is_read_when_the_answer_is_empty(format: str) -> None:
    text = think(call("广州", format))
    for size in range(1, len(text) + 1, 7):
        events, result = read(text, list(range(size, len(text), size)), format=format)
        assert result.content == "" and result.reasoning.endswith("</tool_call>")
        assert [(c.name, c.arguments, c.from_thinking) for c in result.tool_calls] == [
            ("get_current_weather", {"city": "广州"}, True)
        ]
        (done,) = [e for e in events if isinstance(e, ParsedCall)]
        (delta,) = [e for e in events if isinstance(e, CallDelta)]
        assert done == result.tool_calls[0] and (delta.index, delta.id, delta.arguments) == (
            0,
            done.id,
            '{"city": "广州"}',
        )
        assert result.to_dict()["tool_calls"][0]["from_thinking"] is True


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (think(call("广州"), "It is sunny."), "an answer after the thinking"),
        (think(call("广州"), call("北京")), "a call after the thinking (only that one runs)"),
        (think('<tool_call>\n{"name": "get_current_weather", "arguments": {"city": \n</tool_call>'), "malformed"),
        (think(tool_call_text("rm_rf", {"path": "/"})), "a tool that is not declared"),
        (think("I could call get_current_weather(city='广州')."), "no call, only words"),
    ],
)  # fmt: skip
def test_nothing_else_is_read_from_the_thinking(text: str, why: str) -> None:
    _, result = read(text, [5, 40])
    assert not [c for c in result.tool_calls if c.from_thinking], why


def test_off_it_stays_reasoning_and_the_endpoint_s_reasoning_counts_too() -> None:
    text = think(call("广州"))
    _, off = read(text, [], recover=False)
    assert (off.content, off.tool_calls) == ("", []) and "<tool_call>" in off.reasoning
    reader = OutputReader(tools=TOOLS, calls_in_thinking=True)  # a remote endpoint split the reasoning off
    reader.feed(Delta("", None, reasoning=f"Let me check.\n{call('深圳')}"))
    reader.feed(Delta("", "stop"))
    reader.finish()
    assert [(c.name, c.arguments, c.from_thinking) for c in reader.result().tool_calls] == [
        ("get_current_weather", {"city": "深圳"}, True)
    ]
    assert thinking_calls(call("广州"), tools=[]) == []  # no declared tools: nothing is read
    assert parse_output(text, tools=TOOLS).tool_calls == []  # the one-shot parser reads no policy


def make_agent(script: list[str], tmp_path: Path, **settings: Any) -> tuple[Agent, SQLiteStore]:
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "agent": settings})
    store = SQLiteStore(str(tmp_path / "sessions.db"))

    def get_current_weather(city: str) -> str:
        """The weather of a city."""
        return f"{city}: 晴"

    return Agent(spec, ScriptedEngine(script), tools=[get_current_weather], store=store), store


async def test_the_agent_runs_it_and_marks_it_in_its_events_and_its_session(tmp_path: Path) -> None:
    agent, store = make_agent([think(call("广州")), "广州晴。"], tmp_path)
    session = agent.session()
    events = [event async for event in session.stream("广州天气?")]
    (shown,) = [e for e in events if isinstance(e, ToolCall)]
    assert (shown.name, shown.arguments, shown.from_thinking) == ("get_current_weather", {"city": "广州"}, True)
    assert [(r.id, r.content) for r in events if isinstance(r, ToolResult)] == [(shown.id, "广州: 晴")]
    final = events[-1]
    assert isinstance(final, Final) and final.text == "广州晴。" and final.tool_calls == 1
    stored = store.get(session.id)
    assert stored is not None
    assistant = stored.records[1]
    assert assistant.data["tool_calls"][0]["id"] == shown.id and assistant.meta["from_thinking"] == [shown.id]
    assert "<tool_call>" in assistant.data["reasoning_content"]  # the thinking is kept as it was
    store.close()


async def test_ignore_leaves_it_in_the_reasoning(tmp_path: Path) -> None:
    agent, store = make_agent([think(call("广州"))], tmp_path, calls_in_thinking="ignore")
    events = [event async for event in agent.session().stream("广州天气?")]
    assert not [e for e in events if isinstance(e, ToolCall | ToolResult)]
    final = events[-1]
    assert isinstance(final, Final) and final.text == "" and final.tool_calls == 0
    store.close()


def test_a_bad_value_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"agent\.calls_in_thinking.*'run' or 'ignore'"):
        AgentSpec.from_dict({"model": {"path": "x"}, "agent": {"calls_in_thinking": "maybe"}}, source="a.yaml")


def test_the_pass_through_returns_it_as_a_tool_call() -> None:
    with scripted_server() as srv, srv.sync_client() as client:
        srv.script = lambda request: think(call("广州"))
        whole = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "?"}],
                                               tools=[WEATHER_TOOL]).choices[0]  # fmt: skip
        chunks = list(client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "?"}],
                                                     tools=[WEATHER_TOOL], stream=True))  # fmt: skip
    calls = whole.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("get_current_weather", {"city": "广州"})
    ]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    streamed = [t for c in chunks for t in c.choices[0].delta.tool_calls or []] if chunks else []
    assert streamed[0].function is not None and streamed[0].function.name == "get_current_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
