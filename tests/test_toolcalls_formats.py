"""qwenrun.toolcalls.formats: the format table, the Hermes wrapper, detection from chat templates."""

from __future__ import annotations

import subprocess
import sys

import pytest
from chunking import check_events, feed_sized, ids
from test_toolcalls_hermes import CASES as HERMES_CASES

from qwenrun.events import CallDelta
from qwenrun.toolcalls import (
    PARSERS,
    HermesParser,
    Qwen3CoderParser,
    detect_format,
    hermes,
    new_parser,
    resolve_format,
)
from qwenrun.weights.tiny import CHAT_TEMPLATE as QWEN25_TEMPLATE
from qwenrun.weights.tiny_templates import QWEN3_CODER_TEMPLATE, QWEN3_TEMPLATE


def test_table() -> None:
    assert list(PARSERS.items()) == [("hermes", HermesParser), ("qwen3_coder", Qwen3CoderParser)]
    assert isinstance(new_parser("hermes"), HermesParser)
    assert isinstance(new_parser("qwen3_coder", [], ids()), Qwen3CoderParser)
    assert isinstance(new_parser("auto"), HermesParser)


@pytest.mark.parametrize("text", [case[1] for case in HERMES_CASES], ids=[case[0] for case in HERMES_CASES])
def test_hermes_wrapper_is_the_hermes_parser(text: str) -> None:
    expected = hermes.parse(text, ids())
    for size in (1, 2, 3, 7, len(text) + 1):
        parser = HermesParser(None, ids())
        events = feed_sized(parser, text, size)
        assert parser.result() == expected
        check_events(events, expected.content, expected.tool_calls)
        plain = [e for e in events if not isinstance(e, CallDelta)]
        legacy = hermes.StreamParser(ids())
        assert plain == feed_sized(legacy, text, size)  # the same events, deltas aside


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (QWEN25_TEMPLATE, "hermes"),
        (QWEN3_TEMPLATE, "hermes"),
        (QWEN3_CODER_TEMPLATE, "qwen3_coder"),
        ("{{ '<tool_call>\\n<function=' + name + '>' }}", "qwen3_coder"),
        ("{{ messages }}", "hermes"),
        ("", "hermes"),
        (None, "hermes"),
    ],
)
def test_detect_format(template: str | None, expected: str) -> None:
    assert detect_format(template) == expected
    assert resolve_format("auto", template) == expected


def test_resolve_format_overrides_and_rejects() -> None:
    assert resolve_format("hermes", QWEN3_CODER_TEMPLATE) == "hermes"
    assert resolve_format("qwen3_coder") == "qwen3_coder"
    with pytest.raises(ValueError, match=r"unknown tool-call format 'xml'; known: auto, hermes, qwen3_coder"):
        resolve_format("xml")
    with pytest.raises(ValueError, match="unknown tool-call format"):
        new_parser("json")


def test_import_loads_neither_vllm_nor_torch() -> None:
    code = (
        "import sys, qwenrun.toolcalls, qwenrun.weights.tiny; "
        "sys.exit(any(m in sys.modules for m in ('vllm', 'torch', 'transformers')))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
