"""qwenrun's agent loop vs a hand-written loop on vLLM's engine: the same weather sessions.

Each session is the seed's two-phase flow: the model calls ``get_current_weather(city="广州")``
(pinned by the same regex on both sides, so the same tokens come out), the tool runs, its result
goes back as a ``tool`` message, and the model answers with exactly ``--answer-tokens`` tokens
(``ignore_eos``). Both sides share ONE vLLM engine and run alternately, N sessions at a time.

    python benchmarks/agent_vs_raw.py --model .cache/tiny-qwen2 --quick        # CPU smoke
    python benchmarks/agent_vs_raw.py --model /tmp/qwen7b-dummy --load-format dummy \\
        --dtype bfloat16 --sessions 1,16,64,256 --json out.json                  # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenrun.agent import Agent
from qwenrun.engines.scripted import PinnedEngine, literal_regex
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls.hermes import FORCED_PREFILL

CALL = json.dumps({"name": "get_current_weather", "arguments": {"city": "广州"}}, ensure_ascii=False)
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def get_current_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 广州.
    """
    return f"目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


async def get_current_weather_async(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 广州.
    """
    return f"目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


def questions(n: int) -> list[str]:
    return [f"第{i}位用户问：广州天气情况如何?" for i in range(n)]


TOOL_CALLS: list[int] = []  # tool calls per qwenrun session (each must make exactly one)


async def qwenrun_session(agent: Agent, question: str) -> int:
    final = await agent.session().ask(question)
    TOOL_CALLS.append(final.tool_calls)
    return final.usage.completion_tokens


def no_tool_calls(tokenizer: Any) -> dict[int, float]:
    """A logit bias that keeps the model from opening a tool call (the ``<tool_call>`` token)."""
    return {int(tokenizer.convert_tokens_to_ids("<tool_call>")): -100.0}


def raw_session_factory(
    llm: Any, tokenizer: Any, tools: list[dict[str, Any]], args: argparse.Namespace, answer: dict[str, Any]
) -> Callable[[str], Awaitable[int]]:
    """The hand-written loop: chat template, vLLM generate, json.loads, tool, generate again."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    common = {
        "temperature": 0.45,
        "top_p": 0.9,
        "skip_special_tokens": False,
        "output_kind": RequestOutputKind.DELTA,
    }
    call_params = SamplingParams(
        max_tokens=64, structured_outputs=StructuredOutputsParams(regex=literal_regex(CALL)), **common
    )
    answer_params = SamplingParams(**answer, **common)

    async def generate(messages: list[dict[str, Any]], params: Any, prefill: str) -> tuple[str, int]:
        prompt = (
            tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
            + prefill
        )
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        text, count = "", 0
        async for out in llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
            text += out.outputs[0].text
            count += len(out.outputs[0].token_ids)
        return text, count

    async def session(question: str) -> int:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ]
        text, first = await generate(messages, call_params, FORCED_PREFILL)
        call = json.loads(text)
        if args.tool == "async":
            result = await get_current_weather_async(**call["arguments"])
        else:
            result = get_current_weather(**call["arguments"])
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "call_0", "type": "function", "function": call}],
            }
        )
        messages.append({"role": "tool", "tool_call_id": "call_0", "name": call["name"], "content": result})
        _, second = await generate(messages, answer_params, "")
        return first + second

    return session


T = TypeVar("T")


