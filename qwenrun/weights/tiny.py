"""A tiny, random-weight Qwen model for tests and demos, built locally without any network.

``build_tiny_model(dir)`` writes a complete Hugging Face model directory that vLLM can serve:
a 2-layer ``Qwen2ForCausalLM`` (hidden 256, vocab 4096, random weights, float32 safetensors),
a byte-level BPE tokenizer trained here on embedded text (English, Chinese weather phrases and
JSON tool calls) with Qwen2.5's special tokens, and the real Qwen2.5-Instruct chat template, so
tools, tool calls and tool responses render exactly as they do for the real models.
The model talks nonsense, but it is fast, deterministic under greedy decoding, and exercises
the same code paths (chat template, special tokens, structured outputs) as a real Qwen.

Flavours (``flavour=``): ``qwen2`` (the above), ``qwen3`` (a ``Qwen3ForCausalLM`` with Qwen3's
chat template: ``<think>`` reasoning, ``enable_thinking``, Hermes calls) and ``qwen3_coder`` (the
same model with Qwen3-Coder's template: XML calls). The Qwen3 flavours add ``<tool_response>``,
``</tool_response>``, ``<think>`` and ``</think>`` as single added tokens, as Qwen3's tokenizer
has them; their templates are in :mod:`qwenrun.weights.tiny_templates`.

CLI: ``python -m qwenrun.weights.tiny DIR [--flavour NAME] [--seed N] [--force]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwenrun.weights.tiny_templates import QWEN3_CODER_TEMPLATE, QWEN3_TEMPLATE

__all__ = [
    "CHAT_TEMPLATE", "FLAVOURS", "QWEN3_TOKENS", "SPECIAL_TOKENS", "TOOL_TOKENS", "VOCAB_SIZE",
    "build_tiny_model", "main",
]  # fmt: skip

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOOL_TOKENS = ("<tool_call>", "</tool_call>")  # added tokens, but not special: they survive decoding
QWEN3_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # added in Qwen3, too
FLAVOURS = ("qwen2", "qwen3", "qwen3_coder")
_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
)  # fmt: skip
_MARKER = "qwenrun-tiny.json"  # {"flavour": ...}; a model directory without it is a qwen2 one

# The chat template of Qwen2.5-Instruct, verbatim.
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

# Qwen2's pre-tokenizer: digits one by one, letters in runs, punctuation runs with an optional space.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_ENGLISH = """\
You are a helpful assistant. The user asks a question and the assistant answers it, calling tools
when it needs facts it does not know. What is the weather like in Guangzhou today? It is sunny and
warm, twenty eight degrees, with a light breeze from the south. Tomorrow will be cloudy with rain in
the afternoon. Please tell me the temperature in Beijing, Shanghai and Shenzhen. The forecast says
that the wind will be strong and the humidity high. Let me check the current weather for you.
I will call the function get_current_weather with the city as its argument, then read the result
and write a short answer. The tool returned an error; I will try again with a different city name.
Here is the answer: the temperature is 25 degrees Celsius and the sky is clear. Thank you!
Compute the sum of two numbers, search the documents for the answer, and summarize the results.
The calculator says that 12 times 7 is 84. The search found three documents about the topic.
An agent runs a loop: the model writes text or a tool call, the runner executes the tool, and the
result goes back to the model as a tool message until the model gives its final answer.
"""

_CHINESE = """\
广州天气情况如何？今天广州天气晴朗，气温二十八度，有微风。明天多云，下午有雨。
北京的天气怎么样？上海今天下雨吗？深圳气温多少度？请帮我查一下杭州的天气预报。
你好，我是一个有用的助手。请问有什么可以帮您？我来为您查询当前的天气情况。
今天天气很好，适合出门。明天有大风，湿度很高，请注意安全。温度是二十五摄氏度，天空晴朗。
成都、重庆、武汉、南京、西安、天津、苏州、长沙、郑州、青岛、厦门、昆明、大连、沈阳。
计算两个数字的和，搜索文档并总结结果。工具返回了一个错误，我将使用不同的城市名称重试。
"""

_CITIES = (
    "广州", "北京", "上海", "深圳", "杭州", "成都", "重庆", "武汉", "南京", "西安", "天津", "苏州",
    "Guangzhou", "Beijing", "Shanghai", "Shenzhen", "Paris", "London", "Tokyo", "New York", "Berlin",
)  # fmt: skip
_TOOLS = ("get_current_weather", "get_weather_forecast", "calculator", "search_documents", "get_time")
_KEYS = ("city", "unit", "date", "query", "expression", "location", "days", "top_k", "timezone")
_VALUES = ("celsius", "fahrenheit", "today", "tomorrow", "weather", "1 + 2", "sunny", "rain", "cloudy")


def _added_tokens(flavour: str) -> tuple[str, ...]:
    return TOOL_TOKENS if flavour == "qwen2" else (*TOOL_TOKENS, *QWEN3_TOKENS)


def _template(flavour: str) -> str:
    return {"qwen2": CHAT_TEMPLATE, "qwen3": QWEN3_TEMPLATE, "qwen3_coder": QWEN3_CODER_TEMPLATE}[flavour]


def _flavour_corpus(rng: random.Random, flavour: str) -> Iterator[str]:
    """Qwen3 flavours: thinking blocks, and (qwen3_coder) XML tool calls."""
    for _ in range(1500):
        name, city = rng.choice(_TOOLS), rng.choice(_CITIES)
        yield f"<think>\nThe user asks about the weather in {city}. I will call {name}.\n</think>\n\n"
        if flavour == "qwen3_coder":
            key, value = rng.choice(_KEYS), rng.choice((*_VALUES, *_CITIES))
            yield (
                f"<tool_call>\n<function={name}>\n<parameter=city>\n{city}\n</parameter>\n"
                f"<parameter={key}>\n{value}\n</parameter>\n</function>\n</tool_call>"
            )


def _corpus(seed: int, flavour: str = "qwen2") -> Iterator[str]:
    """Deterministic training text: the embedded passages, chat-formatted JSON tool calls, numbers,
    the flavour's own formats and (last, rarest) pseudo-words, so BPE always has enough merges to
    fill the vocabulary."""
    rng = random.Random(seed)
    for _ in range(40):
        yield _ENGLISH
        yield _CHINESE
    for _ in range(3000):
        name, city = rng.choice(_TOOLS), rng.choice(_CITIES)
        args: dict[str, object] = {"city": city}
        for key in rng.sample(_KEYS, rng.randint(0, 3)):
            args[key] = rng.choice((*_VALUES, *_CITIES, rng.randint(0, 100), rng.random() < 0.5))
        call = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        tool = {"type": "function", "function": {"name": name, "description": "Get the weather.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}}  # fmt: skip
        yield f"<|im_start|>user\n{city}天气情况如何<|im_end|>\n<|im_start|>assistant\n"
        yield f"<tool_call>\n{call}\n</tool_call><|im_end|>\n"
        yield f"<tools>\n{json.dumps(tool, ensure_ascii=False)}\n</tools>\n"
        yield f"<tool_response>\n{json.dumps({'temperature': rng.randint(-10, 40)})}\n</tool_response>\n"
    if flavour != "qwen2":
        yield from _flavour_corpus(rng, flavour)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(20000):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))
        yield f" {word}" * 2


def _train_tokenizer(seed: int, flavour: str) -> object:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(_added_tokens(flavour)),
        special_tokens=[AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed, flavour), trainer=trainer)
    tokenizer.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in _added_tokens(flavour)])
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {size} tokens, expected {VOCAB_SIZE}")
    return tokenizer


def _write_tokenizer(tokenizer: object, directory: Path, flavour: str) -> dict[str, int]:
    from tokenizers import Tokenizer

    assert isinstance(tokenizer, Tokenizer)
    tokenizer.save(str(directory / "tokenizer.json"))
    ids: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *_added_tokens(flavour)):
        token_id = tokenizer.token_to_id(tok)
        assert token_id is not None, tok
        ids[tok] = token_id
    added = {
        str(ids[tok]): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": tok in SPECIAL_TOKENS,
        }
        for tok in (*SPECIAL_TOKENS, *_added_tokens(flavour))
    }  # fmt: skip
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": _template(flavour),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(directory / "tokenizer_config.json", config)
    return ids


def _write_model(directory: Path, ids: dict[str, int], seed: int, flavour: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    params: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,  # vLLM's CPU attention has no kernel for head_dim 16
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    qwen3 = flavour != "qwen2"
    config: Any = (Qwen3Config if qwen3 else Qwen2Config)(**params)
    config.dtype = "float32"
    model_class: Any = Qwen3ForCausalLM if qwen3 else Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    state = {name: t.detach().to(torch.float32).contiguous() for name, t in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "model.safetensors").chmod(0o644)
    data = config.to_dict()
    data["architectures"] = ["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"]
    data["torch_dtype"] = data["dtype"] = "float32"  # older transformers read torch_dtype
    for key in ("id2label", "label2id", "_name_or_path"):
        data.pop(key, None)
    _write_json(directory / "config.json", data)
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    _write_json(directory / "generation_config.json", generation)
    _write_json(directory / _MARKER, {"flavour": flavour, "seed": seed})


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _complete(path: Path, flavour: str) -> bool:
    """All files are there, of this flavour."""
    if not all((path / name).is_file() for name in _FILES):
        return False
    try:
        built = json.loads((path / _MARKER).read_text(encoding="utf-8")).get("flavour")
    except FileNotFoundError:
        built = "qwen2"  # built before flavours existed
    except (OSError, ValueError, AttributeError):
        return False
    return bool(built == flavour)


def build_tiny_model(
    path: str | os.PathLike[str], *, seed: int = 0, force: bool = False, flavour: str = "qwen2"
) -> Path:
    """Write the tiny model of ``flavour`` (one of ``FLAVOURS``) into ``path`` unless a complete
    one of that flavour is there already; return the path.

    The directory is built in a temporary sibling and renamed into place, so a concurrent reader
    never sees half a model. ``force`` rebuilds it; an incomplete directory, or one of another
    flavour, is always rebuilt. An unknown flavour is a ValueError naming the known ones.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown tiny model flavour {flavour!r}; known: {', '.join(FLAVOURS)}")
    target = Path(path).expanduser().resolve()
    if _complete(target, flavour) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        work.chmod(0o755)
        tokenizer = _train_tokenizer(seed, flavour)
        ids = _write_tokenizer(tokenizer, work, flavour)
        _write_model(work, ids, seed, flavour)
        if target.exists() or target.is_symlink():
            if _complete(target, flavour) and not force:  # another process won the race
                return target
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "model")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(work, target)
        except OSError:  # a concurrent builder renamed its copy first
            if not _complete(target, flavour):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwenrun.weights.tiny", description="Build the tiny test model."
    )
    parser.add_argument("directory", help="where to write the model (kept if already complete)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="qwen2", help="chat template and format")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the model exists")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.directory, seed=args.seed, force=args.force, flavour=args.flavour))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
