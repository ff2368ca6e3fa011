"""Start-up: ``qwenrun up`` (front end ``openai``) against ``vllm serve``, same model and engine.

Each server is started as a subprocess and timed until ``/health`` answers 200, then until its
first chat completion has been answered (what a user waits for). Cold: a fresh, empty vLLM cache
folder (``VLLM_CACHE_ROOT``: torch.compile artefacts) for that server; warm: the same folder again,
as a second start on one machine has it (``--phases warm --cache-root`` of an earlier run's
caches, such as ``server_vs_vllm.py --cache-root``'s, measures warm starts alone). Both servers get their own folders, so neither inherits
the other's compile cache, and the order alternates between rounds (the file cache of the Python
packages is warm after the first start of either: the first start of the run is also reported).

    python benchmarks/startup.py --rounds 1                                        # CPU, tiny model
    python benchmarks/startup.py --model /tmp/qwen7b-dummy --dtype bfloat16 --load-format dummy \\
        --max-model-len 4096 --gpu-memory-utilization 0.85 --max-num-seqs 256 --no-enforce-eager  # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_vs_vllm import SERVED, SERVERS, EngineConfig, Server, cpu_model, start, stop, versions


async def first_answer_s(server: Server, started_at: float) -> float:
    """Seconds from the start of ``server`` until it answered its first chat completion."""
    body = {"model": SERVED, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    async with httpx.AsyncClient(timeout=600) as client:
        response = await client.post(server.base + "/v1/chat/completions", json=body)
    response.raise_for_status()
    return round(time.perf_counter() - started_at, 1)


async def one_start(name: str, args: argparse.Namespace, cache: Path, workdir: Path) -> dict[str, Any]:
    os.environ["VLLM_CACHE_ROOT"] = str(cache)  # server_env() copies os.environ
    began = time.perf_counter()
    server = await start(name, args.model, 8, workdir, args.startup_timeout, args.engine)
    try:
        answered = await first_answer_s(server, began)
    finally:
        await stop(server)
    return {"health_s": server.startup_s, "first_answer_s": answered}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {"cold": [], "warm": []} for n in SERVERS}
    starts: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        order = SERVERS if round_ % 2 == 0 else SERVERS[::-1]
        for phase in args.phases:
            for name in order:
                # empty for "cold", filled by the cold start (or an earlier benchmark) for "warm"
                cache = Path(args.cache_root or workdir / "cache") / (
                    name if round_ == 0 else f"{name}-{round_}"
                )
                if phase == "cold" and cache.exists() and any(cache.iterdir()):
                    raise SystemExit(f"{cache} is not empty: a cold start needs a fresh cache folder")
                result = await one_start(name, args, cache, workdir)
                results[name][phase].append(result)
                starts.append({"server": name, "phase": phase, "round": round_, **result})
                print(f"[bench] round {round_} {phase:4} {name:7} /health {result['health_s']:6.1f} s, "
                      f"first answer {result['first_answer_s']:6.1f} s", flush=True)  # fmt: skip
    summary = {
        name: {
            phase: {key: statistics.median(r[key] for r in runs) for key in ("health_s", "first_answer_s")}
            for phase, runs in phases.items()
            if runs
        }
        for name, phases in results.items()
    }
    for phase in args.phases:
        ours, theirs = summary["qwenrun"][phase], summary["vllm"][phase]
        print(f"[bench] {phase}: qwenrun {ours['health_s']:.1f} s / vLLM {theirs['health_s']:.1f} s to /health "
              f"(ratio {ours['health_s'] / theirs['health_s']:.3f}); first answer {ours['first_answer_s']:.1f} / "
              f"{theirs['first_answer_s']:.1f} s", flush=True)  # fmt: skip
    return {"starts": starts, "summary": summary, "cpu": cpu_model(), "versions": versions(),
            "engine": vars(args.engine)}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=str(Path(__file__).resolve().parent.parent / ".cache" / "tiny-qwen2")
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (cold, warm) x both servers")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--no-enforce-eager", action="store_true", help="GPU: torch.compile and CUDA graphs")
    parser.add_argument(
        "--logs", help="keep the server logs (and caches, without --cache-root) in this folder"
    )
    parser.add_argument("--cache-root", help="each server's VLLM_CACHE_ROOT is this folder / its name")
    parser.add_argument("--phases", default="cold,warm", help="cold: fresh caches; warm: the caches again")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.model = str(Path(args.model).resolve())
    args.phases = args.phases.split(",")
    args.engine = EngineConfig(args.dtype, args.load_format, args.max_model_len, args.gpu_memory_utilization,
                               args.max_num_seqs, not args.no_enforce_eager)  # fmt: skip
    return args


if __name__ == "__main__":
    arguments = parse_args()
    report = asyncio.run(main(arguments))
    print("RESULT " + json.dumps(report), flush=True)
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(json.dumps(report, indent=1))
