"""``qwenrun parse`` (model text on stdin -> content, reasoning, tool calls as JSON) and
``qwenrun tiny-model --flavour``, through Click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qwenrun.cli import main
from qwenrun.cli.parse import chat_template_of, template_opens_thinking
from qwenrun.engines.scripted import tool_call_text
from qwenrun.toolcalls import parse_output
from qwenrun.weights.tiny_templates import QWEN3_CODER_TEMPLATE, QWEN3_TEMPLATE

TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]  # fmt: skip
XML = tool_call_text("forecast", {"city": "广州", "days": 3}, format="qwen3_coder")
THOUGHT = '<think>\nMaybe <tool_call>\n{"name": "forecast", "arguments": {}}\n</tool_call>, maybe not.\n</think>\n\n'


def run(*args: str, text: str) -> tuple[int, Any]:
    result = CliRunner().invoke(main, ["parse", *args], input=text)
    try:
        return result.exit_code, json.loads(result.output)
    except ValueError:
        return result.exit_code, result.output


def calls(output: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in output["tool_calls"]]


@pytest.fixture
def tools_file(tmp_path: Path) -> str:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS), encoding="utf-8")
    return str(path)


def test_reads_the_thinking_then_the_calls_as_the_agent_does() -> None:
    text = THOUGHT + "Checking.\n" + tool_call_text("forecast", {"city": "广州"})
    code, output = run(text=text)
    assert code == 0 and set(output) == {"content", "reasoning", "tool_calls"}
    expected = parse_output(
        text, "hermes", lenient=True, new_id=lambda: output["tool_calls"][0]["id"]
    ).to_dict()
    assert output == expected
    assert output["content"] == "Checking." and calls(output) == [("forecast", {"city": "广州"})]
    assert output["reasoning"].startswith("Maybe <tool_call>")  # a call inside <think> is never a call


def test_the_model_s_template_picks_the_format_and_the_tools_type_the_values(
    tiny_qwen3_coder_dir: Path, tiny_qwen3_dir: Path, tools_file: str
) -> None:
    code, typed = run("--model", str(tiny_qwen3_coder_dir), "--tools", tools_file, text=XML)
    assert code == 0 and calls(typed) == [("forecast", {"city": "广州", "days": 3})]
    code, strings = run("--format", "qwen3_coder", text=XML)  # no schema: every value is a string
    assert code == 0 and calls(strings) == [("forecast", {"city": "广州", "days": "3"})]
    code, hermes = run("--model", str(tiny_qwen3_dir), text=XML)  # Qwen3's template: Hermes calls
    assert (
        code == 0
        and hermes["tool_calls"][0]["error"]
        and hermes["tool_calls"][0]["raw"].startswith("\n<function=")
    )
    code, forced = run("--model", str(tiny_qwen3_dir), "--format", "qwen3_coder", text=XML)
    assert code == 0 and calls(forced) == [("forecast", {"city": "广州", "days": "3"})]


def test_thinking_switches_and_bare_json(tools_file: str) -> None:
    code, plain = run("--no-thinking", text=THOUGHT + "ok")
    assert code == 0 and plain["reasoning"] == "" and plain["content"].startswith("<think>")
    code, opened = run("--in-reasoning", text="still thinking\n</think>\n\nok")
    assert code == 0 and (opened["reasoning"], opened["content"]) == ("still thinking", "ok")
    bare = '{"name": "forecast", "arguments": {"city": "广州"}}'
    assert calls(run("--tools", tools_file, text=bare)[1]) == [("forecast", {"city": "广州"})]
    assert run(text=bare)[1]["content"] == bare  # bare JSON names a declared tool, or it is text
    code, strict = run("--strict", "--tools", tools_file, text=bare)
    assert code == 0 and (strict["content"], strict["tool_calls"]) == (bare, [])


def test_a_template_whose_prompt_opens_the_think_block(tmp_path: Path) -> None:
    opening = QWEN3_TEMPLATE.replace(
        "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    )
    assert opening != QWEN3_TEMPLATE and template_opens_thinking(opening)
    assert not template_opens_thinking(QWEN3_TEMPLATE) and not template_opens_thinking("{{ broken")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": opening}]})
    )  # fmt: skip
    assert chat_template_of(str(tmp_path)) == opening
    code, output = run("--model", str(tmp_path), text="plan\n</think>\n\nanswer")
    assert code == 0 and (output["reasoning"], output["content"]) == ("plan", "answer")
    code, output = run("--model", str(tmp_path), "--not-in-reasoning", text="plan\n</think>\n\nanswer")
    assert code == 0 and output["reasoning"] == ""
    (tmp_path / "chat_template.jinja").write_text(QWEN3_CODER_TEMPLATE)  # preferred, as transformers does
    assert chat_template_of(str(tmp_path)) == QWEN3_CODER_TEMPLATE


@pytest.mark.parametrize(
    ("args", "content", "message"),
    [
        (["--model", "/no/such/dir"], None, "--model /no/such/dir: not a directory"),
        (["--model", "{empty}"], None, "no chat template (none of chat_template.jinja, chat_template.json, "
                                       "tokenizer_config.json has one)"),
        (["--tools", "{tools}"], "[1, 2", "not JSON"),
        (["--tools", "{tools}"], '{"a": 1}', "expected a JSON list of OpenAI tools, got dict"),
        (["--tools", "{tools}"], '[{"type": "function", "function": {}}]', "[0]: expected a tool with function.name"),
        (["--tools", "/no/such/file.json"], None, "--tools /no/such/file.json: cannot read file"),
        (["--format", "xml"], None, "Invalid value for '--format': 'xml' is not one of 'auto', 'hermes', 'qwen3_coder'"),
    ],
)  # fmt: skip
def test_bad_options_are_clear_errors(
    tmp_path: Path, args: list[str], content: str | None, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    tools = tmp_path / "tools.json"
    if content is not None:
        tools.write_text(content)
    args = [arg.format(empty=tmp_path / "empty", tools=tools) for arg in args]
    code, output = run(*args, text="x")
    assert code == 2 and message in output


def test_tiny_model_flavour(tiny_qwen3_dir: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["tiny-model", str(tiny_qwen3_dir), "--flavour", "qwen3"])  # already built
    assert done.exit_code == 0 and done.output == f"tiny model (qwen3) ready in {tiny_qwen3_dir}\n"
    bad = runner.invoke(main, ["tiny-model", str(tiny_qwen3_dir), "--flavour", "qwen4"])
    assert bad.exit_code == 2 and "'qwen4' is not one of 'qwen2', 'qwen3', 'qwen3_coder'" in bad.output


def test_a_lone_close_think_is_reasoning_unless_the_text_is_known_to_start_as_the_answer() -> None:
    """Without ``--model`` nobody can tell whether the prompt opened the think block: the text
    before a lone ``</think>`` is reasoning (as vLLM's qwen3 reasoning parser reads it)."""
    text = "Let me see.\n</think>\n\nok"
    code, output = run(text=text)
    assert code == 0 and (output["reasoning"], output["content"]) == ("Let me see.", "ok")
    code, output = run("--not-in-reasoning", text=text)
    assert code == 0 and (output["reasoning"], output["content"]) == ("", text)
    code, output = run(text="No tags: the answer.")
    assert code == 0 and (output["reasoning"], output["content"]) == ("", "No tags: the answer.")


def test_a_template_that_cannot_be_rendered_tells_nothing() -> None:
    assert template_opens_thinking("{{ raise_exception('no') }}") is None
    assert template_opens_thinking("{{ '<think>\\n' if add_generation_prompt }}") is True

