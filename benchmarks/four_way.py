"""Four ways to run the same agent sessions (issue 32): what a team would deploy instead of qwenrun.

The sides, each over the same model, tools, prompts, pinned calls and fixed-length answers:

* (a) ``vllm``: a client loop with ``openai.AsyncOpenAI`` against ``vllm serve
  --enable-auto-tool-choice --tool-call-parser hermes``; the client runs the tools and sends the
  whole history back for every model call (two requests per user turn);
* (b) ``passthrough``: the very same client loop against qwenrun's OpenAI server in pass-through
  mode (``model`` = the served name, the tools in the request);
* (c) ``agent``: qwenrun's agent mode (``model`` = the agent's name): one request per user turn, the
  tools run on the server, the history stays there (``X-Qwenrun-Session``; ``--agent-history
  client`` sends it back instead, rebuilt from ``qwenrun_steps``);
* (d) ``inprocess``: qwenrun's ``Agent`` in the server's own process (``Session.ask``), no HTTP.

Workloads: ``single`` (``agent_vs_raw.py``'s weather session: one call, one answer) and ``multi``
(``multiturn.py``'s 6 turns with 20 tools). Turn k's call is pinned by the same regex on every side
(the clients send it in ``structured_outputs``, qwenrun's agent pins it the same way: see
``four_way_host.py``), every answer is exactly ``--answer-tokens`` tokens (``ignore_eos``) with the
``<tool_call>`` token banned; every turn is checked (one call, an answer of the full length).

(a) runs on its own ``vllm serve``; (b), (c), (d) share one qwenrun process (one engine, the same
engine arguments). Layout ``both`` (default): both servers up at once (on one GPU each gets
``--gpu-memory-utilization``, e.g. 0.44), the sides alternate a b c d / d c b a per repeat.
Layout ``one``: one server up at a time (each may take 0.85 of a GPU); each repeat runs one server
then the other, alternating which goes first. Per run: sessions/s, turn latency (p50, p99, per turn
index), tokens per turn, CPU seconds per turn of the client process and of the server's front-end
process (psutil; the engine core's separately: it busy-polls), GC pauses of the client (in
process) and of each server (a ``sitecustomize`` both servers load), the client loop's lag.
Medians over the repeats, ratios against (a); a table (``--table``, markdown) and all runs as JSON.

``--gc-variants freeze,nofreeze,threshold=A:B:C`` (item 4 of the issue) adds runs of ``--gc-sides``
at ``--gc-at`` under each policy of qwenrun's process, alternated (``four_way_host.apply_gc_policy``).
``--deadline-s`` stops before a run that would end past it (the JSON is written after every run).

    python benchmarks/four_way.py --model .cache/tiny-qwen2 --quick                        # CPU smoke
    python benchmarks/four_way.py --model .cache/tiny-qwen2 --quick --engine fake --sides b,c,d
    python benchmarks/four_way.py --model /tmp/qwen7b-dummy --load-format dummy --dtype bfloat16 \\
        --max-model-len 16384 --gpu-memory-utilization 0.44 --max-num-seqs 256 --no-enforce-eager \\
        --sessions 1,16,64 --repeat 3 --json out.json --table out.md                        # 1 GPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import server_vs_vllm as servers
from agent_vs_raw import Probe
from four_way_host import AGENT, SERVED, TEMPERATURE, TOP_P, Workload, workloads

from qwenrun.frontends.openai.chat import SESSION_HEADER

BENCH = Path(__file__).resolve().parent

SIDES = {"a": "vllm serve + client loop", "b": "qwenrun pass-through + client loop",
         "c": "qwenrun agent mode", "d": "qwenrun in-process"}  # fmt: skip
SERVER_OF = {"a": "vllm", "b": "qwenrun", "c": "qwenrun", "d": "qwenrun"}
ENGINE_COUNTERS = ("vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                   "vllm:prompt_tokens", "vllm:generation_tokens")  # fmt: skip
MEDIAN_KEYS = ("wall_s", "sessions_per_s", "turns_per_s", "turn_p50_s", "turn_p99_s", "turn_max_s", "prompt_tokens_per_turn",
               "completion_tokens_per_turn", "cpu_ms_per_turn", "cpu_ms_per_turn_client", "cpu_ms_per_turn_server",
               "engine_cpu_ms_per_turn", "gc_ms_client", "gc_ms_server", "loop_lag_p99_ms", "loop_lag_max_ms")  # fmt: skip

# Loaded by both servers (PYTHONPATH): the process's GC pauses, dumped to FOURWAY_GC_DIR/<pid>.json.
GC_PROBE = """\
import gc, json, os, threading, time
_dir = os.environ.get("FOURWAY_GC_DIR")
if _dir:
    _state, _t = {"ms": 0.0, "n": 0, "gen2": 0}, [0.0]
    def _cb(phase, info):
        if phase == "start":
            _t[0] = time.perf_counter()
        else:
            _state["ms"] += 1e3 * (time.perf_counter() - _t[0]); _state["n"] += 1
            _state["gen2"] += info["generation"] == 2
    gc.callbacks.append(_cb)
    def _dump(path=os.path.join(_dir, f"{os.getpid()}.json")):
        while True:
            time.sleep(0.2)
            with open(path + ".tmp", "w") as f:
                json.dump(_state, f)
            os.replace(path + ".tmp", path)
    threading.Thread(target=_dump, daemon=True, name="fourway-gc-probe").start()
