"""qwenrun.engines.prompts: prompt ids reused piece by piece equal the tokenizer's ids of the whole
prompt, for the chat templates of Qwen2.5, Qwen3 and Qwen3-Coder (the tiny models' tokenizers),
over growing conversations with tool calls, reasoning and ``enable_thinking``. No vLLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from weather import weather_tool

from qwenrun.engines.prompts import MARKER, PromptTokenizer, marker_id
from qwenrun.engines.vllm.inputs import template_messages
from qwenrun.weights.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
FLAVOURS = {"qwen2": "tiny-qwen2", "qwen3": "tiny-qwen3", "qwen3_coder": "tiny-qwen3-coder"}
TOOLS = [
    weather_tool(),
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the documentation.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
            },
        },
    },
]
_tokenizers: dict[str, Any] = {}


def tokenizer_of(flavour: str) -> Any:
    """The tiny model's tokenizer of ``flavour`` (its chat template is the real model's)."""
    if flavour not in _tokenizers:
        from transformers import AutoTokenizer

        directory = build_tiny_model(ROOT / ".cache" / FLAVOURS[flavour], flavour=flavour)
        _tokenizers[flavour] = AutoTokenizer.from_pretrained(str(directory))
    return _tokenizers[flavour]


def render(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """As ``VLLMEngine.render`` does."""
    return str(
        tokenizer.apply_chat_template(
            template_messages(messages), tools=TOOLS, add_generation_prompt=True, tokenize=False, **kwargs
        )
    )


def whole(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def call(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def conversation(turns: int, *, reasoning: bool) -> list[list[dict[str, Any]]]:
    """The message lists an agent sends, call after call: each turn a user message, an assistant
    tool call (with reasoning), the tool's result, then the answer (with reasoning)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a weather bot.  \n"}]
    sent = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"第{turn}问: 广州天气情况如何?\n  \n"})
        sent.append(list(messages))
        think = {"reasoning_content": f"I should call the tool ({turn}).\n"} if reasoning else {}
        messages.append(
            {"role": "assistant", "content": "", **think,
             "tool_calls": [call("get_current_weather", {"city": "广州", "n": turn}, f"c{turn}")]}
        )  # fmt: skip
        messages.append({"role": "tool", "tool_call_id": f"c{turn}", "name": "get_current_weather",
                         "content": f'{{"temp": {20 + turn}, "sky": "多云 <b>ok</b>"}}'})  # fmt: skip
        sent.append(list(messages))
        messages.append({"role": "assistant", "content": f" It is {20 + turn} ℃.\n\n", **think})
    return sent


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_the_tiny_tokenizers_cut_at_im_start(flavour: str) -> None:
    tokenizer = tokenizer_of(flavour)
    prompts = PromptTokenizer(tokenizer)
    assert prompts.enabled and prompts.marker_id == tokenizer.convert_tokens_to_ids(MARKER)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("reasoning", [False, True])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_a_growing_conversation_tokenizes_as_the_whole_prompt(
    flavour: str, reasoning: bool, thinking: bool | None
) -> None:
    tokenizer = tokenizer_of(flavour)
    prompts = PromptTokenizer(tokenizer)
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    texts = [render(tokenizer, messages, **kwargs) for messages in conversation(4, reasoning=reasoning)]
    if flavour == "qwen3" and reasoning:  # the template drops the reasoning of earlier turns
        assert "I should call the tool (0)" in texts[1] and "I should call the tool (0)" not in texts[-1]
    if flavour == "qwen3" and thinking is False:
        assert texts[0].endswith("<think>\n\n</think>\n\n")
    for text in texts:
        assert prompts.encode(text) == whole(tokenizer, text)
        assert prompts.encode(text + "<tool_call>\n") == whole(tokenizer, text + "<tool_call>\n")  # a prefill
    assert prompts.hits > prompts.misses  # the system prompt, tools and earlier messages were reused


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_sessions_share_the_system_prompt_and_tools(flavour: str) -> None:
    tokenizer = tokenizer_of(flavour)
    prompts = PromptTokenizer(tokenizer)
    first = render(tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": "one"}])
    second = render(tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": "two"}])
    assert prompts.encode(first) == whole(tokenizer, first)
    misses = prompts.misses
    assert prompts.encode(second) == whole(tokenizer, second)
    assert prompts.misses == misses + 1  # only the new user message was tokenized


TEXT = st.lists(
    st.one_of(
        st.sampled_from([MARKER, "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "<|im_start", "|>", "\n",
                         " ", "  \n\n", "user\n", "assistant\n", "广州", "é", "e\u0301", "\t", "{\"a\": 1}"]),
        st.text(max_size=8),
    ),
    max_size=30,
).map("".join)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), flavour=st.sampled_from(list(FLAVOURS)))
def test_any_text_tokenizes_as_a_whole(texts: list[str], flavour: str) -> None:
    tokenizer = tokenizer_of(flavour)
    prompts = PromptTokenizer(tokenizer)
    for text in texts:
        assert prompts.encode(text) == whole(tokenizer, text)


