"""The one owner of sampling (qwenrun.sampling): the YAML, both HTTP APIs and both engines know
every knob of SamplingKnobs, with the same bounds; a knob added in one place only fails here."""

from __future__ import annotations

from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError

from qwenrun.engines.base import Request
from qwenrun.engines.openai import request_body
from qwenrun.frontends.openai.items import ResponsesRequest
from qwenrun.frontends.openai.schemas import ChatCompletionRequest
from qwenrun.sampling import KNOBS, OPENAI_NAMES, SamplingKnobs, SamplingSpec, knob_values, sampling_values

# one valid value of each knob: a new knob adds its line here
SAMPLE: dict[str, Any] = {
    "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "max_tokens": 64, "min_tokens": 2,
    "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5, "stop": ["</x>"],
    "seed": 7, "ignore_eos": False,
}  # fmt: skip


def test_every_knob_has_a_sample() -> None:
    assert set(SAMPLE) == set(KNOBS)


def test_the_yaml_the_http_requests_and_the_engines_know_the_same_knobs() -> None:
    assert set(SamplingSpec.model_fields) == {*KNOBS, "extra"}
    assert set(KNOBS) <= set(ChatCompletionRequest.model_fields)
    spec = SamplingSpec(**SAMPLE)
    assert sampling_values(spec) == SAMPLE  # what the vLLM engine's SamplingParams get
    body = request_body(Request(messages=[]), "m", spec, {})
    assert {key: body[key] for key in KNOBS} == SAMPLE  # the openai engine's request body
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **SAMPLE})  # fmt: skip
    assert knob_values(chat, "chat") == SAMPLE


def test_openai_names_map_to_knobs() -> None:
    for api, names in OPENAI_NAMES.items():
        assert set(names.values()) <= set(KNOBS), api
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "max_completion_tokens": 5}
    )
    assert knob_values(chat, "chat") == {"max_tokens": 5}
    responses = ResponsesRequest.model_validate({"model": "m", "input": "hi", "max_output_tokens": 5})
    assert knob_values(responses, "responses") == {"max_tokens": 5}


def _probes(name: str) -> list[Any]:
    """Values at and just beyond each bound of knob ``name``."""
    values: list[Any] = []
    step = 1 if SamplingKnobs.model_fields[name].annotation == (int | None) else 0.01
    for bound in SamplingKnobs.model_fields[name].metadata:
        for kind in (Ge, Gt, Le, Lt):
            if isinstance(bound, kind):
                edge = getattr(bound, kind.__name__.lower())
                values += [edge - step, edge, edge + step]
    return values


def _accepts(model: type[BaseModel], data: dict[str, Any]) -> bool:
    try:
        model.model_validate(data)
    except ValidationError:
        return False
    return True


BOUNDED = [name for name in KNOBS if _probes(name)]


@pytest.mark.parametrize("name", BOUNDED)
def test_the_yaml_and_the_http_requests_accept_the_same_values(name: str) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    responses_names = {knob: alias for alias, knob in OPENAI_NAMES["responses"].items()}
    responses_name = responses_names.get(name, name)
    for value in _probes(name):
        yaml_says = _accepts(SamplingSpec, {name: value})
        assert _accepts(ChatCompletionRequest, {**chat, name: value}) == yaml_says, (name, value)
        if responses_name in ResponsesRequest.model_fields:
            data = {"model": "m", "input": "hi", responses_name: value}
            assert _accepts(ResponsesRequest, data) == yaml_says, (name, value)


def test_some_value_of_each_bounded_knob_is_refused() -> None:
    assert {"temperature", "top_p", "max_tokens", "seed"} <= set(BOUNDED)
    assert not _accepts(SamplingSpec, {"temperature": 2.5})
