"""``engine.kind: openai``: the model runs behind an existing OpenAI-compatible endpoint.

``vllm serve``, a vLLM cluster behind Ray Serve or Kubernetes, or another qwenrun's ``openai``
front end: the agent (tools, sessions, front ends, events) runs here, the engine there. Requests go
through the official ``openai`` client as streamed chat completions.

What differs from the in-process engine:

* Tool calls come back as the endpoint parsed them (``tool_calls``; the endpoint needs its tool
  parser, e.g. ``vllm serve --enable-auto-tool-choice --tool-call-parser hermes``), and text as
  text. qwenrun still reads calls the endpoint left in the text (bare JSON, tags) in the format of
  ``model.tool_call_format`` (``auto`` is ``hermes`` here: the template is the endpoint's).
* Reasoning comes back apart from the text when the endpoint has a reasoning parser (``vllm serve
  --reasoning-parser qwen3``: ``reasoning``, older vLLM ``reasoning_content``) and is carried in
  :attr:`~qwenrun.engines.base.Delta.reasoning`; without one, ``<think>`` in the text is read by
  qwenrun. Whether the endpoint's template opened the block itself is unknown here: with
  ``agent.enable_thinking: true`` the text is held until it tells (``Delta.starts_in_reasoning``
  None: what comes before a lone ``</think>`` is reasoning, as a Thinking-2507 template writes it);
  otherwise (false, or not set: Qwen2.5, Qwen3 templates that write ``<think>`` in the answer) the
  text streams as it comes. ``chat_template_kwargs`` go to the endpoint as vLLM takes them.
* A forced call (``tool_choice`` ``required`` or a name, and the agent's repair of a malformed
  call) is the endpoint's ``tool_choice``; a prefilled answer is not possible.
* A JSON constraint is sent as ``response_format`` (``json_schema``); regex, grammar and choice
  constraints as vLLM's ``structured_outputs`` (vLLM endpoints only).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from qwenrun.engines.base import Constraint, Delta, Health, Request
from qwenrun.engines.settings import OpenAIEngineSpec
from qwenrun.errors import ConfigError, EngineError, MissingExtraError, RequestError
from qwenrun.events import ParsedCall
from qwenrun.sampling import SamplingSpec, sampling_values
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.spec.loading import secret_from_env
from qwenrun.toolcalls.base import new_call_id
from qwenrun.toolcalls.hermes import parse

__all__ = ["OpenAIEngine", "request_body"]

log = logging.getLogger(__name__)


def _settings(spec: AgentSpec) -> OpenAIEngineSpec:
    if not isinstance(spec.engine, OpenAIEngineSpec):
        raise ConfigError(f"{spec.source}: engine.kind: expected 'openai', got {spec.engine.kind!r}")
    return spec.engine


def _constraint(constraint: Constraint) -> dict[str, Any]:
    if constraint.json is not None:
        schema = {"name": "answer", "schema": constraint.json}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    if constraint.structural_tag is not None:  # vLLM takes it as a JSON string
        return {"structured_outputs": {"structural_tag": json.dumps(constraint.structural_tag)}}
    kind = (
        "regex" if constraint.regex is not None else "grammar" if constraint.grammar is not None else "choice"
    )
    return {"structured_outputs": {kind: getattr(constraint, kind)}}


def request_body(
    request: Request, model: str, sampling: SamplingSpec, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The JSON body of the streamed chat completion for ``request``."""
    body: dict[str, Any] = {"model": model, "messages": list(request.messages), "stream": True,
                            "stream_options": {"include_usage": True}}  # fmt: skip
    body.update(sampling_values(request.sampling or sampling, request.overrides))  # vLLM's knobs too
    vendor: dict[str, Any] = {}
    if request.tools:
        body["tools"] = list(request.tools)
        choice = request.tool_choice
        named = {"type": "function", "function": {"name": choice}}
        body["tool_choice"] = choice if choice in ("auto", "none", "required") else named
    if request.constraint is not None:
        for key, value in _constraint(request.constraint).items():
            (body if key == "response_format" else vendor)[key] = value
    if request.chat_template_kwargs:
        vendor["chat_template_kwargs"] = dict(request.chat_template_kwargs)
    return {**body, **vendor, **extra}


class _Calls:
    """Tool calls of a streamed answer, assembled from their deltas by index."""

    def __init__(self) -> None:
        self.parts: dict[int, dict[str, str]] = {}

    def add(self, deltas: Any) -> None:
        for item in deltas or ():
            part = self.parts.setdefault(item.index, {"id": "", "name": "", "arguments": ""})
            part["id"] = item.id or part["id"]
            function = item.function
            if function is not None:
                part["name"] = function.name or part["name"]
                part["arguments"] += function.arguments or ""

    def calls(self) -> tuple[ParsedCall, ...]:
        return tuple(_call(self.parts[index]) for index in sorted(self.parts))


