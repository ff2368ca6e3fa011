"""qwenrun.engines.scripted's helpers: the literal regex that pins forced calls on random-weight models."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from qwenrun.engines.scripted import literal_regex, tool_call_text


@given(st.text())
def test_literal_regex_matches_exactly_its_text(text: str) -> None:
    pattern = re.compile(literal_regex(text))
    assert pattern.fullmatch(text)
    assert not pattern.fullmatch(text + "x")


def test_literal_regex_leaves_what_xgrammar_cannot_read_unescaped() -> None:
    call = tool_call_text("get_current_weather", {"city": "广州 #1 & ~2-3"})
    pattern = literal_regex(call)
    assert "\\ " not in pattern and "\\#" not in pattern and "\\-" not in pattern
    assert "\n" not in pattern and "\\n" in pattern
    assert literal_regex("a.b*(c)[d]{e}|f+g?^$\\") == r"a\.b\*\(c\)\[d\]\{e\}\|f\+g\?\^\$\\"
