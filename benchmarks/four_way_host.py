"""The qwenrun side of ``four_way.py``: the workloads, and the process that serves sides (b), (c), (d).

``four_way.py`` starts this file as a subprocess; it is not meant to be run by hand. One process,
one vLLM engine, two OpenAI servers of qwenrun (``create_app``, as ``qwenrun up`` serves it) on
two ports, one per workload (an agent's tools and system prompt are part of its file):

* pass-through, ``model`` = the served name (side b): the client's tools and structured-output
  constraint as sent;
* agent mode, ``model`` = the agent's name (side c): the agent loop runs one user turn, its tools
  run here (with ``X-Qwenrun-Session`` the history stays on the server, in its SQLite store);
* ``POST /bench/inprocess {"n", "run"}`` (side d): N sessions of ``Session.ask`` in this process;
* ``POST /bench/gc {"policy"}``: the garbage collector's policy for the next runs (item 4);
* ``GET /bench/engine-metrics``: vLLM's Prometheus counters (with ``--engine-stats``).

The same tokens on every side: turn k's tool call is pinned to the same text by the same regex
(``Workload.call_regex``: the whole ``<tool_call>`` block, as the clients send it in
``structured_outputs``), the answer is exactly ``answer_tokens`` tokens (``ignore_eos``) with the
``<tool_call>`` token banned. Agent-mode calls are pinned by :class:`HostEngine` (the benchmark's
engine wrapper); a pass-through request that carries its own constraint goes to the engine as
sent, and a pass-through answer gets the ban the client asked for in ``logit_bias`` (qwenrun's
server does not read ``logit_bias``, so the wrapper applies the same ban; see RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent_vs_raw
import multiturn
from agent_vs_raw import Probe, no_tool_calls
from fastapi import Request as HTTPRequest  # at module level: FastAPI resolves the annotations here
from fastapi.responses import JSONResponse, Response
from multiturn import TurnPinnedEngine

from qwenrun.engines.base import Request
from qwenrun.engines.scripted import PinnedEngine, literal_regex
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls.hermes import FORCED_PREFILL
from qwenrun.tools import Tool

SERVED = "qwen"  # the served model name of both servers
AGENT = "bench-agent"  # qwenrun's agent mode
TEMPERATURE, TOP_P = 0.45, 0.9
CALL_MAX_TOKENS = 160  # the whole pinned block fits (random weights may spell it in short tokens)
DEFAULT_THRESHOLD = gc.get_threshold()


# -- the workloads ----------------------------------------------------------------------------------


def _single_question(run: str, session: int, turn: int) -> str:
    # the run id keeps one run's prompts from hitting the prefix cache the previous run filled
    return f"[{run}/{session}] 第{session}位用户问：广州天气情况如何?"


def _weather(name: str, arguments: dict[str, Any]) -> str:
    return agent_vs_raw.get_current_weather(**arguments)


@dataclass(frozen=True)
class Workload:
    """What every side runs: the system prompt, the tools, the pinned call of each turn."""

    name: str
    system: str
    schemas: list[dict[str, Any]]
    calls: list[str]  # turn k's call as its JSON text
    answer_tokens: int
    question: Callable[[str, int, int], str]
    run_tool: Callable[[str, dict[str, Any]], str]
    call_max_tokens: int = CALL_MAX_TOKENS

    @property
    def turns(self) -> int:
        return len(self.calls)

    def call_block(self, turn: int) -> str:
        return f"{FORCED_PREFILL}{self.calls[turn]}\n</tool_call>"

    def call_regex(self, turn: int) -> str:
        """The regex of turn ``turn``'s whole call block (what ``PinnedEngine(prefill=False)`` uses)."""
        return literal_regex(self.call_block(turn))

    def tools(self) -> list[Tool]:
        """The tools as qwenrun's agent runs them (the same schemas, the same results)."""

        def call_of(name: str) -> Callable[[dict[str, Any]], Awaitable[str]]:
            async def call(arguments: dict[str, Any]) -> str:
                return self.run_tool(name, arguments)

            return call

        return [
            Tool.from_schema(s["function"]["name"], s["function"]["description"], s["function"]["parameters"],
                             call_of(s["function"]["name"]))
            for s in self.schemas
        ]  # fmt: skip


