"""Multi-turn agent sessions: qwenrun's agent loop vs a hand-written loop on the same vLLM engine.

N sessions x ``--turns`` turns against an agent with ``--tools`` tools (20 by default: with the
system prompt a ~3k-token prefix of Qwen2.5's tokenizer, the same for every session). Each turn is
a user message, a tool call pinned by a regex (the same text on both sides: turn k calls tool
``3k mod tools`` with fixed arguments), the tool's result, and an answer of exactly
``--answer-tokens`` tokens (``ignore_eos``, ``<tool_call>`` banned). The history grows turn by
turn. Side (a) is qwenrun's ``Session.ask`` on ``VLLMEngine``; side (b) renders the whole history
with the chat template, tokenizes it and calls ``AsyncLLM.generate`` itself, as a hand-written
loop does. Both drive ONE engine and run alternately.

Per turn index it reports, for each side: turn latency, the time from the tool's result to the
first token of the answer (TTFT), prompt tokens and how many vLLM served from its prefix cache
(``RequestOutput.num_cached_tokens``), and the time spent in ``apply_chat_template`` + ``encode``
(on the event loop, and in other threads); per run: sessions/s, loop lag and GC pauses.

``--engine fake`` replaces vLLM by a stand-in that emits one token per running request every
``--step-ms`` (no model, no vLLM engine process): it measures the client side alone, with the real
tokenizer and chat template of ``--model``.

    python benchmarks/multiturn.py --model .cache/tiny-qwen2 --quick --cpu            # CPU smoke
    python benchmarks/multiturn.py --model .cache/tiny-qwen2 --engine fake --sessions 64,256
    python benchmarks/multiturn.py --model /tmp/qwen7b-dummy --load-format dummy --dtype bfloat16 \\
        --max-model-len 8192 --sessions 1,16,64,256 --repeat 3 --json out.json            # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_vs_raw import Probe, no_tool_calls

from qwenrun.agent import Agent
from qwenrun.engines.base import Request
from qwenrun.engines.scripted import PinnedEngine, literal_regex
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls.hermes import FORCED_PREFILL
from qwenrun.tools import Tool

SYSTEM = (
    "You are Ops, the operations assistant of a software company. You answer questions about "
    "projects, services, tickets and deployments. Always look the facts up with a tool before you "
    "answer, quote the numbers the tool returned, and keep answers short and precise."
)
WORDS = ["city", "region", "date", "unit", "limit", "query", "account", "order", "ticket", "device", "sensor", "channel", "user", "team", "project", "file", "branch", "commit", "metric", "window"]
QUESTIONS = (
    "What is the state of the payments service right now?",
    "And how many tickets are open for it?",
    "Which deployment changed it last, and when?",
    "Compare that with the search service, please.",
    "Who is on call for both this week?",
    "Summarise everything in three lines.",
    "Anything else I should know before the release?",
    "Thanks. One last check of the error rate?",
)


# -- the workload ---------------------------------------------------------------------------------


def tool_schemas(count: int) -> list[dict[str, Any]]:
    """``count`` OpenAI tools, ~140 Qwen2.5 tokens each (3 described parameters, one enum)."""
    tools = []
    for i in range(count):
        word = WORDS[i % len(WORDS)]
        properties: dict[str, Any] = {}
        for j in range(3):
            name = f"{WORDS[(i + 7 * j + 3) % len(WORDS)]}_{j}"
            kind = ("string", "integer", "boolean")[j]
            prop: dict[str, Any] = {"type": kind, "description": f"The {name.split('_')[0]} to look at."}
            if j == 0:
                prop["enum"] = [f"{word}_{x}" for x in ("alpha", "beta", "gamma")]
            properties[name] = prop
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": f"{word}_lookup_{i:02d}",
                    "description": f"Looks up the {word} records of service {i}; returns a JSON object.",
                    "parameters": {"type": "object", "properties": properties, "required": list(properties)[:1]},
                },
            }
        )
    return tools


def turn_call(tools: list[dict[str, Any]], turn: int) -> dict[str, Any]:
    """The call of turn ``turn``: tool ``3 * turn`` (mod the count) with its required argument."""
    function = tools[(3 * turn) % len(tools)]["function"]
    name = next(iter(function["parameters"]["properties"]))
    value = function["parameters"]["properties"][name]["enum"][turn % 3]
    return {"name": function["name"], "arguments": {name: value}}


def call_text(call: dict[str, Any]) -> str:
    return json.dumps(call, ensure_ascii=False)


def tool_result(name: str, arguments: dict[str, Any]) -> str:
    values = {key: f"{value}" for key, value in arguments.items()}
    return json.dumps(
        {"tool": name, "query": values, "status": "ok", "open": len(name) % 7, "p99_ms": 41 + len(name),
         "note": "All checks passed in the last 24 hours; one warning about disk usage on node 3."},
        ensure_ascii=False,
    )  # fmt: skip


def question(run: str, session: int, turn: int) -> str:
    # the run id keeps one run's prompts from hitting the prefix cache the previous run filled
    return f"[{run}/{session}] {QUESTIONS[turn % len(QUESTIONS)]}"


# -- what each session went through ---------------------------------------------------------------


class Turn:
    __slots__ = ("answer_first", "end", "requests", "start", "tool_done")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.end = self.tool_done = self.answer_first = 0.0
        self.requests: list[list[float]] = []  # [started, first output, prompt tokens, cached tokens]


class Trace:
    """One session's turns (set as the context of the session's task)."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []

    def begin(self) -> None:
        self.turns.append(Turn())

    def end(self) -> None:
        self.turns[-1].end = time.perf_counter()


