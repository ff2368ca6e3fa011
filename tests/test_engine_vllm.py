"""qwenrun.engines.vllm.engine: spec -> vLLM arguments (fast), and the real engine on the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from weather import weather_tool

from qwenrun.engines.base import Constraint, Delta, Engine, Request
from qwenrun.engines.scripted import literal_regex
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.engines.vllm.inputs import engine_kwargs, sampling_kwargs, template_messages
from qwenrun.errors import ConfigError, EngineError, RequestError
from qwenrun.sampling import SamplingSpec
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls.hermes import parse

CALL = '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "广州"}}\n</tool_call>'
CALL_REGEX = literal_regex(CALL)
USER = [{"role": "user", "content": "广州天气情况如何"}]
TOOLS = [weather_tool()]


def _arg_names() -> set[str]:
    from vllm import AsyncEngineArgs

    return {field.name for field in dataclasses.fields(AsyncEngineArgs)}


def _spec(engine: dict[str, Any] | None = None, **model: Any) -> AgentSpec:
    return AgentSpec.from_dict({"model": {"path": "/models/qwen", **model}, "engine": engine or {}})


async def _collect(stream: Any) -> list[Delta]:
    return [delta async for delta in stream]


def generate(engine: Engine, messages: list[dict[str, Any]], **options: Any) -> Any:
    """``engine.generate`` of a :class:`Request` with these fields."""
    return engine.generate(Request(messages=messages, **options))


# -- engine_kwargs / sampling_kwargs -------------------------------------------------------------


def test_import_does_not_load_vllm() -> None:
    code = "import sys, qwenrun.engines.vllm.engine; sys.exit('vllm' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_engine_kwargs_maps_every_field() -> None:
    spec = _spec(
        {
            "dtype": "bfloat16", "tensor_parallel_size": 2, "pipeline_parallel_size": 1,
            "data_parallel_size": 2, "gpu_memory_utilization": 0.8, "max_num_seqs": 32,
            "max_model_len": 8192, "enforce_eager": True, "seed": 7, "distributed_executor_backend": "mp",
            "load_format": "safetensors", "available_devices": 4, "env": {"A": "1"},
        },
        tokenizer="/models/tok", revision="main", served_model_name="qwen", trust_remote_code=True,
    )  # fmt: skip
    expected: dict[str, Any] = {
        "model": "/models/qwen", "tokenizer": "/models/tok", "revision": "main",
        "served_model_name": "qwen", "trust_remote_code": True, "dtype": "bfloat16",
        "tensor_parallel_size": 2, "pipeline_parallel_size": 1, "data_parallel_size": 2,
        "gpu_memory_utilization": 0.8, "max_num_seqs": 32, "max_model_len": 8192, "enforce_eager": True,
        "seed": 7, "distributed_executor_backend": "mp", "load_format": "safetensors",
        "disable_log_stats": True, "enable_log_requests": False,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }  # fmt: skip
    if "swap_space" in _arg_names():
        expected["swap_space"] = 16
    assert engine_kwargs(spec) == expected
    kwargs = engine_kwargs(_spec())
    assert kwargs["tokenizer"] is None and kwargs["max_model_len"] is None and kwargs["seed"] == 0


def test_engine_kwargs_extra_wins_and_keeps_false() -> None:
    extra = {"enable_prefix_caching": False, "disable_log_stats": False, "max_num_batched_tokens": 4096}
    kwargs = engine_kwargs(_spec({"extra": extra, "enforce_eager": True}))
    assert kwargs["enable_prefix_caching"] is False
    assert kwargs["disable_log_stats"] is False
    assert kwargs["max_num_batched_tokens"] == 4096


def test_engine_kwargs_unknown_extra_key() -> None:
    with pytest.raises(ConfigError) as info:
        engine_kwargs(_spec({"extra": {"max_num_seq": 8}}))
    message = str(info.value)
    assert "engine.extra.max_num_seq" in message and "'max_num_seqs'" in message


def test_engine_kwargs_drops_fields_this_vllm_lacks(caplog: pytest.LogCaptureFixture) -> None:
    if "swap_space" in _arg_names():
        pytest.skip("this vLLM still has swap_space")
    with caplog.at_level(logging.WARNING, logger="qwenrun.engines.vllm.engine"):
        assert "swap_space" not in engine_kwargs(_spec())
    assert not caplog.records  # the default is dropped quietly
    with caplog.at_level(logging.WARNING, logger="qwenrun.engines.vllm.engine"):
        assert "swap_space" not in engine_kwargs(_spec({"swap_space": 4}))
    assert any("engine.swap_space" in record.getMessage() for record in caplog.records)


def test_engine_kwargs_none_seed_uses_vllm_default() -> None:
    from vllm import AsyncEngineArgs

    default = {f.name: f.default for f in dataclasses.fields(AsyncEngineArgs)}["seed"]
    kwargs = engine_kwargs(_spec({"seed": None}))
    assert kwargs.get("seed", default) == default


def test_sampling_kwargs() -> None:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    assert sampling_kwargs(SamplingSpec()) == {
        "temperature": 0.45, "top_p": 0.9, "max_tokens": 8192, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop": [],
        "skip_special_tokens": False, "output_kind": RequestOutputKind.DELTA,
    }  # fmt: skip
    spec = SamplingSpec(top_k=20, seed=3, stop=["</x>"], extra={"min_p": 0.1, "ignore_eos": False})
    kwargs = sampling_kwargs(spec, {"max_tokens": 5, "temperature": 0, "stop": ["\n"], "seed": None})
    assert kwargs == {
        "temperature": 0, "top_p": 0.9, "top_k": 20, "max_tokens": 5, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop": ["\n"], "seed": 3, "min_p": 0.1,
        "ignore_eos": False, "skip_special_tokens": False, "output_kind": RequestOutputKind.DELTA,
    }  # fmt: skip
    SamplingParams(**kwargs)  # vLLM accepts them


def test_constraint_needs_exactly_one_kind() -> None:
    assert Constraint(choice=["a", "b"]).choice == ["a", "b"]
    with pytest.raises(ValueError):
        Constraint()
    with pytest.raises(ValueError):
        Constraint(regex="a", grammar="root ::= 'a'")


def test_template_messages_parse_arguments_without_mutating() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    fixed = template_messages(messages)
    assert fixed[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert fixed[0]["content"] == ""
    assert call["function"]["arguments"] == '{"x": 1}'


def test_template_messages_give_the_reasoning_to_the_template_as_reasoning_content() -> None:
    fixed = template_messages(
        [{"role": "assistant", "content": "a", "reasoning": "r"},
         {"role": "assistant", "content": "b", "reasoning": "other", "reasoning_content": "kept"}]
    )  # fmt: skip
    assert [(m["reasoning_content"], m["content"]) for m in fixed] == [("r", "a"), ("kept", "b")]


def test_a_thinking_budget_turns_on_vllms_reasoning_parser() -> None:
    """vLLM enforces thinking_token_budget only with a reasoning parser; qwenrun's constraints then
    still apply from the first token (enable_in_reasoning), as they do without one."""
    budget = engine_kwargs(AgentSpec.from_dict({"model": {"path": "/m"}, "agent": {"thinking_budget": 128}}))
    assert budget["reasoning_parser"] == "qwen3"
    assert budget["structured_outputs_config"] == {
        "backend": "xgrammar", "disable_any_whitespace": True, "enable_in_reasoning": True,
    }  # fmt: skip
    plain = engine_kwargs(_spec())
    assert "reasoning_parser" not in plain and "enable_in_reasoning" not in plain["structured_outputs_config"]
    own = engine_kwargs(_spec({"extra": {"reasoning_parser": "deepseek_r1"}}))
    assert (
        own["reasoning_parser"] == "deepseek_r1" and own["structured_outputs_config"]["enable_in_reasoning"]
    )


def test_the_tool_call_format_is_the_spec_s_until_the_template_is_read() -> None:
    assert VLLMEngine(_spec()).tool_call_format == "hermes"  # auto: resolved at start
    assert VLLMEngine(_spec(tool_call_format="qwen3_coder")).tool_call_format == "qwen3_coder"


async def test_unstarted_engine() -> None:
    engine = VLLMEngine(_spec())
    assert isinstance(engine, Engine) and engine.model_name == "/models/qwen"
    with pytest.raises(EngineError, match="not started"):
        await _collect(generate(engine, USER))
    await engine.shutdown()  # no-op


class EngineDeadError(Exception):
    """Stands in for vllm.v1.engine.exceptions.EngineDeadError (matched by name)."""


class _FakeTokenizer:
    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return "".join(m["content"] for m in messages)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1] * len(text)


class _FakeVLLM:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail, self.errored, self.aborted = fail, False, []

    async def generate(self, prompt: Any, params: Any, request_id: str) -> Any:
        if self.fail is not None:
            self.errored = isinstance(self.fail, EngineDeadError)
            raise self.fail
        for i in range(1000):
            token = type("Out", (), {"text": "x", "token_ids": [i], "finish_reason": None})
            yield type("RequestOutput", (), {"outputs": [token], "finished": False})
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _fake_engine(fake: _FakeVLLM) -> VLLMEngine:
    engine = VLLMEngine(_spec({"max_model_len": 100}))
    engine.attach(fake, _FakeTokenizer(), 100)
    return engine


async def test_engine_death_is_an_engine_error() -> None:
    engine = _fake_engine(_FakeVLLM(EngineDeadError("boom")))
    with pytest.raises(EngineError, match="engine has died"):
        await _collect(generate(engine, USER))
    with pytest.raises(EngineError, match="engine has died"):  # and stays dead
        await _collect(generate(engine, USER))
    rejected = _fake_engine(_FakeVLLM(ValueError("bad request")))  # vLLM's input validation
    with pytest.raises(RequestError, match=r"^vLLM refused the request: bad request$"):
        await _collect(generate(rejected, USER))
    assert rejected.health() == "ready"


async def test_stopping_early_calls_abort() -> None:
    fake = _FakeVLLM()
    engine = _fake_engine(fake)
    async with contextlib.aclosing(generate(engine, USER, request_id="r1")) as stream:
        async for _ in stream:
            break
    assert fake.aborted == ["r1"]


async def test_start_failure_is_an_engine_error(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENRUN_TEST_ENV", "before")  # restored afterwards
    engine = VLLMEngine(_spec({"env": {"QWENRUN_TEST_ENV": "set"}}, path=str(tmp_path)))  # no model in it
    with pytest.raises(EngineError, match="vLLM failed to start") as info:
        await engine.start()
    assert str(tmp_path) in str(info.value) and info.value.__cause__ is not None
    assert os.environ["QWENRUN_TEST_ENV"] == "set" and not engine.started


# -- the real engine ---------------------------------------------------------------------------


@pytest.mark.engine
async def test_streaming_deltas(engine: VLLMEngine) -> None:
    assert engine.max_model_len == 2048 and engine.model_name == "tiny-qwen2"
    await engine.start()  # idempotent
    deltas = await _collect(generate(engine, USER))
    assert len(deltas) > 1
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason in ("stop", "length")
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts) and counts[-1] <= 32
    assert len({d.prompt_tokens for d in deltas}) == 1 and deltas[0].prompt_tokens > 10
    again = await _collect(generate(engine, USER))  # greedy: the same text
    assert "".join(d.text for d in again) == "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "length" or counts[-1] < 32


@pytest.mark.engine
async def test_prompts_are_tokenized_in_the_prompt_thread_reusing_pieces(engine: VLLMEngine) -> None:
    """The chat template and the tokenizer run off the event loop (as ``vllm serve`` does), and a
    second call of a conversation tokenizes only its new messages; the ids are the whole prompt's."""
    import threading

    tokenizer = engine._tokenizer
    seen: list[tuple[str, str]] = []
    encode = tokenizer.encode

    def spy(text: str, *args: Any, **kwargs: Any) -> Any:
        seen.append((threading.current_thread().name, text))
        return encode(text, *args, **kwargs)

    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "spy 广州?"}]
    second = [*first, {"role": "assistant", "content": "It rains."}, {"role": "user", "content": "spy 北京?"}]
    tokenizer.encode = spy
    try:
        await _collect(engine.generate(Request(messages=first, overrides={"max_tokens": 2})))
        seen.clear()
        await _collect(engine.generate(Request(messages=second, overrides={"max_tokens": 2})))
    finally:
        del tokenizer.encode
    assert seen and all(name.startswith("qwenrun-prompts") for name, _ in seen)
    pieces = [text for _, text in seen]
    assert not any("Be brief." in text or "spy 广州?" in text for text in pieces)  # reused
    assert any("spy 北京?" in text for text in pieces)
    text = engine.render(second)
    assert engine._prompts is not None and engine._prompts.encode(text) == encode(text, add_special_tokens=False)


