"""End-to-end tests of the Chainlit front end, driven in Debian's Chromium (Playwright, headless).

The server runs in a subprocess (Chainlit ends its process with ``os._exit`` on shutdown) on a
free 127.0.0.1 port. This file is also that subprocess's entry point: ``python
tests/test_chainlit_browser.py AGENT.yaml PORT`` serves the agent file with a deterministic
:class:`~qwenrun.engines.scripted.ScriptedEngine` and a local weather tool, so the tests are fast. One test
(marked ``engine`` too) serves the tiny random-weight vLLM model through ``qwenrun up``. The
approval test serves an agent with an ``approval: ask`` tool and an MCP server (tests/mcp_server.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from weather import get_current_weather, weather_of

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from qwenrun.engines.scripted import ModelRequest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("QWENRUN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUESTION = "广州天气情况如何?"
ANSWER = "广州今天晴，气温25°C，东南风2级，适合出门。"
LONG_ANSWER = "这是一篇很长的文章。" * 150
REASONING = "用户想知道广州的天气；我直接回答。"

AGENT_YAML = """\
model:
  path: scripted-qwen
agent:
  name: weather-test
  system_prompt: You are a helpful assistant.
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


# -- the server side (runs in the subprocess) ------------------------------------------------



def script(request: ModelRequest) -> str:
    """The scripted model: a weather tool call, an answer, a long text, or the question history."""
    from qwenrun.engines.scripted import tool_call_text

    last = request.messages[-1]
    if last["role"] == "tool":
        if str(last["content"]).startswith("Error: the user rejected"):
            return "好的，不查了。"
        return f"回声：{last['content']}" if last.get("name") == "echo" else ANSWER
    prompt = str(last["content"])
    if "回声" in prompt:
        return tool_call_text("echo", {"text": prompt})
    if "想一想" in prompt:
        return f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"
    if "天气" in prompt:
        return tool_call_text("get_current_weather", {"city": "广州" if "广州" in prompt else "北京"})
    if "长文" in prompt:
        return LONG_ANSWER
    if "问了什么" in prompt:
        asked = [m["content"] for m in request.messages[1:-1] if m["role"] == "user"]
        return "之前的问题：" + ("；".join(asked) if asked else "（无）")
    return "你好！"


def serve_scripted(path: str, port: int) -> None:
    from qwenrun.agent import Agent
    from qwenrun.engines.scripted import ScriptedEngine
    from qwenrun.frontends.chainlit import app as web
    from qwenrun.spec.agent_file import AgentSpec
    from qwenrun.tools import Tool

    spec = AgentSpec.from_file(path)
    declared = spec.tool("get_current_weather")
    approval = declared.approval if declared else "auto"
    weather = Tool.from_function(get_current_weather, approval=approval, origin="the test weather tool")
    agent = Agent(spec, engine=ScriptedEngine(script, chunk_size=3, delay_s=0.02), tools=[weather])
    web.serve(agent, port=port, watch_file=path)


# -- helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def server(command: list[str], port: int, cwd: Path, env: dict[str, str], timeout: float) -> Iterator[str]:
    """Start a front-end process, wait until it answers HTTP, yield its URL, stop it."""
    log = cwd / f"server-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url + "/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer on {url} in {timeout:.0f} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():  # scripts/test.sh installs it when it can, and says why not
        reason = os.environ.get("QWENRUN_BROWSER_SKIP") or (
            f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install chromium, or run "
            "scripts/test.sh as root); the browser tests never download one"
        )
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def scripted_url(workdir: Path) -> Iterator[str]:
    path = workdir / "weather-test.yaml"
    path.write_text(AGENT_YAML, encoding="utf-8")
    port = free_port()
    command = [sys.executable, __file__, str(path), str(port)]
    with server(command, port, workdir, {}, timeout=60) as url:
        yield url


def open_chat(browser: Browser, url: str, welcome: str = "你好！问我天气吧。") -> Page:
    """A new browser context (its own cookies: a new chat session) on the chat page, once connected."""
    page = browser.new_context(locale="zh-CN", viewport={"width": 1100, "height": 900}).new_page()
    page.set_default_timeout(20_000)
    page.goto(url)
    page.get_by_text(welcome).wait_for()  # on_chat_start ran: the socket is connected
    return page


def ask(page: Page, text: str) -> None:
    from playwright.sync_api import expect

    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")
    expect(page.locator(".step[data-step-type='user_message']").filter(has_text=text).last).to_be_visible()


def wait_idle(page: Page, timeout: float = 20_000) -> None:
    """Wait for the end of the turn: the stop button turns back into the send button."""
    from playwright.sync_api import expect

    expect(page.locator("#stop-button")).to_have_count(0, timeout=timeout)
    expect(page.locator("#chat-submit")).to_be_visible()


