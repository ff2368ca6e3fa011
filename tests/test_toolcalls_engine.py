"""Qwen3 thinking and both tool-call formats on the real engine: the tiny model's qwen3 flavour
(Qwen3's template: thinking, Hermes calls) and qwen3_coder flavour (Qwen3-Coder's: XML calls).

Each test runs once per flavour (``flavour_engine``). The weights are random, so structured
outputs decide the text: :class:`~qwenrun.engines.scripted.PinnedEngine` pins a think block plus a call in
the engine's format, and the answer after the tool result; the engine's own forced calls (a closed
think block, then a JSON-schema or XML structural-tag call) are tested unpinned. The agent loop,
the REPL and one-shot runs, and Chainlit (its socket handlers, in process) are here; the OpenAI
server is in ``test_toolcalls_server.py``.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
from test_chainlit import Client
from weather import weather_tool

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.engines.base import Constraint, Delta, OutputReader, Request
from qwenrun.engines.scripted import PinnedEngine, literal_regex, tool_call_body
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.errors import RequestError
from qwenrun.events import Event, Final, Reasoning, Repair, TextDelta, ToolCall, ToolResult
from qwenrun.frontends.chainlit import app as web
from qwenrun.frontends.chainlit import view as chainlit_view
from qwenrun.frontends.console import repl, run_once
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

QUESTION = "广州天气情况如何?"
REASONING = "The user asks about 广州. I will call get_current_weather."
ANSWER_REASONING = "The tool answered; I summarise it."
ANSWER = "广州多云到晴。"
SEED = "目前广州多云到晴，气温28~31℃，吹轻微的偏北风。"  # the weather plugin's mock backend
CODE = 'if tag == "</tool_call>":\n    return "</parameter>"'  # quotes the closing tags


def agent_spec(
    engine: VLLMEngine, *, frontend: str = "cli", tools: tuple[str, ...] = (), **agent: Any
) -> AgentSpec:
    """The weather agent on a flavour engine (``tool_choice: required``, the mock weather tool, or
    the ``tools`` named)."""
    data = engine.spec.model_dump(mode="json")
    data["tools"] = [{"name": name} for name in tools] or [
        {"name": "get_current_weather", "settings": {"backend": "mock"}}
    ]
    data["agent"] = {"name": "weather-qwen3", "tool_choice": "required", "max_iterations": 3, **agent}
    data["frontend"] = {"kind": frontend}
    data["sessions"] = {"enabled": False}
    return AgentSpec.from_dict(data, source="tests/weather-qwen3.yaml")


def pinned(
    engine: VLLMEngine, name: str = "get_current_weather", arguments: Any = None, **options: Any
) -> PinnedEngine:
    """The engine with its calls pinned to a think block plus ``name(arguments)`` in its format,
    and its answers to a think block plus :data:`ANSWER`."""
    body = tool_call_body(
        name, {"city": "广州"} if arguments is None else arguments, format=engine.tool_call_format
    )
    options.setdefault("reasoning", REASONING)
    options.setdefault("answer", f"<think>\n{ANSWER_REASONING}\n</think>\n\n{ANSWER}")
    return PinnedEngine(engine, body, call_max_tokens=200, **options)


def weather_agent(engine: VLLMEngine, *, frontend: str = "cli", **options: Any) -> Agent:
    spec = agent_spec(engine, frontend=frontend)
    return Agent(spec, pinned(engine, **options), load_tools(spec))


def reasoning_of(events: list[Event]) -> list[str]:
    """The reasoning of each model call, in order (a call's pieces joined)."""
    parts: list[str] = []
    previous: Event | None = None
    for event in events:
        if isinstance(event, Reasoning):
            if isinstance(previous, Reasoning):
                parts[-1] += event.text
            else:
                parts.append(event.text)
        previous = event
    return parts


def is_qwen3(engine: VLLMEngine) -> bool:
    return engine.tool_call_format == "hermes"


# -- the agent loop -------------------------------------------------------------------------------


async def test_weather_loop_reasoning_calls_and_history(flavour_engine: VLLMEngine) -> None:
    """The thinking streams as Reasoning events, the call after </think> runs (vLLM #39056, #42021),
    and the history keeps each call's reasoning where Qwen3's template expects it."""
    engine = flavour_engine
    agent = weather_agent(engine)
    assert isinstance(agent.engine, PinnedEngine)
    session = agent.session()
    events = [event async for event in session.stream(QUESTION)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    final = events[-1]
    assert [(c.name, c.arguments) for c in calls] == [("get_current_weather", {"city": "广州"})]
    assert [(r.content, r.is_error) for r in results] == [(SEED, False)]
    assert reasoning_of(events) == [REASONING, ANSWER_REASONING]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == ANSWER
    assert isinstance(final, Final) and (final.text, final.tool_calls, final.iterations) == (ANSWER, 1, 2)
    assert session.messages[1]["reasoning_content"] == REASONING and session.messages[1]["content"] == ""
    assert session.messages[-1] == {
        "role": "assistant",
        "content": ANSWER,
        "reasoning_content": ANSWER_REASONING,
    }

    tools = agent.tool_schemas()
    second = engine.render(agent.engine.requests[1], tools)  # the tool loop: its reasoning is kept
    assert (f"<think>\n{REASONING}\n</think>" in second) is is_qwen3(engine)  # Qwen3-Coder's renders none
    assert [event async for event in session.stream("深圳呢?")][-1].type == "final"  # the next turn
    third = engine.render(agent.engine.requests[2], tools)
    assert ANSWER in third and REASONING not in third and ANSWER_REASONING not in third


async def test_the_engine_forces_a_valid_call_after_a_closed_think_block(flavour_engine: VLLMEngine) -> None:
    """Unpinned: tool_choice required is a prefill (closing the think block Qwen3's template leaves
    open; nothing when enable_thinking is false or the template has none) plus a JSON-schema or
    XML structural-tag grammar of the engine's format."""
    engine = flavour_engine
    tools = [weather_tool({"enum": ["广州"]}), {"type": "function", "function": {"name": "get_time"}}]
    for template in ({}, {"enable_thinking": False}):
        for choice, call in (("get_current_weather", ("get_current_weather", {"city": "广州"})),
                             ("get_time", ("get_time", {}))):  # fmt: skip
            request = Request(messages=[{"role": "user", "content": QUESTION}], tools=tools, tool_choice=choice,
                              chat_template_kwargs=template, overrides={"max_tokens": 64})  # fmt: skip
            reader = OutputReader(engine.tool_call_format, tools=tools)
            deltas = [delta async for delta in engine.generate(request)]
            for delta in deltas:
                reader.feed(delta)
            reader.finish()
            think = "<think>\n\n</think>\n\n" if is_qwen3(engine) and not template else ""
            assert deltas[0].text == f"{think}<tool_call>\n"
            result = reader.result()
            assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == [(*call, None)]
            assert (result.content, result.reasoning) == ("", "")


def only_guangzhou(city: Literal["广州"]) -> str:
    """Get the weather of 广州.

    Args:
        city: The city.
    """
    return f"{city}：晴"


class MalformedFirst:
    """The engine with its first answer pinned to ``text`` (a malformed call); later calls as they are."""

    def __init__(self, engine: VLLMEngine, text: str) -> None:
        self.engine, self.text, self.used = engine, text, False
        self.model_name, self.tool_call_format = engine.model_name, engine.tool_call_format

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def health(self) -> Any:
        return self.engine.health()

    def generate(self, request: Request) -> AsyncIterator[Delta]:
        if not self.used:
            self.used = True
            request = dataclasses.replace(request, constraint=Constraint(regex=literal_regex(self.text)))
        return self.engine.generate(request)


async def test_agent_forced_call_and_repair_run_in_the_engines_format(flavour_engine: VLLMEngine) -> None:
    """A named tool_choice, and the repair of a malformed call, are the engine's own forced calls
    (unpinned): a valid call of the tool's schema, in the engine's format."""
    engine = flavour_engine
    spec = agent_spec(engine, tools=("only_guangzhou",), tool_choice="only_guangzhou", max_iterations=2)
    agent = Agent(spec, engine, [only_guangzhou])
    events = [
        event async for event in agent.session(record=False).stream(QUESTION, overrides={"max_tokens": 48})
    ]
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [
        ("only_guangzhou", {"city": "广州"})
    ]
    assert [e.content for e in events if isinstance(e, ToolResult)] == ["广州：晴"]

    broken = {  # invalid JSON; an XML value left open (the output cut)
        "hermes": '<tool_call>\n{"name": "only_guangzhou", "arguments": {"city": 广州}}\n</tool_call>',
        "qwen3_coder": "<tool_call>\n<function=only_guangzhou>\n<parameter=city>\n广州",
    }[engine.tool_call_format]
    spec = agent_spec(engine, tools=("only_guangzhou",), tool_choice="auto", max_iterations=2)
    agent = Agent(spec, MalformedFirst(engine, broken), [only_guangzhou])
    events = [
        event async for event in agent.session(record=False).stream(QUESTION, overrides={"max_tokens": 48})
    ]
    repairs = [e for e in events if isinstance(e, Repair)]
    assert len(repairs) == 1 and "retrying with a forced only_guangzhou call" in repairs[0].reason
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [
        ("only_guangzhou", {"city": "广州"})
    ]


def echo(text: str) -> str:
    """Return the text.

    Args:
        text: Any text.
    """
    return text


def get_time() -> str:
    """The time."""
    return "12:00"


@pytest.mark.parametrize(("tool", "arguments", "result"), [(echo, {"text": CODE}, CODE), (get_time, {}, "12:00")],
                         ids=["closing-tags-in-a-value", "no-parameters"])  # fmt: skip
async def test_calls_whose_values_quote_the_tags_or_that_have_no_parameters(
    flavour_engine: VLLMEngine, tool: Any, arguments: dict[str, Any], result: str
) -> None:
    """A ``</tool_call>`` inside a value does not end the call (vLLM PR #45310); a tool without
    parameters is called with ``{}`` (vLLM #28806)."""
    spec = agent_spec(flavour_engine, tools=(tool.__name__,), tool_choice=tool.__name__)
    agent = Agent(spec, pinned(flavour_engine, tool.__name__, arguments), [tool])
    events = [event async for event in agent.session(record=False).stream("run it")]
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [(tool.__name__, arguments)]
    assert [(e.content, e.is_error) for e in events if isinstance(e, ToolResult)] == [(result, False)]


async def test_a_call_inside_the_think_block_is_never_run(flavour_engine: VLLMEngine) -> None:
    engine = flavour_engine
    call = tool_call_body("get_current_weather", {"city": "北京"}, format=engine.tool_call_format)
    thought = f"I could write\n<tool_call>\n{call}\n</tool_call>\nbut I know it."
    spec = agent_spec(engine, tool_choice="auto")
    agent = Agent(
        spec, pinned(engine, answer=f"<think>\n{thought}\n</think>\n\nNo call needed."), load_tools(spec)
    )
    events = [event async for event in agent.session(record=False).stream(QUESTION)]
    assert not [e for e in events if isinstance(e, ToolCall | ToolResult)]
    assert reasoning_of(events) == [thought]
    final = events[-1]
    assert isinstance(final, Final) and final.text == "No call needed."


class InTurn:
    """The engine with its n-th model call pinned by the n-th of ``pins`` (the last one after that)."""

    def __init__(self, *pins: PinnedEngine) -> None:
        self.pins = list(pins)
        self.model_name = pins[0].model_name

    @property
    def tool_call_format(self) -> str:
        return self.pins[0].tool_call_format

    async def start(self) -> None:
        await self.pins[0].start()

    async def shutdown(self) -> None:  # the fixture shuts the real engine down
        pass

    def health(self) -> Any:
        return self.pins[0].health()

    def generate(self, request: Request) -> AsyncIterator[Delta]:
        pin = self.pins.pop(0) if len(self.pins) > 1 else self.pins[0]
        return pin.generate(request)


async def test_a_call_made_while_thinking_runs_when_nothing_follows_the_block(
    flavour_engine: VLLMEngine,
) -> None:
    """vLLM #39056: the model writes a complete call inside its thinking and nothing after
    ``</think>`` (the real engine writes it, pinned by structured outputs): the agent runs it,
    marked ``from_thinking``, then answers from its result."""
    engine = flavour_engine
    call = tool_call_body("get_current_weather", {"city": "广州"}, format=engine.tool_call_format)
    thought = f"Let me check.\n<tool_call>\n{call}\n</tool_call>"
    spec = agent_spec(engine, tool_choice="auto")
    first = pinned(engine, answer=f"<think>\n{thought}\n</think>\n\n")
    agent = Agent(spec, InTurn(first, pinned(engine)), load_tools(spec))
    events = [event async for event in agent.session(record=False).stream(QUESTION)]
    (shown,) = [e for e in events if isinstance(e, ToolCall)]
    assert (shown.name, shown.arguments, shown.from_thinking) == ("get_current_weather", {"city": "广州"}, True)
    assert [e.content for e in events if isinstance(e, ToolResult)] == [SEED]
    assert reasoning_of(events) == [thought, ANSWER_REASONING]
    final = events[-1]
    assert isinstance(final, Final) and final.text == ANSWER and final.tool_calls == 1


async def test_thinking_budget(flavour_engine: VLLMEngine) -> None:
    """vLLM's thinking_token_budget closes the think block after that many tokens; the qwen3 engine
    runs vLLM's reasoning parser for it (its spec sets agent.thinking_budget), the qwen3_coder one
    does not, and vLLM refuses the budget there (a RequestError: the server's 400)."""
    engine = flavour_engine
    request = Request(messages=[{"role": "user", "content": QUESTION}], prefill="<think>\n",
                      overrides={"max_tokens": 48, "ignore_eos": True, "thinking_token_budget": 8})  # fmt: skip
    if not is_qwen3(engine):
        with pytest.raises(RequestError, match="thinking_token_budget is set but reasoning_config is not"):
            async for _ in engine.generate(request):
                pass
        return
    text = "".join([delta.text async for delta in engine.generate(request)])
    tokenizer = await engine.tokenizer()
    thinking = text.split("</think>")[0].removeprefix("<think>\n")
    assert "</think>" in text and len(tokenizer.encode(thinking, add_special_tokens=False)) <= 8
    unlimited = Request(
        messages=request.messages, prefill="<think>\n", overrides={"max_tokens": 48, "ignore_eos": True}
    )
    assert "</think>" not in "".join([delta.text async for delta in engine.generate(unlimited)])


# -- the console ----------------------------------------------------------------------------------


async def test_run_once_and_the_repl_show_the_reasoning(
    flavour_engine: VLLMEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = weather_agent(flavour_engine)
    final = await run_once(agent, QUESTION)
    assert final.text == ANSWER
    out = capsys.readouterr().out
    assert out == (
        f'{REASONING}\n  → get_current_weather(city="广州")\n  ← {SEED}\n{ANSWER_REASONING}\n\n{ANSWER}\n'
    )
    await run_once(agent, QUESTION, as_json=True)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    thoughts = "".join(event["text"] for event in events if event["type"] == "reasoning")
    assert thoughts == REASONING + ANSWER_REASONING
    await repl(agent, io.StringIO(f"{QUESTION}\n/exit\n"))
    captured = capsys.readouterr()
    assert captured.out == out and "Session " in captured.err


# -- Chainlit -------------------------------------------------------------------------------------


async def test_chainlit_shows_the_reasoning_as_a_step(flavour_engine: VLLMEngine) -> None:
    """Chainlit's own socket handlers, in process, with the agent on the real engine."""
    web.import_chainlit()
    web.build_app(weather_agent(flavour_engine, frontend="chainlit"))
    client = Client()
    try:
        await client.connect()
        await client.send(QUESTION)
        shown = [(step["type"], step["name"], step.get("output")) for step in client.thread()
                 if step["type"] in ("llm", "tool", "assistant_message")]  # fmt: skip
        assert shown == [
            ("llm", chainlit_view.REASONING_STEP, REASONING),
            ("tool", "get_current_weather", SEED),
            ("llm", chainlit_view.REASONING_STEP, ANSWER_REASONING),
            ("assistant_message", "weather-qwen3", ANSWER),
        ]
    finally:
        await client.close()