CURRENT: contextvars.ContextVar[Trace] = contextvars.ContextVar("multiturn_trace")


class Meter:
    """Time spent rendering and tokenizing, on the event loop's thread and in other threads, by the
    turn index of the session that spent it (-1: outside a session's context)."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.on_loop: dict[int, float] = {}
        self.off_loop: dict[int, float] = {}
        self.inside = threading.local()

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(self.inside, "busy", False):  # called from a timed function: counted there
                return function(*args, **kwargs)
            self.inside.busy = True
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                self.inside.busy = False
                trace = CURRENT.get(None)
                turn = len(trace.turns) - 1 if trace is not None else -1
                where = self.on_loop if threading.get_ident() == self.loop_thread else self.off_loop
                where[turn] = where.get(turn, 0.0) + spent

        return timed

    def install(self, tokenizer: Any, *others: Any) -> None:
        """Time ``tokenizer``'s chat template and encoding, and the ``encode`` of ``others`` (such
        as qwenrun's prompt tokenizer), as instance attributes over their methods."""
        for name in ("apply_chat_template", "encode"):
            setattr(tokenizer, name, self.wrap(getattr(tokenizer, name)))
        for other in others:
            other.encode = self.wrap(other.encode)

    def take(self) -> tuple[dict[int, float], dict[int, float]]:
        """Seconds on the loop and off it, by turn, since the last call."""
        taken = self.on_loop, self.off_loop
        self.on_loop, self.off_loop = {}, {}
        return taken