"""


# -- the sessions of each side --------------------------------------------------------------------


def _call_dict(call: Any) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


async def client_loop(client: Any, w: Workload, run: str, index: int, ban: int) -> list[dict[str, Any]]:
    """(a) and (b): what a hand-written agent service does with the official client."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": w.system}]
    turns = []
    for turn in range(w.turns):
        started = time.perf_counter()
        messages.append({"role": "user", "content": w.question(run, index, turn)})
        first = await client.chat.completions.create(
            model=SERVED, messages=messages, tools=w.schemas, tool_choice="auto", max_tokens=w.call_max_tokens,
            temperature=TEMPERATURE, top_p=TOP_P, extra_body={"structured_outputs": {"regex": w.call_regex(turn)}},
        )  # fmt: skip
        message = first.choices[0].message
        calls = message.tool_calls or []
        messages.append({"role": "assistant", "content": message.content, "tool_calls": [_call_dict(c) for c in calls]}
                        if calls else {"role": "assistant", "content": message.content or ""})  # fmt: skip
        for call in calls:  # the tools run here, in the client
            result = w.run_tool(call.function.name, json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        second = await client.chat.completions.create(
            model=SERVED, messages=messages, tools=w.schemas, tool_choice="auto", max_tokens=w.answer_tokens,
            temperature=TEMPERATURE, top_p=TOP_P, logit_bias={str(ban): -100}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        answer = second.choices[0]
        messages.append({"role": "assistant", "content": answer.message.content or ""})
        usage_1, usage_2 = first.usage, second.usage
        turns.append({"s": time.perf_counter() - started, "prompt": usage_1.prompt_tokens + usage_2.prompt_tokens,
                      "completion": usage_1.completion_tokens + usage_2.completion_tokens, "calls": len(calls),
                      "answer": usage_2.completion_tokens, "finish": answer.finish_reason})  # fmt: skip
    return turns


async def agent_loop(client: Any, w: Workload, run: str, index: int, history: str) -> list[dict[str, Any]]:
    """(c): one request per user turn to qwenrun's agent mode; the tools run on the server."""
    session = {SESSION_HEADER: f"fw-{run}-{index}"} if history == "session" else None
    messages: list[dict[str, Any]] = []  # --agent-history client: what the client sends back
    turns = []
    for turn in range(w.turns):
        started = time.perf_counter()
        user = {"role": "user", "content": w.question(run, index, turn)}
        reply = await client.chat.completions.create(
            model=AGENT, messages=[*messages, user], tool_choice="required", extra_headers=session
        )
        choice = reply.choices[0]
        steps = (choice.message.model_extra or {}).get("qwenrun_steps") or []
        calls = [step for step in steps if step["type"] == "tool_call"]
        if session is None:
            messages.append(user)
            if calls:
                messages.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": s["id"], "type": "function", "function": {
                        "name": s["name"], "arguments": json.dumps(s["arguments"], ensure_ascii=False)}}
                    for s in calls]})  # fmt: skip
            messages += [{"role": "tool", "tool_call_id": s["id"], "content": s["content"]}
                         for s in steps if s["type"] == "tool_result"]  # fmt: skip
            messages.append({"role": "assistant", "content": choice.message.content or ""})
        turns.append({"s": time.perf_counter() - started, "prompt": reply.usage.prompt_tokens,
                      "completion": reply.usage.completion_tokens, "calls": len(calls),
                      "finish": choice.finish_reason})  # fmt: skip
    return turns


# -- the benchmark ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _order(items: list[str], rep: int) -> list[str]:
    return list(items) if rep % 2 == 0 else list(reversed(items))


