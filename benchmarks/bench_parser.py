"""Microbenchmarks of qwenrun's pure-Python hot paths: the Hermes parser and the agent loop.

1. ``hermes.parse`` (one-shot) and ``hermes.StreamParser`` fed in chunks of 1, 4 and 16 characters,
   over realistic Qwen2.5 answers with 0, 1 and 3 tool calls: µs per call and µs per KB.
2. Linearity: the same work on an input 4x longer, for plain text, many calls, the adversarial
   "rescue" input (every block ends in a string left open), and a Qwen3-Coder value full of tags
   that are not structural, fed one character at a time; the time ratio should be ~4 (16 would be
   quadratic). These are the scaling checks that used to be timed tests.
3. The agent loop's overhead per model step: one weather turn (forced tool call, tool, answer) on
   ``qwenrun.engines.scripted.ScriptedEngine``, against iterating the very same deltas raw, and against a
   minimal hand-written loop (raw deltas + ``hermes.parse`` + the tool + the messages).

No vLLM, no model, no timing assertion: it prints a table and one ``RESULT {json}`` line.

    python benchmarks/bench_parser.py            # ~30 s
    python benchmarks/bench_parser.py --quick    # ~1 s (smoke test)
    python benchmarks/bench_parser.py --json benchmarks/results/cpu/bench_parser.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenrun.agent import Agent
from qwenrun.engines.base import Request
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.events import Final
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls import Qwen3CoderParser, base, hermes
from qwenrun.toolcalls.hermes import FORCED_PREFILL

CHUNK_SIZES = (1, 4, 16)

PROSE = (
    "根据查询结果，广州今天多云到晴，气温28~31℃，吹轻微的偏北风，空气质量良好。"
    "The afternoon stays warm and humid, so light clothes and sunscreen are a good idea; "
    "an umbrella is not needed unless you go out late in the evening. "
    "明天预计仍以多云为主，早晚温差不大，适合户外活动。如果您需要未来一周的预报，请告诉我。"
)


def answers() -> dict[str, str]:
    """Realistic Qwen2.5 outputs: an answer without calls, one call, three calls (with text)."""
    one = tool_call_text("get_current_weather", {"city": "广州"})
    three = "我来分别查询这三个城市的天气。\n" + "\n".join(
        tool_call_text(name, args)
        for name, args in [
            ("get_current_weather", {"city": "广州", "unit": "celsius"}),
            ("get_current_weather", {"city": "深圳", "unit": "celsius"}),
            (
                "get_forecast",
                {"city": "北京", "days": 3, "fields": ["temp", "wind"], "detail": {"hourly": False}},
            ),
        ]
    )
    return {"0 calls": PROSE * 2, "1 call": one, "3 calls": three}


def ids() -> Callable[[], str]:
    """A cheap deterministic id factory (uuid4 would dominate the small cases)."""
    count = iter(range(1 << 62))
    return lambda: f"call_{next(count)}"


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream_parse(pieces: list[str]) -> base.ParseResult:
    parser = hermes.StreamParser(ids())
    for piece in pieces:
        parser.feed(piece)
    parser.finish()
    return parser.result()


def per_call_us(fn: Callable[[], object], repeat: int, budget_s: float) -> float:
    """Best of ``repeat`` timeit runs, each sized to take about ``budget_s``; µs per call."""
    timer = timeit.Timer(fn)
    once = timer.timeit(number=1)  # also a warm-up
    number = max(1, int(budget_s / max(once, 1e-7)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def bench_parser(repeat: int, budget_s: float) -> list[dict[str, Any]]:
    rows = []
    for label, text in answers().items():
        expected = hermes.parse(text, ids())
        kb = len(text.encode()) / 1024
        row: dict[str, Any] = {
            "answer": label,
            "chars": len(text),
            "bytes": len(text.encode()),
            "calls": len(expected.tool_calls),
        }
        us = per_call_us(lambda text=text: hermes.parse(text, ids()), repeat, budget_s)  # type: ignore[misc]
        row["oneshot_us"], row["oneshot_us_per_kb"] = round(us, 2), round(us / kb, 2)
        for size in CHUNK_SIZES:
            pieces = chunks(text, size)
            got = stream_parse(pieces)
            assert got.content == expected.content and len(got.tool_calls) == len(expected.tool_calls)
            us = per_call_us(lambda pieces=pieces: stream_parse(pieces), repeat, budget_s)  # type: ignore[misc]
            row[f"stream{size}_us"], row[f"stream{size}_us_per_kb"] = round(us, 2), round(us / kb, 2)
            row[f"stream{size}_us_per_chunk"] = round(us / len(pieces), 3)
        rows.append(row)
    return rows


# -- linearity (the idea of the former timed test: 4x the input should take ~4x the time) ----------

LINEAR_CASES = {
    "text": ("", "x"),
    "calls": ("", tool_call_text("f", {"s": "ab"})),
    "rescues": ('<tool_call>"</tool_call>', '<tool_call>\\"</tool_call>'),  # strings left open: re-reads
}


def linear_workload(prefix: str, unit: str, n: int) -> Callable[[], object]:
    block = '<tool_call>{"name": "f", "arguments": {"s": "' + "y" * n + '"}}'
    text = prefix + unit * (n // len(unit))
    block_chars = list(block)
    text_chunks = chunks(text, 3)

    def go() -> None:
        stream_parse(block_chars)  # one big block, 1-char chunks
        hermes.parse(text, ids())
        stream_parse(text_chunks)

    return go


TAGS_PIECE = '</tool_call>" <parameter=s>\n</function> x <tool_call> </parameter>x\n'


def qwen3_coder_workload(n: int) -> Callable[[], object]:
    """A Qwen3-Coder call whose value is full of tags that are not structural, fed one character
    at a time (the former timed test of tests/test_toolcalls_qwen3_coder.py)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string"}}}}}]  # fmt: skip
    value = TAGS_PIECE * max(1, n // len(TAGS_PIECE))
    text = f"<tool_call>\n<function=f>\n<parameter=s>\n{value}\n</parameter>\n</function>\n</tool_call>"

    def go() -> None:
        parser = Qwen3CoderParser(tools, ids())
        for char in text:
            parser.feed(char)
        parser.finish()

    return go


def linear_workloads() -> dict[str, Callable[[int], Callable[[], object]]]:
    workloads: dict[str, Callable[[int], Callable[[], object]]] = {
        label: lambda n, prefix=prefix, unit=unit: linear_workload(prefix, unit, n)
        for label, (prefix, unit) in LINEAR_CASES.items()
    }
    workloads["qwen3-coder tags"] = qwen3_coder_workload
    return workloads


def bench_linearity(n: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for label, workload in linear_workloads().items():
        small = min(timeit.repeat(workload(n), repeat=repeat, number=1))
        large = min(timeit.repeat(workload(4 * n), repeat=repeat, number=1))
        rows.append(
            {
                "case": label,
                "n": n,
                "small_ms": round(small * 1e3, 2),
                "large_ms": round(large * 1e3, 2),
                "ratio_4x": round(large / small, 2),
            }
        )
    return rows


# -- the agent loop's overhead per model step -----------------------------------------------------

QUESTION = "广州天气情况如何?"
CALL_TEXT = tool_call_text("get_current_weather", {"city": "广州"})
ANSWER_TEXT = PROSE


def get_current_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 广州.
    """
    return f"目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


def script(request: ModelRequest) -> str:
    return ANSWER_TEXT if request.messages[-1]["role"] == "tool" else CALL_TEXT


def make_agent(chunk_size: int) -> tuple[Agent, ScriptedEngine]:
    spec = AgentSpec.from_dict(
        {
            "model": {"path": "scripted"},
            "agent": {"tool_choice": "get_current_weather", "max_iterations": 3},
            "tools": [{"name": "get_current_weather"}],
        },
        source="bench_parser",
    )
    engine = ScriptedEngine(script, chunk_size=chunk_size)
    return Agent(spec, engine, tools=[get_current_weather]), engine


async def raw_turn(agent: Agent, engine: ScriptedEngine) -> int:
    """The same two model calls, deltas iterated and dropped: the floor. Returns the delta count."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
    count = 0
    async for _ in engine.generate(Request(messages=messages, prefill=FORCED_PREFILL)):
        count += 1
    messages = [*messages, {"role": "tool", "content": "x"}]
    async for _ in engine.generate(Request(messages=messages)):
        count += 1
    return count


async def hand_turn(agent: Agent, engine: ScriptedEngine) -> int:
    """A minimal hand-written loop: join the text, parse it, run the tool, call again."""
    tools = agent.tool_schemas()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": agent.system_prompt},
        {"role": "user", "content": QUESTION},
    ]
    count, text = 0, ""
    async for delta in engine.generate(Request(messages=messages, tools=tools, prefill=FORCED_PREFILL)):
        text += delta.text
        count += 1
    call = hermes.parse(text).tool_calls[0]
    result = get_current_weather(**call.arguments)
    messages += [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json()},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result},
    ]
    text = ""
    async for delta in engine.generate(Request(messages=messages, tools=tools)):
        text += delta.text
        count += 1
    return count