class MeteredLLM:
    """vLLM's AsyncLLM (or the fake) with each request's first output and prefix-cache hits noted
    in the session's trace. Both sides go through it, so its cost (one generator hop per output)
    is the same for both."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    async def generate(self, prompt: Any, params: Any, request_id: str, **kwargs: Any) -> AsyncIterator[Any]:
        trace = CURRENT.get(None)
        record = [time.perf_counter(), 0.0, float(len(prompt["prompt_token_ids"])), -1.0]
        if trace is not None and trace.turns:
            trace.turns[-1].requests.append(record)
        stream = self._llm.generate(prompt, params, request_id, **kwargs)
        try:
            async for output in stream:
                if not record[1]:
                    record[1] = time.perf_counter()
                    if trace is not None and trace.turns and trace.turns[-1].tool_done:
                        trace.turns[-1].answer_first = record[1]
                if output.finished:
                    cached = getattr(output, "num_cached_tokens", None)
                    record[3] = float(cached) if cached is not None else -1.0
                yield output
        finally:
            await stream.aclose()


def make_tools(schemas: list[dict[str, Any]]) -> list[Tool]:
    def call_of(name: str) -> Callable[[dict[str, Any]], Awaitable[str]]:
        async def call(arguments: dict[str, Any]) -> str:
            result = tool_result(name, arguments)
            trace = CURRENT.get(None)
            if trace is not None:
                trace.turns[-1].tool_done = time.perf_counter()
            return result

        return call

    return [
        Tool.from_schema(s["function"]["name"], s["function"]["description"], s["function"]["parameters"],
                         call_of(s["function"]["name"]))
        for s in schemas
    ]  # fmt: skip


class TurnPinnedEngine:
    """Pins the forced call of turn k (counted by the user messages) to ``turn_call(k)``."""

    def __init__(self, pinned: list[PinnedEngine]) -> None:
        self._pinned = pinned
        self.engine = pinned[0].engine
        self.model_name = self.engine.model_name

    @property
    def tool_call_format(self) -> str:
        return self.engine.tool_call_format

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self) -> None:
        pass

    def health(self) -> Any:
        return self.engine.health()

    def generate(self, request: Request) -> AsyncIterator[Any]:
        turn = sum(1 for message in request.messages if message.get("role") == "user") - 1
        return self._pinned[turn % len(self._pinned)].generate(request)


# -- the two sides --------------------------------------------------------------------------------


def qwenrun_side(agent: Agent, turns: int) -> Callable[[str, int], Awaitable[int]]:
    async def session(run: str, index: int) -> int:
        trace, chat, tokens = CURRENT.get(), agent.session(record=False), 0
        for turn in range(turns):
            trace.begin()
            final = await chat.ask(question(run, index, turn), tool_choice="required")
            trace.end()
            if final.tool_calls != 1:
                raise RuntimeError(f"qwenrun session {index} turn {turn}: {final.tool_calls} tool calls")
            tokens += final.usage.completion_tokens
        return tokens

    return session


def raw_side(
    llm: Any, tokenizer: Any, schemas: list[dict[str, Any]], args: argparse.Namespace, answer: dict[str, Any]
) -> Callable[[str, int], Awaitable[int]]:
    """The hand-written loop: the whole history through the chat template and the tokenizer on
    every model call, ``AsyncLLM.generate``, ``json.loads``, the tool, generate again."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    common = {"temperature": 0.45, "top_p": 0.9, "skip_special_tokens": False, "output_kind": RequestOutputKind.DELTA}
    call_params = [
        SamplingParams(max_tokens=96, structured_outputs=StructuredOutputsParams(
            regex=literal_regex(call_text(turn_call(schemas, k)))), **common)
        for k in range(args.turns)
    ]
    answer_params = SamplingParams(**answer, **common)
    tools = {schema["function"]["name"]: schema for schema in schemas}

    async def generate(messages: list[dict[str, Any]], params: Any, prefill: str) -> tuple[str, int]:
        prompt = tokenizer.apply_chat_template(messages, tools=schemas, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(prompt + prefill, add_special_tokens=False)
        text, count = "", 0
        async for out in llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
            text += out.outputs[0].text
            count += len(out.outputs[0].token_ids)
        return text, count

    async def session(run: str, index: int) -> int:
        trace, tokens = CURRENT.get(), 0
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
        for turn in range(args.turns):
            trace.begin()
            messages.append({"role": "user", "content": question(run, index, turn)})
            text, count = await generate(messages, call_params[turn], FORCED_PREFILL)
            call = json.loads(text)
            assert call["name"] in tools
            result = tool_result(call["name"], call["arguments"])
            trace.turns[-1].tool_done = time.perf_counter()
            call_id = f"call_{turn}"
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [{"id": call_id, "type": "function", "function": call}]})  # fmt: skip
            messages.append({"role": "tool", "tool_call_id": call_id, "name": call["name"], "content": result})
            answer_text, second = await generate(messages, answer_params, "")
            messages.append({"role": "assistant", "content": answer_text})
            trace.end()
            tokens += count + second
        return tokens

    return session


# -- a stand-in for vLLM's AsyncLLM (``--engine fake``) -------------------------------------------


class _Completion:
    __slots__ = ("finish_reason", "text", "token_ids")

    def __init__(self, text: str, count: int, finish_reason: str | None) -> None:
        self.text, self.token_ids, self.finish_reason = text, [0] * count, finish_reason


class _Output:
    __slots__ = ("finished", "num_cached_tokens", "outputs")

    def __init__(self, text: str, count: int, finished: bool, reason: str | None) -> None:
        self.outputs, self.finished, self.num_cached_tokens = [_Completion(text, count, reason)], finished, None


class _Running:
    __slots__ = ("count", "event", "pending", "tokens")

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.pending, self.count = tokens, [], 0
        self.event = asyncio.Event()


