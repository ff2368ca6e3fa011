"""qwenrun's OpenAI-compatible server vs vLLM's own, under the same chat-completions load.

Both servers serve the same model with the same engine arguments; the client sends the very same
request bodies to each (plain chat, no tools: qwenrun's pass-through mode), on loopback:

* qwenrun: ``python -m qwenrun.cli up bench.yaml`` with ``frontend.kind: openai``;
* vLLM: ``python -m vllm.entrypoints.openai.api_server --model ... --dtype float32 ...``.

``ignore_eos`` rides in each request body (the ``extra_body`` of the openai client); both servers
honour it, and every answer's ``usage.completion_tokens`` is checked to be exactly ``--max-tokens``
on both sides.
Sampling is at temperature 1.0: greedily, the random-weight tiny model writes only newlines, which
qwenrun trims from the content (so it would stream no content chunks at all and win unfairly);
sampled text gives both servers the same ~30 content chunks per answer (checked: ``chunks``).

Layout ``one`` (default): one server up at a time; each round starts it, warms it up, measures every
mode, stops it; rounds alternate which server goes first. Layout ``both``: both up (started one
after the other, then warmed up), runs alternated A B B A; the idle server's CPU time during each
run is recorded to show it stays idle. Each run reports req/s, tokens/s, p50/p99/max latency (time
to the first content chunk too when streaming), the cores the server kept busy, the CPU time of its
front-end process per request (HTTP, chat template, tokenizer, detokenizer, engine client: where the
two servers differ; the engine core and worker processes run the same vLLM code on both sides, and
they busy-poll, so their CPU time tracks wall time), and the CPU time other processes of the
machine used meanwhile: a round where they used more than 10% of the
cores is noisy, and the "quiet" ratios are the median over the rounds whose two runs were quiet.

    python benchmarks/server_vs_vllm.py --quick                          # smoke, ~3 min on 2 CPUs
    python benchmarks/server_vs_vllm.py --json benchmarks/results/cpu/server_vs_vllm.json
    python benchmarks/server_vs_vllm.py --model /tmp/qwen7b-dummy --load-format dummy --dtype bfloat16 \\
        --max-model-len 4096 --gpu-memory-utilization 0.85 --max-num-seqs 256 --no-enforce-eager   # 1 GPU

On a GPU keep the default layout ``one``: two servers at 0.85 of the memory do not fit together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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
QUIET_SHARE = 0.1  # a run is "quiet" if other processes used less than this share of all cores
MEDIAN_KEYS = ("req_s", "tok_s", "p50_s", "p99_s", "max_s", "server_cores_busy", "front_cpu_ms_per_req")


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


@dataclass(frozen=True)
class EngineConfig:
    """The engine arguments both servers get (defaults: the tiny CPU engine of the tests)."""

    dtype: str = "float32"
    load_format: str = "auto"
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.2
    max_num_seqs: int = 64
    enforce_eager: bool = True


def qwenrun_yaml(model: str, port: int, max_tokens: int, engine: EngineConfig) -> str:
    """The agent file of the qwenrun side: the same engine as vLLM's, neutral sampling."""
    return f"""\
model:
  path: {model}
  served_model_name: {SERVED}
engine:
  dtype: {engine.dtype}
  load_format: {engine.load_format}
  gpu_memory_utilization: {engine.gpu_memory_utilization}
  max_num_seqs: {engine.max_num_seqs}
  max_model_len: {engine.max_model_len}
  enforce_eager: {str(engine.enforce_eager).lower()}
  seed: 0
sampling:
  temperature: 1.0  # requests set their own
  top_p: 1.0
  max_tokens: {max_tokens}
agent:
  name: bench-agent
frontend:
  kind: openai
  host: 127.0.0.1
  port: {port}
"""


