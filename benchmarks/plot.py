"""Plots of the benchmark results (matplotlib, Agg backend: no display needed).

Reads the JSON files under ``--results`` (default ``benchmarks/results``) and writes, into ``--out``
(default: the same folder):

* ``agent_vs_raw.png`` from ``agent-final/agent_vs_raw_tp1.json`` (the final H100 run of
  ``agent_vs_raw.py``): sessions/s of the hand-written vLLM loop and of qwenrun at each N, and their
  ratio, with the ratios of every earlier H100 run (``agent_vs_raw_tp1.json``, ``agent-*/``,
  ``tp-*/``) as labelled points; ``tp-first`` is left out (its raw side was measured cold).
* ``server_vs_vllm.png`` from ``cpu/server_vs_vllm.json`` (layout ``both``) and
  ``cpu/server_vs_vllm_one_final.json`` (layout ``one``) of ``server_vs_vllm.py``, and
  ``server_vs_vllm_h100.png`` from ``server-h100-final/*.json``, those present: req/s and p50 latency of
  qwenrun's OpenAI server and of vLLM's per mode and run, and the front-end process's CPU time per
  request against each run's req/s.
* ``h200_ratio_vs_n.png`` and ``h200_multiturn_turns.png`` from ``h200-perf2/`` (issue 22): the
  qwenrun/raw ratio against N for the single-turn runs, the multi-turn run and the single-turn run
  before issue 22; and per turn index of the multi-turn run, the render + tokenize time per session
  and the time to the answer's first token after the tool's result.

* ``four_way.png`` from ``four-way/*.json`` (issue 32: the parts of one ``four_way.py`` session, put
  there as they came back): per workload, sessions/s and p50 turn latency of sides (b), (c), (d)
  as ratios against (a) at each N, with each row's layout in the legend.

Prints one ``RESULT {json}`` line naming the files written.

    python benchmarks/plot.py
    python benchmarks/plot.py --results benchmarks/results --out /tmp/plots
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
RAW_COLOR, OURS_COLOR, VLLM_COLOR = "#7f7f7f", "#1f77b4", "#7f7f7f"
TARGET_AT_256 = 65  # sessions/s the issue asked for at N=256
IGNORED_RUNS = ("tp-first",)  # repeat 1 of the TP runs: the raw side was measured cold


def load(path: Path) -> Any:
    return json.loads(path.read_text())


FINAL_AGENT_RUN = "agent-final"
AGENT_TARGET_RATIO = 0.97


def earlier_agent_points(results: Path) -> list[tuple[str, list[int], list[float]]]:
    """(label, Ns, ratios) of each earlier H100 run, e.g. ('tp-second TP=2', [256], [0.717])."""
    paths = [results / "agent_vs_raw_tp1.json", *sorted(results.glob("agent-*/agent_vs_raw_tp1.json"))]
    paths += sorted(results.glob("tp-*/tp*.json"))
    points = []
    for path in paths:
        folder = path.parent.name
        if not path.exists() or folder in IGNORED_RUNS or folder == FINAL_AGENT_RUN:
            continue
        rows = load(path).get("rows", [])
        if path.parent == results:
            label = "first run"
        elif path.stem.startswith("tp"):
            label = f"{folder} TP={path.stem.removeprefix('tp')}"
        else:
            label = folder
        points.append((label, [int(row["n"]) for row in rows], [float(row["ratio"]) for row in rows]))
    return points


def plot_agent_vs_raw(results: Path, out: Path) -> Path | None:
    source = results / FINAL_AGENT_RUN / "agent_vs_raw_tp1.json"
    if not source.exists():
        return None
    report = load(source)
    rows = report["rows"]
    repeats = len(rows[0].get("reps", [])) or "?"
    ns = [row["n"] for row in rows]
    raw = [row["raw"]["sessions_per_s"] for row in rows]
    ours = [row["qwenrun"]["sessions_per_s"] for row in rows]
    ratio = [row["ratio"] for row in rows]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7.5, 8), sharex=True, gridspec_kw={"height_ratios": [2, 1.3]}
    )
    top.plot(ns, raw, "o--", color=RAW_COLOR, label="hand-written loop on vLLM (raw)")
    top.plot(ns, ours, "s-", color=OURS_COLOR, label="qwenrun agent loop")
    for n, value in zip(ns, ours, strict=True):
        top.annotate(f"{value:.1f}", (n, value), textcoords="offset points", xytext=(6, -12), fontsize=8)
    top.plot(
        [256],
        [TARGET_AT_256],
        "_",
        color="#d62728",
        markersize=22,
        markeredgewidth=2,
        label=f"target at N=256: {TARGET_AT_256} sessions/s",
    )
    top.set_xscale("log", base=2)
    top.set_xlim(0.7, 400)
    top.set_yscale("log")
    top.set_ylabel("sessions / s (higher is better)")
    top.set_title(
        "Weather sessions (tool call + 128-token answer), Qwen2.5-7B shape, bf16\n"
        f"1x H100 80GB, vLLM 0.26.0, TP=1, one shared engine, median of {repeats} alternated runs",
        fontsize=10,
    )
    top.grid(True, which="both", alpha=0.3)
    top.legend(loc="upper left")
    bottom.axhline(1.0, color="black", linewidth=0.8)
    bottom.axhline(AGENT_TARGET_RATIO, color="#d62728", linewidth=0.8, linestyle="--",
                   label=f"target {AGENT_TARGET_RATIO}")  # fmt: skip
    markers = iter(["^", "v", "D", "P", "X", "<", ">", "h", "*", "p"])
    for label, n_values, ratios in earlier_agent_points(results):
        bottom.plot(n_values, ratios, next(markers, "o"), linestyle=":", color=RAW_COLOR, alpha=0.6,
                    markersize=4, label=label)  # fmt: skip
    bottom.plot(ns, ratio, "s-", color=OURS_COLOR, linewidth=2, label=f"final ({FINAL_AGENT_RUN})")
    for n, value in zip(ns, ratio, strict=True):
        bottom.annotate(
            f"{value:.3f}", (n, value), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8
        )
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(ns, [str(n) for n in ns])
    bottom.set_xlabel("concurrent sessions N")
    bottom.set_ylabel("qwenrun / raw")
    bottom.set_ylim(0.6, 1.15)
    bottom.grid(True, alpha=0.3)
    bottom.legend(loc="lower left", fontsize=6, ncol=3)
    fig.tight_layout()
    target = out / "agent_vs_raw.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


# The final runs (one client per simulated user): layout both, layout one. The earlier runs,
# server_vs_vllm_both.json and server_vs_vllm_one.json, used one shared httpx pool in the client.
SERVER_FILES = ("server_vs_vllm.json", "server_vs_vllm_one_final.json")


H100_SERVER_FILES = ("rounds-2.json", "round-1.json")


def plot_server(results: Path, out: Path, folder: str = "cpu", files: tuple[str, ...] = SERVER_FILES,
                name: str = "server_vs_vllm.png") -> Path | None:  # fmt: skip
    reports = [{**load(results / folder / f), "file": f} for f in files if (results / folder / f).exists()]
    if not reports:
        return None
    fig, grid = plt.subplots(len(reports), 3, figsize=(13, 4.2 * len(reports)), squeeze=False)
    for axes, report in zip(grid, reports, strict=True):
        server_row(axes, report)
    cfg = reports[0]["config"]
    where = (
        f"tiny Qwen2 model on {cfg['cpus']} shared CPU cores"
        if folder == "cpu"
        else f"Qwen2.5-7B shape (dummy bf16 weights) on 1x H100, vLLM 0.26.0 ({folder})"
    )
    fig.suptitle(
        f"OpenAI chat completions, {where}: {cfg['requests']} requests "
        f"per run, concurrency {cfg['concurrency']}, {cfg['max_tokens']} tokens each\n"
        "bars: median of the rounds; dots: each run; the paired ratio is the median of the rounds' ratios",
        fontsize=9,
    )
    fig.tight_layout()
    target = out / name
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def server_row(axes: Any, report: dict[str, Any]) -> None:
    """req/s and p50 per mode (bars + runs), and front-end CPU per request against req/s."""
    modes = list(report["summary"])
    width = 0.35
    servers = (("vllm", VLLM_COLOR, "vLLM server"), ("qwenrun", OURS_COLOR, "qwenrun server"))
    layout = f"{report['file']}: layout {report['config']['layout']}, {report['config']['rounds']} rounds"
    for ax, metric, label, key in (
        (axes[0], "req_s", "requests / s (higher is better)", "paired_ratio_req_s"),
        (axes[1], "p50_s", "p50 latency, s (lower is better)", "paired_ratio_p50"),
    ):
        for i, mode in enumerate(modes):
            summary = report["summary"][mode]
            for j, (server, color, name) in enumerate(servers):
                x = i + (j - 0.5) * width
                ax.bar(
                    x,
                    summary[server][metric],
                    width * 0.9,
                    color=color,
                    alpha=0.7,
                    label=name if i == 0 else None,
                )
                points = [r[metric] for r in report["runs"] if r["mode"] == mode and r["server"] == server]
                ax.plot([x] * len(points), points, "k.", markersize=4)
            ratio = summary.get(key)
            if ratio is not None:
                ax.text(i, ax.get_ylim()[1] * 0.98, f"paired {ratio:.2f}", ha="center", va="top", fontsize=8)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel(label)
        ax.set_title(layout, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    ax = axes[2]
    for server, color, name in servers:
        for mode, marker in zip(modes, ("o", "s"), strict=False):
            rows = [r for r in report["runs"] if r["mode"] == mode and r["server"] == server]
            ax.plot(
                [r["req_s"] for r in rows],
                [r["front_cpu_ms_per_req"] for r in rows],
                marker,
                color=color,
                alpha=0.75,
                linestyle="none",
                label=f"{name}, {mode}",
            )
    ax.set_xlabel("requests / s of the run")
    ax.set_ylabel("front-end process CPU ms per request")
    ax.set_title("cost per request vs the run's regime", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


H200_RUNS = "h200-perf2"  # issue 22: benchmarks/gpu.sh agent (twice), multiturn, startup, server
H200_BASELINE = {1: 1.000, 16: 0.988, 64: 1.010, 256: 0.963}  # the same benchmark before issue 22


def multiturn_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows (one per N) of every ``multiturn*/multiturn.json`` under ``folder``, by N."""
    rows = [row for path in sorted(folder.glob("multiturn*/multiturn.json")) for row in load(path)["rows"]]
    return sorted(rows, key=lambda row: row["n"])