def _call(part: dict[str, str]) -> ParsedCall:
    """A :class:`ParsedCall` of an endpoint's call, read like a Hermes block (never raises)."""
    raw = json.dumps({"name": part["name"], "arguments": part["arguments"] or "{}"}, ensure_ascii=False)
    (read,) = parse(f"<tool_call>{raw}</tool_call>").tool_calls
    return ParsedCall(part["id"] or new_call_id(), read.name or part["name"], read.arguments, raw, read.error)


class OpenAIEngine:
    """:class:`~qwenrun.engines.base.Engine` on a remote OpenAI-compatible endpoint."""

    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.settings = _settings(spec)
        self.model_name: str = spec.served_model_name
        self.remote_model = self.settings.model or spec.served_model_name
        fmt = spec.model.tool_call_format
        self.tool_call_format: str = "hermes" if fmt == "auto" else fmt
        self._client: Any = None

    def health(self) -> Health:
        return "ready" if self._client is not None else "stopped"

    async def start(self) -> None:
        """Connect and check that the endpoint serves the model (``GET /v1/models``)."""
        if self._client is not None:
            return
        try:
            import openai
        except ImportError as exc:
            raise MissingExtraError("openai", "openai") from exc
        settings = self.settings
        key = "EMPTY"  # what vLLM accepts when it runs without --api-key
        if settings.api_key_env:
            where = f"{self.spec.source}: engine.api_key_env"
            hint = f"export {settings.api_key_env}=<key> or remove api_key_env"
            key = secret_from_env(settings.api_key_env, where, "key", "VLLM_API_KEY", hint)
        client = openai.AsyncOpenAI(
            base_url=settings.base_url,
            api_key=key,
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
        )
        try:
            served = [model.id async for model in client.models.list()]
        except openai.APIError as exc:
            await client.close()
            raise EngineError(
                f"{self.spec.source}: engine: cannot use {settings.base_url}: {_reason(exc)}"
            ) from exc
        if self.remote_model not in served:
            await client.close()
            raise EngineError(
                f"{self.spec.source}: engine: {settings.base_url} does not serve {self.remote_model!r} "
                f"(it serves: {', '.join(served) or 'nothing'}); set engine.model or model.served_model_name"
            )
        self._client = client
        log.info("remote engine ready: %s at %s", self.remote_model, settings.base_url)

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        """Stream the endpoint's answer; its tool calls come in the last delta."""
        import openai

        client = self._client
        if client is None:
            raise EngineError("the engine is not started; call `await engine.start()` first")
        if request.prefill:
            raise RequestError(
                "engine.kind openai cannot continue a prefilled answer (an in-process engine can)"
            )
        body = request_body(request, self.remote_model, self.spec.sampling, self.settings.extra_body)
        model, messages = body.pop("model"), body.pop("messages")
        # what the openai client names goes as its argument, the rest (vLLM's knobs) as extra_body
        named = inspect.signature(client.chat.completions.create).parameters
        standard = {key: body.pop(key) for key in list(body) if key in named and key != "extra_body"}
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, extra_body=body, **standard
            )
        except openai.APIError as exc:
            raise _error(exc) from exc
        calls, prompt, completion, finish, held, held_reasoning = _Calls(), 0, 0, "stop", "", ""
        # The endpoint's template is unknown: where the agent thinks, the text may start inside a
        # <think> the template opened (held until a </think> or the end tells); else it streams.
        opens = None if request.chat_template_kwargs.get("enable_thinking") is True else False
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    prompt, completion = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                for choice in chunk.choices:
                    calls.add(choice.delta.tool_calls)
                    text = choice.delta.content or ""
                    reasoning = _reasoning(choice.delta)
                    finish = choice.finish_reason or finish
                    if (text or reasoning) and request.incremental:
                        yield Delta(text, None, prompt, completion, reasoning=reasoning,
                                    starts_in_reasoning=opens)  # fmt: skip
                    else:
                        held, held_reasoning = held + text, held_reasoning + reasoning
        except openai.APIError as exc:
            raise _error(exc) from exc
        finally:
            await stream.close()  # a consumer that stops early closes the connection: vLLM aborts
        reason = {"tool_calls": "stop", "function_call": "stop"}.get(finish, finish)
        finish_reason = reason if reason in ("stop", "length") else "stop"
        yield Delta(held, finish_reason, prompt, completion, calls.calls(), reasoning=held_reasoning,
                    starts_in_reasoning=opens)  # fmt: skip


def _reasoning(delta: Any) -> str:
    """A stream delta's reasoning: vLLM's ``reasoning`` (0.10+), else ``reasoning_content``
    (older vLLM, DeepSeek); extra fields of the ``openai`` client's objects."""
    extra = delta.model_extra or {}
    text = extra.get("reasoning") or extra.get("reasoning_content")
    return text if isinstance(text, str) else ""


def _reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}: {message}" if status else f"{type(exc).__name__}: {message}"


def _error(exc: Exception) -> EngineError | RequestError:
    status = getattr(exc, "status_code", None)
    if status is not None and 400 <= status < 500 and status not in (401, 403, 404, 408, 429):
        return RequestError(f"the endpoint refused the request: {_reason(exc)}")
    return EngineError(f"the remote engine failed: {_reason(exc)}")
