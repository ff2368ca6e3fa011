"""Fast tests of the Chainlit front end (qwenrun/web.py), without a browser or a server.

A :class:`Client` stands for one browser tab: Chainlit's own socket handlers
(``connection_successful``, ``client_message``, ``stop``) run for real against a
``WebsocketSession`` whose emits are recorded; :meth:`Client.thread` rebuilds what the browser
would show from them. The agent runs on a :class:`~qwenrun.engines.scripted.ScriptedEngine`.
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from weather import get_current_weather, weather_of

from qwenrun.agent import Agent
from qwenrun.cli import main
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError, MissingExtraError
from qwenrun.events import Final, TextDelta
from qwenrun.frontends.chainlit import app as web
from qwenrun.frontends.chainlit import view as chainlit_view
from qwenrun.frontends.settings import ChainlitFrontend
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "广州天气情况如何?"
ANSWER = "广州今天晴，气温25°C。"
YAML = """\
model:
  path: scripted-qwen
agent:
  name: weather-test
  description: Weather agent for tests
  max_iterations: 3
tools:
  - get_current_weather
frontend:
  kind: chainlit
  title: Weather test
  welcome: 你好！问我天气吧。
  starters:
    - label: 广州天气
      message: 广州天气情况如何?
    - label: 长文
      message: 写一篇长文
"""



def weather_script(request: ModelRequest) -> str:
    last = request.messages[-1]
    if last["role"] == "tool":
        return ANSWER
    prompt = str(last["content"])
    if "火星" in prompt:
        return tool_call_text("get_current_weather", {"city": "火星"})
    if "天气" in prompt:
        return tool_call_text("get_current_weather", {"city": "广州"})
    return "你好！"


def make_agent(
    script: Callable[[ModelRequest], str] = weather_script, yaml: str = YAML, **engine: Any
) -> Agent:
    spec = AgentSpec.from_text(yaml, source="tests/weather-test.yaml")
    return Agent(spec, engine=ScriptedEngine(script, **engine), tools=[get_current_weather])


@pytest.fixture(scope="module")
def cl() -> Any:
    return web.import_chainlit()


@pytest.fixture
def config(cl: Any) -> Any:
    from chainlit.config import config as chainlit_config

    return chainlit_config


class Client:
    """One browser tab, as Chainlit's socket handlers see it."""

    def __init__(self) -> None:
        from chainlit.session import WebsocketSession

        self.sid = uuid.uuid4().hex
        self.emitted: list[tuple[str, Any]] = []

        async def emit(event: str, data: Any) -> None:
            self.emitted.append((event, copy.deepcopy(data)))

        async def emit_call(event: str, data: Any, timeout: int | None) -> None:
            return None

        self.session = WebsocketSession(
            id=str(uuid.uuid4()),
            socket_id=self.sid,
            emit=emit,
            emit_call=emit_call,
            user_env={},
            client_type="webapp",
        )

    async def connect(self) -> None:
        """What the browser triggers once its socket is up: on_chat_start."""
        from chainlit import socket as chainlit_socket

        await chainlit_socket.connection_successful(self.sid)
        assert self.session.current_task is not None
        await self.session.current_task

    async def start(self, text: str) -> asyncio.Task[Any]:
        """Send a user message (Chainlit runs on_message as the session's current task)."""
        from chainlit import socket as chainlit_socket

        payload = {
            "message": {
                "id": str(uuid.uuid4()),
                "threadId": "",
                "name": "User",
                "type": "user_message",
                "output": text,
                "createdAt": chainlit_view.now(),
            },
            "fileReferences": None,
        }
        await chainlit_socket.message(self.sid, payload)
        task = self.session.current_task
        assert task is not None
        return task

    async def send(self, text: str) -> None:
        await (await self.start(text))

    async def stop(self) -> None:
        from chainlit import socket as chainlit_socket

        await chainlit_socket.stop(self.sid)

    def events(self, name: str) -> list[Any]:
        return [data for event, data in self.emitted if event == name]

    def thread(self) -> list[dict[str, Any]]:
        """The steps and messages as the browser would hold them, in order of appearance."""
        steps: dict[str, dict[str, Any]] = {}
        for event, data in self.emitted:
            if event in ("new_message", "update_message", "stream_start"):
                steps.setdefault(data["id"], {}).update(data)
            elif event == "stream_token":
                step = steps[data["id"]]
                step["output"] = ("" if data["isSequence"] else step.get("output", "")) + data["token"]
            elif event == "delete_message":
                steps.pop(data["id"], None)
        return list(steps.values())

    def shown(self) -> list[tuple[str, str]]:
        """(type, name or text) of the tool steps and messages, in order."""
        return [
            (step["type"], step["name"] if step["type"] == "tool" else step["output"])
            for step in self.thread()
            if step["type"] in ("tool", "assistant_message", "system_message")
        ]

    async def close(self) -> None:
        await self.session.delete()


