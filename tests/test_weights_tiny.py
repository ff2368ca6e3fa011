"""The tiny test model: files, tokenizer, chat templates, idempotent building, and its Qwen3 flavours
read back from the real engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from weather import weather_tool

from qwenrun.engines.base import Constraint, Request
from qwenrun.engines.scripted import literal_regex
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import ParsedCall
from qwenrun.toolcalls import OutputParser, ParsedOutput, detect_format, parse_output, prompt_opens_thinking
from qwenrun.weights.tiny import (
    CHAT_TEMPLATE,
    FLAVOURS,
    QWEN3_TOKENS,
    SPECIAL_TOKENS,
    TOOL_TOKENS,
    VOCAB_SIZE,
    build_tiny_model,
    main,
)
from qwenrun.weights.tiny_templates import QWEN3_CODER_TEMPLATE, QWEN3_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent

CALL = '{"name": "get_current_weather", "arguments": {"city": "广州"}}'
TOOLS = [weather_tool()]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_files_and_config(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names  # fmt: skip
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    expected = {
        "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 4096, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }  # fmt: skip
    assert {key: config[key] for key in expected} == expected
    tok_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert (tok_config["eos_token"], tok_config["pad_token"]) == ("<|im_end|>", "<|endoftext|>")


def test_weights_are_float32_and_tied(tiny_model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as weights:
        keys = set(weights.keys())
        embed = weights.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys
    assert tuple(embed.shape) == (4096, 256)
    assert str(embed.dtype) == "torch.float32"


def test_vocab_and_special_tokens(tokenizer: Any, tiny_model_dir: Path) -> None:
    assert len(tokenizer) == VOCAB_SIZE
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (*SPECIAL_TOKENS, *TOOL_TOKENS)}
    assert len(set(ids.values())) == 5 and all(0 <= i < VOCAB_SIZE for i in ids.values())
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    # each tag is one token, and the tool-call tags survive skip_special_tokens
    text = f"<|im_start|>assistant\n<tool_call>\n{CALL}\n</tool_call><|im_end|>"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert encoded[0] == ids["<|im_start|>"] and encoded[-1] == ids["<|im_end|>"]
    assert ids["<tool_call>"] in encoded and ids["</tool_call>"] in encoded
    assert tokenizer.decode(encoded) == text
    assert (
        tokenizer.decode(encoded, skip_special_tokens=True) == f"assistant\n<tool_call>\n{CALL}\n</tool_call>"
    )


@pytest.mark.parametrize(
    "text", ["广州天气情况如何", "北京今天下雨吗？气温 25 度。", CALL, "Hello, wörld! 🌤"]
)
def test_tokenizer_round_trips(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tool_call_json_tokenizes_compactly(tokenizer: Any) -> None:
    ids = tokenizer.encode(CALL, add_special_tokens=False)
    assert len(ids) <= 24, [tokenizer.decode([i]) for i in ids]  # real merges, not bytes
    assert len(tokenizer.encode("广州", add_special_tokens=False)) == 1


def test_template_renders_tools_and_tool_calls(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "广州天气情况如何"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_current_weather", "arguments": {"city": "广州"}},
                }
            ],
        },
        {"role": "tool", "content": '{"temperature": 28}'},
        {"role": "tool", "content": '{"humidity": 80}'},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    tool_json = json.dumps(TOOLS[0], ensure_ascii=False)
    assert text == (
        "<|im_start|>system\nYou are a weather bot.\n\n# Tools\n\nYou may call one or more functions to "
        "assist with the user query.\n\nYou are provided with function signatures within <tools></tools> "
        f"XML tags:\n<tools>\n{tool_json}\n</tools>\n\nFor each function call, return a json object with "
        "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n广州天气情况如何<|im_end|>\n"
        f"<|im_start|>assistant\n<tool_call>\n{CALL}\n</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temperature": 28}\n</tool_response>\n'
        '<tool_response>\n{"humidity": 80}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


def test_template_without_tools(tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_build_is_idempotent_and_atomic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "junk.txt").write_text("an interrupted build")  # incomplete: rebuilt
    assert build_tiny_model(target) == target
    assert not (target / "junk.txt").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temp dirs left
    stamps = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert build_tiny_model(str(target)) == target
    assert main([str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamps


def test_cached_model_is_not_rebuilt(tiny_model_dir: Path) -> None:
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_force_rebuilds_deterministically(tmp_path: Path) -> None:
    target = build_tiny_model(tmp_path / "tiny")
    weights, vocab = (target / "model.safetensors").read_bytes(), (target / "tokenizer.json").read_text()
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(target, force=True) == target
    assert (target / "model.safetensors").stat().st_mtime_ns != stamp
    assert (target / "model.safetensors").read_bytes() == weights
    assert (target / "tokenizer.json").read_text() == vocab


# -- the Qwen3 flavours -------------------------------------------------------------------------

HERMES_CALL = f"<tool_call>\n{CALL}\n</tool_call>"
XML_CALL = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\n广州\n</parameter>\n</function>\n</tool_call>"
REASONING = "The user asks about 广州. I will call get_current_weather."
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "北京天气情况如何"},
    {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\n北京晴。"},
    {"role": "user", "content": "广州天气情况如何"},
    {"role": "assistant", "content": "", "reasoning_content": REASONING,
     "tool_calls": [{"type": "function", "function": {"name": "get_current_weather", "arguments": {"city": "广州"}}}]},
    {"role": "tool", "content": '{"temperature": 28}'},
]  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_tokenizer(tiny_qwen3_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen3_dir))


@pytest.fixture(scope="module")
def qwen3_coder_tokenizer(tiny_qwen3_coder_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen3_coder_dir))


def test_flavour_files(tiny_qwen3_dir: Path, tiny_qwen3_coder_dir: Path) -> None:
    for directory, template in (
        (tiny_qwen3_dir, QWEN3_TEMPLATE),
        (tiny_qwen3_coder_dir, QWEN3_CODER_TEMPLATE),
    ):
        config = json.loads((directory / "config.json").read_text())
        assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
        assert json.loads((directory / "tokenizer_config.json").read_text())["chat_template"] == template
        assert (
            build_tiny_model(directory, flavour=directory.name.removeprefix("tiny-").replace("-", "_"))
            == directory
        )


@pytest.mark.parametrize("name", ["qwen3_tokenizer", "qwen3_coder_tokenizer"])
def test_flavour_tokens_are_single_and_survive_decoding(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(name)
    assert len(tokenizer) == VOCAB_SIZE
    ids = {
        tok: tokenizer.convert_tokens_to_ids(tok) for tok in (*SPECIAL_TOKENS, *TOOL_TOKENS, *QWEN3_TOKENS)
    }
    assert len(set(ids.values())) == 9 and all(0 <= i < VOCAB_SIZE for i in ids.values())
    text = f"<think>\n{REASONING}\n</think>\n\n{XML_CALL}<tool_response>\nok\n</tool_response>"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert all(ids[tok] in encoded for tok in (*TOOL_TOKENS, *QWEN3_TOKENS))
    assert tokenizer.decode(encoded, skip_special_tokens=True) == text


def test_qwen3_template_thinking_switch(qwen3_tokenizer: Any) -> None:
    user = [{"role": "user", "content": "hi"}]
    on = qwen3_tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    off = qwen3_tokenizer.apply_chat_template(
        user, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    assert not prompt_opens_thinking(on) and not prompt_opens_thinking(off)


def test_qwen3_template_keeps_reasoning_of_the_current_tool_loop_only(qwen3_tokenizer: Any) -> None:
    text = qwen3_tokenizer.apply_chat_template(
        HISTORY, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    tool_json = json.dumps(TOOLS[0], ensure_ascii=False)
    assert text.startswith("<|im_start|>system\nYou are a weather bot.\n\n# Tools\n\n")
    assert f"<tools>\n{tool_json}\n</tools>" in text
    assert text.endswith(
        "<|im_start|>user\n北京天气情况如何<|im_end|>\n"
        "<|im_start|>assistant\n北京晴。<|im_end|>\n"  # an earlier turn: its reasoning is dropped
        "<|im_start|>user\n广州天气情况如何<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\n{REASONING}\n</think>\n\n{HERMES_CALL}<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temperature": 28}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert detect_format(qwen3_tokenizer.chat_template) == "hermes"


def test_qwen3_coder_template_renders_xml_calls_the_parser_reads(qwen3_coder_tokenizer: Any) -> None:
    tools = [weather_tool(), {"type": "function", "function": {"name": "forecast", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "fields": {"type": "array"}, "metric": {"type": "boolean"}}}}}]  # fmt: skip
    arguments = {"city": "广州\n(南)", "days": 3, "fields": ["temp", "wind"], "metric": True}
    messages = [
        {"role": "user", "content": "广州天气情况如何"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_current_weather", "arguments": {"city": "广州"}}},
            {"type": "function", "function": {"name": "forecast", "arguments": arguments}}]},
        {"role": "tool", "content": "sunny"},
    ]  # fmt: skip
    text = qwen3_coder_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert "<function>\n<name>get_current_weather</name>" in text
    assert f"<|im_start|>assistant\nChecking.\n\n{XML_CALL}" in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n"
    )
    assistant = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    result = parse_output(assistant, detect_format(qwen3_coder_tokenizer.chat_template), tools=tools)
    assert result.content == "Checking."
    assert [(c.name, c.arguments) for c in result.tool_calls] == [
        ("get_current_weather", {"city": "广州"}),
        ("forecast", arguments),
    ]


async def _forced(engine: VLLMEngine, text: str, prefill: str = "") -> list[str]:
    """The engine's raw deltas when its output is pinned to ``text`` by a regex."""
    stream = engine.generate(
        Request(
            messages=[{"role": "user", "content": "广州天气情况如何"}], tools=TOOLS, prefill=prefill,
            constraint=Constraint(regex=literal_regex(text)),
        )
    )  # fmt: skip
    deltas = [delta async for delta in stream]
    assert deltas[-1].finish_reason == "stop"
    return [delta.text for delta in deltas]


