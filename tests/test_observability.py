"""Observability (qwenrun/agent/observability.py): OpenTelemetry spans, Prometheus metrics shared with the
server's /metrics, JSON logs with the session id, and no cost when none of it is configured."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from weather import get_current_weather

from qwenrun.agent import Agent
from qwenrun.agent.observability import (
    JsonFormatter,
    Metrics,
    SessionFilter,
    Telemetry,
    environment_tracer,
)
from qwenrun.cli import common as cli
from qwenrun.cli import main as cli_main
from qwenrun.context import SESSION_ID
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import EngineError
from qwenrun.frontends.openai import create_app
from qwenrun.frontends.openai.metrics import bind_metrics
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent



def script(request: ModelRequest) -> str:
    last = request.messages[-1]
    if last["role"] == "tool":
        return "好的。"
    cities = str(last["content"]).split(",")
    return "".join(tool_call_text("get_current_weather", {"city": city}) for city in cities)


def make_agent(telemetry: Telemetry | None = None, **kwargs: Any) -> Agent:
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "agent": {"name": "weather"},
                                "frontend": {"kind": "openai"}})  # fmt: skip
    return Agent(spec, ScriptedEngine(script), tools=[get_current_weather], telemetry=telemetry, **kwargs)


@pytest.fixture
def spans() -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Telemetry(provider.get_tracer("test")), exporter
    provider.shutdown()


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in finished if span.name == name]


async def test_spans_nest_turn_model_call_and_tool_call(
    spans: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    telemetry, exporter = spans
    session = make_agent(telemetry).session("s-1")
    final = await session.ask("广州,火星")
    finished = exporter.get_finished_spans()
    (turn,) = by_name(finished, "qwenrun.turn")
    models = by_name(finished, "qwenrun.model_call")
    tools = by_name(finished, "qwenrun.tool_call")
    assert len(models) == 2 and len(tools) == 2
    assert turn.context is not None and turn.parent is None
    for child in [*models, *tools]:
        assert child.parent is not None and child.parent.span_id == turn.context.span_id
        assert child.context is not None and child.context.trace_id == turn.context.trace_id
        assert child.attributes is not None and child.attributes["session.id"] == "s-1"
    attributes = dict(turn.attributes or {})
    assert attributes["session.id"] == "s-1" and attributes["qwenrun.agent"] == "weather"
    assert attributes["qwenrun.turn"] == 1 and attributes["qwenrun.stop_reason"] == "answer"
    assert attributes["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens > 0
    assert attributes["gen_ai.usage.output_tokens"] == final.usage.completion_tokens > 0
    assert (
        sum(int((m.attributes or {})["gen_ai.usage.output_tokens"]) for m in models)
        == final.usage.completion_tokens
    )
    assert sorted((t.attributes or {})["tool.name"] for t in tools) == ["get_current_weather"] * 2
    mars = next(t for t in tools if "Mars" in (t.status.description or ""))
    assert mars.status.status_code == StatusCode.ERROR and (mars.attributes or {})["tool.is_error"] is True
    assert turn.status.status_code == StatusCode.UNSET
    second = await session.ask("深圳")
    assert second.stop_reason == "answer"
    assert (by_name(exporter.get_finished_spans(), "qwenrun.turn")[-1].attributes or {})["qwenrun.turn"] == 2


async def test_a_failed_turn_is_an_error_span(spans: tuple[Telemetry, InMemorySpanExporter]) -> None:
    telemetry, exporter = spans
    agent = make_agent(telemetry)
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    engine.dead = True
    with pytest.raises(EngineError):
        await agent.session().ask("广州")
    (turn,) = by_name(exporter.get_finished_spans(), "qwenrun.turn")
    assert turn.status.status_code == StatusCode.ERROR
    assert turn.events[0].name == "exception"


async def test_a_cancelled_turn_ends_its_spans(spans: tuple[Telemetry, InMemorySpanExporter]) -> None:
    telemetry, exporter = spans
    agent = make_agent(telemetry)
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    engine.delay_s = 0.01
    task = asyncio.ensure_future(agent.session().ask("广州"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    finished = exporter.get_finished_spans()
    assert [s.name for s in finished] == ["qwenrun.model_call", "qwenrun.turn"]
    assert all((s.attributes or {})["qwenrun.cancelled"] is True for s in finished)


def test_no_opentelemetry_and_no_prometheus_import_without_configuration() -> None:
    code = """