class FakeLLM:
    """One token per running request every ``step_s``, delivered as vLLM's output handler does:
    into a per-request collector that merges what the consumer has not taken yet. A request whose
    regex is one of ``literals`` writes that text (4 characters a token), else ``max_tokens``
    words. No prefix cache (``num_cached_tokens`` is None)."""

    errored = False

    def __init__(self, step_s: float, literals: dict[str, str], seed: int = 0) -> None:
        self.step_s, self.literals = step_s, literals
        self.running: dict[str, _Running] = {}
        self.words = [f" {w}" for w in WORDS] + [" 的", " 是", ",", "."]
        self.random = random.Random(seed)
        self.task: asyncio.Task[None] | None = None

    def _tokens(self, params: Any) -> list[str]:
        constraint = getattr(params, "structured_outputs", None)
        literal = self.literals.get(getattr(constraint, "regex", None) or "")
        if literal is not None:
            return [literal[i : i + 4] for i in range(0, len(literal), 4)]
        return [self.random.choice(self.words) for _ in range(params.max_tokens)]

    async def _steps(self) -> None:
        while self.running:
            await asyncio.sleep(self.step_s)
            for request in list(self.running.values()):
                request.pending.append(request.tokens[request.count])
                request.count += 1
                request.event.set()

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[_Output]:
        request = self.running[request_id] = _Running(self._tokens(params))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._steps())
        try:
            while True:
                await request.event.wait()
                request.event.clear()
                pieces, request.pending = request.pending, []
                done = request.count >= len(request.tokens)
                if done:
                    del self.running[request_id]
                yield _Output("".join(pieces), len(pieces), done, "length" if done else None)
                if done:
                    return
        finally:
            self.running.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.running.pop(request_id, None)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running)

    def shutdown(self) -> None:
        if self.task is not None:
            self.task.cancel()


# -- measurement ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def per_turn(traces: list[Trace], meter_by_turn: list[dict[str, float]]) -> list[dict[str, float]]:
    rows = []
    for k in range(len(traces[0].turns)):
        turns = [trace.turns[k] for trace in traces]
        answer = [t.requests[-1] for t in turns]
        call = [t.requests[0] for t in turns]
        cached = [r[3] for r in answer + call if r[3] >= 0]
        ttft = [t.answer_first - t.tool_done for t in turns if t.answer_first and t.tool_done]
        rows.append(
            {
                "turn": k,
                "turn_p50_s": round(_median([t.end - t.start for t in turns]), 4),
                "turn_p99_s": round(_p([t.end - t.start for t in turns], 0.99), 4),
                "turns_per_s": round(len(turns) / max(1e-9, max(t.end for t in turns) - min(t.start for t in turns)), 3),
                "ttft_p50_ms": round(1e3 * _median(ttft), 2),
                "ttft_p99_ms": round(1e3 * _p(ttft, 0.99), 2),
                "call_prompt_tokens": round(statistics.mean(r[2] for r in call), 1),
                "answer_prompt_tokens": round(statistics.mean(r[2] for r in answer), 1),
                "prompt_tokens": int(sum(r[2] for r in answer + call)),
                "cached_tokens": int(sum(cached)) if cached else -1,
                "prefilled_tokens": int(sum(r[2] for r in answer + call) - sum(cached)) if cached else -1,
                "render_tokenize_loop_ms_per_session": round(meter_by_turn[k]["loop"] / len(turns), 3),
                "render_tokenize_thread_ms_per_session": round(meter_by_turn[k]["thread"] / len(turns), 3),
            }
        )
    return rows