@pytest.mark.engine
async def test_not_incremental_is_one_delta_with_the_same_text(engine: VLLMEngine) -> None:
    """``incremental=False`` (vLLM's FINAL_ONLY): the whole completion in one delta, the same
    greedy text and counts as the streamed deltas."""
    streamed = await _collect(generate(engine, USER))
    whole = await _collect(generate(engine, USER, incremental=False))
    assert len(whole) == 1 and len(streamed) > 1
    assert whole[0].text == "".join(d.text for d in streamed)
    assert (whole[0].finish_reason, whole[0].prompt_tokens, whole[0].completion_tokens) == (
        streamed[-1].finish_reason,
        streamed[-1].prompt_tokens,
        streamed[-1].completion_tokens,
    )
    call = await _collect(generate(engine, USER, tools=TOOLS, constraint=Constraint(regex=CALL_REGEX),
                                          overrides={"max_tokens": 100}, incremental=False))  # fmt: skip
    assert [(d.text, d.finish_reason) for d in call] == [(CALL, "stop")]  # the end token is removed


@pytest.mark.engine
async def test_regex_constraint_emits_the_tool_call(engine: VLLMEngine) -> None:
    stream = generate(
        engine, USER, tools=TOOLS, constraint=Constraint(regex=CALL_REGEX), overrides={"max_tokens": 100}
    )
    deltas = await _collect(stream)
    assert "".join(d.text for d in deltas) == CALL
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.engine
async def test_json_constraint(engine: VLLMEngine) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["广州", "北京", "上海"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "metric": {"type": "boolean"},
            "fields": {"type": "array", "items": {"enum": ["temp", "wind", "rain"]}, "maxItems": 3},
        },
        "required": ["city", "days", "metric", "fields"],
        "additionalProperties": False,
    }
    stream = generate(engine, USER, constraint=Constraint(json=schema), overrides={"max_tokens": 100})
    deltas = await _collect(stream)
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop", text
    value = json.loads(text)
    assert list(value) == ["city", "days", "metric", "fields"]
    assert value["city"] in ("广州", "北京", "上海") and 1 <= value["days"] <= 7
    assert isinstance(value["metric"], bool) and set(value["fields"]) <= {"temp", "wind", "rain"}
    assert text == json.dumps(value, ensure_ascii=False)  # no free whitespace: ", " and ": " only