def test_the_cache_keeps_at_most_capacity_pieces() -> None:
    tokenizer = tokenizer_of("qwen2")
    prompts = PromptTokenizer(tokenizer, capacity=3)
    text = "".join(f"{MARKER}user\nmessage {i}<|im_end|>\n" for i in range(10))
    assert prompts.encode(text) == whole(tokenizer, text)
    assert len(prompts._pieces) == 3
    assert prompts.encode(text) == whole(tokenizer, text)


class _Token:
    def __init__(self, content: str, **flags: bool) -> None:
        self.content = content
        self.lstrip = self.rstrip = self.single_word = self.normalized = False
        self.__dict__.update(flags)


class _Tokenizer:
    """A tokenizer whose ids are its characters' code points (its ``added_tokens_decoder`` is
    what the test gives); it does not cut at added tokens, so the probe fails if asked."""

    def __init__(self, added: dict[int, _Token], split: bool = False) -> None:
        self.added_tokens_decoder, self.split_special_tokens = added, split

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(char) for char in text]


@pytest.mark.parametrize(
    ("added", "split"),
    [
        ({}, False),  # no such token
        ({7: _Token(MARKER, lstrip=True)}, False),  # eats the space before it
        ({7: _Token(MARKER, normalized=True)}, False),
        ({7: _Token(MARKER)}, True),  # special tokens tokenized as text
        ({7: _Token(MARKER), 8: _Token("x<|im")}, False),  # another token overlaps it
    ],
)
def test_a_tokenizer_that_may_not_cut_there_tokenizes_whole(added: dict[int, _Token], split: bool) -> None:
    tokenizer = _Tokenizer(added, split)
    assert marker_id(tokenizer) is None
    prompts = PromptTokenizer(tokenizer)
    assert not prompts.enabled
    assert prompts.encode(f"a{MARKER}b") == whole(tokenizer, f"a{MARKER}b")


def test_a_tokenizer_that_fails_the_probe_tokenizes_whole() -> None:
    tokenizer = _Tokenizer({7: _Token(MARKER)})  # claims the marker but never emits id 7
    assert marker_id(tokenizer) == 7
    prompts = PromptTokenizer(tokenizer)
    assert not prompts.enabled
    assert prompts.encode(f"a{MARKER}b") == whole(tokenizer, f"a{MARKER}b")


@pytest.mark.real_model
@pytest.mark.parametrize("reasoning", [False, True])
def test_the_real_qwen_tokenizer_reuses_pieces_and_tokenizes_as_a_whole(real_model_dir: Path, reasoning: bool) -> None:
    """Qwen2.5-Coder-0.5B's own tokenizer (151k tokens, Qwen's chat template): cut at ``<|im_start|>``,
    equal ids over a growing conversation, arbitrary text too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_model_dir))
    prompts = PromptTokenizer(tokenizer)
    assert prompts.enabled and prompts.marker_id == tokenizer.convert_tokens_to_ids(MARKER)
    for messages in conversation(5, reasoning=reasoning):
        text = render(tokenizer, messages)
        assert prompts.encode(text) == whole(tokenizer, text)
        assert prompts.encode(text + "<tool_call>\n") == whole(tokenizer, text + "<tool_call>\n")
    assert prompts.hits > prompts.misses
    odd = "e\u0301 <|im_start|>\u0301x  \n<|im_end|><|im_start|><|im_start|> 广州\r\n\t<tool_call>"
    assert prompts.encode(odd) == whole(tokenizer, odd)
