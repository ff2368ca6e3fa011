"""The figures of docs/reliability.md and the tests that keep them true.

The doc holds one marked table (``<!-- figures:begin -->`` ... ``<!-- figures:end -->``) of
``| `key` | value | meaning |`` rows. Every reliability test that produces a figure (examples run,
faults injected, requests sent, losses, memory bounds) reads its number from that table with
:func:`figure`, runs exactly that much, asserts what it counted equals it, and writes what it
measured with :func:`record` to ``reliability-figures.json`` in pytest's base temp directory.
This module checks the table itself: every key is used by a test and the issue's minimums hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
ROW = re.compile(r"^\|\s*`(?P<key>[a-z0-9_]+)`\s*\|\s*(?P<value>[0-9][0-9,]*)\s*\|(?P<meaning>[^|]+)\|\s*$")

# Every figure of the table, and the test module that produces it.
PRODUCERS = {
    "yaml_text_mutations": "test_reliability_fuzz.py",
    "yaml_structure_mutations": "test_reliability_fuzz.py",
    "yaml_random_bytes": "test_reliability_fuzz.py",
    "http_random_json": "test_reliability_fuzz.py",
    "http_mutated_requests": "test_reliability_fuzz.py",
    "http_random_bytes": "test_reliability_fuzz.py",
    "http_server_errors": "test_reliability_fuzz.py",
    "tool_faults": "test_reliability_faults.py",
    "tool_hung_threads": "test_reliability_faults.py",
    "tool_big_result_bytes": "test_reliability_faults.py",
    "engine_faults": "test_reliability_faults.py",
    "load_sessions": "test_reliability_load.py",
    "load_rounds": "test_reliability_load.py",
    "load_requests": "test_reliability_load.py",
    "load_lost": "test_reliability_load.py",
    "load_mixed_up": "test_reliability_load.py",
    "load_round_timeout_s": "test_reliability_load.py",
    "load_rss_growth_limit_mib": "test_reliability_load.py",
    "load_rss_limit_mib": "test_reliability_load.py",
    "load_seeded_requests": "test_reliability_load.py",
    "load_seeded_lost": "test_reliability_load.py",
}


def doc_figures() -> dict[str, int]:
    """The marked table of docs/reliability.md as ``{key: value}``."""
    text = DOC.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{DOC}: one {BEGIN} ... {END} table"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    figures: dict[str, int] = {}
    for line in table.strip().splitlines():
        match = ROW.match(line.strip())
        if match is None:
            assert line.startswith("|") and ("---" in line or "Figure" in line), f"bad table row: {line!r}"
            continue
        key = match["key"]
        assert key not in figures, f"{key} appears twice in {DOC}"
        figures[key] = int(match["value"].replace(",", ""))
    return figures


def figure(key: str) -> int:
    """One figure of the doc's table (KeyError if the doc lacks it)."""
    return doc_figures()[key]


def record(tmp_path_factory: pytest.TempPathFactory, **values: float | int | str) -> Path:
    """Merge measured values into ``<basetemp>/reliability-figures.json`` (for humans and CI logs)."""
    path = tmp_path_factory.getbasetemp() / "reliability-figures.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def test_the_table_lists_exactly_the_produced_figures() -> None:
    figures = doc_figures()
    assert sorted(figures) == sorted(PRODUCERS)
    for key, module in PRODUCERS.items():
        source = (ROOT / "tests" / module).read_text(encoding="utf-8")
        assert f'figure("{key}")' in source, f"{module} does not read the figure {key}"


def test_the_figures_meet_the_issue() -> None:
    figures = doc_figures()
    yaml_total = sum(figures[key] for key in PRODUCERS if key.startswith("yaml_"))
    http_total = figures["http_random_json"] + figures["http_mutated_requests"] + figures["http_random_bytes"]
    assert yaml_total >= 2000 and http_total >= 1000
    assert figures["load_sessions"] == 200
    assert figures["load_requests"] == figures["load_sessions"] * figures["load_rounds"]
    assert figures["load_lost"] == figures["load_mixed_up"] == figures["http_server_errors"] == 0
