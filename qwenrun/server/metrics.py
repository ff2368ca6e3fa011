"""Prometheus metrics of the OpenAI-compatible server, in a registry of its own per app.

:class:`MetricsMiddleware` (plain ASGI, so it also times streamed responses to their last byte)
counts every request by endpoint, mode and status, and tracks latency and requests in flight.
The chat route tells it the mode and, for streams, the real outcome through ``scope["state"]``
(``qwenrun_mode``, ``qwenrun_status``: e.g. 499 for a client that went away, 503 for an engine
error after the 200 headers). Token and tool-call counters are fed by the chat route.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MODE_KEY", "STATUS_KEY", "Metrics", "MetricsMiddleware"]

MODE_KEY = "qwenrun_mode"
STATUS_KEY = "qwenrun_status"
ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
MAX_TOOL_LABELS = 64  # pass-through tool names come from clients: bound the label set
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The server's counters, histogram and gauge, registered in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
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
        self._tools: set[str] = set()

    def count_tokens(self, mode: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(mode).inc(prompt)
        self.completion_tokens.labels(mode).inc(completion)

    def count_tool_call(self, mode: str, name: str) -> None:
        if name not in self._tools and len(self._tools) >= MAX_TOOL_LABELS:
            name = "other"
        else:
            self._tools.add(name)
        self.tool_calls.labels(name, mode).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format of the registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _endpoint(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class MetricsMiddleware:
    """Counts and times every HTTP request (ASGI middleware)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint(scope["path"])
        state = scope.setdefault("state", {})
        status = 500  # what an exception escaping the app becomes
        started = time.perf_counter()

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        gauge = self.metrics.in_flight.labels(endpoint)
        gauge.inc()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            gauge.dec()
            mode = str(state.get(MODE_KEY, "none"))
            outcome = str(state.get(STATUS_KEY, status))
            self.metrics.requests.labels(endpoint, mode, outcome).inc()
            self.metrics.latency.labels(endpoint, mode).observe(time.perf_counter() - started)