def _cpu(proc: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        times = proc.cpu_times()
        return float(times.user + times.system)
    return 0.0


class Bench:
    """The servers, the runs so far and the report (written after every run)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, scratch: Path) -> None:
        """Server logs go to ``workdir``; the GC dumps, the probe and the session stores to ``scratch``."""
        self.args, self.workdir, self.scratch = args, workdir, scratch
        self.loads = workloads(args)
        self.servers: dict[str, servers.Server] = {}
        self.host_ports: dict[str, int] = {}
        self.gc_dir, probe = scratch / "gc", scratch / "gc-probe"
        for folder in (self.gc_dir, probe, scratch / "stores"):
            folder.mkdir(parents=True, exist_ok=True)
        (probe / "sitecustomize.py").write_text(GC_PROBE)
        self.env = {"FOURWAY_GC_DIR": str(self.gc_dir),
                    "PYTHONPATH": f"{probe}{os.pathsep}{servers.server_env()['PYTHONPATH']}"}  # fmt: skip
        self.engine = servers.EngineConfig(args.dtype, args.load_format, args.max_model_len, args.gpu_memory_utilization,
                                           args.max_num_seqs, not args.no_enforce_eager)  # fmt: skip
        self.ban = ban_token(args.model)
        self.started = time.monotonic()
        self.deadline = self.started + args.deadline_s if args.deadline_s else float("inf")
        self.me = psutil.Process()
        self.ssl = ssl.create_default_context()
        self.walls: dict[tuple[str, str, int], float] = {}
        self.report: dict[str, Any] = {
            "config": dict(vars(args)),
            "machine": {"cpu": servers.cpu_model(), "cpus": os.cpu_count()}, "versions": servers.versions(),
            "startup_s": {}, "kv_cache_tokens": {}, "runs": [], "skipped": [], "gc_states": [],
        }  # fmt: skip

    # servers

    def commands(self, name: str) -> tuple[list[str], int]:
        args, port = self.args, servers.free_port()
        if name == "vllm":
            command = servers.vllm_command(args.model, port, self.engine)
            command[command.index("--served-model-name") + 1] = SERVED
            if args.engine_stats:
                command.remove("--disable-log-stats")
            return [*command, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"], port
        self.host_ports = {"multi": port, "single": servers.free_port()}
        command = [sys.executable, str(BENCH / "four_way_host.py"), "--model", args.model, "--engine", args.engine,
                   "--step-ms", str(args.step_ms), "--port-multi", str(port), "--port-single", str(self.host_ports["single"]),
                   "--sessions-dir", str(self.scratch / "stores"), "--dtype", args.dtype, "--load-format", args.load_format,
                   "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--turns", str(args.turns),
                   "--tools", str(args.tools), "--answer-tokens", str(args.answer_tokens)]  # fmt: skip
        command += (["--enforce-eager"] if self.engine.enforce_eager else []) + (
            ["--engine-stats"] if args.engine_stats else []
        )
        return command, port

    async def ensure(self, names: set[str]) -> set[str]:
        """Exactly the servers ``names`` up (stopped first, then started one after the other);
        returns those it started."""
        started = names - set(self.servers)
        for name in [n for n in self.servers if n not in names]:
            await servers.stop(self.servers.pop(name))
            self._write_pids()
        for name in sorted(names - set(self.servers), key=lambda n: n != "vllm"):  # vllm first, as measured
            command, port = self.commands(name)
            env = dict(self.env)
            if self.args.cache_root:  # each server its own torch.compile cache
                env["VLLM_CACHE_ROOT"] = str(Path(self.args.cache_root) / name)
            server = await servers.start(name, self.args.model, self.args.answer_tokens, self.workdir,
                                         self.args.startup_timeout, self.engine, command=command, port=port,
                                         env=env)  # fmt: skip
            self.servers[name] = server
            self._write_pids()
            if name == "qwenrun":
                await self._healthy(f"http://127.0.0.1:{self.host_ports['single']}/health")  # the second port
            self.report["startup_s"].setdefault(name, []).append(server.startup_s)
            found = re.search(r"KV cache size: ([\d,]+) tokens", server.log.read_text(errors="replace"))
            self.report["kv_cache_tokens"].setdefault(name, []).append(
                int(found[1].replace(",", "")) if found else None
            )
            print(f"[bench] {name} up in {server.startup_s} s, KV cache {self.report['kv_cache_tokens'][name][-1]} tokens",
                  flush=True)  # fmt: skip
        return started

    async def _healthy(self, url: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not answer 200 in {timeout_s:.0f} s")
                await asyncio.sleep(0.2)

    def _write_pids(self) -> None:
        """The servers' process groups, for ``gpu.sh`` to end what a killed run left behind."""
        if self.args.pid_file:
            Path(self.args.pid_file).write_text("".join(f"{s.proc.pid}\n" for s in self.servers.values()))

    async def close(self) -> None:
        await self.ensure(set())

    def base(self, side: str, w: Workload) -> str:
        if side == "a":
            return self.servers["vllm"].base + "/v1"
        return f"http://127.0.0.1:{self.host_ports[w.name]}" + ("" if side == "d" else "/v1")

    # measurements

    def _gc_of(self, server: servers.Server) -> dict[str, float]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads((self.gc_dir / f"{server.proc.pid}.json").read_text()))
        return {"ms": 0.0, "n": 0, "gen2": 0}

    async def _engine_counters(self, name: str) -> dict[str, float]:
        if not self.args.engine_stats or name not in self.servers:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        url = self.servers[name].base + ("/metrics" if name == "vllm" else "/bench/engine-metrics")
        async with httpx.AsyncClient(timeout=30) as http:
            text = (await http.get(url)).text
        totals = dict.fromkeys(ENGINE_COUNTERS, 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name_ = sample.name.removesuffix("_total")
                if name_ in totals and not sample.name.endswith("_created"):
                    totals[name_] += sample.value
        return totals

    def _snapshot(self) -> dict[str, float]:
        snap = {"client": _cpu(self.me)}
        for name, server in self.servers.items():
            snap[f"{name}.front"] = server.cpu_s(front_only=True)
            snap[f"{name}.all"] = server.cpu_s()
        return snap

    def _gc_snapshot(self) -> dict[str, float]:
        """The servers' GC totals as their probes last dumped them (every 0.2 s)."""
        snap = {}
        for name, server in self.servers.items():
            state = self._gc_of(server)
            snap[f"{name}.gc_ms"], snap[f"{name}.gc2"] = state["ms"], state["gen2"]
        return snap

    def fits(self, side: str, w: Workload, n: int) -> bool:
        """Whether a run of ``side`` at N = ``n`` ends before the deadline: judged by the longest
        run of that side (else of any side) at ``n`` so far, else by the largest smaller N's
        scaled by (n / N) ** 0.75 (how the multi-turn runs grew on the H200), else yes."""
        walls = [(m, s[0] == side[0], wall) for (s, name, m), wall in self.walls.items() if name == w.name]
        here = [wall for m, mine, wall in walls if m == n and mine] or [
            wall for m, _, wall in walls if m == n
        ]
        if not here:
            smaller = [m for m, _, _ in walls if m < n]
            if not smaller:
                return True
            m = max(smaller)
            here = [wall * (n / m) ** 0.75 for k, _, wall in walls if k == m]
        return time.monotonic() + 1.2 * max(here) + 10 < self.deadline

    async def measure(self, side: str, w: Workload, n: int, *, record: bool = True, rep: int = 0,
                      variant: str | None = None) -> dict[str, Any] | None:  # fmt: skip
        key = side if variant is None else f"{side}@{variant}"
        if record and not self.fits(side, w, n):
            self.report["skipped"].append({"side": key, "workload": w.name, "n": n, "rep": rep})
            print(f"[bench] skipped {key} {w.name} N={n} rep {rep}: past the deadline", flush=True)
            return None
        run = uuid.uuid4().hex[:8]
        await servers.settle(list(self.servers.values()))
        base, server_name = self.base(side, w), SERVER_OF[side]
        clients = [] if side == "d" else self._clients(base, n)  # made before the run: not measured
        control = httpx.AsyncClient(timeout=None) if side == "d" else None
        counters = await self._engine_counters(server_name)
        before, probe, host_report = {**self._snapshot(), **self._gc_snapshot()}, Probe(), None
        try:
            if control is not None:
                response, _ = await probe.timed(
                    control.post(base + "/bench/inprocess", json={"n": n, "run": run})
                )
                response.raise_for_status()
                host_report = response.json()
                sessions, errors, wall = host_report["sessions"], host_report["errors"], host_report["wall_s"]
            else:
                sessions, errors, wall = await self._run_clients(side, w, n, run, clients, probe)
        finally:
            after = self._snapshot()
            if control is not None:
                await control.aclose()
            for client in {id(c): c for c in clients}.values():
                await client.close()
        await asyncio.sleep(0.3)  # the probes' next dump holds the run's last pauses
        after.update(self._gc_snapshot())
        counters_after = await self._engine_counters(server_name)
        row = self._row(side, w, n, sessions, errors, wall, before, after, probe, host_report)
        row.update(key=key, rep=rep, variant=variant, run=run,
                   engine={k: counters_after[k] - counters.get(k, 0.0) for k in counters_after})  # fmt: skip
        if record:
            self.walls[(key, w.name, n)] = wall
            self.report["runs"].append(row)
            self.save()
        print(f"[bench] {'' if record else 'warm-up '}{w.name} N={n} rep {rep} {key:<12} {row['sessions_per_s']:8.3f} sess/s "
              f"p50 {row['turn_p50_s']:.3f} p99 {row['turn_p99_s']:.3f} s | cpu ms/turn client {row['cpu_ms_per_turn_client']:.1f} "
              f"server {row['cpu_ms_per_turn_server']:.1f} engine {row['engine_cpu_ms_per_turn']:.1f} | gc ms client "
              f"{row['gc_ms_client']} server {row['gc_ms_server']} | tok/turn {row['prompt_tokens_per_turn']:.0f}+"
              f"{row['completion_tokens_per_turn']:.1f} | bad {row['bad_turns']} errors {row['errors']}", flush=True)  # fmt: skip
        if row["first_error"]:  # a ratio against this run compares other work: say why at once
            print(f"[bench]   first error of {row['errors']}: {row['first_error'][:300]}", flush=True)
        return row

    def _clients(self, base: str, n: int) -> list[Any]:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        def make() -> Any:  # the client's own HTTP defaults, one SSL context (26 ms a client without)
            http = DefaultAsyncHttpxClient(verify=self.ssl, timeout=1800)
            return AsyncOpenAI(base_url=base, api_key="none", max_retries=0, http_client=http)

        if self.args.shared_client:
            return [make()] * n
        return [make() for _ in range(n)]  # like N independent users (see server_vs_vllm.run_load)

    async def _run_clients(self, side: str, w: Workload, n: int, run: str, clients: list[Any], probe: Probe) -> tuple[
            list[list[dict[str, Any]]], list[str], float]:  # fmt: skip
        errors: list[str] = []

        async def one(index: int) -> list[dict[str, Any]]:
            try:
                if side == "c":
                    return await agent_loop(clients[index], w, run, index, self.args.agent_history)
                return await client_loop(clients[index], w, run, index, self.ban)
            except Exception as exc:  # reported, the other sessions go on
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                return []

        sessions, wall = await probe.timed(asyncio.gather(*(one(i) for i in range(n))))
        return list(sessions), errors, wall

    def _row(self, side: str, w: Workload, n: int, sessions: list[list[dict[str, Any]]], errors: list[str], wall: float,
             before: dict[str, float], after: dict[str, float], probe: Probe, host: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        turns = [turn for session in sessions for turn in session]
        latencies = [turn["s"] for turn in turns] or [float("nan")]
        done = max(1, len(turns))
        bad = sum(
            1
            for t in turns
            if t["calls"] != 1
            or t["finish"] != "length"
            or t.get("answer", w.answer_tokens) != w.answer_tokens
        )
        delta = {key: after[key] - before.get(key, 0.0) for key in after}
        own = SERVER_OF[side]
        client = delta["client"]
        server = delta.get(f"{own}.front", 0.0)
        engine = delta.get(f"{own}.all", 0.0) - server
        idle = sum(delta.get(f"{name}.all", 0.0) for name in self.servers if name != own)
        lag = host if host is not None else probe.report()
        return {
            "side": side, "workload": w.name, "n": n, "wall_s": round(wall, 3), "sessions_per_s": round(n / wall, 4),
            "turns_per_s": round(len(turns) / wall, 4), "turns_done": len(turns), "turns_expected": n * w.turns, "bad_turns": bad, "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "turn_p50_s": round(_median(latencies), 4), "turn_p99_s": round(servers.quantile(latencies, 0.99), 4),
            "turn_max_s": round(max(latencies), 4),
            "turn_p50_by_index": [round(_median([s[k]["s"] for s in sessions if len(s) > k]), 4) for k in range(w.turns)],
            "prompt_tokens_per_turn": round(statistics.mean(t["prompt"] for t in turns), 1) if turns else 0.0,
            "completion_tokens_per_turn": round(statistics.mean(t["completion"] for t in turns), 2) if turns else 0.0,
            "cpu_ms_per_turn_client": round(1e3 * client / done, 3), "cpu_ms_per_turn_server": round(1e3 * server / done, 3),
            "cpu_ms_per_turn": round(1e3 * (client + server) / done, 3), "engine_cpu_ms_per_turn": round(1e3 * engine / done, 3),
            "idle_server_cpu_s": round(idle, 3),
            "gc_ms_client": round(sum(p for _, p in probe.gc_pauses) * 1e3, 1) if host is None else 0.0,
            "gc_ms_server": round(delta.get(f"{own}.gc_ms", 0.0), 1), "gc_gen2_server": int(delta.get(f"{own}.gc2", 0)),
            "loop_lag_p99_ms": lag["loop_lag_p99_ms"], "loop_lag_max_ms": lag["loop_lag_max_ms"],
            "loop": "server" if host is not None else "client",
        }  # fmt: skip

    async def warm_up(self, sides: list[str]) -> None:
        if self.args.warmup:
            for name in dict.fromkeys(name for name, _, _ in self.args.runs):
                for side in sides:
                    await self.measure(side, self.loads[name], self.args.warmup, record=False)

    async def set_gc(self, policy: str) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            response = await http.post(
                f"http://127.0.0.1:{self.host_ports['multi']}/bench/gc", json={"policy": policy}
            )
        response.raise_for_status()
        self.report["gc_states"].append(response.json())

    async def gc_block(self) -> None:
        """Item 4: qwenrun's process under each GC policy, alternated, at ``--gc-at``."""
        if not self.args.gc_variants:
            return
        for name, n in self.args.gc_at:
            for rep in range(self.args.gc_repeat):
                for variant in _order(self.args.gc_variants, rep):
                    await self.set_gc(variant)
                    for side in self.args.gc_sides:
                        await self.measure(side, self.loads[name], n, rep=rep, variant=variant)
        await self.set_gc("freeze")  # the shipped state, plus whatever the runs left alive

    def save(self) -> None:
        self.report["summary"] = summarize(self.report["runs"])
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(self.report, indent=1, ensure_ascii=False) + "\n")
        if self.args.table:
            Path(self.args.table).write_text(markdown(self.report))


async def benchmark(bench: Bench) -> None:
    """The runs of ``--runs`` (workload, N, repeats), alternated by repeat; then the GC runs."""
    args, sides = bench.args, bench.args.sides
    needed = {SERVER_OF[side] for side in sides}
    if args.layout == "both":
        await bench.ensure(needed)
        await bench.warm_up(sides)
        for name, sessions, repeat in args.runs:
            for n in sessions:
                for rep in range(repeat):
                    for side in _order(sides, rep):
                        await bench.measure(side, bench.loads[name], n, rep=rep)
        if "qwenrun" in needed:
            await bench.gc_block()
        return
    most = max(repeat for _, _, repeat in args.runs)
    for rep in range(most):  # layout one: each repeat runs one server, then the other
        for server in _order(sorted(needed, key=lambda n: n != "vllm"), rep):
            mine = [side for side in sides if SERVER_OF[side] == server]
            if await bench.ensure({server}):  # a fresh server: its caches are cold
                await bench.warm_up(mine)
            for name, sessions, repeat in args.runs:
                for n in sessions if rep < repeat else ():
                    for side in _order(mine, rep):
                        await bench.measure(side, bench.loads[name], n, rep=rep)
            if server == "qwenrun" and rep == most - 1:
                await bench.gc_block()


# -- the report -----------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (workload, N, side), ratios against side (a), per-repeat ratios."""
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["workload"], run["n"], run["key"]), []).append(run)
    for (name, n, key), mine in groups.items():
        row: dict[str, Any] = {"workload": name, "n": n, "key": key, "side": mine[0]["side"],
                               "variant": mine[0]["variant"], "repeats": len(mine)}  # fmt: skip
        row.update({k: round(statistics.median(r[k] for r in mine), 4) for k in MEDIAN_KEYS})
        row["bad_turns"] = sum(r["bad_turns"] for r in mine)
        row["errors"] = sum(r["errors"] for r in mine)
        row["reps_sessions_per_s"] = [r["sessions_per_s"] for r in mine]
        if mine[0]["engine"]:
            row["engine"] = {k: statistics.median(r["engine"][k] for r in mine) for k in mine[0]["engine"]}
        rows.append(row)
    for row in rows:  # against (a), or for a GC variant against the first variant of its side
        if row["variant"] is None:
            base = next(
                (r for r in rows if (r["workload"], r["n"], r["key"]) == (row["workload"], row["n"], "a")),
                None,
            )
        else:
            base = next(r for r in rows if (r["workload"], r["n"], r["side"]) == (row["workload"], row["n"], row["side"])
                        and r["variant"] is not None)  # fmt: skip
        if base is None:
            continue
        row["vs"] = base["key"]
        for k in ("sessions_per_s", "turns_per_s", "turn_p50_s", "turn_p99_s", "cpu_ms_per_turn"):
            row[f"ratio_{k}"] = round(row[k] / base[k], 3) if base[k] else None
        # A side that lost turns (errors) or cut answers short (bad) did other work than its base.
        row["unequal"] = any(r["bad_turns"] or r["errors"] for r in (row, base))
        pairs = {
            r["rep"]: r
            for r in runs
            if (r["workload"], r["n"], r["key"]) == (row["workload"], row["n"], base["key"])
        }
        row["rep_ratios_sessions_per_s"] = [round(r["sessions_per_s"] / pairs[r["rep"]]["sessions_per_s"], 3)
                                            for r in runs if (r["workload"], r["n"], r["key"]) == (row["workload"], row["n"], row["key"])
                                            and r["rep"] in pairs]  # fmt: skip
    return rows