@pytest.fixture
async def client(cl: Any) -> Any:
    client = Client()
    yield client
    await client.close()


# -- configuration from the YAML -------------------------------------------------------------


def test_chainlit_gets_a_private_app_root(cl: Any, config: Any) -> None:
    assert Path(config.root).name.startswith("qwenrun-chainlit-")
    assert Path(config.root).resolve() != Path.cwd().resolve()
    assert web.APP_ROOT_ENV not in os.environ or os.environ[web.APP_ROOT_ENV] == config.root


async def test_title_description_starters_from_yaml(cl: Any, config: Any) -> None:
    app = web.build_app(make_agent()).asgi
    assert app is sys.modules["chainlit.server"].app
    assert config.ui.name == "Weather test"
    assert config.ui.description == "Weather agent for tests"
    assert config.features.edit_message is False
    assert config.run.headless is True
    starters = await config.code.set_starters(None, "zh-CN")
    assert [(s.label, s.message) for s in starters] == [("广州天气", QUESTION), ("长文", "写一篇长文")]


def test_no_nest_asyncio(cl: Any) -> None:
    web.build_app(make_agent())
    assert "chainlit.cli" not in sys.modules  # its import applies nest_asyncio
    assert asyncio.Task.__module__ == "_asyncio"  # asyncio's C tasks are still in place


def test_title_defaults_to_agent_name_and_must_be_html_safe(cl: Any, config: Any) -> None:
    web.build_app(make_agent(yaml=YAML.replace("  title: Weather test\n", "")))
    assert config.ui.name == "weather-test"
    with pytest.raises(ConfigError, match=r"frontend\.title: must not contain"):
        web.build_app(make_agent(yaml=YAML.replace("title: Weather test", "title: '<b>Weather</b>'")))


def test_other_frontend_kind_is_refused(cl: Any) -> None:
    yaml = YAML.split("frontend:")[0] + "frontend:\n  kind: cli\n"
    with pytest.raises(ConfigError, match=r"frontend\.kind: expected 'chainlit', got 'cli'"):
        web.build_app(make_agent(yaml=yaml))


def test_no_login_without_password_env(cl: Any, config: Any) -> None:
    from chainlit.auth import get_configuration, require_login

    web.build_app(make_agent())
    assert config.code.password_auth_callback is None
    assert not require_login()
    assert get_configuration()["passwordAuth"] is False


