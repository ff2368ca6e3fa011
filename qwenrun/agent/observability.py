"""Observability: Prometheus metrics, OpenTelemetry spans and structured (JSON) logs.

* :class:`Metrics`: every Prometheus metric of qwenrun in one registry: the OpenAI server's
  (requests, tokens, tool calls, latency) and the agent's (turns, model and tool call durations,
  session store writes). The server's ``/metrics`` exposes one per app (it binds them to its agent).
* :class:`Telemetry`: what an :class:`~qwenrun.agent.loop.Agent` reports each turn to: spans
  ``qwenrun.turn`` > ``qwenrun.model_call`` / ``qwenrun.tool_call`` when a tracer is given or
  OpenTelemetry is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` and the ``opentelemetry`` extra),
  metrics when bound, and log lines carrying the session id. Without them it costs a few
  attribute assignments: OpenTelemetry and prometheus_client are imported only when used.
* :func:`configure_logging`: ``qwenrun -v --log-format json`` logs one JSON object per line, with
  ``session_id`` (:class:`SessionFilter` reads it from :data:`SESSION_ID`, set during a turn).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from datetime import UTC, datetime
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal

from qwenrun.context import SESSION_ID

if TYPE_CHECKING:
    from qwenrun.events import Final, ToolResult, Usage

__all__ = [
    "JsonFormatter",
    "Metrics",
    "SessionFilter",
    "Telemetry",
    "configure_logging",
    "environment_tracer",
]

log = logging.getLogger("qwenrun.agent")
MAX_TOOL_LABELS = 64  # pass-through tool names come from clients: bound the label set
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


# -- Prometheus ---------------------------------------------------------------------------------


class Metrics:
    """qwenrun's counters, histograms and gauge, registered in ``self.registry`` (one per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "qwenrun_requests", "HTTP requests by endpoint, mode and status.",
            ["endpoint", "mode", "status"], registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "qwenrun_prompt_tokens", "Prompt tokens of chat completions.", ["mode"], registry=registry
        )
        self.completion_tokens = Counter(
            "qwenrun_completion_tokens", "Completion tokens of chat completions.", ["mode"], registry=registry
        )
        self.tool_calls = Counter(
            "qwenrun_tool_calls", "Tool calls by tool name and mode.", ["tool", "mode"], registry=registry
        )
        self.latency = Histogram(
            "qwenrun_request_duration_seconds", "Request latency (streams: to the last byte).",
            ["endpoint", "mode"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "qwenrun_requests_in_flight", "Requests being served.", ["endpoint"], registry=registry
        )
        self.turns = Counter(
            "qwenrun_turns", "Agent turns by agent and outcome (answer, length, max_iterations, "
            "error, cancelled).", ["agent", "outcome"], registry=registry,
        )  # fmt: skip
        self.turn_duration = Histogram(
            "qwenrun_turn_duration_seconds", "Duration of agent turns.", ["agent"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.model_call_duration = Histogram(
            "qwenrun_model_call_duration_seconds", "Duration of the agent's model calls.", ["agent"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tool_duration = Histogram(
            "qwenrun_tool_duration_seconds", "Duration of the agent's tool calls by tool and outcome.",
            ["tool", "outcome"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.store_writes = Histogram(
            "qwenrun_session_store_write_seconds", "Duration of one batch written to the session store.",
            buckets=STORE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.store_records = Counter(
            "qwenrun_session_store_records", "Records written to the session store (outcome: ok, lost).",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self._tools: set[str] = set()

    def tool_label(self, name: str) -> str:
        """``name``, or ``other`` once :data:`MAX_TOOL_LABELS` names are in use."""
        if name not in self._tools and len(self._tools) >= MAX_TOOL_LABELS:
            return "other"
        self._tools.add(name)
        return name

    def count_tokens(self, mode: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(mode).inc(prompt)
        self.completion_tokens.labels(mode).inc(completion)

    def count_tool_call(self, mode: str, name: str) -> None:
        self.tool_calls.labels(self.tool_label(name), mode).inc()

    def observe_store_write(self, seconds: float, records: int, failed: bool) -> None:
        """A session store's write observer (:meth:`~qwenrun.sessions.store.SessionStore.subscribe`)."""
        self.store_writes.observe(seconds)
        self.store_records.labels("lost" if failed else "ok").inc(records)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format of the registry, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- OpenTelemetry ------------------------------------------------------------------------------


def environment_tracer() -> Any | None:
    """The OpenTelemetry tracer to use, or None (then nothing is imported).

    With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) set, a global tracer provider
    exporting over OTLP (``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``, the default, or
    ``grpc``) is set up unless the process configured one already; without it, a provider the
    process configured is used, and otherwise tracing is off.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER") == "none":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and "opentelemetry.trace" not in sys.modules:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        log.warning("%s is set but OpenTelemetry is not installed: pip install 'qwenrun[opentelemetry]'",
                    "OTEL_EXPORTER_OTLP_ENDPOINT")  # fmt: skip
        return None
    configured = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    if not configured and (not endpoint or not _export_over_otlp(trace)):
        return None
    from qwenrun.version import __version__

    return trace.get_tracer("qwenrun", __version__)


def _export_over_otlp(trace: Any) -> bool:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        module = "grpc" if protocol == "grpc" else "http"
        exporter = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{module}.trace_exporter")
    except ImportError as exc:
        log.warning("cannot export spans (%s): pip install 'qwenrun[opentelemetry]'", exc)
        return False
    named = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "qwenrun"}
    provider = TracerProvider(resource=Resource.create(named))
    provider.add_span_processor(BatchSpanProcessor(exporter.OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


class Telemetry:
    """Where an agent reports its turns: an OpenTelemetry ``tracer`` and :class:`Metrics`, each
    optional, and the ``qwenrun.agent`` logger."""

    def __init__(self, tracer: Any | None = None, metrics: Metrics | None = None) -> None:
        self.tracer = tracer
        self.metrics = metrics

    @classmethod
    def from_environment(cls) -> Telemetry:
        return cls(environment_tracer())

    def turn(self, session_id: str, agent: str, turn: int) -> TurnTelemetry:
        """Start observing turn ``turn`` of a session (its span starts now)."""
        return TurnTelemetry(self, session_id, agent, turn)


class _Call:
    """One model or tool call of a turn: a child span, a histogram sample and a debug line."""

    __slots__ = ("_attributes", "_kind", "_span", "_started", "_turn")

    def __init__(self, turn: TurnTelemetry, kind: str, attributes: dict[str, Any]) -> None:
        self._turn, self._kind, self._attributes = turn, kind, attributes
        self._started = perf_counter()
        self._span = turn.child(f"qwenrun.{kind}", attributes)

    def end_model(self, usage: Usage) -> None:
        turn = self._turn
        if turn.metrics is not None:
            turn.metrics.model_call_duration.labels(turn.agent).observe(usage.duration_s)
        if self._span is not None:
            self._span.set_attributes({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                                       "gen_ai.usage.output_tokens": usage.completion_tokens})  # fmt: skip
            self._span.end()
        log.debug("model call: %d + %d tokens in %.3f s", usage.prompt_tokens, usage.completion_tokens,
                  usage.duration_s, extra={"session_id": turn.session_id})  # fmt: skip

    def end_tool(self, result: ToolResult) -> None:
        turn = self._turn
        outcome = "error" if result.is_error else "ok"
        if turn.metrics is not None:
            label = turn.metrics.tool_label(result.name)
            turn.metrics.tool_duration.labels(label, outcome).observe(result.duration_s)
        if self._span is not None:
            self._span.set_attribute("tool.is_error", result.is_error)
            if result.is_error:
                self._span.set_status(_status(True, result.content[:200]))
            self._span.end()
        log.debug("tool %s: %s in %.3f s", result.name, outcome, result.duration_s,
                  extra={"session_id": turn.session_id, "tool": result.name})  # fmt: skip

    def fail(self, exc: BaseException) -> None:
        _fail(self._span, exc)


class TurnTelemetry:
    """The observation of one turn: its span, duration and outcome."""

    def __init__(self, telemetry: Telemetry, session_id: str, agent: str, turn: int) -> None:
        self.tracer, self.metrics = telemetry.tracer, telemetry.metrics
        self.session_id, self.agent, self.turn = session_id, agent, turn
        self.started = perf_counter()
        self.span: Any = None
        if self.tracer is not None:
            attributes = {"session.id": session_id, "qwenrun.agent": agent, "qwenrun.turn": turn}
            self.span = self.tracer.start_span("qwenrun.turn", attributes=attributes)
        self._token = SESSION_ID.set(session_id)
        self.done = False

    def child(self, name: str, attributes: dict[str, Any]) -> Any:
        if self.span is None or self.tracer is None:
            return None
        from opentelemetry import trace

        attributes = {"session.id": self.session_id, **attributes}
        return self.tracer.start_span(name, trace.set_span_in_context(self.span), attributes=attributes)

    def model_call(self, attempt: int) -> _Call:
        return _Call(self, "model_call", {"qwenrun.attempt": attempt})

    def tool_call(self, call_id: str, name: str) -> _Call:
        return _Call(self, "tool_call", {"tool.name": name, "tool.call_id": call_id})

    def end(self, final: Final) -> None:
        """The turn ended with ``final``."""
        usage = final.usage
        if self.span is not None:
            self.span.set_attributes({
                "qwenrun.stop_reason": final.stop_reason, "qwenrun.iterations": final.iterations,
                "qwenrun.tool_calls": final.tool_calls, "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
            })  # fmt: skip
        self._finish(final.stop_reason)
        log.info(
            "turn %d: %s after %d model calls and %d tool calls, %d + %d tokens, %.2f s", self.turn,
            final.stop_reason, usage.model_calls, final.tool_calls, usage.prompt_tokens,
            usage.completion_tokens, perf_counter() - self.started,
            extra={"session_id": self.session_id, "turn": self.turn, "stop_reason": final.stop_reason},
        )  # fmt: skip

    def fail(self, exc: BaseException) -> None:
        """The turn ended with ``exc`` (an error, a cancellation or a consumer that stopped)."""
        if self.done:
            return
        outcome = "error" if isinstance(exc, Exception) else "cancelled"
        _fail(self.span, exc)
        self._finish(outcome)
        level = logging.WARNING if outcome == "error" else logging.INFO
        log.log(level, "turn %d: %s (%s)", self.turn, outcome, type(exc).__name__,
                extra={"session_id": self.session_id, "turn": self.turn})  # fmt: skip

    def _finish(self, outcome: str) -> None:
        self.done = True
        if self.metrics is not None:
            self.metrics.turns.labels(self.agent, outcome).inc()
            self.metrics.turn_duration.labels(self.agent).observe(perf_counter() - self.started)
        if self.span is not None:
            self.span.end()
        with contextlib.suppress(ValueError):  # ended in another context (consumed by another task)
            SESSION_ID.reset(self._token)


def _status(error: bool, description: str | None = None) -> Any:
    from opentelemetry.trace import Status, StatusCode

    return Status(StatusCode.ERROR if error else StatusCode.UNSET, description if error else None)


def _fail(span: Any, exc: BaseException) -> None:
    if span is None:
        return
    if isinstance(exc, Exception):
        span.record_exception(exc)
        span.set_status(_status(True, f"{type(exc).__name__}: {exc}"))
    else:
        span.set_attribute("qwenrun.cancelled", True)
    span.end()


# -- logging ------------------------------------------------------------------------------------


class SessionFilter(logging.Filter):
    """Gives every record a ``session_id``: its own (``extra=``), else the current turn's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = SESSION_ID.get()
        return True


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, session_id, the ``extra`` fields
    and, for an exception, its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(verbosity: int, fmt: Literal["text", "json"] = "text") -> None:
    """``-v`` / ``-vv`` and ``--log-format``: a stderr handler on the root logger.

    Like ``logging.basicConfig``, the text format leaves a process that configured logging alone;
    the JSON format replaces a handler this function added before, and only that.
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if getattr(handler, "qwenrun", False)]
    if fmt == "text" and len(root.handlers) > len(ours):
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.qwenrun = True  # type: ignore[attr-defined]
    handler.addFilter(SessionFilter())
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
