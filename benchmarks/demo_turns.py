"""The demo's turns on the real small model: tokens and model time per turn, before and after the
loop's defences against a small model's habits (issue 27), side by side in one run.

``agents/weather-small.yaml`` on Qwen2.5-Coder-0.5B-Instruct (``qwenrun model fetch``), one vLLM
engine for both sides. Each demo question is asked in a fresh session, as ``bash scripts/demo.sh
"<question>"`` does:

* **before**: ``agent.stop_repeated_calls: false`` and ``agent.extra_arguments: reject`` (what
  qwenrun did until then): a call written again after its result runs on to ``max_tokens``; a
  call with an argument the schema does not declare is refused by the tool;
* **after**: the defaults: the model call stops as soon as the repeat is complete; the undeclared
  argument is dropped before the call runs.

Sampling is greedy (temperature 0, as the file says), so the tokens are the same every run; model
time (the sum of the model calls' wall time, as ``Usage.duration_s`` measures it) depends on the
machine and its load. Rounds alternate the order of the two sides.

    python benchmarks/demo_turns.py                     # both questions, one round
    python benchmarks/demo_turns.py --quick             # the first question only
    python benchmarks/demo_turns.py --rounds 3 --json benchmarks/results/cpu/demo_turns.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, Notice, ToolCall, ToolResult, Usage
from qwenrun.spec.agent_file import AgentSpec

QUESTIONS = ("广州天气情况如何?", "那深圳呢？明天适合出门吗?")  # scripts/demo.sh: the default, the second
SIDES = {
    "before": ("agent.stop_repeated_calls=false", "agent.extra_arguments=reject"),
    "after": (),
}


async def turn(agent: Agent, question: str) -> dict[str, Any]:
    """One question in a fresh session: the tokens of each model call, model time, tool steps."""
    tokens: list[int] = []
    model_s = 0.0
    calls, notices, errors = 0, 0, 0
    final: Final | None = None
    async for event in agent.session(record=False).stream(question):
        if isinstance(event, Usage):
            tokens.append(event.completion_tokens)
            model_s += event.duration_s
        elif isinstance(event, ToolCall):
            calls += 1
        elif isinstance(event, ToolResult):
            errors += event.is_error
        elif isinstance(event, Notice):
            notices += 1
        elif isinstance(event, Final):
            final = event
    assert final is not None
    return {
        "question": question, "tokens": sum(tokens), "tokens_per_call": tokens, "model_s": round(model_s, 2),
        "tool_calls": calls, "tool_errors": errors, "notices": notices, "answer": final.text,
        "from_the_tool": "多云到晴" in final.text and "28~31℃" in final.text,
    }  # fmt: skip


async def main(args: argparse.Namespace) -> dict[str, Any]:
    base = [f"model.path={args.model}", "sessions.enabled=false"]
    specs = {side: AgentSpec.from_file(ROOT / "agents" / "weather-small.yaml", [*base, *sets])
             for side, sets in SIDES.items()}  # fmt: skip
    engine = VLLMEngine(specs["after"])
    await engine.start()
    try:
        agents = {side: Agent(spec, engine, load_tools(spec)) for side, spec in specs.items()}
        await agents["after"].session(record=False).ask("hi")  # warm-up: the first request's set-up
        questions = QUESTIONS[:1] if args.quick else QUESTIONS
        runs: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            order = list(SIDES) if round_ % 2 == 0 else list(SIDES)[::-1]
            for question in questions:
                for side in order:
                    row = {"round": round_, "side": side, **await turn(agents[side], question)}
                    runs.append(row)
                    print(f"[bench] round {round_} {side:6} {question}: {row['tokens']} tokens "
                          f"{row['tokens_per_call']}, {row['model_s']:.1f} s", flush=True)  # fmt: skip
    finally:
        await engine.shutdown()
    rows = []
    for question in questions:
        row: dict[str, Any] = {"question": question}
        for side in SIDES:
            mine = [run for run in runs if run["question"] == question and run["side"] == side]
            row[side] = {**mine[0], "model_s": statistics.median(run["model_s"] for run in mine)}
            row[side].pop("round"), row[side].pop("side"), row[side].pop("question")
        row["tokens_ratio"] = round(row["after"]["tokens"] / row["before"]["tokens"], 3)
        row["model_s_ratio"] = round(row["after"]["model_s"] / row["before"]["model_s"], 3)
        rows.append(row)
    print_table(rows, args.rounds)
    return {"rows": rows, "runs": runs, "rounds": args.rounds, "cpu": cpu_model(), "cores": os.cpu_count(),
            "model": args.model}  # fmt: skip


def print_table(rows: list[dict[str, Any]], rounds: int) -> None:
    median = f" (median of {rounds})" if rounds > 1 else ""
    print(
        f"\n| turn | side | tokens (per model call) | model s{median} | tool calls | answer from the tool |"
    )
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for row in rows:
        for side in SIDES:
            cell = row[side]
            per_call = " + ".join(str(n) for n in cell["tokens_per_call"])
            tool = f"{cell['tool_calls']}" + (
                f" ({cell['tool_errors']} refused)" if cell["tool_errors"] else ""
            )
            answer = "yes" if cell["from_the_tool"] else f"no: {cell['answer'][:40]!r}"
            print(f"| {row['question']} | {side} | {cell['tokens']} ({per_call}) | {cell['model_s']:.1f} | {tool} "
                  f"| {answer} |")  # fmt: skip
        print(f"| {row['question']} | **after / before** | **{row['tokens_ratio']:.2f}** | "
              f"**{row['model_s_ratio']:.2f}** | | |")  # fmt: skip


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="the model folder (default: `qwenrun model fetch qwen2.5-coder-0.5b`)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every question on both sides")
    parser.add_argument("--quick", action="store_true", help="the first question only")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.model is None:
        from qwenrun.weights.fetch import fetch

        args.model = str(fetch("qwen2.5-coder-0.5b"))
    return args


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    arguments = parse_args()
    report = asyncio.run(main(arguments))
    print("RESULT " + json.dumps(report, ensure_ascii=False), flush=True)
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(json.dumps(report, indent=1, ensure_ascii=False))