def single_workload(answer_tokens: int) -> Workload:
    """``agent_vs_raw.py``'s session: one weather tool, one call, one answer."""
    schema = Tool.from_function(agent_vs_raw.get_current_weather).openai_schema()
    return Workload("single", agent_vs_raw.SYSTEM, [schema], [agent_vs_raw.CALL], answer_tokens,
                    _single_question, _weather)  # fmt: skip


def multi_workload(tools: int, turns: int, answer_tokens: int) -> Workload:
    """``multiturn.py``'s session: ``tools`` tools, ``turns`` turns, turn k calls tool 3k."""
    schemas = multiturn.tool_schemas(tools)
    calls = [multiturn.call_text(multiturn.turn_call(schemas, k)) for k in range(turns)]
    return Workload("multi", multiturn.SYSTEM, schemas, calls, answer_tokens, multiturn.question,
                    multiturn.tool_result)  # fmt: skip


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    return {"single": single_workload(args.answer_tokens),
            "multi": multi_workload(args.tools, args.turns, args.answer_tokens)}  # fmt: skip


# -- the engine wrapper ---------------------------------------------------------------------------------


class HostEngine(TurnPinnedEngine):
    """Pins an agent's forced call of turn k to the workload's block and its answers to the fixed
    length; a request with its own constraint (a pass-through client's pinned call) goes to the
    engine as sent. The wrapped engine's stream is returned as is (no per-token cost)."""

    def generate(self, request: Request) -> AsyncIterator[Any]:
        if request.constraint is not None:
            return self.engine.generate(request)
        return super().generate(request)


# -- side (d) and the garbage collector --------------------------------------------------------------


async def run_inprocess(agent: Any, workload: Workload, n: int, run: str) -> dict[str, Any]:
    """N sessions at once, each ``workload.turns`` turns of ``Session.ask`` (side d)."""
    records: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    errors: list[str] = []

    async def one(index: int) -> None:
        chat = agent.session(record=False)
        try:
            for turn in range(workload.turns):
                started = time.perf_counter()
                final = await chat.ask(workload.question(run, index, turn), tool_choice="required")
                records[index].append({
                    "s": time.perf_counter() - started, "prompt": final.usage.prompt_tokens,
                    "completion": final.usage.completion_tokens, "calls": final.tool_calls,
                    "finish": final.stop_reason,
                })  # fmt: skip
        except Exception as exc:  # reported, the other sessions go on
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    probe = Probe()
    _, wall = await probe.timed(asyncio.gather(*(one(i) for i in range(n))))
    return {"wall_s": wall, "sessions": records, "errors": errors, **probe.report()}


def apply_gc_policy(policy: str) -> dict[str, Any]:
    """Set the collector up for the next runs, from a collected heap (at a quiet moment):
    ``freeze``: everything alive now goes to the permanent generation (what the engine does after
    start-up, plus what the warm-up left), default thresholds; ``nofreeze``: nothing frozen;
    ``threshold=A:B:C``: ``freeze`` with ``gc.set_threshold(A, B, C)``."""
    name, _, value = policy.partition("=")
    if name not in ("freeze", "nofreeze", "threshold"):
        raise ValueError(f"unknown gc policy {policy!r}: expected freeze, nofreeze or threshold=A:B:C")
    threshold = DEFAULT_THRESHOLD
    if name == "threshold":
        threshold = tuple(int(part) for part in value.split(":"))
        if len(threshold) != 3:
            raise ValueError(f"gc policy {policy!r}: threshold needs three numbers, A:B:C")
    gc.unfreeze()
    gc.collect()
    if name != "nofreeze":
        gc.freeze()
    gc.set_threshold(*threshold)
    return {"policy": policy, "frozen": gc.get_freeze_count(), "threshold": list(gc.get_threshold())}


# -- the process ----------------------------------------------------------------------------------------