def _read(pieces: list[str], fmt: str, prompt: str) -> ParsedOutput:
    """Parse the engine's deltas as they came, and check that one-shot parsing agrees."""
    parser = OutputParser(
        fmt, tools=TOOLS, start_in_reasoning=prompt_opens_thinking(prompt), new_id=lambda: "c"
    )
    events = [event for piece in pieces for event in parser.feed(piece)] + parser.finish()
    result = parser.result()
    one_shot = parse_output("".join(pieces), fmt, tools=TOOLS, start_in_reasoning=prompt_opens_thinking(prompt),
                            new_id=lambda: "c")  # fmt: skip
    assert result == one_shot
    assert [e for e in events if isinstance(e, ParsedCall)] == result.tool_calls
    return result


@pytest.mark.engine
async def test_engine_thinking_and_call_are_read_back(flavour_engine: VLLMEngine) -> None:
    """On the real engine, a regex forces a thinking block plus a call in the flavour's format; the
    parser picked from the model's chat template reads the raw output back."""
    engine = flavour_engine
    tokenizer = await engine.tokenizer()
    fmt = detect_format(tokenizer.chat_template)
    assert fmt == engine.tool_call_format
    call = XML_CALL if fmt == "qwen3_coder" else HERMES_CALL
    expected = [("get_current_weather", {"city": "广州"}, None)]

    forced = f"<think>\n{REASONING}\n</think>\n\nLet me check.\n{call}"
    pieces = await _forced(engine, forced)
    assert "".join(pieces) == forced
    encoded = tokenizer.encode("".join(pieces), add_special_tokens=False)
    assert encoded.count(tokenizer.convert_tokens_to_ids("<think>")) == 1
    result = _read(pieces, fmt, engine.render([{"role": "user", "content": "x"}], TOOLS))
    assert (result.reasoning, result.content) == (REASONING, "Let me check.")
    assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == expected

    # A template whose prompt ends with "<think>\n" (Qwen3 Thinking-2507): only </think> appears.
    prompt = engine.render([{"role": "user", "content": "x"}], TOOLS, prefill="<think>\n")
    assert prompt_opens_thinking(prompt)
    pieces = await _forced(engine, f"{REASONING}\n</think>\n\n{call}", prefill="<think>\n")
    assert pieces[0] == "<think>\n"  # the engine's answer starts with the prefill
    result = _read(pieces[1:], fmt, prompt)
    assert (result.reasoning, result.content) == (REASONING, "")
    assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == expected


def test_flavour_is_checked_and_a_model_of_another_flavour_rebuilt(
    tiny_qwen3_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        ValueError, match=r"unknown tiny model flavour 'qwen4'; known: qwen2, qwen3, qwen3_coder"
    ):
        build_tiny_model(tmp_path / "x", flavour="qwen4")
    assert FLAVOURS == ("qwen2", "qwen3", "qwen3_coder")
    target = tmp_path / "tiny"
    shutil.copytree(tiny_qwen3_dir, target)
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(target, flavour="qwen3") == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    (target / "qwenrun-tiny.json").unlink()  # read as a qwen2 model built before flavours: rebuilt
    assert build_tiny_model(target, flavour="qwen3") == target
    assert json.loads((target / "qwenrun-tiny.json").read_text()) == {"flavour": "qwen3", "seed": 0}
    assert (target / "model.safetensors").read_bytes() == (tiny_qwen3_dir / "model.safetensors").read_bytes()