@pytest.mark.engine
async def test_json_constraint_bounded_free_string(engine: VLLMEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"note": {"type": "string", "maxLength": 8}},
        "required": ["note"],
    }
    stream = generate(engine, USER, constraint=Constraint(json=schema), overrides={"max_tokens": 100})
    deltas = await _collect(stream)
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop", text
    # the random model writes junk, control characters included, which strict JSON forbids
    assert len(json.loads(text, strict=False)["note"]) <= 8


@pytest.mark.engine
async def test_choice_constraint(engine: VLLMEngine) -> None:
    deltas = await _collect(generate(engine, USER, constraint=Constraint(choice=["yes", "no"])))
    assert "".join(d.text for d in deltas) in ("yes", "no")


@pytest.mark.engine
async def test_prefill(engine: VLLMEngine) -> None:
    prefill = '<tool_call>\n{"name": "get_current_weather", "arguments": '
    assert engine.render(USER, TOOLS, prefill).endswith("<|im_start|>assistant\n" + prefill)
    plain = await _collect(generate(engine, USER, tools=TOOLS))
    schema = {"type": "object", "properties": {"city": {"enum": ["广州"]}}, "required": ["city"]}
    deltas = await _collect(
        generate(engine, USER, tools=TOOLS, prefill=prefill, constraint=Constraint(json=schema))
    )
    assert "".join(d.text for d in deltas) == prefill + '{"city": "广州"}'  # the answer starts with it
    assert deltas[0].text == prefill and deltas[0].completion_tokens == 0
    assert deltas[-1].prompt_tokens > plain[-1].prompt_tokens