class Probe:
    """What the event loop went through during one run: its lag (how late a 5 ms sleep woke up: the
    longest stretch of work that held the loop) and the garbage collector's pauses."""

    PERIOD_S = 0.005

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.gc_pauses: list[tuple[int, float]] = []
        self._gc_started = 0.0

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.PERIOD_S)
            self.lags.append(loop.time() - before - self.PERIOD_S)

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses.append((info["generation"], time.perf_counter() - self._gc_started))

    async def timed(self, work: Awaitable[T]) -> tuple[T, float]:
        """``work``'s result and its wall time, with the loop and the collector watched meanwhile."""
        watcher = asyncio.ensure_future(self.watch())
        gc.callbacks.append(self.on_gc)
        started = time.perf_counter()
        try:
            result = await work
            return result, time.perf_counter() - started
        finally:
            gc.callbacks.remove(self.on_gc)
            watcher.cancel()

    def report(self) -> dict[str, float]:
        lags = sorted(self.lags) or [0.0]
        return {
            "loop_lag_max_ms": round(1e3 * lags[-1], 1),
            "loop_lag_p99_ms": round(1e3 * lags[min(len(lags) - 1, int(0.99 * len(lags)))], 1),
            "gc_ms": round(1e3 * sum(pause for _, pause in self.gc_pauses), 1),
            "gc_max_ms": round(1e3 * max((pause for _, pause in self.gc_pauses), default=0.0), 1),
            "gc_gen2": sum(1 for generation, _ in self.gc_pauses if generation == 2),
        }


async def measure(run: Callable[[str], Awaitable[int]], n: int) -> dict[str, float]:
    latencies: list[float] = []

    async def timed(question: str) -> int:
        started = time.perf_counter()
        tokens = await run(question)
        latencies.append(time.perf_counter() - started)
        return tokens

    probe = Probe()
    counts, wall = await probe.timed(asyncio.gather(*(timed(q) for q in questions(n))))
    tokens = sum(counts)
    latencies.sort()
    return {
        "sessions": n,
        "wall_s": round(wall, 3),
        "sessions_per_s": round(n / wall, 3),
        "gen_tok_per_s": round(tokens / wall, 1),
        "tokens": tokens,
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "max_s": round(latencies[-1], 3),
        **probe.report(),
    }


def describe(name: str, run: dict[str, float]) -> str:
    return (
        f"{name} {run['sessions_per_s']:.2f} sess/s (wall {run['wall_s']:.3f} s, slowest {run['max_s']:.3f} s, "
        f"loop lag max {run['loop_lag_max_ms']} ms, gc {run['gc_ms']} ms max {run['gc_max_ms']} ms "
        f"gen2 {run['gc_gen2']})"
    )


