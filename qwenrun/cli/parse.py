"""``qwenrun parse``: model text on stdin -> ``{"content", "reasoning", "tool_calls"}`` as JSON.

The tool to reach for when a call "didn't work": it reads the text exactly as the agent loop and the
OpenAI server do (:class:`~qwenrun.engines.base.OutputReader`: the ``<think>`` block, then the
tool calls of the format), in the format ``--format`` names or, for ``auto``, the one the chat
template of ``--model DIR`` teaches (read from the directory's files; nothing is downloaded and
neither transformers nor vLLM is imported). ``--tools FILE`` (an OpenAI ``tools`` list as JSON)
types the Qwen3-Coder XML values and names the tools whose bare JSON calls (and calls written in
the thinking, when the answer is empty) are read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from qwenrun.cli.common import errors
from qwenrun.errors import ConfigError
from qwenrun.toolcalls import AUTO, PARSERS, prompt_opens_thinking, resolve_format

__all__ = ["chat_template_of", "parse", "template_opens_thinking"]

_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def chat_template_of(directory: str) -> str:
    """The chat template of a Hugging Face model directory: ``chat_template.jinja``, else the
    ``chat_template`` of ``chat_template.json`` or ``tokenizer_config.json`` (the ``default`` one
    of a list of named templates). ConfigError when there is none."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--model {directory}: not a directory (give a local model directory)")
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in _TEMPLATE_FILES[1:]:
        path = root / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}: not a JSON object: {exc}") from None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str):
            return template
    raise ConfigError(f"--model {directory}: no chat template (none of {', '.join(_TEMPLATE_FILES)} has one)")


def template_opens_thinking(template: str) -> bool | None:
    """Whether the template's generation prompt ends inside ``<think>`` (Qwen3 Thinking-2507, QwQ),
    so that the model's text starts as reasoning: the template rendered for one user message in a
    jinja2 sandbox, as transformers renders it. None when it cannot be rendered (nobody can tell:
    a lone ``</think>`` ends the reasoning)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    try:
        prompt = env.from_string(template).render(
            messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True
        )
    except Exception:  # a template qwenrun cannot render alone
        return None
    return prompt_opens_thinking(prompt)


def read_tools(path: str) -> list[dict[str, Any]]:
    """An OpenAI ``tools`` list from a JSON file (``[{"type": "function", "function": {...}}]``;
    bare function objects are accepted). ConfigError naming the file and the item otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--tools {path}: cannot read file: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"--tools {path}: not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("tools"), list):
        data = data["tools"]  # a saved request body
    if not isinstance(data, list):
        raise ConfigError(f"--tools {path}: expected a JSON list of OpenAI tools, got {type(data).__name__}")
    tools = []
    for index, item in enumerate(data):
        function = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ConfigError(f"--tools {path}: [{index}]: expected a tool with function.name")
        tools.append({"type": "function", "function": function})
    return tools


@click.command("parse")
@click.option(
    "--format", "fmt", type=click.Choice([AUTO, *PARSERS]), default=AUTO, show_default=True,
    help="The tool-call format; auto: the one of --model's chat template (hermes without --model).",
)  # fmt: skip
@click.option("--model", "model", metavar="DIR", help="A local model directory whose chat template is read.")
@click.option("--tools", "tools_file", metavar="FILE", help="An OpenAI tools list (JSON): typed XML values.")
@click.option("--no-thinking", is_flag=True, help="Read <think> as plain text, not as reasoning.")
@click.option(
    "--in-reasoning/--not-in-reasoning", default=None,
    help="The text starts inside a <think> block (the prompt opened it); default: what --model's "
    "template does, else unknown (a lone </think> ends the reasoning).",
)  # fmt: skip
@click.option(
    "--strict", is_flag=True,
    help="Read tagged calls after the thinking only: not bare JSON calls, nor calls written in the "
    "thinking when the answer is empty.",
)  # fmt: skip
def parse(
    fmt: str,
    model: str | None,
    tools_file: str | None,
    no_thinking: bool,
    in_reasoning: bool | None,
    strict: bool,
) -> None:
    """Read model text on stdin as the agent does; print its content, reasoning and tool calls."""
    from qwenrun.engines.base import Delta, OutputReader

    with errors():
        template = chat_template_of(model) if model is not None else None
        tools = read_tools(tools_file) if tools_file is not None else None
    opens = in_reasoning
    if opens is None and template is not None:
        opens = not no_thinking and template_opens_thinking(template)
    reader = OutputReader(
        resolve_format(fmt, template), tools=tools, lenient=not strict, thinking=not no_thinking,
        calls_in_thinking=not strict,
    )  # fmt: skip
    reader.feed(Delta(sys.stdin.read(), "stop", starts_in_reasoning=opens))
    reader.finish()
    click.echo(json.dumps(reader.result().to_dict(), ensure_ascii=False, indent=2))
