"""``qwenrun up --resume``, ``qwenrun sessions list|show|export`` and ``qwenrun replay`` (scripted
engine, a temporary session database)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qwenrun.agent import Agent
from qwenrun.agent.replay import compare, format_call, recorded_turns
from qwenrun.cli import common as cli
from qwenrun.cli import main as cli_main
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.sessions import open_store
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.sessions.store import DB_ENV, SessionInfo
from qwenrun.spec.agent_file import AgentSpec

CALLS: list[str] = []  # what the weather tool was asked, in order


def get_current_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city.
    """
    CALLS.append(city)
    return f"{city}：晴（第{len(CALLS)}次查询）"


def weather_script(request: ModelRequest) -> str:
    """Ask the tool about the city the user names (its first two characters), then answer."""
    last = request.messages[-1]
    if last["role"] == "tool":
        return f"答：{last['content']}"
    return tool_call_text("get_current_weather", {"city": str(last["content"])[:2]})


def other_script(request: ModelRequest) -> str:
    """Like weather_script, but asks about 北京 for 深圳 and checks two cities for 上海."""
    last = request.messages[-1]
    if last["role"] == "user" and str(last["content"]).startswith("深圳"):
        return tool_call_text("get_current_weather", {"city": "北京"})
    if last["role"] == "user" and str(last["content"]).startswith("上海"):
        return tool_call_text("get_current_weather", {"city": "上海"}) + tool_call_text(
            "get_current_weather", {"city": "苏州"}
        )
    return weather_script(request)


class Harness:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.db = tmp_path / "sessions.db"
        monkeypatch.setenv(DB_ENV, str(self.db))
        self.file = tmp_path / "weather.yaml"
        self.file.write_text("model: {path: scripted}\nagent: {name: weather}\n")
        self.script: Callable[[ModelRequest], str] = weather_script
        self.agents: list[Agent] = []
        self.runner = CliRunner()
        monkeypatch.setattr(cli, "make_agent", self.make_agent)
        CALLS.clear()

    def make_agent(self, spec: AgentSpec) -> Agent:
        agent = Agent(spec, ScriptedEngine(self.script), tools=[get_current_weather], store=open_store(spec))
        self.agents.append(agent)
        return agent

    def invoke(self, *args: str, input: str | None = None) -> Result:
        return self.runner.invoke(cli_main, list(args), input=input)

    def chat(self, *lines: str) -> str:
        """A REPL session; returns its id."""
        result = self.invoke("up", str(self.file), input="".join(f"{line}\n" for line in lines) + "/exit\n")
        assert result.exit_code == 0, result.output
        match = re.search(r"Session (\w+) \(continue it later with --resume \1\)", result.output)
        assert match, result.output
        return match.group(1)

    def store(self) -> SQLiteStore:
        return SQLiteStore(self.db)


