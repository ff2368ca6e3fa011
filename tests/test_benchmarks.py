"""Smoke tests of the scripts in ``benchmarks/``: they run and print a ``RESULT {json}`` line.

No timing is asserted (benchmarks print ratios; a test on a shared CI box would only be flaky).
The engine-starting benchmarks are too slow for the suite: only their ``--help`` is run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def result_of(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, done.stdout[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def test_bench_parser_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench_parser.json"
    report = result_of(run("bench_parser.py", "--quick", "--json", str(out)))
    assert [row["answer"] for row in report["parser"]] == ["0 calls", "1 call", "3 calls"]
    assert [row["calls"] for row in report["parser"]] == [0, 1, 3]
    assert {row["case"] for row in report["linearity"]} == {"text", "calls", "rescues"}
    assert [row["chunk_chars"] for row in report["agent"]] == [1, 4]
    assert json.loads(out.read_text()) == report


def test_plot_on_the_committed_results(tmp_path: Path) -> None:
    report = result_of(run("plot.py", "--results", str(BENCH / "results"), "--out", str(tmp_path)))
    written = [Path(path) for path in report["written"]]
    assert tmp_path / "agent_vs_raw.png" in written
    for path in written:
        assert path.parent == tmp_path
        assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("script", ["server_vs_vllm.py", "transformers_baseline.py", "agent_vs_raw.py"])
def test_engine_benchmarks_parse_their_arguments(script: str) -> None:
    done = run(script, "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--quick" in done.stdout and "--json" in done.stdout