def vllm_command(model: str, port: int, engine: EngineConfig) -> list[str]:
    """vLLM's server with the engine arguments qwenrun derives from the YAML above."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    command += ["--served-model-name", SERVED, "--dtype", engine.dtype, "--load-format", engine.load_format]
    command += ["--max-model-len", str(engine.max_model_len), "--max-num-seqs", str(engine.max_num_seqs)]
    command += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization), "--seed", "0"]
    command += ["--disable-log-stats", "--host", "127.0.0.1", "--port", str(port)]
    # vLLM's defaults, not the model's generation_config.json (Qwen's sets top_k 20 and a repetition
    # penalty): qwenrun's engine does not read that file either, so both sample the requests alike.
    command += ["--generation-config", "vllm"]
    return command + (["--enforce-eager"] if engine.enforce_eager else [])


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

    def cpu_s(self, front_only: bool = False) -> float:
        """User + system CPU seconds of the server's process tree (live processes), or of its
        front-end process alone (HTTP, chat template, tokenizer, detokenizer, engine client)."""
        total = 0.0
        for proc in self.tree[:1] if front_only else self.tree:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total


async def start(
    name: str,
    model: str,
    max_tokens: int,
    workdir: Path,
    timeout_s: float,
    engine: EngineConfig | None = None,
    *,
    command: list[str] | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Start server ``name`` (``qwenrun up`` or ``vllm serve``, or ``command`` listening on
    ``port``, with ``env`` over :func:`server_env`) and wait until its ``/health`` answers 200."""
    engine = engine or EngineConfig()
    port = port or free_port()
    log = workdir / f"{name}-{port}.log"
    if command is None and name == "qwenrun":
        config = workdir / f"bench-{port}.yaml"
        config.write_text(qwenrun_yaml(model, port, max_tokens, engine))
        command = [sys.executable, "-m", "qwenrun.cli", "up", str(config)]
    elif command is None:
        command = vllm_command(model, port, engine)
    started = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env={**server_env(), **(env or {})}, cwd=ROOT,
            start_new_session=True,
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
    # One client (one keep-alive connection) per worker, like `concurrency` independent users: with
    # one shared pool, httpx's connection handout made some non-streamed requests wait seconds.
    clients = [httpx.AsyncClient(base_url=server.base, timeout=300) for _ in range(concurrency)]

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            index = next(counter)
            if index >= first_index + requests or time.perf_counter() - started > time_limit_s:
                return
            outcomes.append(await one_request(client, body(index, max_tokens, stream, temperature)))

    def sample() -> tuple[float, ...]:
        idle_cpu = idle.cpu_s() if idle else 0.0
        return server.cpu_s(), server.cpu_s(front_only=True), idle_cpu, time.process_time(), busy_cpu_s()

    try:
        before = sample()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in clients))
        wall = time.perf_counter() - started
        after = sample()
    finally:
        for client in clients:
            await client.aclose()
    server_cpu, front_cpu, idle_cpu, client_cpu, busy = (b - a for a, b in zip(before, after, strict=True))
    other = max(0.0, busy - server_cpu - idle_cpu - client_cpu)  # other users of this machine
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
        "server_cores_busy": round(server_cpu / wall, 2),
        "front_cpu_ms_per_req": round(front_cpu * 1e3 / max(1, len(good)), 2),
        "client_cpu_ms_per_req": round(client_cpu * 1e3 / max(1, len(good)), 2),
        "other_cpu_s": round(other, 2),
        "quiet": other < QUIET_SHARE * wall * (os.cpu_count() or 1),
    }
    if idle is not None:
        row["idle_server_cpu_s"] = round(idle_cpu, 3)
    return row


def busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used (all cores; interrupts left out: the
    loopback traffic of the benchmark itself is counted there, not in any process)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system)