def plot_h200_ratios(results: Path, out: Path) -> Path | None:
    """qwenrun/raw sessions per second against N: the single-turn runs, the multi-turn run, and the
    single-turn run before issue 22."""
    folder = results / H200_RUNS
    agent_runs = sorted(folder.glob("agent-*/agent_vs_raw_tp1.json"))
    turns = multiturn_rows(folder)
    if not agent_runs and not turns:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ns = sorted(H200_BASELINE)
    ax.plot(ns, [H200_BASELINE[n] for n in ns], "--", color=RAW_COLOR, marker="x", label="single-turn, before")
    for index, path in enumerate(agent_runs, 1):
        rows = load(path)["rows"]
        ax.plot([r["n"] for r in rows], [r["ratio"] for r in rows], marker="o", color=OURS_COLOR,
                alpha=1.0 if index == 1 else 0.55, label=f"single-turn, run {index}")  # fmt: skip
    if turns:
        ax.plot([r["n"] for r in turns], [r["ratio"] for r in turns], marker="s", color="#d62728",
                label="6-turn sessions, 20 tools")  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.99, color="black", linewidth=0.6, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent sessions N")
    ax.set_ylabel("qwenrun / raw loop (sessions/s, median of 3)")
    ax.set_title("H200, vllm 0.26, Qwen2.5-7B shape (dummy bf16): qwenrun's agent loop vs a hand-written loop",
                 fontsize=8)  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "h200_ratio_vs_n.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_h200_turns(results: Path, out: Path) -> Path | None:
    """Per turn index of the multi-turn run: the client's render + tokenize time per session (raw:
    on the event loop; qwenrun: in its prompt thread), and the time to the answer's first token
    after the tool's result."""
    rows = multiturn_rows(results / H200_RUNS)
    if not rows:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        n = row["n"]
        turn = [t["turn"] for t in row["raw"]["per_turn"]]
        left.plot(turn, [t["render_tokenize_loop_ms_per_session"] for t in row["raw"]["per_turn"]], "--",
                  marker="x", color=RAW_COLOR, alpha=0.4 + 0.15 * rows.index(row), label=f"raw N={n}")  # fmt: skip
        left.plot(turn, [t["render_tokenize_thread_ms_per_session"] for t in row["qwenrun"]["per_turn"]],
                  marker="o", color=OURS_COLOR, alpha=0.4 + 0.15 * rows.index(row), label=f"qwenrun N={n}")  # fmt: skip
        if n <= 64:
            right.plot(turn, [t["ttft_p50_ms"] for t in row["raw"]["per_turn"]], "--", marker="x",
                       color=RAW_COLOR, alpha=0.4 + 0.2 * rows.index(row), label=f"raw N={n}")  # fmt: skip
            right.plot(turn, [t["ttft_p50_ms"] for t in row["qwenrun"]["per_turn"]], marker="o",
                       color=OURS_COLOR, alpha=0.4 + 0.2 * rows.index(row), label=f"qwenrun N={n}")  # fmt: skip
    left.set_title("chat template + tokenizer, ms per session and turn", fontsize=9)
    right.set_title("first answer token after the tool result, p50 ms", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("turn index (the history grows ~900 tokens a turn)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / "h200_multiturn_turns.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


FOUR_WAY_SIDES = {"b": ("qwenrun pass-through + client loop", "#ff7f0e"), "c": ("qwenrun agent mode", OURS_COLOR),
                  "d": ("qwenrun in-process", "#2ca02c")}  # fmt: skip


def plot_four_way(results: Path, out: Path, folder: str = "four-way") -> Path | None:
    """Ratios of (b), (c), (d) against (a) from every ``four_way.py`` report in ``folder``."""
    rows: list[dict[str, Any]] = []
    for path in sorted((results / folder).glob("*.json")):
        report = load(path)
        layout = f"{report['config']['layout']} {report['config']['gpu_memory_utilization']}"
        rows += [{**row, "layout": layout} for row in report.get("summary", []) if row.get("variant") is None]
    if not rows:
        return None
    workloads = [w for w in ("single", "multi") if any(r["workload"] == w for r in rows)]
    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 7), squeeze=False)
    for col, workload in enumerate(workloads):
        for row_index, (key, label) in enumerate((("sessions_per_s", "sessions/s"), ("turn_p50_s", "p50 turn latency"))):
            ax = axes[row_index][col]
            for side, (name, color) in FOUR_WAY_SIDES.items():
                mine = sorted((r for r in rows if r["workload"] == workload and r["key"] == side
                               and r.get(f"ratio_{key}") is not None), key=lambda r: r["n"])  # fmt: skip
                if mine:
                    ax.plot([r["n"] for r in mine], [r[f"ratio_{key}"] for r in mine], "o-", color=color, label=name)
                    for r in mine:
                        ax.annotate(r["layout"], (r["n"], r[f"ratio_{key}"]), fontsize=5, alpha=0.6)
            ax.axhline(1.0, color=RAW_COLOR, ls="--", lw=1, label="(a) client loop on vllm serve")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent sessions N")
            ax.set_ylabel(f"{label}, ratio to (a)")
            ax.set_title(f"{workload}-turn sessions: {label}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "four_way.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder of the JSON results")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: --results)")
    args = parser.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    plots = (
        plot_agent_vs_raw(args.results, out),
        plot_server(args.results, out),
        plot_server(args.results, out, "server-h100-final", H100_SERVER_FILES, "server_vs_vllm_h100.png"),
        plot_h200_ratios(args.results, out),
        plot_h200_turns(args.results, out),
        plot_four_way(args.results, out),
    )
    written = [p for p in plots if p]
    for path in written:
        print(f"wrote {path}")
    return {"written": [str(p) for p in written]}


if __name__ == "__main__":
    result = main()
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(0 if result["written"] else 1)
