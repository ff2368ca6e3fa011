"""Prometheus metrics of the OpenAI-compatible server, in a registry of its own per app.

:class:`MetricsMiddleware` (plain ASGI, so it also times streamed responses to their last byte)
counts every request by endpoint, mode and status, and tracks latency and requests in flight.
The chat route tells it the mode and, for streams, the real outcome through ``scope["state"]``
(``qwenrun_mode``, ``qwenrun_status``: e.g. 499 for a client that went away, 503 for an engine
error after the 200 headers). Token and tool-call counters are fed by the chat route.
The metric definitions (the agent's too) live in :mod:`qwenrun.agent.observability`.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenrun.agent import Agent
from qwenrun.agent.observability import Metrics, Telemetry

__all__ = ["MODE_KEY", "MetricsMiddleware", "bind_metrics"]

MODE_KEY = "qwenrun_mode"
STATUS_KEY = "qwenrun_status"
ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/models", "/health", "/metrics")


def bind_metrics(agent: Agent, metrics: Metrics) -> None:
    """Report ``agent``'s turns, model and tool calls and session store writes to ``metrics`` (the
    front end binds its metrics to the agent it serves; the agent knows nothing of them)."""
    agent.telemetry = Telemetry(agent.telemetry.tracer, metrics)
    if agent.store is not None:
        agent.store.subscribe(metrics.observe_store_write)


def _endpoint(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
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