import os, sys
os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None); os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
from qwenrun.agent import Agent
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.engines.scripted import ScriptedEngine
agent = Agent(AgentSpec.from_dict({"model": {"path": "x"}}), ScriptedEngine(["hi"]), tools=[])
assert agent.telemetry.tracer is None and agent.telemetry.metrics is None
print(agent.ask and __import__("asyncio").run(agent.ask("q")).text)
print(sorted(m for m in sys.modules if m.startswith(("opentelemetry", "prometheus_client"))))
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"  # a closed port: spans are dropped
from qwenrun.agent.observability import environment_tracer
from opentelemetry import trace
tracer = environment_tracer()
print(type(trace.get_tracer_provider()).__name__, tracer is not None)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    answer, modules, configured = done.stdout.splitlines()[-3:]
    assert (answer, modules, configured) == ("hi", "[]", "TracerProvider True")


def test_environment_tracer_uses_a_provider_the_process_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    from opentelemetry import trace

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        assert environment_tracer() is None  # imported but never configured: off
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert environment_tracer() is None


async def test_agent_metrics_on_the_servers_metrics_endpoint(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    agent = make_agent(store=store)
    app = create_app(agent)
    body = {"model": "weather", "messages": [{"role": "user", "content": "广州,火星"}]}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (
            await http.post("/v1/chat/completions", json=body, headers={"X-Qwenrun-Session": "m"})
        ).status_code == 200
        store.flush()
        text = (await http.get("/metrics")).text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"
    }
    assert samples['qwenrun_turns_total{agent="weather",outcome="answer"}'] == 1
    assert samples['qwenrun_turn_duration_seconds_count{agent="weather"}'] == 1
    assert samples['qwenrun_model_call_duration_seconds_count{agent="weather"}'] == 2
    assert samples['qwenrun_tool_duration_seconds_count{outcome="ok",tool="get_current_weather"}'] == 1
    assert samples['qwenrun_tool_duration_seconds_count{outcome="error",tool="get_current_weather"}'] == 1
    assert samples['qwenrun_session_store_records_total{outcome="ok"}'] == 7  # the session row, 6 records
    assert samples["qwenrun_session_store_write_seconds_count"] >= 1
    # the server's own metrics keep their names
    assert samples['qwenrun_tool_calls_total{mode="agent",tool="get_current_weather"}'] == 2
    assert samples['qwenrun_requests_total{endpoint="/v1/chat/completions",mode="agent",status="200"}'] == 1
    store.close()


def test_metrics_bound_twice_keep_the_tracer(spans: tuple[Telemetry, InMemorySpanExporter]) -> None:
    telemetry, _ = spans
    agent = make_agent(telemetry)
    metrics = Metrics()
    bind_metrics(agent, metrics)
    assert agent.telemetry.tracer is telemetry.tracer and agent.telemetry.metrics is metrics
    assert metrics.exposition()[1].startswith("text/plain")


def test_json_formatter_and_session_filter() -> None:
    record = logging.makeLogRecord({"name": "qwenrun.x", "levelname": "INFO", "levelno": 20,
                                    "msg": "turn %d: %s", "args": (1, "答"), "turn": 1})  # fmt: skip
    token = SESSION_ID.set("s-42")
    try:
        assert SessionFilter().filter(record)
    finally:
        SESSION_ID.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "turn 1: 答" and line["session_id"] == "s-42" and line["turn"] == 1
    assert (line["level"], line["logger"]) == ("INFO", "qwenrun.x") and line["time"].endswith("+00:00")
    own = logging.makeLogRecord({"msg": "x", "session_id": "mine"})
    SessionFilter().filter(own)
    assert json.loads(JsonFormatter().format(own))["session_id"] == "mine"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    assert "ValueError: boom" in json.loads(JsonFormatter().format(failed))["exception"]


def test_cli_log_format_json_has_the_session_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def scripted(spec: AgentSpec) -> Agent:
        return Agent(spec, ScriptedEngine(["晴。"]), tools=[])

    monkeypatch.setattr(cli, "make_agent", scripted)
    agent_file = tmp_path / "a.yaml"
    agent_file.write_text("model: {path: scripted}\nagent: {name: weather}\n")
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    try:
        result = CliRunner().invoke(
            cli_main, ["-v", "--log-format", "json", "run", str(agent_file), "-p", "hi"]
        )
    finally:
        for handler in root.handlers:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
    assert result.exit_code == 0, result.output
    # stderr (the logs) and stdout (the answer) share CliRunner's output: a log may follow the answer
    logs = [
        json.loads(line[line.index('{"time"') :]) for line in result.output.splitlines() if '{"time"' in line
    ]
    turn = next(log for log in logs if log["message"].startswith("turn 1: answer"))
    assert turn["level"] == "INFO" and turn["logger"] == "qwenrun.agent" and len(turn["session_id"]) == 32
    assert turn["stop_reason"] == "answer"
