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
from pg_server import PostgresServer

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
    assert {row["case"] for row in report["linearity"]} == {"text", "calls", "rescues", "qwen3-coder tags"}
    assert [row["chunk_chars"] for row in report["agent"]] == [1, 4]
    assert json.loads(out.read_text()) == report


def test_cli_startup_quick(tmp_path: Path) -> None:
    out = tmp_path / "cli_startup.json"
    report = result_of(run("cli_startup.py", "--quick", "--json", str(out)))
    agents = len(list((ROOT / "agents").glob("*.yaml")))
    assert [row["command"] for row in report["commands"]] == [
        "python -c pass", "import qwenrun.cli", f"qwenrun validate ({agents} agents)"
    ]  # fmt: skip
    assert report["commands"][0]["wall_vs_python"] == 1.0
    assert json.loads(out.read_text()) == report


def test_plot_on_the_committed_results(tmp_path: Path) -> None:
    report = result_of(run("plot.py", "--results", str(BENCH / "results"), "--out", str(tmp_path)))
    written = [Path(path) for path in report["written"]]
    assert tmp_path / "agent_vs_raw.png" in written
    assert {tmp_path / "h200_ratio_vs_n.png", tmp_path / "h200_multiturn_turns.png"} <= set(written)
    for path in written:
        assert path.parent == tmp_path
        assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "script",
    [
        "server_vs_vllm.py",
        "transformers_baseline.py",
        "agent_vs_raw.py",
        "multiturn.py",
        "startup.py",
        "demo_turns.py",
        "four_way.py",
        "responses_store.py",
    ],
)
def test_engine_benchmarks_parse_their_arguments(script: str) -> None:
    done = run(script, "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--json" in done.stdout and ("--quick" in done.stdout or "--phases" in done.stdout)


def test_multiturn_on_the_fake_engine(tmp_path: Path) -> None:
    """Both sides of the multi-turn benchmark run the same turns with the tiny model's tokenizer
    and template (no vLLM engine): every session makes its tool call each turn, qwenrun's prompts
    are tokenized in its prompt thread, the raw loop's on the event loop."""
    from qwenrun.weights.tiny import build_tiny_model

    model = build_tiny_model(ROOT / ".cache" / "tiny-qwen2")
    out = tmp_path / "multiturn.json"
    report = result_of(run("multiturn.py", "--model", str(model), "--engine", "fake", "--quick", "--step-ms", "1",
                           "--json", str(out)))  # fmt: skip
    assert report["prompt_pieces"] is True and report["turns"] == 3 and report["tools"] == 4
    assert [row["n"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        raw, ours = row["raw"], row["qwenrun"]
        assert len(raw["per_turn"]) == len(ours["per_turn"]) == 3
        for a, b in zip(
            raw["per_turn"], ours["per_turn"], strict=True
        ):  # the same conversation (run ids differ)
            assert abs(a["call_prompt_tokens"] - b["call_prompt_tokens"]) < 0.01 * a["call_prompt_tokens"]
        assert ours["render_tokenize_loop_ms_per_turn"] == 0 < ours["render_tokenize_thread_ms_per_turn"]
        assert raw["render_tokenize_loop_ms_per_turn"] > 0 == raw["render_tokenize_thread_ms_per_turn"]
    assert json.loads(out.read_text()) == report


def test_store_benchmark_quick() -> None:
    pytest.importorskip("psycopg")
    done = run("store.py", "--quick")
    if done.returncode != 0 and "PostgreSQL server binaries" in done.stderr:
        pytest.skip("no PostgreSQL server binaries")
    report = result_of(done)
    assert [(row["turns"], row["store"]) for row in report["rows"]] == [
        (1, "sqlite"), (1, "postgres"), (10, "sqlite"), (10, "postgres"),
    ]  # fmt: skip
    for row in report["rows"]:  # what a row keeps: the whole conversation, or its own two items
        assert row["whole_stored_chars"] == row["turns"] * row["delta_stored_chars"]


def test_replicas_benchmark_quick(postgres: PostgresServer, tmp_path: Path) -> None:
    out = tmp_path / "replicas.json"
    report = result_of(run("replicas.py", "--quick", "--url", postgres.database(), "--json", str(out)))
    assert report["settings"]["conversations"] == 4 and report["settings"]["turns"] == 2
    assert [(row["replicas"], row["runs"]) for row in report["rows"]] == [(1, 1), (2, 1)]
    assert [run["turns"] for run in report["runs"]] == [8, 8]  # every turn answered with its whole history
    assert report["ratio"] == round(report["rows"][1]["turns_per_s"] / report["rows"][0]["turns_per_s"], 3)
    assert json.loads(out.read_text()) == report


def test_four_way_on_the_fake_engine(tmp_path: Path) -> None:
    """qwenrun's three sides of the four-way benchmark (pass-through with a client loop, agent mode,
    in-process) run the same sessions through a real qwenrun server on the tiny model's tokenizer
    (no vLLM engine): every turn makes its one pinned call and a full-length answer, the prompts are
    the same conversation on every side, and the GC policies are applied in the server's process."""
    from qwenrun.weights.tiny import build_tiny_model

    model = build_tiny_model(ROOT / ".cache" / "tiny-qwen2")
    out, table = tmp_path / "four_way.json", tmp_path / "four_way.md"
    report = result_of(run("four_way.py", "--model", str(model), "--engine", "fake", "--sides", "b,c,d", "--quick",
                           "--warmup", "0", "--step-ms", "1", "--gc-variants", "freeze,nofreeze", "--gc-at",
                           "single:1", "--gc-sides", "d", "--gc-repeat", "1", "--json", str(out),
                           "--table", str(table)))  # fmt: skip
    main = [row for row in report["runs"] if row["variant"] is None]
    assert sorted((r["workload"], r["n"], r["side"]) for r in main) == sorted(
        (w, n, s) for w in ("single", "multi") for n in (1, 4) for s in "bcd"
    )
    for row in report["runs"]:
        assert row["errors"] == row["bad_turns"] == 0, row
        turns = 1 if row["workload"] == "single" else 3
        assert row["turns_done"] == row["turns_expected"] == row["n"] * turns
    for workload in ("single", "multi"):  # the same conversation (the run ids differ in a few tokens)
        prompts = [r["prompt_tokens_per_turn"] for r in main if r["workload"] == workload]
        assert max(prompts) - min(prompts) < 0.02 * min(prompts), prompts
    assert [(state["policy"], state["frozen"] > 0) for state in report["gc_states"]] == [
        ("freeze", True), ("nofreeze", False), ("freeze", True)
    ]  # fmt: skip
    assert {row["key"] for row in report["runs"] if row["variant"]} == {"d@freeze", "d@nofreeze"}
    assert json.loads(out.read_text()) == report
    assert "(c) qwenrun agent mode" in table.read_text()


def test_plot_of_a_four_way_report(tmp_path: Path) -> None:
    """plot.py draws four_way.png from the reports in results/four-way/ (here: the CPU smoke's)."""
    (tmp_path / "four-way").mkdir()
    (tmp_path / "four-way" / "fw-1.json").write_bytes(
        (BENCH / "results/cpu/four_way_quick.json").read_bytes()
    )
    report = result_of(run("plot.py", "--results", str(tmp_path), "--out", str(tmp_path)))
    assert report["written"] == [str(tmp_path / "four_way.png")]
    assert (tmp_path / "four_way.png").read_bytes().startswith(b"\x89PNG")