async def agent_turn(agent: Agent, engine: ScriptedEngine) -> int:
    final = await agent.session().ask(QUESTION)
    assert isinstance(final, Final) and final.tool_calls == 1, final
    return 0  # counted from the engine's calls instead


async def time_turns(
    turn: Callable[[Agent, ScriptedEngine], Awaitable[int]], chunk_size: int, turns: int, repeat: int
) -> tuple[float, int]:
    """Best seconds per turn over ``repeat`` runs of ``turns`` sequential turns; deltas per turn."""
    agent, engine = make_agent(chunk_size)
    deltas_per_turn = (
        len(chunks(CALL_TEXT.removeprefix("<tool_call>\n"), chunk_size))
        + len(chunks(ANSWER_TEXT, chunk_size))
        + 3
    )  # + the prefill's delta and the two final empty deltas
    best = float("inf")
    for _ in range(repeat):
        engine.calls.clear()
        started = time.perf_counter()
        for _ in range(turns):
            count = await turn(agent, engine)
            assert count in (0, deltas_per_turn), (count, deltas_per_turn)
        best = min(best, (time.perf_counter() - started) / turns)
    return best, deltas_per_turn


async def bench_agent(turns: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for chunk_size in (1, 4):
        raw, deltas = await time_turns(raw_turn, chunk_size, turns, repeat)
        hand, _ = await time_turns(hand_turn, chunk_size, turns, repeat)
        ours, _ = await time_turns(agent_turn, chunk_size, turns, repeat)
        rows.append(
            {
                "chunk_chars": chunk_size,
                "deltas_per_turn": deltas,
                "raw_us_per_turn": round(raw * 1e6, 1),
                "hand_us_per_turn": round(hand * 1e6, 1),
                "agent_us_per_turn": round(ours * 1e6, 1),
                "raw_us_per_delta": round(raw * 1e6 / deltas, 2),
                "hand_us_per_delta": round(hand * 1e6 / deltas, 2),
                "agent_us_per_delta": round(ours * 1e6 / deltas, 2),
                "agent_overhead_us_per_delta": round((ours - raw) * 1e6 / deltas, 2),
                "agent_overhead_us_per_turn": round((ours - raw) * 1e6, 1),
                "agent_vs_hand_us_per_turn": round((ours - hand) * 1e6, 1),
            }
        )
    return rows


def fit_overhead(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The agent's overhead over raw as a fixed cost per turn plus a cost per delta (two sizes)."""
    (a, b) = rows[0], rows[-1]
    per_delta = (a["agent_overhead_us_per_turn"] - b["agent_overhead_us_per_turn"]) / (
        a["deltas_per_turn"] - b["deltas_per_turn"]
    )
    fixed = a["agent_overhead_us_per_turn"] - per_delta * a["deltas_per_turn"]
    return {"us_per_delta": round(per_delta, 2), "us_per_turn": round(fixed, 1)}


# -- report ---------------------------------------------------------------------------------------


def print_tables(report: dict[str, Any]) -> None:
    print("\nHermes parser (best of repeats)")
    head = f"{'answer':<8} {'bytes':>6} {'calls':>5} {'one-shot µs':>12} {'µs/KB':>8}"
    for size in CHUNK_SIZES:
        head += f" {f'stream c={size} µs':>16} {'µs/KB':>8}"
    print(head)
    for row in report["parser"]:
        line = f"{row['answer']:<8} {row['bytes']:>6} {row['calls']:>5} {row['oneshot_us']:>12.1f} "
        line += f"{row['oneshot_us_per_kb']:>8.1f}"
        for size in CHUNK_SIZES:
            line += f" {row[f'stream{size}_us']:>16.1f} {row[f'stream{size}_us_per_kb']:>8.1f}"
        print(line)
    print("\nLinearity: time for 4x the input (4 = linear, 16 = quadratic)")
    print(f"{'case':<16} {'n':>8} {'n ms':>9} {'4n ms':>9} {'ratio':>6}")
    for row in report["linearity"]:
        print(
            f"{row['case']:<16} {row['n']:>8} {row['small_ms']:>9.2f} {row['large_ms']:>9.2f} {row['ratio_4x']:>6.2f}"
        )
    print("\nAgent loop on ScriptedEngine: one weather turn (call -> tool -> answer), sequential")
    print(
        f"{'chunk':>5} {'deltas':>6} {'raw µs':>9} {'hand µs':>9} {'agent µs':>9} "
        f"{'raw µs/Δ':>9} {'agent µs/Δ':>10} {'overhead µs/Δ':>13} {'agent-hand µs':>13}"
    )
    for row in report["agent"]:
        print(
            f"{row['chunk_chars']:>5} {row['deltas_per_turn']:>6} {row['raw_us_per_turn']:>9.1f} "
            f"{row['hand_us_per_turn']:>9.1f} {row['agent_us_per_turn']:>9.1f} {row['raw_us_per_delta']:>9.2f} "
            f"{row['agent_us_per_delta']:>10.2f} {row['agent_overhead_us_per_delta']:>13.2f} "
            f"{row['agent_vs_hand_us_per_turn']:>13.1f}"
        )
    fit = report["agent_fit"]
    print(
        f"agent overhead over raw ≈ {fit['us_per_turn']:.0f} µs per turn (2 model calls, 1 tool) "
        f"+ {fit['us_per_delta']:.2f} µs per delta"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        repeat, budget, linear_n, turns = 2, 0.01, 2_000, 20
    else:
        repeat, budget, linear_n, turns = 5, 0.2, 50_000, 300
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "quick": args.quick,
        "parser": bench_parser(repeat, budget),
        "linearity": bench_linearity(linear_n, max(3, repeat)),
        "agent": asyncio.run(bench_agent(turns, repeat)),
    }
    report["agent_fit"] = fit_overhead(report["agent"])
    print_tables(report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke: small inputs, few repeats")
    parser.add_argument("--json", help="also write the report to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    result = main(arguments)
    print("RESULT " + json.dumps(result, ensure_ascii=False), flush=True)
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
