"""Structured answers (``agent.output_schema``) on the real vLLM engine (the tiny random-weight
model): its words are noise, but structured outputs force JSON of the schema, so every front end
gets a valid answer: the agent loop, the OpenAI server's agent mode (chat and Responses), the CLI's
``run --json`` and Chainlit. The schemas leave finitely many answers, so the noise must end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from loopback import serve_in_loop
from openai import AsyncOpenAI
from test_chainlit import Client
from weather import get_current_weather

from qwenrun.agent import Agent
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, TextDelta
from qwenrun.frontends.chainlit import app as web
from qwenrun.frontends.openai import create_app
from qwenrun.frontends.settings import ChainlitFrontend
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"sunny": {"type": "boolean"}, "sky": {"enum": ["clear", "cloudy", "rain"]}},
    "required": ["sunny", "sky"],
    "additionalProperties": False,
}
CITY: dict[str, Any] = {
    "type": "object", "properties": {"city": {"enum": ["深圳", "广州"]}}, "required": ["city"],
    "additionalProperties": False,
}  # fmt: skip


def valid(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {"sunny", "sky"} and isinstance(value["sunny"], bool)
            and value["sky"] in ("clear", "cloudy", "rain"))  # fmt: skip


@pytest.fixture(scope="module")
def agent(engine: VLLMEngine, tiny_spec: AgentSpec) -> Agent:
    data = tiny_spec.model_dump(mode="json", exclude_none=True)
    data["agent"] = {**data["agent"], "name": "weather-json", "output_schema": SCHEMA}
    return Agent(AgentSpec.from_dict(data, source="tests/tiny-json.yaml"), engine, tools=[get_current_weather])


async def test_the_agent_answers_with_valid_json_after_its_tool_steps(agent: Agent) -> None:
    session = agent.session(record=False)
    events = [event async for event in session.stream("深圳天气如何?")]
    final = events[-1]
    assert isinstance(final, Final) and final.stop_reason == "answer", final
    assert valid(final.output) and json.loads(final.text) == final.output
    assert [e.text for e in events if isinstance(e, TextDelta)] == [final.text]
    assert session.messages[-1]["content"] == final.text


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(agent: Agent) -> AsyncIterator[AsyncOpenAI]:
    app = create_app(agent, shutdown_engine=False)
    async with serve_in_loop(app) as url, AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                                      timeout=120) as client:  # fmt: skip
        yield client


async def test_server_agent_mode_returns_the_json_as_the_content(client: AsyncOpenAI) -> None:
    out = await client.chat.completions.create(model="weather-json", messages=[{"role": "user", "content": "hi"}])
    assert valid(json.loads(out.choices[0].message.content or ""))
    streamed = await client.chat.completions.create(
        model="weather-json", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in streamed if chunk.choices])
    assert valid(json.loads(text))
    per_request = await client.chat.completions.create(
        model="weather-json", messages=[{"role": "user", "content": "深圳?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    )  # fmt: skip
    assert json.loads(per_request.choices[0].message.content or "") in ({"city": "深圳"}, {"city": "广州"})


async def test_responses_agent_mode_reports_the_schema_and_applies_text_format(client: AsyncOpenAI) -> None:
    out = await client.responses.create(model="weather-json", input="深圳天气如何?")
    assert valid(json.loads(out.output_text))
    assert out.text is not None and out.text.format.type == "json_schema"
    assert out.text.format.schema_ == SCHEMA  # type: ignore[union-attr]
    city = await client.responses.create(
        model="weather-json", input="深圳?",
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
    )  # fmt: skip
    assert json.loads(city.output_text) in ({"city": "深圳"}, {"city": "广州"})


async def test_chainlit_shows_the_answer_as_a_json_block(agent: Agent) -> None:
    web.import_chainlit()
    spec = agent.spec.model_copy(update={"frontend": ChainlitFrontend(kind="chainlit")})
    web.build_app(Agent(spec, agent.engine, tools=[get_current_weather]))
    browser = Client()
    try:
        await browser.connect()
        await browser.send("深圳天气如何?")
        answers = [step["output"] for step in browser.thread() if step["type"] == "assistant_message"]
    finally:
        await browser.close()
    assert answers and answers[-1].startswith("```json\n") and answers[-1].endswith("\n```")
    shown = json.loads(answers[-1].removeprefix("```json\n").removesuffix("\n```"))
    assert valid(shown) and answers[-1] == f"```json\n{json.dumps(shown, indent=2, ensure_ascii=False)}\n```"


@pytest.mark.timeout(600)
def test_run_json_prints_the_validated_object(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [str(Path(sys.executable).with_name("qwenrun")), "run", str(ROOT / "agents" / "weather-tiny.yaml"),
               "--set", f"model.path={tiny_model_dir}", "--set", f"agent.output_schema={json.dumps(SCHEMA)}",
               "--json", "-p", "深圳天气如何?"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=500, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(done.stdout.splitlines()[-1])
    assert final["type"] == "final" and valid(final["output"]) and json.loads(final["text"]) == final["output"]