def answers(page: Page) -> list[str]:
    return [
        text.strip() for text in page.locator(".step[data-step-type='assistant_message']").all_inner_texts()
    ]


# -- the tests -------------------------------------------------------------------------------


def test_weather_question_streams_answer_with_tool_step(
    browser: Browser, scripted_url: str, workdir: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = open_chat(browser, scripted_url)
    expect(page).to_have_title("Weather test")
    expect(page.locator("#starters button")).to_have_count(2)

    ask(page, QUESTION)
    expect(page.locator(".step[data-step-type='assistant_message']").filter(has_text=ANSWER)).to_be_visible()
    wait_idle(page)
    step = page.locator("#step-get_current_weather")
    expect(step).to_have_count(1)
    expect(step).to_contain_text("get_current_weather")
    step.click()
    tool = page.locator(".step[data-step-type='tool']")
    expect(tool).to_contain_text('"city": "广州"')
    expect(tool.get_by_text(weather_of("广州"))).to_be_visible()
    assert answers(page)[-1] == ANSWER
    # the tool step comes before the answer, both after the question
    html = page.content()
    assert html.index(QUESTION) < html.index('id="step-get_current_weather"') < html.index(ANSWER)
    page.wait_for_timeout(500)  # the step's accordion animation
    page.screenshot(path=str(tmp_path / "weather.png"), full_page=True)
    # Chainlit wrote nothing into the server's working directory
    assert not {".chainlit", ".files", "chainlit.md"} & {p.name for p in workdir.iterdir()}
    page.context.close()


def test_reasoning_is_a_collapsed_step_before_the_answer(browser: Browser, scripted_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = open_chat(browser, scripted_url)
    ask(page, "想一想：广州天气?")
    expect(page.locator(".step[data-step-type='assistant_message']").filter(has_text=ANSWER)).to_be_visible()
    wait_idle(page)
    step = page.locator("#step-Reasoning")
    expect(step).to_have_count(1)
    expect(page.get_by_text(REASONING)).to_have_count(0)  # collapsed
    step.click()
    expect(page.get_by_text(REASONING)).to_be_visible()
    html = page.content()
    assert html.index('id="step-Reasoning"') < html.index(ANSWER)
    assert answers(page)[-1] == ANSWER  # the reasoning is not part of the answer
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "reasoning.png"), full_page=True)
    page.context.close()


def test_each_tab_has_its_own_session(browser: Browser, scripted_url: str) -> None:
    from playwright.sync_api import expect

    first = open_chat(browser, scripted_url)
    ask(first, QUESTION)
    wait_idle(first)
    second = open_chat(browser, scripted_url)
    ask(second, "我之前问了什么?")
    expect(second.get_by_text("之前的问题：（无）")).to_be_visible()
    wait_idle(second)
    ask(first, "我之前问了什么?")
    expect(first.get_by_text(f"之前的问题：{QUESTION}")).to_be_visible()
    wait_idle(first)
    first.context.close()
    second.context.close()


def test_stop_button_cancels_and_session_stays_usable(browser: Browser, scripted_url: str) -> None:
    from playwright.sync_api import expect

    page = open_chat(browser, scripted_url)
    page.locator("#starters button").filter(has_text="长文").click()
    message = page.locator(".step[data-step-type='assistant_message']").filter(has_text="这是一篇很长的文章")
    expect(message).to_be_visible()
    page.locator("#stop-button").click()
    expect(page.get_by_text("Task manually stopped.")).to_be_visible()
    wait_idle(page)
    stopped_at = len(message.inner_text())
    time.sleep(0.5)
    assert len(message.inner_text()) == stopped_at < len(LONG_ANSWER)  # generation really stopped
    ask(page, "我之前问了什么?")
    expect(page.get_by_text("之前的问题：写一篇长文")).to_be_visible()
    wait_idle(page)
    page.context.close()