@pytest.mark.engine
async def test_a_forced_tool_choice_is_a_prefilled_grammar_call(engine: VLLMEngine) -> None:
    tools = [weather_tool({"type": "string", "maxLength": 8})]  # random weights: a short junk city
    deltas = await _collect(
        generate(engine, USER, tools=tools, tool_choice="get_current_weather", overrides={"max_tokens": 80})
    )
    text = "".join(d.text for d in deltas)
    assert text.startswith("<tool_call>\n")
    (call,) = parse(text).tool_calls
    assert call.ok and call.name == "get_current_weather" and isinstance(call.arguments.get("city"), str)
    # the grammar is built once per tools list and choice, then reused
    assert (
        engine._forcing(Request(messages=USER, tools=tools, tool_choice="required"), "")[0]
        is (engine._forcing(Request(messages=USER, tools=tools, tool_choice="required"), "")[0])
    )
    other = engine._forcing(Request(messages=USER, tools=list(tools), tool_choice="required"), "")[0]
    assert other is not None and other.json is not None
    assert engine._forcing(Request(messages=USER, tools=tools, tool_choice="auto"), "") == (None, "")


@pytest.mark.engine
async def test_conversation_with_tool_calls(engine: VLLMEngine) -> None:
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_current_weather", "arguments": '{"city": "广州"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 28}'},
    ]
    prompt = engine.render(messages, TOOLS)
    assert f"<|im_start|>assistant\n{CALL}<|im_end|>\n" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 28}\n</tool_response><|im_end|>\n' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    deltas = await _collect(generate(engine, messages, tools=TOOLS))
    assert deltas[-1].finish_reason in ("stop", "length")


