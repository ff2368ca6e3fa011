"""Agent replicas on one shared engine (issue 29, item 5): turns/s through 1 replica and through 2.

Two ``qwenrun up … --set frontend.kind=openai`` processes of one agent file (``engine.kind:
openai`` to the shared engine, ``sessions.store: postgres`` in one database) and one engine; K
conversations at once, T turns each, over ``POST /v1/responses`` with ``previous_response_id``.
With 2 replicas turn t of conversation n goes to replica (n + t) mod 2, so every turn continues a
conversation the other replica stored; with 1 replica all go to the first (the second idles). Each
turn is the agent's: a model call that calls ``get_current_weather`` (the mock backend), the tool,
a model call that answers. Every answer is checked: it starts with the conversation's user
messages joined by ``|``, which the engine can only know from the history the replica rebuilt.

The engine is a fake OpenAI-compatible server in its own process (this file with
``--serve-engine``): it streams a tool call, or an answer of ``--answer-chars`` characters in
chunks ``--step-ms`` apart (a GPU engine's decode steps; under its batch limit each request takes
that long whatever the concurrency). It costs little CPU, so the replicas' own work (HTTP, the
agent loop, the session store) is what is measured. The layouts alternate (1 2 / 2 1 …) over
``--repeat`` rounds; printed: turns/s, turn latency (p50, p99) and CPU seconds per turn of the
replicas, the engine and this driver, medians over the rounds, and the ratio 2 replicas / 1.

    python benchmarks/replicas.py                    # a throw-away PostgreSQL (initdb/pg_ctl on PATH)
    python benchmarks/replicas.py --url postgresql://USER:PASSWORD@HOST/DB --conversations 128
    python benchmarks/replicas.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SERVED = "engine-qwen"  # the model the fake engine serves
AGENT = "replicated"  # the agent's name: agent mode on the replicas
CITY = "广州"


# -- the fake engine (its own process) ---------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def serve_engine(port: int, step_s: float, answer_chars: int, chunk_chars: int) -> None:
    """A streamed chat-completions endpoint: a ``get_current_weather`` call when the conversation's
    last message is not a tool result, else the users' messages joined by ``|`` and padding."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def sse(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
        chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": SERVED,
                 "choices": choices, **({"usage": usage} if usage else {})}  # fmt: skip
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def completions(request: Request) -> Response:
        body = await request.json()
        messages = body["messages"]
        prompt = sum(len(_text(m.get("content"))) for m in messages)

        async def stream() -> AsyncIterator[str]:
            yield sse({"role": "assistant", "content": ""})
            if messages[-1]["role"] != "tool":
                arguments = json.dumps({"city": CITY}, ensure_ascii=False)
                await asyncio.sleep(step_s * 4)  # a call is a few decode steps
                call = {"index": 0, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                        "function": {"name": "get_current_weather", "arguments": arguments}}  # fmt: skip
                yield sse({"tool_calls": [call]})
                yield sse({}, "tool_calls")
            else:
                users = "|".join(_text(m["content"]) for m in messages if m["role"] == "user")
                answer = users + " " + "晴" * max(0, answer_chars - len(users) - 1)
                for start in range(0, len(answer), chunk_chars):
                    await asyncio.sleep(step_s)
                    yield sse({"content": answer[start : start + chunk_chars]})
                yield sse({}, "stop")
            yield sse({}, usage={"prompt_tokens": prompt, "completion_tokens": answer_chars,
                                 "total_tokens": prompt + answer_chars})  # fmt: skip
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": SERVED, "object": "model", "owned_by": "fake"}]}
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                            Route("/v1/models", models), Route("/health", health)])  # fmt: skip
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A server process of this benchmark (the engine or a replica), its log, its CPU time."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.name, self.port, self.log = name, port, log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)  # fmt: skip
        self.psutil = psutil.Process(self.popen.pid)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_healthy(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as http:
            while True:
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start: {self.log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.base}/health", timeout=2)).status_code == 200:
                        return
                await asyncio.sleep(0.3)

    def cpu_s(self) -> float:
        """CPU seconds of the process and its children so far."""
        total = 0.0
        for proc in [self.psutil, *self.psutil.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def agent_file(folder: Path, engine_url: str) -> Path:
    agent = {
        "model": {"path": SERVED},
        "engine": {"kind": "openai", "base_url": engine_url, "model": SERVED},
        "agent": {"name": AGENT, "system_prompt": "You answer with the weather.", "max_iterations": 3},
        "tools": ["get_current_weather"],
        "frontend": {"kind": "openai"},
        "sessions": {"store": "postgres", "url": "${QWENRUN_DATABASE_URL}"},
    }
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(agent, allow_unicode=True), encoding="utf-8")
    return path


# -- the load --------------------------------------------------------------------------------------


def output_text(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")  # fmt: skip


async def conversation(
    http: httpx.AsyncClient, bases: list[str], n: int, turns: int, run: str
) -> list[float]:
    """One conversation of ``turns`` turns, turn t on ``bases[(n + t) % len(bases)]``; seconds per turn."""
    previous: str | None = None
    users: list[str] = []
    took = []
    for t in range(turns):
        text = f"{run}-{n}-{t} {CITY}天气?"
        users.append(text)
        body = {"model": AGENT, "input": text, "previous_response_id": previous}
        started = time.perf_counter()
        answer = await http.post(f"{bases[(n + t) % len(bases)]}/v1/responses", json=body, timeout=300)
        took.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise RuntimeError(
                f"turn {t} of conversation {n}: HTTP {answer.status_code}: {answer.text[:500]}"
            )
        response = answer.json()
        if not output_text(response).startswith("|".join(users)):
            raise RuntimeError(
                f"turn {t} of conversation {n}: the history is not whole: {output_text(response)!r}"
            )
        previous = response["id"]
    return took


async def measure(
    replicas: list[Process], engine: Process, count: int, conversations: int, turns: int
) -> dict[str, Any]:
    """``conversations`` at once over the first ``count`` replicas; turns/s and CPU per turn."""
    bases = [replica.base for replica in replicas[:count]]
    run = uuid.uuid4().hex[:6]
    limits = httpx.Limits(max_connections=conversations + 8, max_keepalive_connections=conversations + 8)
    before = [process.cpu_s() for process in replicas] + [engine.cpu_s()]
    driver = time.process_time()
    async with httpx.AsyncClient(limits=limits) as http:
        started = time.perf_counter()
        took = await asyncio.gather(*(conversation(http, bases, n, turns, run) for n in range(conversations)))
        wall = time.perf_counter() - started
    driver = time.process_time() - driver
    after = [process.cpu_s() for process in replicas] + [engine.cpu_s()]
    spent = [b - a for a, b in zip(before, after, strict=True)]
    latencies = sorted(seconds for turns_took in took for seconds in turns_took)
    done = conversations * turns
    return {
        "replicas": count, "turns": done, "wall_s": wall, "turns_per_s": done / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "replica_cpu_ms_per_turn": 1000 * sum(spent[:-1]) / done,
        "engine_cpu_ms_per_turn": 1000 * spent[-1] / done, "driver_cpu_ms_per_turn": 1000 * driver / done,
    }  # fmt: skip


async def benchmark(args: argparse.Namespace, url: str, folder: Path) -> dict[str, Any]:
    engine_port = free_port()
    engine = Process("engine", [sys.executable, __file__, "--serve-engine", str(engine_port),
                                "--step-ms", str(args.step_ms), "--answer-chars", str(args.answer_chars),
                                "--chunk-chars", str(args.chunk_chars)],
                     engine_port, folder / "engine.log", dict(os.environ))  # fmt: skip
    processes = [engine]
    try:
        await engine.wait_healthy()
        path = agent_file(folder, f"{engine.base}/v1")
        qwenrun = str(Path(sys.executable).parent / "qwenrun")
        env = {**os.environ, "QWENRUN_DATABASE_URL": url}
        replicas = []
        for n in range(2):
            port = free_port()
            command = [
                qwenrun,
                "up",
                str(path),
                "--set",
                "frontend.kind=openai",
                "--set",
                f"frontend.port={port}",
            ]
            replicas.append(Process(f"replica {n + 1}", command, port, folder / f"replica-{n + 1}.log", env))
        processes += replicas
        for replica in replicas:
            await replica.wait_healthy()
        await measure(replicas, engine, 2, min(8, args.conversations), 2)  # warm-up: connections, caches
        runs: list[dict[str, Any]] = []
        for round_ in range(args.repeat):
            for count in (1, 2) if round_ % 2 == 0 else (2, 1):
                row = await measure(replicas, engine, count, args.conversations, args.turns)
                row["round"] = round_
                runs.append(row)
                print(
                    f"  round {round_ + 1}, {count} replica(s): {row['turns_per_s']:.1f} turns/s", flush=True
                )
        return {"runs": runs}
    finally:
        for process in reversed(processes):
            process.stop()


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for count in (1, 2):
        mine = [run for run in runs if run["replicas"] == count]
        row: dict[str, Any] = {"replicas": count, "runs": len(mine)}
        for key in ("turns_per_s", "p50_ms", "p99_ms", "replica_cpu_ms_per_turn", "engine_cpu_ms_per_turn",
                    "driver_cpu_ms_per_turn"):  # fmt: skip
            row[key] = round(statistics.median(run[key] for run in mine), 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a PostgreSQL database (default: start a throw-away cluster)")
    parser.add_argument("--conversations", type=int, default=64, help="at once (K)")
    parser.add_argument("--turns", type=int, default=4, help="per conversation (T)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of both layouts, alternated")
    parser.add_argument("--step-ms", type=float, default=2.0, help="the fake engine's ms per chunk")
    parser.add_argument("--answer-chars", type=int, default=200)
    parser.add_argument("--chunk-chars", type=int, default=8, help="characters per streamed chunk")
    parser.add_argument("--quick", action="store_true", help="4 conversations of 2 turns, 1 round")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--serve-engine", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_engine is not None:
        serve_engine(args.serve_engine, args.step_ms / 1000, args.answer_chars, args.chunk_chars)
        return
    if args.quick:
        args.conversations, args.turns, args.repeat = 4, 2, 1
    with ExitStack() as stack:
        url = args.url
        if url is None:
            from pg_server import postgres_server

            url = stack.enter_context(postgres_server()).database()
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qwenrun-replicas-")))
        report = asyncio.run(benchmark(args, url, folder))
    rows = summarize(report["runs"])
    one, two = rows
    ratio = two["turns_per_s"] / one["turns_per_s"]
    pairs = [b["turns_per_s"] / a["turns_per_s"] for a, b in zip(report["runs"][0::2], report["runs"][1::2],
                                                                  strict=True)]  # fmt: skip
    pair_ratios = [round(r if a["replicas"] == 1 else 1 / r, 3) for r, a in zip(pairs, report["runs"][0::2],
                                                                                 strict=True)]  # fmt: skip
    print(f"{args.conversations} conversations at once, {args.turns} turns each (a tool call and an answer per "
          f"turn), the engine {args.answer_chars} characters in chunks of {args.chunk_chars} every "
          f"{args.step_ms:g} ms; {os.cpu_count()} CPUs; medians of {args.repeat} round(s)")  # fmt: skip
    print(f"{'replicas':>8} | {'turns/s':>8} | {'p50 ms':>8} | {'p99 ms':>8} | {'replica CPU ms/turn':>19} | "
          f"{'engine CPU ms/turn':>18} | {'driver CPU ms/turn':>18}")  # fmt: skip
    for row in rows:
        print(f"{row['replicas']:>8} | {row['turns_per_s']:>8.1f} | {row['p50_ms']:>8.1f} | {row['p99_ms']:>8.1f} | "
              f"{row['replica_cpu_ms_per_turn']:>19.1f} | {row['engine_cpu_ms_per_turn']:>18.1f} | "
              f"{row['driver_cpu_ms_per_turn']:>18.1f}")  # fmt: skip
    print(
        f"2 replicas / 1 replica: {ratio:.2f}x turns/s (each round: {', '.join(f'{r:.2f}' for r in pair_ratios)})"
    )
    result = {"settings": {key: getattr(args, key) for key in ("conversations", "turns", "repeat", "step_ms",
                                                              "answer_chars", "chunk_chars")},
              "cpus": os.cpu_count(), "rows": rows, "ratio": round(ratio, 3), "round_ratios": pair_ratios,
              "runs": report["runs"]}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