def describe(row: dict[str, Any]) -> str:
    ttft = f" ttft50 {row['ttft_p50_s']:.3f}" if row.get("ttft_p50_s") is not None else ""
    idle = f" idle-server-cpu {row['idle_server_cpu_s']:.2f}s" if "idle_server_cpu_s" in row else ""
    return (
        f"[bench] round {row['round']} {row['mode']:<9} {row['server']:<7} {row['req_s']:7.2f} req/s "
        f"{row['tok_s']:8.1f} tok/s p50 {row['p50_s']:.3f} p99 {row['p99_s']:.3f} max {row['max_s']:.3f}{ttft} "
        f"| front {row['front_cpu_ms_per_req']:.1f} cpu-ms/req, server {row['server_cores_busy']:.2f} cores, others {row['other_cpu_s']:.1f} cpu-s"
        f"{'' if row['quiet'] else ' (NOISY)'}{idle} | chunks {row['content_chunks_per_req']:.1f} "
        f"chars {row['content_chars_per_req']:.0f} exact {row['tokens_exact']}/{row['requests']} "
        f"errors {row['errors']}"
    )


# -- the benchmark ----------------------------------------------------------------------------------


async def settle(servers: list[Server], *, window_s: float = 0.5, timeout_s: float = 20) -> float:
    """Wait until the servers are idle (vLLM's engine core and worker keep polling for a while
    after their last request); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        before = sum(server.cpu_s() for server in servers)
        await asyncio.sleep(window_s)
        if sum(server.cpu_s() for server in servers) - before < 0.05 * window_s:
            break
    return round(time.monotonic() - started, 1)


async def measure_all(
    server: Server, args: argparse.Namespace, round_: int, idle: Server | None
) -> list[dict[str, Any]]:
    rows = []
    for mode in args.modes:
        settled = await settle([server, *([idle] if idle else [])])
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
        row["round"], row["settle_s"] = round_, settled
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
        if args.cache_root:  # each server its own vLLM cache (torch.compile): the first start is cold
            os.environ["VLLM_CACHE_ROOT"] = str(Path(args.cache_root) / name)
        server = await start(name, args.model, args.max_tokens, workdir, args.startup_timeout, args.engine)
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
    """Medians per server and mode, their ratios, and the ratios of each round's pair of runs."""
    summary: dict[str, Any] = {}
    for mode in modes:
        per: dict[str, Any] = {}
        for name in SERVERS:
            rows = [r for r in runs if r["mode"] == mode and r["server"] == name]
            per[name] = {key: round(statistics.median(r[key] for r in rows), 4) for key in MEDIAN_KEYS}
            ttfts = [r["ttft_p50_s"] for r in rows if r.get("ttft_p50_s") is not None]
            per[name]["ttft_p50_s"] = round(statistics.median(ttfts), 4) if ttfts else None
        ours, theirs = per["qwenrun"], per["vllm"]
        pairs = []
        for k in sorted({r["round"] for r in runs}):
            pair = {r["server"]: r for r in runs if r["round"] == k and r["mode"] == mode}
            pairs.append((pair["qwenrun"], pair["vllm"]))
        quiet = [(a, b) for a, b in pairs if a["quiet"] and b["quiet"]]
        per.update(
            ratio_req_s=round(ours["req_s"] / theirs["req_s"], 3),
            ratio_p50=round(ours["p50_s"] / theirs["p50_s"], 3),
            ratio_p99=round(ours["p99_s"] / theirs["p99_s"], 3),
            ratio_front_cpu=round(ours["front_cpu_ms_per_req"] / theirs["front_cpu_ms_per_req"], 3),
            round_ratios_req_s=[round(a["req_s"] / b["req_s"], 3) for a, b in pairs],
            round_ratios_p50=[round(a["p50_s"] / b["p50_s"], 3) for a, b in pairs],
            round_ratios_front_cpu=[
                round(a["front_cpu_ms_per_req"] / b["front_cpu_ms_per_req"], 3) for a, b in pairs
            ],
            paired_ratio_req_s=round(statistics.median(a["req_s"] / b["req_s"] for a, b in pairs), 3),
            paired_ratio_p50=round(statistics.median(a["p50_s"] / b["p50_s"] for a, b in pairs), 3),
            paired_ratio_front_cpu=round(
                statistics.median(a["front_cpu_ms_per_req"] / b["front_cpu_ms_per_req"] for a, b in pairs), 3
            ),
            quiet_rounds=len(quiet),
            quiet_ratio_req_s=round(statistics.median(a["req_s"] / b["req_s"] for a, b in quiet), 3)
            if quiet
            else None,
            quiet_ratio_p50=round(statistics.median(a["p50_s"] / b["p50_s"] for a, b in quiet), 3)
            if quiet
            else None,
        )
        summary[mode] = per
    return summary


