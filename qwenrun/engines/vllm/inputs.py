"""``engine.kind: vllm``, the arguments and inputs: the agent spec as vLLM's engine and sampling
arguments (:func:`engine_kwargs`, :func:`sampling_kwargs`), messages as chat templates expect them,
pre-tokenized prompts and the tokens' log probabilities. vLLM is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from qwenrun.engines.base import TokenLogprob
from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.errors import ConfigError
from qwenrun.sampling import SamplingSpec, sampling_values
from qwenrun.spec.agent_file import AgentSpec

__all__ = [
    "END_TOKENS", "engine_arg_defaults", "engine_kwargs", "sampling_kwargs", "template_messages",
    "token_logprobs", "tokens_prompt", "vllm_spec",
]  # fmt: skip

log = logging.getLogger("qwenrun.engines.vllm.engine")

END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_NOT_ENGINE_ARGS = frozenset({"kind", "available_devices", "gpus_per_node", "env", "extra"})


def vllm_spec(spec: AgentSpec) -> VLLMEngineSpec:
    """``spec.engine``, which must be a vLLM one."""
    if not isinstance(spec.engine, VLLMEngineSpec):
        raise ConfigError(f"{spec.source}: engine.kind: expected 'vllm', got {spec.engine.kind!r}")
    return spec.engine


# -- spec -> vLLM arguments -------------------------------------------------------------------


def engine_arg_defaults() -> dict[str, Any]:
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
    known = engine_arg_defaults()
    engine = vllm_spec(spec)
    model = spec.model
    wanted: dict[str, Any] = {
        "model": model.path,
        "tokenizer": model.tokenizer,
        "revision": model.revision,
        "served_model_name": model.served_model_name,
        "trust_remote_code": model.trust_remote_code,
    }
    explicit = engine.model_fields_set
    for name in type(engine).model_fields:
        if name not in _NOT_ENGINE_ARGS:
            wanted[name] = getattr(engine, name)
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
    if spec.agent.thinking_budget is not None and "reasoning_parser" in known:
        # vLLM enforces thinking_token_budget only with a reasoning parser (its reasoning config).
        kwargs["reasoning_parser"] = "qwen3"
    for key, value in engine.extra.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{spec.source}: engine.extra.{key}: not a vLLM engine argument{hint}")
        kwargs[key] = value
    if "structured_outputs_config" in known:
        # Compact JSON under json constraints. vLLM >= 0.11 reads this flag only from the engine
        # config, where it needs an explicit backend; xgrammar is what "auto" picks for almost all.
        # With a reasoning parser vLLM would apply constraints only after </think>: qwenrun's
        # constraints (forced calls, pinned text) cover the whole answer, so they apply from the start.
        kwargs.setdefault(
            "structured_outputs_config", {"backend": "xgrammar", "disable_any_whitespace": True}
        )
        if kwargs.get("reasoning_parser") and isinstance(kwargs["structured_outputs_config"], Mapping):
            kwargs["structured_outputs_config"] = {
                **kwargs["structured_outputs_config"],
                "enable_in_reasoning": True,
            }
    return kwargs


def sampling_kwargs(sampling: SamplingSpec, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``vllm.SamplingParams``: the spec, its ``extra``, then ``overrides``.

    The values are :func:`qwenrun.sampling.sampling_values` (an override of None is "not given",
    an unset knob is left to vLLM). Special tokens are always kept in the text and the output
    kind is always DELTA.
    """
    from vllm.sampling_params import RequestOutputKind

    kwargs = sampling_values(sampling, overrides)
    kwargs.setdefault("stop", [])
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


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``messages`` as chat templates expect them: text content, tool-call arguments as
    objects rather than the JSON strings of the OpenAI format, and an assistant's ``reasoning``
    as ``reasoning_content`` (what Qwen3's template reads), as vLLM does."""
    result = []
    for message in messages:
        message = {**message, "content": _text(message.get("content"))}
        if message.get("reasoning") is not None and message.get("reasoning_content") is None:
            message["reasoning_content"] = message["reasoning"]
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


def tokens_prompt(prompt_ids: list[int]) -> dict[str, Any]:
    """A pre-tokenized prompt: vLLM's rendered ``TokensInput`` where it exists, else ``TokensPrompt``."""
    try:
        from vllm.inputs import tokens_input
    except ImportError:  # older vLLM
        return {"prompt_token_ids": prompt_ids}
    return dict(tokens_input(prompt_ids))


def token_logprobs(choice: Any, top: int) -> list[TokenLogprob]:
    """The log probabilities of a vLLM ``CompletionOutput``'s new tokens (end tokens left out, as
    they are left out of the text)."""
    result = []
    for token_id, position in zip(choice.token_ids, choice.logprobs or (), strict=False):
        if not position or token_id not in position:
            continue
        chosen = position[token_id]
        token = chosen.decoded_token or ""
        if token in END_TOKENS:
            continue
        ranked = sorted(position.values(), key=lambda entry: entry.rank or 0)[:top]
        result.append(
            TokenLogprob(
                token, float(chosen.logprob), tuple((e.decoded_token or "", float(e.logprob)) for e in ranked)
            )
        )
    return result