def _median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {key: round(statistics.median(row[key] for row in rows), 3) for key in keys}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    spec = AgentSpec.from_dict(
        {
            "model": {"path": args.model},
            "engine": {
                "dtype": args.dtype,
                "load_format": args.load_format,
                "max_model_len": args.max_model_len,
                "gpu_memory_utilization": args.gpu_memory_utilization,
                "max_num_seqs": args.max_num_seqs,
                "enforce_eager": args.enforce_eager,
                "tensor_parallel_size": args.tp,
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1"} if args.cpu else {},
            },
            "sampling": {"temperature": 0.45, "top_p": 0.9, "max_tokens": args.answer_tokens},
            "agent": {"system_prompt": SYSTEM, "tool_choice": "get_current_weather", "max_iterations": 3},
            "tools": [{"name": "get_current_weather"}],
        },
        source="benchmark",
    )
    engine = VLLMEngine(spec)
    started = time.perf_counter()
    await engine.start()
    report: dict[str, Any] = {
        "startup_s": round(time.perf_counter() - started, 1),
        "tool": args.tool,
        "rows": [],
    }
    print(f"[bench] engine start-up {report['startup_s']} s", flush=True)
    tool = get_current_weather_async if args.tool == "async" else get_current_weather
    tool.__name__ = "get_current_weather"
    llm = engine._engine  # the same AsyncLLM, driven by hand on the raw side
    tokenizer = llm.get_tokenizer()
    if asyncio.iscoroutine(tokenizer):
        tokenizer = await tokenizer
    # Random weights write the <tool_call> token now and then inside the answer: qwenrun would then
    # run (and repair) a second call, which the raw loop ignores. Both sides ban it in the answer.
    answer = {"max_tokens": args.answer_tokens, "ignore_eos": True, "logit_bias": no_tool_calls(tokenizer)}
    pinned = PinnedEngine(engine, CALL, call_max_tokens=64, keep_requests=False, answer_overrides=answer)
    agent = Agent(spec, pinned, tools=[tool])
    raw = raw_session_factory(llm, tokenizer, agent.tool_schemas(), args, answer)
    ours = lambda q: qwenrun_session(agent, q)  # noqa: E731
    warm = max(args.sessions)  # warm-up at the largest batch: grammar compile, kernels, graph shapes
    await measure(raw, warm)
    await measure(ours, warm)
    for n in args.sessions:
        pairs = []
        for rep in range(args.repeat):
            first, second = (raw, ours) if rep % 2 == 0 else (ours, raw)
            a = await measure(first, n)
            b = await measure(second, n)
            pairs.append((a, b) if first is raw else (b, a))
            raw_run, our_run = pairs[-1]
            print(
                f"[bench]   N={n} rep {rep}: {describe('raw', raw_run)}; {describe('qwenrun', our_run)}",
                flush=True,
            )
        # the median run of each side (with 2 repeats: the mean of the two)
        raw_row = _median_row([p[0] for p in pairs])
        our_row = _median_row([p[1] for p in pairs])
        ratio = our_row["sessions_per_s"] / raw_row["sessions_per_s"]
        row = {
            "n": n,
            "raw": raw_row,
            "qwenrun": our_row,
            "ratio": round(ratio, 3),
            "reps": [[p[0]["sessions_per_s"], p[1]["sessions_per_s"]] for p in pairs],
            "runs": [{"raw": p[0], "qwenrun": p[1]} for p in pairs],
        }
        report["rows"].append(row)
        print(
            f"[bench] N={n:<4} raw {raw_row['sessions_per_s']:8.2f} sess/s {raw_row['gen_tok_per_s']:9.1f} tok/s "
            f"p50 {raw_row['p50_s']:.3f} p99 {raw_row['p99_s']:.3f} | qwenrun {our_row['sessions_per_s']:8.2f} "
            f"sess/s {our_row['gen_tok_per_s']:9.1f} tok/s p50 {our_row['p50_s']:.3f} p99 {our_row['p99_s']:.3f}"
            f" | ratio {ratio:.3f}",
            flush=True,
        )
    report["qwenrun_sessions"] = len(TOOL_CALLS)
    report["qwenrun_sessions_with_one_tool_call"] = TOOL_CALLS.count(1)
    print(
        f"[bench] qwenrun sessions: {len(TOOL_CALLS)}, with exactly one tool call: {TOOL_CALLS.count(1)}",
        flush=True,
    )
    if args.single_stream:
        one = await measure(raw, 1)
        report["single_stream_tok_s"] = one["gen_tok_per_s"]
        print(f"[bench] single stream decode: {one['gen_tok_per_s']} tok/s", flush=True)
    await engine.shutdown()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sessions", default="1,16,64")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--tool",
        choices=["sync", "async"],
        default="async",
        help="the weather tool as a plain function (qwenrun runs it in a worker thread) "
        "or a coroutine function like the qwenrun-weather plugin's (run on the loop)",
    )
    parser.add_argument("--single-stream", action="store_true", help="also time 1 raw session alone")
    parser.add_argument("--cpu", action="store_true", help="set VLLM_CPU_KVCACHE_SPACE=1")
    parser.add_argument("--quick", action="store_true", help="smoke: 1 and 4 sessions, 8 tokens, 1 repeat")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.sessions = [int(n) for n in args.sessions.split(",")]
    if args.quick:
        args.sessions, args.answer_tokens, args.repeat = [1, 4], 8, 1
    return args


if __name__ == "__main__":
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    print("[bench] RESULT " + json.dumps(result), flush=True)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=1))