@pytest.mark.engine
async def test_concurrent_requests(engine: VLLMEngine) -> None:
    conversations = [[{"role": "user", "content": f"第{i}个问题：广州天气情况如何？"}] for i in range(16)]
    results = await asyncio.wait_for(
        asyncio.gather(*(_collect(generate(engine, c)) for c in conversations)), timeout=300
    )
    assert len(results) == 16
    assert all(r[-1].finish_reason in ("stop", "length") for r in results)
    assert engine.num_unfinished_requests() == 0


async def _drained(engine: VLLMEngine) -> None:
    """The engine has no request left within a few event-loop iterations, however busy the
    machine: the request was aborted, not run to its end (its 1900 tokens are seconds of engine
    work away, far more than 1,000 iterations that wait for nothing)."""
    for _ in range(1000):
        if engine.num_unfinished_requests() == 0:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{engine.num_unfinished_requests()} requests still running")


@pytest.mark.engine
async def test_stopping_early_aborts(engine: VLLMEngine) -> None:
    long = {"max_tokens": 1900, "ignore_eos": True}
    async with contextlib.aclosing(generate(engine, USER, overrides=long)) as stream:
        async for delta in stream:
            if delta.completion_tokens >= 3:
                break
    await _drained(engine)

    async for delta in generate(engine, USER, overrides=long):  # a plain break, closed by the GC hook
        if delta.completion_tokens >= 3:
            break
    await _drained(engine)

    seen = asyncio.Event()

    async def consume() -> None:
        async for _ in generate(engine, USER, overrides=long):
            seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), timeout=60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _drained(engine)

    deltas = await _collect(generate(engine, USER, overrides={"max_tokens": 4}))  # still serving
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 4


@pytest.mark.engine
async def test_prompt_too_long(engine: VLLMEngine) -> None:
    huge = [{"role": "user", "content": " ".join(str(i) for i in range(2000))}]
    with pytest.raises(RequestError, match=r"^the prompt is \d+ tokens, but max_model_len is 2048 ") as info:
        await asyncio.wait_for(_collect(generate(engine, huge)), timeout=30)
    assert info.value.code == "context_length_exceeded" and engine.health() == "ready"


@pytest.mark.engine
async def test_prompt_near_the_limit_is_capped(engine: VLLMEngine) -> None:
    tokenizer = await engine.tokenizer()
    words = " ".join(str(i % 10) for i in range(900))  # digits are single tokens
    base = len(tokenizer.encode(engine.render([{"role": "user", "content": words}])))
    content = words + " 1" * ((2048 - 5 - base) // 2)
    deltas = await _collect(
        generate(
            engine, [{"role": "user", "content": content}], overrides={"max_tokens": 32, "ignore_eos": True}
        )
    )
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].prompt_tokens + deltas[-1].completion_tokens <= 2048
    assert deltas[-1].completion_tokens < 32


@pytest.mark.engine
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
async def test_the_engines_processes_never_see_ctrl_c(engine: VLLMEngine) -> None:
    """A terminal sends Ctrl-C's SIGINT to the whole foreground process group; vLLM's engine core
    and workers start with SIGINT blocked, so only qwenrun (which stops the answer) handles it."""
    import psutil

    def in_our_group(child: psutil.Process) -> bool:  # Ctrl-C reaches the foreground group only
        try:
            return os.getpgid(child.pid) == os.getpgrp()
        except ProcessLookupError:  # a process of another test that has just ended
            return False

    children = [child for child in psutil.Process().children(recursive=True) if in_our_group(child)]
    names = [child.name() for child in children]
    assert "VLLM::EngineCore" in names and "VLLM::Worker" in names, names
    for child in children:
        with open(f"/proc/{child.pid}/status", encoding="ascii") as file:
            fields = dict(line.split(":", 1) for line in file.read().splitlines() if ":" in line)
        bit = 1 << (signal.SIGINT - 1)
        # blocked (vLLM's processes) or ignored (multiprocessing's resource tracker does that itself)
        deaf = (int(fields["SigBlk"], 16) | int(fields["SigIgn"], 16)) & bit
        assert deaf, f"{child.pid} {child.cmdline()[:4]} would die of a Ctrl-C"