@pytest.fixture
def h(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(tmp_path, monkeypatch)


def test_repl_prints_the_id_and_resume_continues_the_session(h: Harness) -> None:
    session_id = h.chat("广州天气?", "深圳呢?")
    result = h.invoke("up", str(h.file), "--resume", session_id, input="北京呢?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert f"Resumed session {session_id} (2 turns)" in result.output
    engine = h.agents[-1].engine
    assert isinstance(engine, ScriptedEngine)
    users = [m["content"] for m in engine.calls[-1].messages if m["role"] == "user"]
    assert users == ["广州天气?", "深圳呢?", "北京呢?"]
    store = h.store()
    stored = store.get(session_id)
    assert stored is not None and stored.info.turns == 3 and len(stored.records) == 15
    store.close()


def test_reset_in_the_repl_starts_a_new_session(h: Harness) -> None:
    result = h.invoke("up", str(h.file), input="广州?\n/reset\n深圳?\n/exit\n")
    assert result.exit_code == 0, result.output
    ids = re.findall(r"Session (\w+) \(continue", result.output)
    assert len(ids) == 2 and ids[0] != ids[1] and "(conversation cleared)" in result.output
    store = h.store()
    assert sorted(info.turns for info in store.list()) == [1, 1]
    store.close()


def test_resume_errors(h: Harness, tmp_path: Path) -> None:
    h.chat("广州?")
    missing = h.invoke("up", str(h.file), "--resume", "nope")
    assert missing.exit_code == 1 and f"no session 'nope' in {h.db}" in missing.output
    web = tmp_path / "web.yaml"
    web.write_text("model: {path: x}\nfrontend: {kind: chainlit}\n")
    wrong = h.invoke("up", str(web), "--resume", "x")
    assert wrong.exit_code == 2 and "--resume is for frontend.kind cli, not chainlit" in wrong.output
    off = tmp_path / "off.yaml"
    off.write_text("model: {path: x}\nsessions: {enabled: false}\n")
    disabled = h.invoke("up", str(off), "--resume", "x")
    assert disabled.exit_code == 1 and "sessions.enabled: false" in disabled.output
    quiet = h.invoke("up", str(off), input="广州?\n/exit\n")
    assert "(not recorded)" in quiet.output


def test_sessions_list_show_and_export(h: Harness) -> None:
    first = h.chat("广州天气?")
    second = h.chat("深圳呢?", "上海?")
    listed = h.invoke("sessions", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split() == ["ID", "UPDATED", "AGENT", "FRONTEND", "TURNS", "TITLE"]
    assert [line.split()[0] for line in lines[1:]] == [second, first]  # newest first
    assert lines[1].split()[-3:] == ["cli", "2", "深圳呢?"]
    assert len(h.invoke("sessions", "list", "-n", "1").output.splitlines()) == 2
    assert h.invoke("sessions", "list", "--agent", "other").output.startswith("No sessions recorded")

    shown = h.invoke("sessions", "show", second)
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert f"Session {second}: agent weather (cli), model scripted" in out
    assert out.index("── turn 1 ──") < out.index("user: 深圳呢?") < out.index("── turn 2 ──")
    assert '  → get_current_weather({"city": "深圳"})' in out
    assert "  ← get_current_weather: 深圳：晴" in out
    assert "(answer, 1 tool calls, " in out and " tokens, " in out

    exported = h.invoke("sessions", "export", second, "--format", "jsonl")
    rows = [json.loads(line) for line in exported.output.splitlines()]
    assert rows[0]["type"] == "session" and rows[0]["id"] == second and rows[0]["turns"] == 2
    assert [row["type"] for row in rows[1:]] == ["message"] * 4 + ["event"] + ["message"] * 4 + ["event"]
    assert rows[1]["message"] == {"role": "user", "content": "深圳呢?"} and rows[1]["turn"] == 1
    assert rows[5]["event"]["type"] == "final" and rows[5]["meta"]["usage"]["model_calls"] == 2
    assert [row["seq"] for row in rows[1:]] == list(range(10))

    markdown = h.invoke("sessions", "export", first, "--format", "markdown").output
    assert markdown.startswith(f"# Session `{first}`\n")
    assert "## Turn 1" in markdown and "**User:** 广州天气?" in markdown
    assert '**Assistant** calls `get_current_weather` with `{"city": "广州"}`' in markdown
    assert "**Tool `get_current_weather`:**\n\n```text\n广州：晴" in markdown


def test_sessions_export_to_a_file_and_other_databases(h: Harness, tmp_path: Path) -> None:
    session_id = h.chat("广州?")
    target = tmp_path / "out.md"
    assert (
        h.invoke("sessions", "export", session_id, "--format", "markdown", "-o", str(target)).exit_code == 0
    )
    assert target.read_text(encoding="utf-8").startswith(f"# Session `{session_id}`")
    empty = tmp_path / "none.db"
    result = h.invoke("sessions", "--db", str(empty), "list")
    assert result.exit_code == 0 and result.output == f"No sessions recorded in {empty}.\n"
    assert not empty.exists()  # reading never creates a database
    missing = h.invoke("sessions", "--db", str(h.db), "show", "nope")
    assert missing.exit_code == 1 and f"Error: no session 'nope' in {h.db}" in missing.output
    relative = tmp_path / "rel" / "agent.yaml"
    relative.parent.mkdir()
    relative.write_text("model: {path: x}\nsessions: {path: mine.db}\n")
    other = h.invoke("sessions", "-f", str(relative), "list")
    assert other.output == f"No sessions recorded in {relative.parent / 'mine.db'}.\n"


def test_replay_agrees(h: Harness) -> None:
    session_id = h.chat("广州?", "深圳?")
    store = h.store()
    before = len(store.list())
    result = h.invoke("replay", session_id)
    assert result.exit_code == 0, result.output
    assert f"Replaying session {session_id} (2 turns) with {h.file.resolve()}" in result.output
    assert 'turn 1 [same]: 广州?\n    get_current_weather({"city": "广州"})' in result.output
    assert "tool calls match in all 2 turns" in result.output
    assert len(store.list()) == before  # a replay is not recorded
    store.close()


def test_replay_shows_where_tool_calls_differ(h: Harness, tmp_path: Path) -> None:
    session_id = h.chat("广州?", "深圳?", "上海?")
    h.script = other_script  # the changed prompt / model
    changed = tmp_path / "changed.yaml"
    changed.write_text("model: {path: scripted}\nagent: {name: weather, system_prompt: Be brief.}\n")
    result = h.invoke("replay", session_id, str(changed))
    assert result.exit_code == 1, result.output
    out = result.output
    assert f"with {changed}" in out
    assert 'turn 1 [same]: 广州?\n    get_current_weather({"city": "广州"})\n' in out
    assert ('turn 2 [DIFFERS]: 深圳?\n  - get_current_weather({"city": "深圳"})\n'
            '  + get_current_weather({"city": "北京"})\n') in out  # fmt: skip
    assert ('turn 3 [DIFFERS]: 上海?\n    get_current_weather({"city": "上海"})\n'
            '  + get_current_weather({"city": "苏州"})\n') in out  # fmt: skip
    assert "2 of 3 turns call tools differently" in out
    system = h.agents[-1].engine.calls[0].messages[0]  # type: ignore[attr-defined]
    assert system == {"role": "system", "content": "Be brief."}


def test_replay_with_recorded_tool_results(h: Harness) -> None:
    session_id = h.chat("广州?", "深圳?")
    assert CALLS == ["广州", "深圳"]
    live = h.invoke("replay", session_id)
    assert live.exit_code == 0 and CALLS == ["广州", "深圳", "广州", "深圳"]
    recorded = h.invoke("replay", session_id, "--tools", "recorded")
    assert recorded.exit_code == 0, recorded.output
    assert CALLS == ["广州", "深圳", "广州", "深圳"]  # the tool did not run again
    engine = h.agents[-1].engine
    assert isinstance(engine, ScriptedEngine)
    tool_results = [m["content"] for call in engine.calls for m in call.messages[-1:] if m["role"] == "tool"]
    assert tool_results == ["广州：晴（第1次查询）", "深圳：晴（第2次查询）"]


def test_replay_errors(h: Harness, tmp_path: Path) -> None:
    missing = h.invoke("replay", "nope")
    assert missing.exit_code == 1 and "no session 'nope'" in missing.output
    store = h.store()
    spec = AgentSpec.from_dict({"model": {"path": "x"}})  # recorded from a dict: no file
    agent = Agent(spec, ScriptedEngine(["hi"]), tools=[], store=store)
    session = agent.session()
    asyncio.run(session.ask("q"))
    store.flush()
    result = h.invoke("replay", session.id)
    assert result.exit_code == 1 and "was recorded without a file: give the FILE" in result.output
    store.close()


def test_recorded_turns_and_compare() -> None:
    assert (
        format_call("f", {"b": 1, "a": "é"})
        == format_call("f", '{"a": "é", "b": 1}')
        == 'f({"a": "é", "b": 1})'
    )
    assert format_call("f", "not json") == "f(not json)"
    store = SQLiteStore(":memory:")
    spec = AgentSpec.from_dict({"model": {"path": "x"}})
    agent = Agent(spec, ScriptedEngine(weather_script), tools=[get_current_weather], store=store)
    session = agent.session()
    asyncio.run(session.ask("广州?"))
    stored = store.get(session.id)
    assert stored is not None
    (turn,) = recorded_turns(stored)
    assert (turn.number, turn.prompt, turn.calls) == (1, "广州?", ['get_current_weather({"city": "广州"})'])
    assert list(turn.results[turn.calls[0]]) == [f"广州：晴（第{len(CALLS)}次查询）"]
    assert turn.answer.startswith("答：")
    diff = compare(turn, ["x()", 'get_current_weather({"city": "广州"})'])
    assert diff.lines == [("+", "x()"), ("=", 'get_current_weather({"city": "广州"})')] and not diff.same
    assert compare(turn, turn.calls).same
    store.close()


def test_the_commands_are_registered(h: Harness) -> None:
    result = h.invoke("--help")
    assert "sessions" in result.output and "replay" in result.output
    assert "--log-format [text|json]" in result.output
    assert "--resume SESSION_ID" in h.invoke("up", "--help").output


def test_show_makes_terminal_escapes_visible(h: Harness) -> None:
    store = h.store()
    store.create(SessionInfo("esc", "weather", title="clear\x1b[2J"))
    store.append("esc", 1, "message", {"role": "user", "content": "hi\x1b]0;owned\x07"}, {})
    store.append(
        "esc", 1, "message", {"role": "tool", "name": "t", "tool_call_id": "c", "content": "\x1b[31mred"}, {}
    )
    store.close()
    shown = h.invoke("sessions", "show", "esc").output
    assert "user: hi\\x1b]0;owned\\x07" in shown and "← t: \\x1b[31mred" in shown
    assert "clear\\x1b[2J" in h.invoke("sessions", "list").output


def test_show_and_export_tell_the_dropped_arguments(h: Harness) -> None:
    def echoing(request: ModelRequest) -> str:  # echoes the schema's `required` into the call
        if request.messages[-1]["role"] == "user":
            return tool_call_text("get_current_weather", {"city": "深圳", "required": ["city"]})
        return weather_script(request)

    h.script = echoing
    session_id = h.chat("深圳呢?")
    shown = h.invoke("sessions", "show", session_id).output
    assert '  ! get_current_weather: dropped required=["city"]: not in the tool\'s schema' in shown, shown
    assert '→ get_current_weather({"city": "深圳"})' in shown and "答：深圳：晴" in shown
    markdown = h.invoke("sessions", "export", session_id, "--format", "markdown").output
    assert '*notice: get_current_weather: dropped required=["city"]' in markdown, markdown


def test_list_columns_fit_long_ids_and_agent_names(h: Harness) -> None:
    store = h.store()
    chainlit_id = "0b6f3c1e-2f4a-4c55-9d57-3a1e8c2b7f10"  # Chainlit's thread ids: 36 characters
    store.create(
        SessionInfo(chainlit_id, "weather-chat-with-a-long-name", frontend="chainlit", title="广州?")
    )
    store.create(SessionInfo("a" * 32, "weather", title="深圳?"))
    store.close()
    lines = h.invoke("sessions", "list").output.splitlines()
    header = lines[0]
    for line in lines[1:]:  # every column starts where its header does
        for column in ("UPDATED", "AGENT", "FRONTEND"):
            start = header.index(column)
            assert line[start - 2 : start] == "  " or line[start - 1] == " ", (column, line)
            assert line[start] != " ", (column, line)
    assert lines[1].split()[0] in (chainlit_id, "a" * 32) and len(lines) == 3