async def measure(run: Callable[[str, int], Awaitable[int]], n: int, turns: int, meter: Meter) -> dict[str, Any]:
    """N sessions at once, each ``turns`` turns."""
    run_id = uuid.uuid4().hex[:8]
    traces = [Trace() for _ in range(n)]
    meter.take()

    async def one(index: int) -> int:
        CURRENT.set(traces[index])  # this task's context: its tools and requests see it
        return await run(run_id, index)

    probe = Probe()
    counts, wall = await probe.timed(asyncio.gather(*(one(i) for i in range(n))))
    tokens = sum(counts)
    on_loop, off_loop = meter.take()
    loop_ms, thread_ms = 1e3 * sum(on_loop.values()), 1e3 * sum(off_loop.values())
    by_turn = [{"loop": 1e3 * on_loop.get(k, 0.0), "thread": 1e3 * off_loop.get(k, 0.0)} for k in range(turns)]
    return {
        "sessions": n,
        "wall_s": round(wall, 3),
        "sessions_per_s": round(n / wall, 4),
        "turns_per_s": round(n * turns / wall, 3),
        "gen_tok_per_s": round(tokens / wall, 1),
        "render_tokenize_loop_ms_per_turn": round(loop_ms / (n * turns), 3),
        "render_tokenize_thread_ms_per_turn": round(thread_ms / (n * turns), 3),
        **probe.report(),
        "per_turn": per_turn(traces, by_turn),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The key-wise median of ``runs`` (per turn too)."""
    row: dict[str, Any] = {}
    for key, value in runs[0].items():
        if key == "per_turn":
            row[key] = [
                {name: round(statistics.median(r["per_turn"][k][name] for r in runs), 4) for name in turn}
                for k, turn in enumerate(value)
            ]
        else:
            row[key] = round(statistics.median(r[key] for r in runs), 4)
    return row


def describe(name: str, run: dict[str, Any]) -> str:
    return (
        f"{name} {run['sessions_per_s']:.3f} sess/s (wall {run['wall_s']:.2f} s, render+tokenize "
        f"{run['render_tokenize_loop_ms_per_turn']:.2f} ms/turn on loop + {run['render_tokenize_thread_ms_per_turn']:.2f}"
        f" in threads, loop lag p99 {run['loop_lag_p99_ms']} max {run['loop_lag_max_ms']} ms, gc {run['gc_ms']} ms)"
    )


def print_turns(raw: dict[str, Any], ours: dict[str, Any]) -> None:
    print(
        "[bench]   turn | turn p50 ms raw / qwenrun (diff) | TTFT after tool p50 ms raw / qwenrun | "
        "prompt tok call+answer | cached raw / qwenrun | render+tok ms/session on loop raw / qwenrun",
        flush=True,
    )
    for a, b in zip(raw["per_turn"], ours["per_turn"], strict=True):
        print(
            f"[bench]   {a['turn']:>4} | {1e3 * a['turn_p50_s']:8.1f} / {1e3 * b['turn_p50_s']:8.1f} "
            f"({1e3 * (b['turn_p50_s'] - a['turn_p50_s']):+7.1f}) | {a['ttft_p50_ms']:8.1f} / {b['ttft_p50_ms']:8.1f} | "
            f"{a['call_prompt_tokens']:6.0f} + {a['answer_prompt_tokens']:6.0f} | "
            f"{a['cached_tokens']:8.0f} / {b['cached_tokens']:8.0f} | "
            f"{a['render_tokenize_loop_ms_per_session']:7.2f} / {b['render_tokenize_loop_ms_per_session']:7.2f}",
            flush=True,
        )


async def start_engine(spec: AgentSpec, args: argparse.Namespace, literals: dict[str, str]) -> VLLMEngine:
    engine = VLLMEngine(spec)
    if args.engine == "vllm":
        await engine.start()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        engine.attach(FakeLLM(args.step_ms / 1e3, literals), tokenizer, args.max_model_len)
    engine._engine = MeteredLLM(engine._engine)  # both sides go through the same meter
    return engine


async def main(args: argparse.Namespace) -> dict[str, Any]:
    schemas = tool_schemas(args.tools)
    calls = [call_text(turn_call(schemas, k)) for k in range(args.turns)]
    spec = AgentSpec.from_dict(
        {
            "model": {"path": args.model},
            "engine": {
                "dtype": args.dtype, "load_format": args.load_format, "max_model_len": args.max_model_len,
                "gpu_memory_utilization": args.gpu_memory_utilization, "max_num_seqs": args.max_num_seqs,
                "enforce_eager": args.enforce_eager, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"} if args.cpu else {},
            },
            "sampling": {"temperature": 0.45, "top_p": 0.9, "max_tokens": args.answer_tokens},
            "agent": {"system_prompt": SYSTEM, "max_iterations": 3},
        },
        source="benchmark",
    )  # fmt: skip
    started = time.perf_counter()
    engine = await start_engine(spec, args, {literal_regex(text): text for text in calls})
    report: dict[str, Any] = {"engine": args.engine, "startup_s": round(time.perf_counter() - started, 1),
                              "tools": args.tools, "turns": args.turns, "answer_tokens": args.answer_tokens,
                              "rows": []}  # fmt: skip
    print(f"[bench] engine ({args.engine}) ready in {report['startup_s']} s", flush=True)
    tokenizer = engine._tokenizer
    meter = Meter()
    meter.install(tokenizer, *[p for p in [getattr(engine, "_prompts", None)] if p is not None])
    answer = {"max_tokens": args.answer_tokens, "ignore_eos": True, "logit_bias": no_tool_calls(tokenizer)}
    pins = [PinnedEngine(engine, text, call_max_tokens=96, keep_requests=False, answer_overrides=answer) for text in calls]
    agent = Agent(spec, TurnPinnedEngine(pins), tools=make_tools(schemas))
    prefix = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}], tools=agent.tool_schemas(),
                                           tokenize=False)  # fmt: skip
    report["prefix_tokens"] = len(tokenizer.encode(prefix, add_special_tokens=False))
    prompts = getattr(engine, "_prompts", None)
    report["prompt_pieces"] = bool(prompts is not None and prompts.enabled)
    print(f"[bench] system prompt + {args.tools} tools: {report['prefix_tokens']} tokens; qwenrun reuses "
          f"prompt pieces: {report['prompt_pieces']}", flush=True)  # fmt: skip
    sides = {"raw": raw_side(engine._engine, tokenizer, agent.tool_schemas(), args, answer),
             "qwenrun": qwenrun_side(agent, args.turns)}  # fmt: skip
    warm = min(args.warmup, max(args.sessions))
    for name in ("raw", "qwenrun"):  # grammars, kernels, batch shapes
        await measure(sides[name], warm, args.turns, meter)
    for n in args.sessions:
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "qwenrun": []}
        for rep in range(args.repeat):
            order = ("raw", "qwenrun") if rep % 2 == 0 else ("qwenrun", "raw")
            for name in order:
                runs[name].append(await measure(sides[name], n, args.turns, meter))
            print(f"[bench]   N={n} rep {rep}: {describe('raw', runs['raw'][-1])}; "
                  f"{describe('qwenrun', runs['qwenrun'][-1])}", flush=True)  # fmt: skip
        raw, ours = median_run(runs["raw"]), median_run(runs["qwenrun"])
        ratio = ours["sessions_per_s"] / raw["sessions_per_s"]
        overhead = [round(1e3 * (b["turn_p50_s"] - a["turn_p50_s"]), 2) for a, b in zip(raw["per_turn"], ours["per_turn"], strict=True)]
        report["rows"].append({"n": n, "raw": raw, "qwenrun": ours, "ratio": round(ratio, 4),
                               "reps": [[a["sessions_per_s"], b["sessions_per_s"]] for a, b in zip(runs["raw"], runs["qwenrun"], strict=True)],
                               "turn_overhead_ms": overhead, "runs": runs})  # fmt: skip
        print(f"[bench] N={n:<4} raw {raw['sessions_per_s']:8.3f} sess/s | qwenrun {ours['sessions_per_s']:8.3f} sess/s"
              f" | ratio {ratio:.3f} | loop lag p99 {raw['loop_lag_p99_ms']} / {ours['loop_lag_p99_ms']} ms"
              f" | gc {raw['gc_ms']} / {ours['gc_ms']} ms", flush=True)  # fmt: skip
        print_turns(raw, ours)
    await engine.shutdown()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", choices=["vllm", "fake"], default="vllm")
    parser.add_argument("--step-ms", type=float, default=20.0, help="fake engine: ms per decode step")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--sessions", default="1,16,64")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=16, help="sessions of the warm-up run of each side")
    parser.add_argument("--cpu", action="store_true", help="set VLLM_CPU_KVCACHE_SPACE=1")
    parser.add_argument("--quick", action="store_true", help="smoke: 1 and 3 sessions, 3 turns, 4 tools, 8 tokens, max_model_len <= 4096")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.sessions = [int(n) for n in args.sessions.split(",")]
    if args.quick:
        args.sessions, args.turns, args.tools, args.answer_tokens, args.repeat, args.warmup = [1, 3], 3, 4, 8, 1, 2
        args.max_model_len = min(args.max_model_len, 4096)  # the tiny models' positions
    return args


if __name__ == "__main__":
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    print("RESULT " + json.dumps(result), flush=True)
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(json.dumps(result, indent=1))
