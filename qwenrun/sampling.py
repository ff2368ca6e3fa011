"""The one owner of sampling: every knob qwenrun sends a model, its type and its bounds.

:class:`SamplingKnobs` names each knob once (one line: name, type, bounds; None = not given). The
rest is derived from it:

* the agent file's ``sampling:`` table, :class:`SamplingSpec`: the knobs, the defaults of those the
  file sets by default (:func:`spec_field`), and ``extra`` for other ``SamplingParams`` fields;
* the per-request override type: :class:`SamplingKnobs` itself (all optional);
* the HTTP requests: Chat Completions mixes :class:`SamplingKnobs` in, Responses takes its fields
  with :func:`knob_field`; OpenAI's other names for a knob are :data:`OPENAI_NAMES`;
* what both engines send: :func:`sampling_values` merges the spec and the overrides (vLLM's
  ``SamplingParams`` keyword arguments in-process, the JSON body of the openai engine).

Adding a knob vLLM's ``SamplingParams`` takes is one line in :class:`SamplingKnobs` (and, if the
agent file should default it, one in :class:`SamplingSpec`); ``tests/test_sampling.py`` checks
that the YAML, both HTTP APIs and both engines then know it, with the same bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic.fields import FieldInfo

from qwenrun.spec.base import Settings

__all__ = [
    "KNOBS", "OPENAI_NAMES", "SamplingKnobs", "SamplingSpec", "knob_field", "knob_values", "sampling_values",
]  # fmt: skip


class SamplingKnobs(BaseModel):
    """Every sampling knob, its type and bounds; None means "not given" (the engine's default, or,
    in a request, the agent file's value). The bounds are what ``vllm serve`` accepts."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or None disables top-k.")
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what vLLM and torch take (int64)
    ignore_eos: bool | None = None


KNOBS: tuple[str, ...] = tuple(SamplingKnobs.model_fields)

# OpenAI's other names of a knob in each HTTP API (the knob's own name is accepted as well)
OPENAI_NAMES: dict[str, dict[str, str]] = {
    "chat": {"max_completion_tokens": "max_tokens"},
    "responses": {"max_output_tokens": "max_tokens"},
}


def knob_values(request: BaseModel, api: str) -> dict[str, Any]:
    """The knobs an HTTP ``request`` of ``api`` (a key of :data:`OPENAI_NAMES`) gives, by the knobs'
    names: its fields named after a knob, then those of OpenAI's names (which win); None = not given,
    ``stop`` as a list."""
    fields = type(request).model_fields
    names = {name: name for name in KNOBS if name in fields}
    names.update({alias: knob for alias, knob in OPENAI_NAMES[api].items() if alias in fields})
    given: dict[str, Any] = {}
    for field, knob in names.items():
        value = getattr(request, field)
        if value is not None:
            given[knob] = [value] if knob == "stop" and isinstance(value, str) else value
    return given


def knob_field(name: str, default: Any = None) -> Any:
    """A field with the type bounds of knob ``name`` and ``default`` (for a model's own annotation)."""
    return FieldInfo.merge_field_infos(SamplingKnobs.model_fields[name], default=default)


def spec_field(name: str, default: Any) -> Any:
    """The agent file's field of knob ``name``: the knob's bounds, the file's ``default``."""
    return knob_field(name, default)


class SamplingSpec(Settings, SamplingKnobs):
    """vLLM ``SamplingParams`` of every model call (an unset knob is left to vLLM's default)."""

    temperature: float = spec_field("temperature", 0.45)
    top_p: float = spec_field("top_p", 0.9)
    max_tokens: int = spec_field("max_tokens", 8192)
    repetition_penalty: float = spec_field("repetition_penalty", 1.0)
    presence_penalty: float = spec_field("presence_penalty", 0.0)
    frequency_penalty: float = spec_field("frequency_penalty", 0.0)
    extra: dict[str, Any] = Field(default_factory=dict, description="Other SamplingParams fields.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        return [value] if isinstance(value, str) else value


def _given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of the spec that are set: not None, ``stop`` only when not empty."""
    given = {name: value for name, value in values.items() if value is not None}
    stop = given.pop("stop", None)
    if stop:
        given["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return given


def sampling_values(sampling: SamplingSpec, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One model call's sampling values, as both engines send them: the spec's knobs that are set,
    its ``extra``, then ``overrides`` (an override of None means "not given" and is skipped)."""
    values = _given({name: getattr(sampling, name) for name in KNOBS})
    values.update(sampling.extra)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = [value] if name == "stop" and isinstance(value, str) else value
    return values