def host_spec(workload: Workload, args: argparse.Namespace, port: int) -> AgentSpec:
    engine: dict[str, Any] = {
        "dtype": args.dtype, "load_format": args.load_format, "max_model_len": args.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization, "max_num_seqs": args.max_num_seqs,
        "enforce_eager": args.enforce_eager, "seed": 0, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
    }  # fmt: skip
    if args.engine_stats:
        engine["extra"] = {"disable_log_stats": False}
    return AgentSpec.from_dict(
        {
            "model": {"path": args.model, "served_model_name": SERVED},
            "engine": engine,
            "sampling": {"temperature": TEMPERATURE, "top_p": TOP_P, "max_tokens": workload.answer_tokens},
            "agent": {"name": AGENT, "system_prompt": workload.system, "max_iterations": 3},
            "sessions": {"enabled": True, "path": str(Path(args.sessions_dir) / f"{workload.name}.db")},
            "frontend": {"kind": "openai", "host": "127.0.0.1", "port": port},
        },
        source=f"four_way_host:{workload.name}",
    )


def add_bench_routes(app: Any, agent: Any, workload: Workload) -> None:
    @app.post("/bench/inprocess")
    async def inprocess(request: HTTPRequest) -> JSONResponse:
        body = await request.json()
        return JSONResponse(await run_inprocess(agent, workload, int(body["n"]), str(body["run"])))

    @app.post("/bench/gc")
    async def gc_policy(request: HTTPRequest) -> JSONResponse:
        body = await request.json()
        try:
            return JSONResponse(apply_gc_policy(str(body["policy"])))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/bench/engine-metrics")
    async def engine_metrics() -> Response:
        from prometheus_client import REGISTRY, generate_latest

        return Response(generate_latest(REGISTRY), media_type="text/plain")


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from qwenrun.agent import Agent
    from qwenrun.engines.vllm.engine import VLLMEngine
    from qwenrun.frontends.openai import create_app
    from qwenrun.sessions import open_store

    loads = workloads(args)
    ports = {"single": args.port_single, "multi": args.port_multi}
    specs = {name: host_spec(w, args, ports[name]) for name, w in loads.items()}
    engine = VLLMEngine(specs["multi"])  # one engine for both agents (the engine tables are equal)
    started = time.perf_counter()
    if args.engine == "vllm":
        await engine.start()
    else:  # multiturn.py's stand-in for AsyncLLM: one token per running request every --step-ms
        from transformers import AutoTokenizer

        literals = {w.call_regex(k): w.call_block(k) for w in loads.values() for k in range(w.turns)}
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        engine.attach(multiturn.FakeLLM(args.step_ms / 1e3, literals), tokenizer, args.max_model_len)
    print(f"[host] engine ({args.engine}) ready in {time.perf_counter() - started:.1f} s", flush=True)
    answer = {
        "max_tokens": args.answer_tokens,
        "ignore_eos": True,
        "logit_bias": no_tool_calls(engine._tokenizer),
    }
    servers = []
    for name, workload in loads.items():
        pins = [PinnedEngine(engine, call, call_max_tokens=workload.call_max_tokens, keep_requests=False,
                             answer_overrides=answer, prefill=False) for call in workload.calls]  # fmt: skip
        agent = Agent(specs[name], HostEngine(pins), tools=workload.tools(), store=open_store(specs[name]))
        if agent.tool_schemas() != workload.schemas:
            raise SystemExit(f"{name}: the agent's tool schemas differ from the clients'")
        app = create_app(agent, shutdown_engine=False)
        add_bench_routes(app, agent, workload)
        config = uvicorn.Config(app, host="127.0.0.1", port=ports[name], log_level="info")  # as serve()
        servers.append(uvicorn.Server(config))
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        await engine.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--port-single", type=int, required=True)
    parser.add_argument("--port-multi", type=int, required=True)
    parser.add_argument("--sessions-dir", required=True, help="where the agents' SQLite session stores go")
    parser.add_argument("--engine", choices=["vllm", "fake"], default="vllm")
    parser.add_argument("--step-ms", type=float, default=20.0, help="fake engine: ms per decode step")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--engine-stats", action="store_true", help="vLLM's stats on (Prometheus counters)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--answer-tokens", type=int, default=128)
    return parser.parse_args(argv)


if __name__ == "__main__":
    # uvicorn hands the SIGINT it caught on to asyncio's runner, which raises KeyboardInterrupt
    # once the servers and the engine have stopped: that is the normal end here.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parse_args()))
    print(json.dumps({"stopped": True}), flush=True)
