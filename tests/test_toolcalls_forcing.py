"""How a call is forced in each format: the prefill, the constraint, and the think block closed
first. The Qwen3-Coder structural tag is compiled by xgrammar (what vLLM runs) with the tiny
qwen3_coder model's tokenizer and checked against texts, and what it accepts is read back by the
parser to the same call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from weather import weather_tool

from qwenrun.toolcalls import FORCED_PREFILL, forced_call, parse_output, thinking_prefill
from qwenrun.toolcalls.hermes import forced_call as hermes_forced_call
from qwenrun.weights.tiny_templates import QWEN3_CODER_TEMPLATE, QWEN3_TEMPLATE

FORECAST = {
    "type": "function",
    "function": {
        "name": "forecast",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer"},
                "options": {"type": "object"},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"type": "string", "pattern": "[A-Z]{3}"},
            },
            "required": ["city", "unit"],
        },
    },
}
NO_PARAMETERS = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [FORECAST, NO_PARAMETERS]


def xml(name: str, *parameters: tuple[str, str]) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters)
    return f"<function={name}>\n{body}</function>\n</tool_call>"


@pytest.fixture(scope="module")
def compiler(tiny_qwen3_coder_dir: Path) -> Any:
    import xgrammar
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3_coder_dir))
    return xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer))


def accepts(compiler: Any, tag: dict[str, Any], text: str) -> bool:
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiler.compile_structural_tag(json.dumps(tag)))
    return bool(matcher.accept_string(text))


def test_hermes_forcing_is_the_json_schema_after_the_prefill() -> None:
    forced = forced_call("hermes", TOOLS, "get_time")
    assert forced is not None and forced.structural_tag is None
    assert (forced.json_schema, forced.prefill) == hermes_forced_call(TOOLS, "get_time")
    assert forced.prefill == FORCED_PREFILL == "<tool_call>\n"
    # a function declared without parameters takes none: {} is its only call
    assert forced.json_schema["properties"]["arguments"] == {
        "type": "object", "properties": {}, "additionalProperties": False,
    }  # fmt: skip


@pytest.mark.parametrize("fmt", ["hermes", "qwen3_coder"])
@pytest.mark.parametrize("choice", ["auto", "none", "unknown_tool"])
def test_nothing_to_force(fmt: str, choice: str) -> None:
    assert forced_call(fmt, TOOLS, choice) is None
    assert forced_call(fmt, [], "required") is None


@pytest.mark.parametrize(
    ("text", "call"),
    [
        (xml("forecast", ("city", "广州"), ("unit", "c")), ("forecast", {"city": "广州", "unit": "c"})),
        (xml("forecast", ("city", "a\nb<c"), ("unit", "f"), ("days", "3"), ("options", '{"a": [1, 2]}'),
             ("note", "null"), ("code", "CAN")),
         ("forecast", {"city": "a\nb<c", "unit": "f", "days": 3, "options": {"a": [1, 2]}, "note": None,
                       "code": "CAN"})),
        (xml("forecast", ("city", "x"), ("unit", "c"), ("note", "some note")),
         ("forecast", {"city": "x", "unit": "c", "note": "some note"})),
        (xml("get_time"), ("get_time", {})),
    ],
    ids=["required-only", "every-type", "nullable-string", "no-parameters"],
)  # fmt: skip
def test_qwen3_coder_forcing_accepts_template_style_calls_that_read_back(
    compiler: Any, text: str, call: tuple[str, dict[str, Any]]
) -> None:
    forced = forced_call("qwen3_coder", TOOLS, "required")
    assert forced is not None and forced.prefill == "<tool_call>\n" and forced.json_schema is None
    assert forced.structural_tag is not None and accepts(compiler, forced.structural_tag, text)
    (read,) = parse_output(forced.prefill + text, "qwen3_coder", tools=TOOLS).tool_calls
    assert (read.name, read.arguments, read.error) == (*call, None)


@pytest.mark.parametrize(
    "text",
    [
        xml("forecast", ("city", "123456789"), ("unit", "c")),  # maxLength 8
        xml("forecast", ("city", "x"), ("unit", "k")),  # not in the enum
        xml("forecast", ("unit", "c")),  # a required parameter missing
        xml("forecast", ("city", "x"), ("unit", "c"), ("days", "three")),  # not an integer
        xml("forecast", ("city", "x"), ("unit", "c"), ("code", "can")),  # not the pattern
        "<function=forecast>\n<parameter=city> 广州 </parameter>\n<parameter=unit>\nc\n</parameter>\n"
        "</function>\n</tool_call>",  # whitespace the parser would keep in the string
        xml("forecast", ("unit", "c"), ("city", "x")),  # the schema's order (required first)
        xml("get_time", ("x", "1")),  # no parameters declared
        xml("other", ("city", "x")),  # not a tool
    ],
)
def test_qwen3_coder_forcing_refuses_what_would_not_be_a_valid_call(compiler: Any, text: str) -> None:
    forced = forced_call("qwen3_coder", TOOLS, "required")
    assert forced is not None and forced.structural_tag is not None
    assert not accepts(compiler, forced.structural_tag, text)


def test_a_named_choice_forces_that_tool_only(compiler: Any) -> None:
    forced = forced_call("qwen3_coder", TOOLS, "get_time")
    assert forced is not None and forced.structural_tag is not None
    assert accepts(compiler, forced.structural_tag, xml("get_time"))
    assert not accepts(compiler, forced.structural_tag, xml("forecast", ("city", "x"), ("unit", "c")))
    weather = forced_call("qwen3_coder", [weather_tool()], "get_current_weather")
    assert weather is not None and weather.structural_tag is not None
    assert accepts(compiler, weather.structural_tag, xml("get_current_weather", ("city", "广州")))


@pytest.mark.parametrize(
    ("prompt", "template", "prefill"),
    [
        ("<|im_start|>assistant\n", QWEN3_TEMPLATE, "<think>\n\n</think>\n\n"),  # thinking on
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", QWEN3_TEMPLATE, ""),  # enable_thinking false
        ("<|im_start|>assistant\n<think>\n", QWEN3_TEMPLATE, "\n</think>\n\n"),  # Thinking-2507, QwQ
        ("<|im_start|>assistant\n", QWEN3_CODER_TEMPLATE, ""),  # no thinking in the template
        ("<|im_start|>assistant\n", None, ""),
    ],
    ids=["open", "disabled", "prompt-opened", "coder", "no-template"],
)
def test_thinking_prefill_closes_what_the_prompt_leaves_open(
    prompt: str, template: str | None, prefill: str
) -> None:
    assert thinking_prefill(prompt, template) == prefill
    text = prompt + prefill + "<tool_call>\n"  # what follows is a call, never reasoning
    answer = text.split("<|im_start|>assistant\n")[1]
    result = parse_output(answer + '{"name": "f", "arguments": {}}', "hermes")
    assert (result.reasoning, [call.name for call in result.tool_calls]) == ("", ["f"])