async def test_password_login(cl: Any, config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from chainlit.auth import get_configuration, require_login

    monkeypatch.setenv("QWENRUN_TEST_PASSWORD", "s3cret-密码")
    monkeypatch.setenv(web.AUTH_SECRET_ENV, "placeholder")
    monkeypatch.delenv(web.AUTH_SECRET_ENV)  # unset now; restored (unset) after the test
    yaml = YAML + "  password_env: QWENRUN_TEST_PASSWORD\n  username: alice\n"
    web.build_app(make_agent(yaml=yaml))
    assert require_login() is True
    assert get_configuration()["passwordAuth"] is True
    assert len(os.environ[web.AUTH_SECRET_ENV]) >= 32  # generated for this process
    login = config.code.password_auth_callback
    user = await login("alice", "s3cret-密码")
    assert user is not None and user.identifier == "alice"
    assert await login("alice", "wrong") is None
    assert await login("admin", "s3cret-密码") is None
    english, chinese = (config.load_translation(language)["auth"]["login"]["form"]["email"]
                        for language in ("en-US", "zh-CN"))  # fmt: skip
    assert (english["label"], english["placeholder"]) == ("Username", "alice")  # not "Email address"
    assert (chinese["label"], chinese["placeholder"]) == ("用户名", "alice")
    web.build_app(make_agent())  # back to no login
    assert not require_login()


def test_password_env_must_be_set(cl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWENRUN_TEST_PASSWORD", raising=False)
    yaml = YAML + "  password_env: QWENRUN_TEST_PASSWORD\n"
    with pytest.raises(ConfigError, match="environment variable QWENRUN_TEST_PASSWORD is not set"):
        web.build_app(make_agent(yaml=yaml))


def test_a_password_given_instead_of_its_variable_name_is_never_printed(
    cl: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``password_env: ${UI_PASSWORD}`` interpolates the password itself: refused, not printed."""
    monkeypatch.setenv("QWENRUN_TEST_PASSWORD", "s3cret-pw")
    for value in ("s3cret-pw", "not a name!"):
        with pytest.raises(ConfigError) as info:
            web.build_app(make_agent(yaml=YAML + f"  password_env: {value!r}\n"))
        message = str(info.value)
        assert "frontend.password_env: must be the name of the environment variable that holds the password" in message
        assert value not in message


def test_check_password_is_exact() -> None:
    front = make_agent().spec.frontend
    assert isinstance(front, ChainlitFrontend)
    assert web.check_password(front, "pw", "admin", "pw")
    assert not web.check_password(front, "pw", "admin", "pw ")
    assert not web.check_password(front, "pw", "Admin", "pw")


def test_missing_chainlit_is_a_helpful_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "chainlit", None)  # makes `import chainlit` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'qwenrun\[chainlit\]'"):
        web.import_chainlit()
    with pytest.raises(MissingExtraError):
        web.build_app(make_agent())
    result = CliRunner().invoke(main, ["up", str(ROOT / "agents" / "weather-chat.yaml")])
    assert result.exit_code == 1
    assert "chainlit is not installed; install it with: pip install 'qwenrun[chainlit]'" in result.output


def test_serve_builds_the_agent_of_the_file(cl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[tuple[Agent, dict[str, Any]]] = []
    monkeypatch.setattr(web, "serve", lambda agent, **kwargs: served.append((agent, kwargs)))
    path = ROOT / "agents" / "weather-chat.yaml"
    result = CliRunner().invoke(main, ["up", str(path), "--set", "frontend.port=8123"])
    assert result.exit_code == 0, result.output
    ((agent, kwargs),) = served
    assert agent.spec.frontend.kind == "chainlit" and agent.spec.frontend.port == 8123
    assert "get_current_weather" in agent.tools
    assert kwargs == {"watch_file": str(path), "overrides": ("frontend.port=8123",)}


def test_busy_port_fails_before_the_engine_loads() -> None:
    spec = make_agent().spec
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            web._check_port(spec, "127.0.0.1", port)


def test_weather_chat_agent_file() -> None:
    spec = AgentSpec.from_file(ROOT / "agents" / "weather-chat.yaml")
    front = spec.frontend
    assert isinstance(front, ChainlitFrontend)
    assert front.host == "127.0.0.1" and len(front.starters) == 2
    assert QUESTION in [starter.message for starter in front.starters]
    assert [tool.name for tool in spec.tools] == ["get_current_weather"]


# -- events -> Chainlit ----------------------------------------------------------------------


async def test_welcome_is_a_system_message(client: Client) -> None:
    web.build_app(make_agent())
    await client.connect()
    assert client.shown() == [("system_message", "你好！问我天气吧。")]


async def test_answer_streams_after_a_tool_step(client: Client) -> None:
    agent = make_agent()
    web.build_app(agent)
    await client.connect()
    await client.send(QUESTION)
    assert client.shown()[1:] == [("tool", "get_current_weather"), ("assistant_message", ANSWER)]
    run, tool, answer = (
        s
        for s in client.thread()
        if s["type"] in ("run", "tool", "assistant_message") and s.get("name") != "on_chat_start"
    )
    assert run["name"] == "on_message" and run["type"] == "run"
    assert tool["parentId"] == run["id"] and answer["parentId"] == run["id"]  # nested under the run
    assert '"city": "广州"' in tool["input"] and tool["showInput"] == "json"
    assert tool["output"] == weather_of("广州") and tool["isError"] is False
    assert tool["start"] and tool["end"]
    assert answer["streaming"] is False and answer["name"] == "Weather test"
    tokens = [e["token"] for e in client.events("stream_token") if e["id"] == answer["id"]]
    assert len(tokens) > 3 and "".join(tokens) in ANSWER  # token by token (first one in stream_start)
    assert client.events("task_end")  # the UI leaves its "running" state


async def test_text_before_a_tool_call_is_its_own_message(client: Client) -> None:
    replies = [tool_call_text("get_current_weather", {"city": "广州"}, text="我查一下。\n"), ANSWER]
    web.build_app(make_agent(lambda request: replies.pop(0)))
    await client.connect()
    await client.send(QUESTION)
    assert client.shown()[1:] == [
        ("assistant_message", "我查一下。\n"),
        ("tool", "get_current_weather"),
        ("assistant_message", ANSWER),
    ]


async def test_reasoning_streams_into_a_collapsed_step_before_the_answer(client: Client) -> None:
    replies = ["<think>\nThe user wants 广州.\n</think>\n\n" + tool_call_text("get_current_weather", {"city": "广州"}),
               "<think>\nSunny.\n</think>\n\n" + ANSWER]  # fmt: skip
    web.build_app(make_agent(lambda request: replies.pop(0)))
    await client.connect()
    await client.send(QUESTION)
    shown = [(s["type"], s["name"], s["output"]) for s in client.thread() if s["type"] in ("llm", "tool")]
    assert shown == [
        ("llm", chainlit_view.REASONING_STEP, "The user wants 广州."),
        ("tool", "get_current_weather", weather_of("广州")),
        ("llm", chainlit_view.REASONING_STEP, "Sunny."),
    ]
    thought = next(s for s in client.thread() if s["type"] == "llm")
    assert thought["defaultOpen"] is False and not thought["streaming"]
    assert thought["start"] and thought["end"]
    assert client.shown()[-1] == ("assistant_message", ANSWER)


async def test_parallel_tool_calls_are_steps_in_order(client: Client) -> None:
    calls = "\n".join(tool_call_text("get_current_weather", {"city": city}) for city in ("广州", "北京"))
    replies = ["\n" + calls, ANSWER]
    web.build_app(make_agent(lambda request: replies.pop(0)))
    await client.connect()
    await client.send("广州和北京天气")
    tools = [s for s in client.thread() if s["type"] == "tool"]
    assert [t["output"] for t in tools] == [weather_of("广州"), weather_of("北京")]
    assert client.shown()[1:] == [("tool", "get_current_weather")] * 2 + [("assistant_message", ANSWER)]


async def test_tool_error_is_an_error_step(client: Client) -> None:
    web.build_app(make_agent())
    await client.connect()
    await client.send("火星天气")
    (tool,) = (s for s in client.thread() if s["type"] == "tool")
    assert tool["isError"] is True
    assert tool["output"] == "Error: ValueError: no weather station on Mars"
    assert client.shown()[-1] == ("assistant_message", ANSWER)


async def test_engine_error_is_shown_and_the_session_survives(client: Client) -> None:
    agent = make_agent()
    web.build_app(agent)
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    await client.connect()
    engine.dead = True
    await client.send(QUESTION)
    error = client.thread()[-1]
    assert error["isError"] is True and error["output"] == "EngineError: the scripted engine is dead"
    engine.dead = False
    await client.send(QUESTION)
    assert client.shown()[-1] == ("assistant_message", ANSWER)
    prompts = [m["content"] for m in engine.calls[-1].messages if m["role"] == "user"]
    assert prompts == [QUESTION, QUESTION]


async def test_history_is_per_chat_session(cl: Any) -> None:
    agent = make_agent()
    web.build_app(agent)
    first, second = Client(), Client()
    try:
        await first.connect()
        await second.connect()
        await first.send(QUESTION)
        await second.send("你好")
        await first.send("谢谢")
        engine = agent.engine
        assert isinstance(engine, ScriptedEngine)
        users = [[m["content"] for m in call.messages if m["role"] == "user"] for call in engine.calls]
        assert users[-2] == ["你好"]  # the second tab does not see the first tab's question
        assert users[-1] == [QUESTION, "谢谢"]  # the first tab keeps its history
    finally:
        await first.close()
        await second.close()


async def test_stop_cancels_the_turn_and_keeps_the_session(client: Client) -> None:
    long_text = "很长的回答。" * 200
    agent = make_agent(
        lambda r: "好的。" if "谢谢" in str(r.messages[-1]["content"]) else long_text, delay_s=0.01
    )
    web.build_app(agent)
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    await client.connect()
    task = await client.start("写一篇长文")
    for _ in range(500):
        if len(client.events("stream_token")) > 3:
            break
        await asyncio.sleep(0.01)
    await client.stop()
    await task
    assert engine.active == 0  # the model call was aborted
    shown = client.shown()
    assert ("assistant_message", "Task manually stopped.") in shown
    (partial,) = (s for s in client.thread() if s["type"] == "assistant_message" and "很长" in s["output"])
    assert partial["streaming"] is False and 0 < len(partial["output"]) < len(long_text)
    await client.send("谢谢")
    assert client.shown()[-1] == ("assistant_message", "好的。")
    history = engine.calls[-1].messages
    assert [m["role"] for m in history[1:]] == ["user", "assistant", "user"]
    assert history[2]["content"] == partial["output"]  # what the user saw is kept


async def test_on_stop_cancels_the_running_turn(client: Client, config: Any) -> None:
    from chainlit.context import init_ws_context

    agent = make_agent(lambda r: "很长的回答。" * 200, delay_s=0.01)
    web.build_app(agent)
    await client.connect()
    task = await client.start("写一篇长文")
    while not client.events("stream_token"):
        await asyncio.sleep(0.01)
    init_ws_context(client.session)
    await config.code.on_stop()  # without Chainlit's own cancel
    await task
    assert agent.engine.active == 0  # type: ignore[attr-defined]


async def test_max_iterations_note_is_shown(client: Client) -> None:
    yaml = YAML.replace("max_iterations: 3", "max_iterations: 1")
    web.build_app(make_agent(lambda r: tool_call_text("get_current_weather", {"city": "广州"}), yaml=yaml))
    await client.connect()
    await client.send(QUESTION)
    assert client.shown()[-1] == (
        "assistant_message",
        "(stopped after 1 model calls without a final answer)",
    )


async def test_answer_cut_at_max_tokens_says_so(client: Client, cl: Any) -> None:
    from chainlit.context import init_ws_context

    web.build_app(make_agent())
    init_ws_context(client.session)
    view = chainlit_view.TurnView(cl, "Weather test")
    await view.show(TextDelta("  "))  # leading whitespace alone shows nothing
    assert client.thread() == []
    await view.show(TextDelta("半句"))
    await view.show(Final("半句", "length"))
    (message,) = client.thread()
    assert message["output"] == "半句\n\n*(cut off: the answer reached sampling.max_tokens)*"
    assert message["streaming"] is False


async def test_a_teams_agent_is_the_messages_author(client: Client, cl: Any) -> None:
    from chainlit.context import init_ws_context

    web.build_app(make_agent())
    init_ws_context(client.session)
    view = chainlit_view.TurnView(cl, "Weather test")
    await view.show(TextDelta("I hand you over.", agent="boss"))
    await view.show(TextDelta("Helper here.", agent="helper"))  # a handoff: another agent speaks
    await view.show(Final("Helper here.", agent="helper"))
    assert [(m["name"], m["output"]) for m in client.thread()] == [
        ("boss", "I hand you over."), ("helper", "Helper here."),
    ]  # fmt: skip


# -- frontend.watch --------------------------------------------------------------------------


def test_reload_agent_keeps_the_engine(cl: Any, config: Any, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(YAML, encoding="utf-8")
    old = make_agent(yaml=YAML)
    chat = web.build_app(old)
    path.write_text(YAML.replace("title: Weather test", "title: Weather v2"), encoding="utf-8")
    assert web.reload_agent(chat, path) is True
    new = chat.agent
    assert new is not old and new.engine is old.engine and config.ui.name == "Weather v2"
    assert list(new.tools.values()) == list(old.tools.values())  # tools section unchanged: kept
    path.write_text(YAML.replace("path: scripted-qwen", "path: other-model"), encoding="utf-8")
    assert web.reload_agent(chat, path) is False  # a new model needs a restart
    assert chat.agent is new
    path.write_text("model: [", encoding="utf-8")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        web.reload_agent(chat, path)


def test_reload_agent_keeps_the_mcp_servers_or_asks_for_a_restart(cl: Any, config: Any, tmp_path: Path) -> None:
    from mcp_fixtures import SERVER

    mcp = f"  - mcp: {{name: test, command: {sys.executable}, args: [{SERVER}]}}\n    allow: [echo]\n"
    with_mcp = YAML.replace("  - get_current_weather\n", "  - get_current_weather\n" + mcp)
    path = tmp_path / "agent.yaml"
    path.write_text(with_mcp, encoding="utf-8")
    old = make_agent(yaml=with_mcp)
    chat = web.build_app(old)
    path.write_text(with_mcp.replace("title: Weather test", "title: Weather v2"), encoding="utf-8")
    assert web.reload_agent(chat, path) is True
    assert chat.agent.mcp is old.mcp  # the running servers are kept (none started here)
    path.write_text(with_mcp.replace("allow: [echo]", "allow: [add]"), encoding="utf-8")
    assert web.reload_agent(chat, path) is False  # other MCP tools need a restart
    assert chat.agent.spec.tools == old.spec.tools


DYING_UI = """
import asyncio, sys
from qwenrun.frontends.chainlit import app as web
from qwenrun.frontends.chainlit import view as chainlit_view
from qwenrun.agent import Agent
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.engines.scripted import ScriptedEngine

class Engine(ScriptedEngine):
    async def start(self):
        await super().start()
        asyncio.get_running_loop().call_later(1.0, setattr, self, "dead", True)  # its process died

web.serve(Agent(AgentSpec.from_file(sys.argv[1]), engine=Engine(["x"]), tools=[]), port=int(sys.argv[2]))
"""


def test_the_chat_ui_exits_1_when_its_engine_dies(tmp_path: Path) -> None:
    """A dead engine never comes back: the chat UI stops (Chainlit would exit with 0) with 1."""
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "ui.yaml"
    path.write_text("model: {path: scripted}\nsessions: {enabled: false}\nfrontend: {kind: chainlit}\n")
    done = subprocess.run([sys.executable, "-c", DYING_UI, str(path), str(port)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Error: the engine died, so the chat UI stopped (exit code 1)" in done.stderr
