"""The Responses API with ``previous_response_id`` chains (issue 32, item 3): qwenrun's server with
its SQLite and PostgreSQL stores against ``vllm serve``'s Responses API with its in-memory store
(``VLLM_ENABLE_RESPONSES_API_STORE=1``), on one engine configuration, one side at a time.

``--chains`` clients each run chains of ``--chain-length`` responses (every response continues
the previous one with ``previous_response_id``) until ``--responses`` responses are stored. For
each side it reports the responses per second, the p50/p99 latency, the errors, and the resident
memory of the server's front-end process (where the stores live) after a warm-up and after the
run: what keeping those responses costs it. Throughput on two shared CPUs says little; the memory
does not depend on the machine.

    python benchmarks/responses_store.py --quick                 # 200 responses a side
    python benchmarks/responses_store.py --json benchmarks/results/cpu/responses_store.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import server_vs_vllm as servers  # noqa: E402
from server_vs_vllm import SERVED  # noqa: E402

SIDES = ("vllm", "sqlite", "postgres")
QUESTION = "广州今天的天气怎么样？请简单地回答，谢谢。"


def qwenrun_yaml(
    args: argparse.Namespace, engine: servers.EngineConfig, port: int, store: str, where: str
) -> str:
    """qwenrun's server (pass-through: ``model`` is the served name) on ``engine``, with its
    responses kept in ``store`` (SQLite file ``where``, or the PostgreSQL URL ``where``)."""
    base = servers.qwenrun_yaml(args.model, port, args.max_output_tokens, engine)
    key = "path" if store == "sqlite" else "url"
    return base + f"sessions:\n  store: {store}\n  {key}: {json.dumps(where)}\n"


async def chain_worker(client: httpx.AsyncClient, args: argparse.Namespace, left: list[int],
                       latencies: list[float], errors: list[str]) -> None:  # fmt: skip
    """Chains of ``--chain-length`` responses until ``left[0]`` responses are spent."""
    while left[0] > 0:
        previous: str | None = None
        for turn in range(args.chain_length):
            if left[0] <= 0:
                return
            left[0] -= 1
            body: dict[str, Any] = {"model": SERVED, "input": f"{QUESTION} ({turn})", "temperature": 0,
                                    "max_output_tokens": args.max_output_tokens, "store": True}  # fmt: skip
            if previous is not None:
                body["previous_response_id"] = previous
            started = time.perf_counter()
            try:
                response = await client.post("/v1/responses", json=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:300]}")
                    break  # the chain is broken: start another
                previous = response.json()["id"]
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                break


async def load(base: str, args: argparse.Namespace, responses: int) -> dict[str, Any]:
    left, latencies, errors = [responses], list[float](), list[str]()  # left: shared by the workers
    limits = httpx.Limits(max_connections=args.chains, max_keepalive_connections=args.chains)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(
            *(chain_worker(client, args, left, latencies, errors) for _ in range(args.chains))
        )
        wall = time.perf_counter() - started
    return {
        "responses": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 2), "responses_per_s": round(len(latencies) / wall, 2),
        "p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "p99_s": round(servers.quantile(latencies, 0.99), 4) if latencies else None,
    }  # fmt: skip


def rss_mb(server: servers.Server) -> float:
    """Resident memory of the server's front-end process (the HTTP server and its store)."""
    return round(float(server.tree[0].memory_info().rss) / 2**20, 1)


async def run_side(side: str, args: argparse.Namespace, workdir: Path, pg_url: str | None) -> dict[str, Any]:
    port = servers.free_port()
    engine = servers.EngineConfig(max_model_len=args.max_model_len, max_num_seqs=args.chains)
    if side == "vllm":
        server = await servers.start("vllm", args.model, args.max_output_tokens, workdir, args.start_timeout_s,
                                     engine, port=port, env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"})  # fmt: skip
    else:
        where = str(workdir / f"responses-{port}.db") if side == "sqlite" else str(pg_url)
        config = workdir / f"responses-{side}-{port}.yaml"
        config.write_text(qwenrun_yaml(args, engine, port, side, where))
        command = [sys.executable, "-m", "qwenrun.cli", "up", str(config)]
        server = await servers.start(f"qwenrun-{side}", args.model, args.max_output_tokens, workdir,
                                     args.start_timeout_s, engine, command=command, port=port)  # fmt: skip
    try:
        warm = await load(server.base, args, args.warmup)
        if warm["errors"]:
            raise RuntimeError(f"{side}: the warm-up failed: {warm['first_error']}")
        before = rss_mb(server)
        row = {"side": side, **await load(server.base, args, args.responses)}
        await asyncio.sleep(1.0)
        after = rss_mb(server)
        row.update({"rss_before_mb": before, "rss_after_mb": after, "rss_growth_mb": round(after - before, 1),
                    "kb_per_response": round((after - before) * 1024 / max(row["responses"], 1), 2)})  # fmt: skip
        print(f"[bench] {side:<9} {row['responses']} responses in {row['wall_s']} s ({row['responses_per_s']}/s), "
              f"p50 {row['p50_s']} p99 {row['p99_s']} s, errors {row['errors']} | front-end RSS "
              f"{before} -> {after} MB ({row['kb_per_response']} KB/response)", flush=True)  # fmt: skip
        if row["first_error"]:
            print(f"[bench]   first error: {row['first_error']}", flush=True)
        return row
    finally:
        await servers.stop(server)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown}; choose from {', '.join(SIDES)}")
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"cpu": servers.cpu_model(), "cpus": psutil.cpu_count()}, "versions": servers.versions(),
        "rows": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="responses-store-") as folder, contextlib.ExitStack() as stack:
        pg_url = None
        if "postgres" in sides:
            from pg_server import postgres_server  # type: ignore[import-not-found]

            pg_url = stack.enter_context(postgres_server()).database()
        for side in sides:
            report["rows"].append(await run_side(side, args, Path(folder), pg_url))
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print("RESULT " + json.dumps(report, ensure_ascii=False))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / ".cache" / "tiny-qwen2"))
    parser.add_argument("--sides", default=",".join(SIDES), help=f"of {', '.join(SIDES)}")
    parser.add_argument("--responses", type=int, default=10_000, help="stored responses a side")
    parser.add_argument("--chains", type=int, default=64, help="concurrent clients")
    parser.add_argument("--chain-length", type=int, default=10)
    parser.add_argument("--max-output-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=64, help="responses before the first memory reading")
    parser.add_argument("--start-timeout-s", type=float, default=600)
    parser.add_argument("--quick", action="store_true", help="200 responses a side, 16 chains")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.responses, args.chains, args.warmup = 200, 16, 16
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