def _ratio(row: dict[str, Any], key: str) -> str:
    value = row.get(f"ratio_{key}")
    if value is None or row.get("vs") == row["key"]:
        return ""
    return f" ({value:.3f}{UNEQUAL if row.get('unequal') else ''})"


UNEQUAL = "†"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables: the four sides, then the GC variants."""
    lines = []
    main = [r for r in report.get("summary", []) if r["variant"] is None]
    variants = [r for r in report.get("summary", []) if r["variant"] is not None]
    header = ("| workload | N | side | sessions/s (vs a) | turns/s (vs a) | turn p50 s (vs a) | turn p99 s (vs a) | CPU ms/turn client + "
              "server (vs a) | client / server | engine core ms/turn | GC ms/run client / server | tokens/turn prompt + "
              "completion | repeats | bad / errors |")  # fmt: skip
    lines += [header, "|" + "---|" * 14]
    for r in sorted(main, key=lambda r: (r["workload"], r["n"], r["key"])):
        lines.append(
            f"| {r['workload']} | {r['n']} | ({r['key']}) {SIDES[r['side']]} | {r['sessions_per_s']:.3f}{_ratio(r, 'sessions_per_s')} | "
            f"{r.get('turns_per_s', 0.0):.2f}{_ratio(r, 'turns_per_s')} | {r['turn_p50_s']:.3f}{_ratio(r, 'turn_p50_s')} | {r['turn_p99_s']:.3f}{_ratio(r, 'turn_p99_s')} | "
            f"{r['cpu_ms_per_turn']:.1f}{_ratio(r, 'cpu_ms_per_turn')} | {r['cpu_ms_per_turn_client']:.1f} / "
            f"{r['cpu_ms_per_turn_server']:.1f} | {r['engine_cpu_ms_per_turn']:.1f} | {r['gc_ms_client']:.0f} / "
            f"{r['gc_ms_server']:.0f} | {r['prompt_tokens_per_turn']:.0f} + {r['completion_tokens_per_turn']:.1f} | "
            f"{r['repeats']} | {r['bad_turns']} / {r['errors']} |"
        )  # fmt: skip
    if any(r.get("unequal") for r in main):
        lines += ["", f"{UNEQUAL} not the same work as (a): one of the two lost turns (errors, e.g. a prompt over "
                      "max_model_len) or gave short answers (bad turns); see `first_error` in the JSON."]  # fmt: skip
    if variants:
        lines += ["", "| workload | N | side | GC policy | sessions/s (vs first) | turn p50 s | turn p99 s | CPU ms/turn | "
                      "GC ms/run server | repeats |", "|" + "---|" * 10]  # fmt: skip
        for r in sorted(variants, key=lambda r: (r["workload"], r["n"], r["side"])):
            lines.append(f"| {r['workload']} | {r['n']} | ({r['side']}) | {r['variant']} | {r['sessions_per_s']:.3f}"
                         f"{_ratio(r, 'sessions_per_s')} | {r['turn_p50_s']:.3f} | {r['turn_p99_s']:.3f} | "
                         f"{r['cpu_ms_per_turn']:.1f} | {r['gc_ms_server']:.0f} | {r['repeats']} |")  # fmt: skip
    if report.get("skipped"):
        lines += ["", f"Skipped (past the deadline): {len(report['skipped'])} runs."]
    return "\n".join(lines) + "\n"


def ban_token(model: str) -> int:
    """The id of ``<tool_call>``, banned in every answer (``logit_bias``)."""
    from tokenizers import Tokenizer

    token = Tokenizer.from_file(str(Path(model) / "tokenizer.json")).token_to_id("<tool_call>")
    if token is None:
        raise SystemExit(f"{model}: the tokenizer has no <tool_call> token")
    return int(token)


def parse_block(item: str, repeat: int, problems: list[str]) -> tuple[str, list[int], int]:
    """One item of ``--runs``: ``WORKLOAD:N[,N...][xREPEATS]``, e.g. ``multi:16,64x3``."""
    found = re.fullmatch(r"(\w+):(\d+(?:,\d+)*)(?:x(\d+))?", item)
    if found is None:
        problems.append(f"--runs: {item!r} is not WORKLOAD:N[,N...][xREPEATS]")
        return "single", [], 0
    return found[1], [int(n) for n in found[2].split(",")], int(found[3] or repeat)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(BENCH.parent / ".cache" / "tiny-qwen2"))
    parser.add_argument("--sides", default="a,b,c,d")
    parser.add_argument("--workloads", default="single,multi")
    parser.add_argument("--sessions", default="1,4")
    parser.add_argument("--turns", type=int, default=6, help="of the multi-turn workload")
    parser.add_argument("--tools", type=int, default=20, help="of the multi-turn workload")
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--runs", help="instead of --workloads x --sessions x --repeat: e.g. 'single:1,16x3 multi:64x2'"
    )
    parser.add_argument("--warmup", type=int, default=8, help="sessions of each side's warm-up run (0: none)")
    parser.add_argument("--layout", choices=["both", "one"], default="both")
    parser.add_argument(
        "--agent-history",
        choices=["session", "client"],
        default="session",
        help="(c): the server keeps the history (X-Qwenrun-Session) or the client sends it",
    )
    parser.add_argument("--shared-client", action="store_true", help="one AsyncOpenAI for all sessions")
    parser.add_argument(
        "--engine", choices=["vllm", "fake"], default="vllm", help="fake: qwenrun's sides without vLLM"
    )
    parser.add_argument("--step-ms", type=float, default=20.0, help="fake engine: ms per decode step")
    parser.add_argument("--gc-variants", default="", help="e.g. freeze,nofreeze,threshold=10000:20:50")
    parser.add_argument("--gc-at", default="single:4", help="workload:N pairs of the GC runs")
    parser.add_argument("--gc-sides", default="c,d")
    parser.add_argument("--gc-repeat", type=int, default=2)
    parser.add_argument(
        "--engine-stats",
        action="store_true",
        help="vLLM's stats on in both servers: prefix cache, preemptions",
    )
    parser.add_argument(
        "--deadline-s", type=float, default=0, help="start no run that would end later (0: none)"
    )
    parser.add_argument("--startup-timeout", type=float, default=900)
    engine = parser.add_argument_group("engine (both servers; defaults: the tiny CPU engine)")
    engine.add_argument("--dtype", default="float32")
    engine.add_argument("--load-format", default="auto")
    engine.add_argument("--max-model-len", type=int, default=4096)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.2, help="each server's share")
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument("--no-enforce-eager", action="store_true", help="GPU: CUDA graphs, torch.compile")
    parser.add_argument("--cache-root", help="VLLM_CACHE_ROOT of each server: this folder / its name")
    parser.add_argument("--logs", help="keep the server logs and stores in this folder (default: a temp dir)")
    parser.add_argument("--pid-file", help="write the servers' process ids here while they run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke defaults: N = 1 and 4, 3 turns, 4 tools, 8 tokens, 1 repeat, warm-up 1",
    )
    parser.add_argument("--json")
    parser.add_argument("--table", help="also write the tables (markdown) to this file")
    if parser.parse_known_args(argv)[0].quick:  # smoke defaults; what the command line gives wins
        parser.set_defaults(sessions="1,4", turns=3, tools=4, answer_tokens=8, repeat=1, warmup=1)
    args = parser.parse_args(argv)
    args.sides = args.sides.split(",")
    sessions = [int(n) for n in args.sessions.split(",")]
    problems: list[str] = []
    if args.runs:
        args.runs = [parse_block(item, args.repeat, problems) for item in args.runs.replace(";", " ").split()]
    else:
        args.runs = [(name, sessions, args.repeat) for name in args.workloads.split(",")]
    args.workloads = list(dict.fromkeys(name for name, _, _ in args.runs))
    args.gc_variants = [v for v in args.gc_variants.split(",") if v]
    args.gc_sides = args.gc_sides.split(",")
    args.gc_at = [(pair.split(":")[0], int(pair.split(":")[1])) for pair in args.gc_at.split(",") if pair]
    problems += [f"unknown side {s!r} (a, b, c, d)" for s in args.sides + args.gc_sides if s not in SIDES]
    problems += [f"unknown workload {w!r} (single, multi)" for w in args.workloads + [w for w, _ in args.gc_at]
                 if w not in ("single", "multi")]  # fmt: skip
    if args.engine == "fake" and "a" in args.sides:
        problems.append("--engine fake runs qwenrun's sides only: --sides b,c,d")
    if args.gc_variants and not set(args.gc_sides) <= {"b", "c", "d"}:
        problems.append("--gc-sides: qwenrun's sides only (b, c, d)")
    if problems:
        parser.error("; ".join(problems))
    return args


async def main(args: argparse.Namespace) -> dict[str, Any]:
    args.model = str(Path(args.model).resolve())
    if not (Path(args.model) / "config.json").exists():
        from qwenrun.weights.tiny import build_tiny_model

        build_tiny_model(Path(args.model))
    with tempfile.TemporaryDirectory(prefix="four_way-") as tmp:
        workdir = Path(args.logs) if args.logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, workdir, Path(tmp))
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, task.cancel
        )  # a time limit: stop the servers
        try:
            await benchmark(bench)
        finally:
            await bench.close()
            bench.save()
        print(markdown(bench.report), flush=True)
        return bench.report


if __name__ == "__main__":
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    print("RESULT " + json.dumps(result, ensure_ascii=False), flush=True)