def test_password_login(browser: Browser, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    path = tmp_path / "weather-auth.yaml"
    text = AGENT_YAML + "  password_env: QWENRUN_TEST_PASSWORD\n  username: alice\n"
    path.write_text(text, encoding="utf-8")
    port = free_port()
    command = [sys.executable, __file__, str(path), str(port)]
    env = {"QWENRUN_TEST_PASSWORD": "s3cret-密码"}
    with server(command, port, tmp_path, env, timeout=60) as url:
        page = browser.new_context().new_page()
        page.set_default_timeout(20_000)
        page.goto(url)
        expect(page.locator("#chat-input")).to_have_count(0)  # the login form comes first
        expect(page.locator("#email")).to_have_attribute("placeholder", "alice")  # not me@example.com
        expect(page.get_by_text("Email address")).to_have_count(0)
        page.locator("#email").fill("alice")
        page.locator("#password").fill("wrong")
        page.locator("#password").press("Enter")
        expect(page.locator("#chat-input")).to_have_count(0)
        expect(page.get_by_text(re.compile("credentials|凭证|Invalid", re.I)).first).to_be_visible()
        page.locator("#password").fill("s3cret-密码")
        page.locator("#password").press("Enter")
        page.get_by_text("你好！问我天气吧。").wait_for()
        ask(page, QUESTION)
        expect(page.get_by_text(ANSWER)).to_be_visible()
        page.context.close()


APPROVAL_YAML = f"""\
model:
  path: scripted-qwen
agent:
  name: approval-test
tools:
  - name: get_current_weather
    approval: ask
  - mcp: {{name: test, command: {json.dumps(sys.executable)}, args: [{json.dumps(str(ROOT / "tests" / "mcp_server.py"))}]}}
    allow: [echo]
frontend:
  kind: chainlit
  title: Approval test
  welcome: 要我做什么？
"""


def test_approve_and_reject_a_call_in_the_chat_and_an_mcp_tool(browser: Browser, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    path = tmp_path / "approval.yaml"
    path.write_text(APPROVAL_YAML, encoding="utf-8")
    port = free_port()
    with server([sys.executable, __file__, str(path), str(port)], port, tmp_path, {}, timeout=60) as url:
        page = open_chat(browser, url, welcome="要我做什么？")
        ask(page, QUESTION)
        question = page.locator(".step").filter(has_text="Run this tool call?").last
        expect(question).to_contain_text('get_current_weather({"city": "广州"})')
        expect(question).to_contain_text("from the test weather tool")  # the tool's origin
        page.get_by_role("button", name="Approve").click()
        expect(page.locator(".step[data-step-type='assistant_message']").filter(has_text=ANSWER)).to_be_visible()
        wait_idle(page)
        page.locator("#step-get_current_weather").last.click()
        expect(page.get_by_text(weather_of("广州")).last).to_be_visible()

        ask(page, "深圳天气?")
        expect(page.get_by_role("button", name="Reject")).to_be_visible()
        page.get_by_role("button", name="Reject").click()
        expect(page.get_by_text("好的，不查了。")).to_be_visible()
        wait_idle(page)
        page.locator("#step-get_current_weather").last.click()
        expect(page.get_by_text("Error: the user rejected this call of get_current_weather; it was not run.")).to_be_visible()

        ask(page, "回声 你好")  # the MCP server's tool: no approval asked
        expect(page.get_by_text("回声：回声 你好")).to_be_visible()
        wait_idle(page)
        expect(page.locator("#step-echo")).to_have_count(1)
        assert page.get_by_role("button", name="Approve").count() == 0
        page.screenshot(path=str(tmp_path / "approval.png"), full_page=True)
        page.context.close()


@pytest.mark.engine
def test_tiny_vllm_model_through_qwenrun_up(browser: Browser, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The real path: ``qwenrun up`` with the tiny random model; its text is noise, the call forced."""
    from playwright.sync_api import expect

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "qwenrun.cli",
        "up",
        str(ROOT / "agents" / "weather-tiny.yaml"),
        "--set",
        "frontend.kind=chainlit",
        "--set",
        f"frontend.port={port}",
        "--set",
        "frontend.title=Tiny weather",
        "--set",
        "frontend.welcome=Tiny model, its text is noise.",
        "--set",
        "sampling.max_tokens=256",  # room for a forced call with a long random city name
    ]
    env = {"QWENRUN_TINY_MODEL": str(tiny_model_dir), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with server(command, port, tmp_path, env, timeout=300) as url:
        page = open_chat(browser, url, welcome="Tiny model, its text is noise.")
        expect(page).to_have_title("Tiny weather")
        ask(page, QUESTION)
        expect(page.locator("#step-get_current_weather").first).to_be_visible(timeout=120_000)
        wait_idle(page, timeout=180_000)
        page.locator("#step-get_current_weather").first.click()
        expect(page.locator(".step[data-step-type='tool']").first).to_contain_text('"city"')
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / "tiny.png"), full_page=True)
        page.context.close()


def _main(argv: list[str]) -> Any:
    if len(argv) != 2 or not re.fullmatch(r"\d+", argv[1]):
        sys.exit(f"usage: python {Path(__file__).name} AGENT.yaml PORT")
    return serve_scripted(argv[0], int(argv[1]))


if __name__ == "__main__":
    _main(sys.argv[1:])
