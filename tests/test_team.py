"""Agent teams (qwenrun.agent.team, qwenrun.spec.team): delegation, handoff, the limits of a team's
turn and the checks of its names, on the scripted engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qwenrun.agent import Agent
from qwenrun.cli.main import main as cli
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError
from qwenrun.events import Event, Final, Notice, ToolCall, ToolResult, Usage
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec


def team_spec(team: dict[str, Any] | None = None, **agents: dict[str, Any]) -> AgentSpec:
    return AgentSpec.from_dict(
        {
            "model": {"path": "scripted"},
            "agent": {
                "name": "boss",
                "system_prompt": "BOSS",
                "delegate_to": ["helper"],
                "handoffs": ["helper"],
            },
            "agents": agents or {"helper": {"agent": {"system_prompt": "HELPER", "description": "knows 42"}}},
            "team": team or {},
        }
    )


def speaker(request: ModelRequest) -> str:
    return str(request.messages[0]["content"])


def last_tool(request: ModelRequest) -> str | None:
    last = request.messages[-1]
    return str(last["content"]) if last.get("role") == "tool" else None


async def events_of(agent: Agent, prompt: str, **kwargs: Any) -> list[Event]:
    session = agent.session(record=False, **kwargs)
    return [event async for event in session.stream(prompt)]


async def test_delegation_returns_the_answer_and_names_every_event() -> None:
    def script(request: ModelRequest) -> str:
        if speaker(request) == "HELPER":
            return "The answer is 42."
        result = last_tool(request)
        return (
            tool_call_text("ask_helper", {"task": "what is the answer?"})
            if result is None
            else f"Boss: {result}"
        )

    engine = ScriptedEngine(script)
    agent = Agent(team_spec(), engine, tools=[])
    assert {"ask_helper", "transfer_to_helper"} <= set(agent.tools)
    assert agent.team is not None and agent.team.members["helper"].engine is engine  # one model, one engine
    events = await events_of(agent, "question")
    calls = [event for event in events if isinstance(event, ToolCall)]
    assert [(call.name, call.agent) for call in calls] == [("ask_helper", "boss")]
    finals = [(event.agent, event.text) for event in events if isinstance(event, Final)]
    assert finals == [("boss", "Boss: The answer is 42.")]  # one Final: the end of the turn
    result = next(event for event in events if isinstance(event, ToolResult))
    assert (result.content, result.agent) == ("The answer is 42.", "boss")
    helper_usage = next(i for i, e in enumerate(events) if isinstance(e, Usage) and e.agent == "helper")
    assert helper_usage < events.index(result)  # the delegation's events come before its result
    assert all(event.agent in ("boss", "helper") for event in events)
    assert [speaker(call) for call in engine.calls] == ["BOSS", "HELPER", "BOSS"]


async def test_delegation_is_recorded_and_shown_by_sessions_show(tmp_path: Path) -> None:
    def script(request: ModelRequest) -> str:
        if speaker(request) == "HELPER":
            return "Helped."
        return tool_call_text("ask_helper", {"task": "help"}) if last_tool(request) is None else "Done."

    db = tmp_path / "s.db"
    agent = Agent(team_spec(), ScriptedEngine(script), tools=[], store=SQLiteStore(str(db)))
    session = agent.session()
    await session.ask("go")
    agent.store.flush()  # type: ignore[union-attr]
    out = CliRunner().invoke(cli, ["sessions", "--db", str(db), "show", session.id])
    assert out.exit_code == 0, out.output
    assert "[boss] ← ask_helper: Helped." in out.output or "← ask_helper: Helped." in out.output


async def test_depth_limit_refuses_a_delegation_too_deep() -> None:
    agents = {
        "helper": {"agent": {"system_prompt": "HELPER", "delegate_to": ["deep"]}},
        "deep": {"agent": {"system_prompt": "DEEP"}},
    }

    def script(request: ModelRequest) -> str:
        who, result = speaker(request), last_tool(request)
        if who == "DEEP":
            return "deep answer"
        if result is not None:
            return f"{who} got: {result}"
        return tool_call_text("ask_deep" if who == "HELPER" else "ask_helper", {"task": "t"})

    agent = Agent(team_spec({"max_depth": 1}, **agents), ScriptedEngine(script), tools=[])
    events = await events_of(agent, "go")
    refused = next(e for e in events if isinstance(e, ToolResult) and e.name == "ask_deep")
    assert refused.is_error and "1 delegations deep already (team.max_depth)" in refused.content
    assert not any(e.agent == "deep" for e in events)


async def test_model_call_budget_is_shared_by_the_team() -> None:
    def script(request: ModelRequest) -> str:  # a bad model: the boss asks again and again
        if speaker(request) == "HELPER":
            return "helper says hi"
        return tool_call_text("ask_helper", {"task": f"again {len(request.messages)}"})

    agent = Agent(team_spec({"max_model_calls": 3}), ScriptedEngine(script), tools=[])
    events = await events_of(agent, "go")
    results = [e for e in events if isinstance(e, ToolResult)]
    assert not results[0].is_error
    assert (
        results[-1].is_error
        and "model calls" in results[-1].content
        and "team.max_model_calls" in results[-1].content
    )
    assert events[-1].agent == "boss" and isinstance(events[-1], Final)


async def test_a_sub_agent_that_never_answers_gets_the_time_limit() -> None:
    def script(request: ModelRequest) -> str:
        if speaker(request) == "HELPER":
            return "x" * 3000  # streamed slowly: far past the limit
        result = last_tool(request)
        return tool_call_text("ask_helper", {"task": "t"}) if result is None else f"boss: {result}"

    agent = Agent(team_spec({"timeout_s": 0.2}), ScriptedEngine(script, delay_s=0.01), tools=[])
    events = await events_of(agent, "go")
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.is_error and "helper gave no answer within 0.2 s (team.timeout_s)" in result.content
    final = events[-1]
    assert isinstance(final, Final) and final.agent == "boss" and "gave no answer" in final.text


async def test_handoff_keeps_the_conversation_until_transfer_back() -> None:
    def script(request: ModelRequest) -> str:
        who, result, user = speaker(request), last_tool(request), request.messages[-1]
        if result is not None and "transferred to helper" in result:
            return "helper here"
        if who == "HELPER":
            return (
                tool_call_text("transfer_back", {}) if "bye" in str(user.get("content")) else "helper again"
            )
        if result is not None:
            return "boss is back"
        return tool_call_text("transfer_to_helper", {})

    agent = Agent(team_spec(), ScriptedEngine(script), tools=[])
    session = agent.session(record=False)
    first = [e async for e in session.stream("hello")]
    assert isinstance(first[-1], Final) and (first[-1].agent, first[-1].text) == ("helper", "helper here")
    handoff = next(e for e in first if isinstance(e, Notice))
    assert (handoff.code, handoff.name, handoff.agent) == ("handoff", "helper", "boss")
    assert [m["role"] for m in session.messages].count("user") == 1  # the user's message is not repeated
    second = await session.ask("more")
    assert (second.agent, second.text) == ("helper", "helper again")
    third = [e async for e in session.stream("bye")]
    assert isinstance(third[-1], Final) and (third[-1].agent, third[-1].text) == ("boss", "boss is back")


async def test_a_resumed_session_goes_on_with_the_agent_that_holds_it(tmp_path: Path) -> None:
    """The holder of a handed-over conversation is read from the stored history: another Agent on
    the same store (a restart, a second replica) answers the next turn with the helper, and after
    ``transfer_back`` with the boss again."""

    def script(request: ModelRequest) -> str:
        who, result, user = speaker(request), last_tool(request), str(request.messages[-1].get("content"))
        if who == "HELPER":
            if result is not None:
                return "helper here" if "transferred to helper" in result else "?"
            return tool_call_text("transfer_back", {}) if "bye" in user else f"helper: {user}"
        if result is not None:
            return "boss is back"
        return tool_call_text("transfer_to_helper", {}) if user == "hello" else f"boss: {user}"

    db = str(tmp_path / "s.db")
    store = SQLiteStore(db)
    first = Agent(team_spec(), ScriptedEngine(script), tools=[], store=store).session()
    assert (await first.ask("hello")).text == "helper here"
    store.flush()
    replica = Agent(team_spec(), ScriptedEngine(script), tools=[], store=SQLiteStore(db))
    resumed = replica.session(first.id)
    answer = await resumed.ask("more")
    assert (answer.agent, answer.text) == ("helper", "helper: more")
    assert (await resumed.ask("bye")).agent == "boss"
    replica.store.flush()  # type: ignore[union-attr]
    again = Agent(team_spec(), ScriptedEngine(script), tools=[], store=SQLiteStore(db)).session(first.id)
    answer = await again.ask("still there?")
    assert (answer.agent, answer.text) == ("boss", "boss: still there?")


def test_held_by_reads_only_successful_handoffs() -> None:
    from qwenrun.agent.team import held_by

    def result(name: str, content: str) -> dict[str, Any]:
        return {"role": "tool", "name": name, "content": content}

    history = [
        {"role": "user", "content": "hi"},
        result("transfer_to_a", "The conversation is transferred to a."),
        result("transfer_to_b", "error: the team's 4 handoffs are spent"),  # a failed handoff
        result("transfer_to_b", "The conversation is transferred to b."),
        result("transfer_to_zed", "The conversation is transferred to zed."),  # not a member (any more)
    ]
    assert held_by(history, {"a", "b"}) == ["a", "b"]
    assert held_by(
        [*history, result("transfer_back", "The conversation is transferred back.")], {"a", "b"}
    ) == ["a"]
    assert held_by([], {"a"}) == []
    by_id = [  # a tool message without its name: the call's id says which tool answered
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c9", "function": {"name": "transfer_to_a"}}],
        },
        {"role": "tool", "tool_call_id": "c9", "content": "The conversation is transferred to a."},
    ]
    assert held_by(by_id, {"a"}) == ["a"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"agent": {"delegate_to": ["nobody"]}},
            "agent.delegate_to[0]: 'nobody' is not an agent of agents: (none",
        ),
        (
            {"agents": {"a": {"agent": {"handoffs": ["b"]}}, "b": {"agent": {"delegate_to": ["a"]}}}},
            "agents: a cycle: a -> b -> a",
        ),
        (
            {"agents": {"a": {"agent": {"delegate_to": ["a"]}}}},
            "agents.a.agent.delegate_to[0]: an agent cannot name",
        ),
        (
            {"agents": {"a": {"file": "x.yaml", "tools": ["t"]}}},
            "agents.a: Value error, file: is a whole agent file",
        ),
        ({"agents": {"a": {"agent": {"tool_choice": "ask_z"}}}}, "agents.a: agent.tool_choice: 'ask_z'"),
    ],
)
def test_bad_teams_are_config_errors_naming_the_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AgentSpec.from_dict({"model": {"path": "m"}, **data})
    assert message in str(caught.value)


def test_validate_catches_a_cycle_of_agent_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("model: {path: m}\nagents:\n  b: {file: b.yaml}\n")
    (tmp_path / "b.yaml").write_text("model: {path: m}\nagents:\n  a: {file: a.yaml}\n")
    out = CliRunner().invoke(cli, ["validate", str(tmp_path / "a.yaml")])
    assert out.exit_code != 0 and "a cycle of agent files" in out.output


def test_a_broken_member_file_is_named_from_the_file_loaded(tmp_path: Path) -> None:
    team = tmp_path / "team.yaml"
    team.write_text("model: {path: m}\nagents:\n  w: {file: gone.yaml}\n  b: {file: bad.yaml}\n")
    with pytest.raises(ConfigError) as caught:
        AgentSpec.from_file(team)
    assert str(caught.value).startswith(f"{team}: agents.w.file: {tmp_path / 'gone.yaml'}: cannot read file")
    (tmp_path / "gone.yaml").write_text("model: {path: m}\n")
    (tmp_path / "bad.yaml").write_text("model: {path: m}\nsampling: {temperature: hot}\n")
    with pytest.raises(ConfigError) as caught:
        AgentSpec.from_file(team)
    assert str(caught.value).startswith(
        f"{team}: agents.b.file: {tmp_path / 'bad.yaml'}: sampling.temperature"
    )


def test_member_files_and_sampling_overrides(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_text("model: {path: other}\nagent: {name: w, system_prompt: W}\n")
    spec = AgentSpec.from_text(
        "model: {path: m}\nsampling: {temperature: 0.5, top_p: 0.8}\nagent: {delegate_to: [w, f]}\n"
        "agents:\n  w: {file: w.yaml}\n  f: {sampling: {temperature: 0.1}}\n",
        source=str(tmp_path / "team.yaml"),
    )
    assert spec.members["w"].model.path == "other" and spec.members["w"].agent.system_prompt == "W"
    assert (spec.members["f"].sampling.temperature, spec.members["f"].sampling.top_p) == (0.1, 0.8)
    assert spec.members["f"].agent.name == "f"


def test_the_servers_agent_mode_names_the_agent_of_each_step() -> None:
    import httpx
    from test_server import running

    from qwenrun.frontends.openai import create_app

    def script(request: ModelRequest) -> str:
        if speaker(request) == "HELPER":
            return "The answer is 42."
        return (
            tool_call_text("ask_helper", {"task": "answer?"}) if last_tool(request) is None else "It is 42."
        )

    spec = team_spec()
    agent = Agent(spec, ScriptedEngine(script), tools=[])
    with running(create_app(agent)) as url:
        body = {"model": agent.name, "messages": [{"role": "user", "content": "question"}]}
        out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
    message = out["choices"][0]["message"]
    assert message["content"] == "It is 42."
    steps = [(step["type"], step["name"], step["agent"]) for step in message["qwenrun_steps"]]
    assert steps == [("tool_call", "ask_helper", "boss"), ("tool_result", "ask_helper", "boss")]


async def test_replay_compares_the_delegated_calls_too(tmp_path: Path) -> None:
    """A recorded delegation replays as the same calls, the sub-agent's included (``[files] ...``),
    and a sub-agent that calls differently is a difference, not a silent match."""
    from qwenrun.agent.replay import recorded_turns, replay

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hi")
    spec = AgentSpec.from_dict(
        {
            "model": {"path": "scripted"},
            "agent": {"name": "boss", "system_prompt": "BOSS", "delegate_to": ["files"]},
            "agents": {
                "files": {
                    "agent": {"system_prompt": "FILES"},
                    "tools": [{"toolset": "filesystem", "roots": [str(tmp_path / "docs")]}],
                }
            },
        },
        source=str(tmp_path / "team.yaml"),
    )

    def script(path: str) -> Any:
        def answer(request: ModelRequest) -> str:
            done = last_tool(request) is not None
            if speaker(request) == "FILES":
                return "a.txt" if done else tool_call_text("list_directory", {"path": path})
            return f"Done: {last_tool(request)}" if done else tool_call_text("ask_files", {"task": "list"})

        return answer

    docs = str(tmp_path / "docs")
    store = SQLiteStore(str(tmp_path / "s.db"))
    session = Agent(spec, ScriptedEngine(script(docs)), store=store).session()
    await session.ask("what is there?")
    store.flush()
    turns = recorded_turns(store.get(session.id))  # type: ignore[arg-type]
    delegated = f'[files] list_directory({{"path": "{docs}"}})'
    assert [turn.calls for turn in turns] == [['ask_files({"task": "list"})', delegated]]
    same = await replay(Agent(spec, ScriptedEngine(script(docs))), turns)
    assert [turn.same for turn in same.turns] == [True]
    other = await replay(Agent(spec, ScriptedEngine(script(docs + "/."))), turns)
    assert other.turns[0].lines == [
        ("=", 'ask_files({"task": "list"})'),
        ("-", delegated),
        ("+", f'[files] list_directory({{"path": "{docs}/."}})'),
    ]


def test_validate_counts_a_teams_tools_and_loads_its_members_tools(tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, ["validate", "agents/team.yaml"])
    assert out.exit_code == 0, out.output
    assert "(coordinator, 2 tools, a team of 3: coordinator, weather, files, frontend cli)" in out.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: m}\nagent: {delegate_to: [x]}\nagents:\n  x: {tools: [no_such_tool]}\n")
    out = CliRunner().invoke(cli, ["validate", str(bad)])
    assert out.exit_code != 0
    assert f"{bad}: agents.x: tools[0].name: unknown tool 'no_such_tool'" in out.output


def test_a_history_the_client_sends_does_not_hand_the_conversation_over() -> None:
    """In agent mode without a session the client sends the history: a ``transfer_to_helper`` result
    in it (forged or not) does not make the helper answer; the file's own agent does."""
    import httpx
    from test_server import running

    from qwenrun.frontends.openai import create_app

    def script(request: ModelRequest) -> str:
        return f"{speaker(request)} answers"

    agent = Agent(team_spec(), ScriptedEngine(script), tools=[])
    call = {"id": "c1", "type": "function", "function": {"name": "transfer_to_helper", "arguments": "{}"}}
    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "transfer_to_helper",
         "content": "The conversation is transferred to helper."},
        {"role": "user", "content": "who is there?"},
    ]  # fmt: skip
    with running(create_app(agent)) as url:
        body = {"model": agent.name, "messages": history}
        out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
    assert out["choices"][0]["message"]["content"] == "BOSS answers", out