def print_summary(report: dict[str, Any]) -> None:
    print(
        "\nmedian over rounds; ratio = qwenrun / vLLM of those medians (targets: req/s >= 1.0, p50 <= 1.03)"
    )
    print(
        f"{'mode':<9} {'server':<8} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'max s':>7} "
        f"{'ttft50 s':>8} {'cores':>5} {'front cpu-ms/req':>16}"
    )
    for mode, per in report["summary"].items():
        for name in ("vllm", "qwenrun"):
            row = per[name]
            ttft = f"{row['ttft_p50_s']:8.3f}" if row["ttft_p50_s"] is not None else f"{'-':>8}"
            print(
                f"{mode:<9} {name:<8} {row['req_s']:8.2f} {row['tok_s']:8.1f} {row['p50_s']:7.3f} "
                f"{row['p99_s']:7.3f} {row['max_s']:7.3f} {ttft} {row['server_cores_busy']:5.2f} "
                f"{row['front_cpu_ms_per_req']:16.2f}"
            )
        print(
            f"{mode:<9} {'ratio':<8} {per['ratio_req_s']:8.3f} {'':>8} {per['ratio_p50']:7.3f} "
            f"{per['ratio_p99']:7.3f} {'':>7} {'':>8} {'':>5} {per['ratio_front_cpu']:16.3f}\n"
            f"{mode:<9} {'':<8} per round: req/s {per['round_ratios_req_s']} p50 {per['round_ratios_p50']} "
            f"front cpu {per['round_ratios_front_cpu']}"
        )
        print(
            f"{mode:<9} {'paired':<8} {per['paired_ratio_req_s']:8.3f} {'':>8} {per['paired_ratio_p50']:7.3f} "
            f"{'':>7} {'':>7} {'':>8} {'':>5} {per['paired_ratio_front_cpu']:16.3f}   (median of the rounds' ratios)"
        )
        print(
            f"{mode:<9} {'quiet':<8} {per['quiet_ratio_req_s']} (req/s), {per['quiet_ratio_p50']} (p50): "
            f"median of the {per['quiet_rounds']} rounds where other processes used < {QUIET_SHARE:.0%} of the CPU"
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
    engine = parser.add_argument_group("engine (both servers; defaults: the tiny CPU engine)")
    engine.add_argument("--dtype", default="float32")
    engine.add_argument("--load-format", default="auto", help="'dummy' for random weights of a real shape")
    engine.add_argument("--max-model-len", type=int, default=2048)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument(
        "--no-enforce-eager", action="store_true", help="GPU: allow CUDA graphs, torch.compile"
    )
    parser.add_argument("--logs", help="keep the server logs in this folder (default: a temp dir)")
    parser.add_argument("--cache-root", help="VLLM_CACHE_ROOT of each server: this folder / its name")
    parser.add_argument("--quick", action="store_true", help="smoke: 16 requests, 8 tokens, 1 round, stream")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    args.engine = EngineConfig(
        args.dtype,
        args.load_format,
        args.max_model_len,
        args.gpu_memory_utilization,
        args.max_num_seqs,
        not args.no_enforce_eager,
    )
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.rounds = 16, 4, 8, 1
        args.warmup, args.modes = 4, ["stream"]
    return args


async def main(args: argparse.Namespace) -> dict[str, Any]:
    model = str(Path(args.model).resolve())
    if not (Path(model) / "config.json").exists():
        from qwenrun.weights.tiny import build_tiny_model

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
    report["config"].update(cpus=os.cpu_count(), engine=dataclasses.asdict(args.engine))
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
