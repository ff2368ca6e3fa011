"""The tiny test model: files, tokenizer, chat template, idempotent building."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from weather import weather_tool

from qwenrun.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, TOOL_TOKENS, VOCAB_SIZE, build_tiny_model, main

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
