"""Two ``qwenrun up … frontend.kind=openai`` processes on two ports, one PostgreSQL database
(tests/pg_server.py) and one engine: a qwenrun OpenAI server on a scripted engine, served by the
test on 127.0.0.1, that both replicas reach with ``engine.kind: openai``. Its answer is every user
message of the request joined with ``|``, so an answer shows exactly which history a replica
rebuilt from the database. A conversation continues on the other replica (``previous_response_id``
and ``X-Qwenrun-Session``), many run at once over both, a replica killed mid-turn loses no
completed turn, and both restarted keep everything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from loopback import serve_in_loop
from pg_server import PostgresServer, free_port

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine
from qwenrun.frontends.openai import create_app
from qwenrun.spec.agent_file import AgentSpec

SERVED = "engine-qwen"
AGENT = "replicated"
SLOW = "slow please"
# at once over both replicas, two Responses and two session turns each (1,000: under a minute on
# this 2-CPU machine beside another suite; QWENRUN_TEST_CONVERSATIONS sets another number)
CONVERSATIONS = int(os.environ.get("QWENRUN_TEST_CONVERSATIONS", "1000"))


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [])


def echo_users(request: ModelRequest) -> str:
    users = [text_of(m["content"]) for m in request.messages if m["role"] == "user"]
    if users and users[-1] == SLOW:
        return "z" * 30_000  # 600 chunks of 50 characters, 20 ms apart: a 12 s turn
    return "|".join(users)


class Slow(ScriptedEngine):
    """Chunks 20 ms apart only for the slow turn (the others answer at once)."""

    async def generate(self, request: Any) -> Any:  # type: ignore[override]
        users = [text_of(m["content"]) for m in request.messages if m["role"] == "user"]
        async for chunk in super().generate(request):
            yield chunk
            if users and users[-1] == SLOW:
                await asyncio.sleep(0.02)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def engine_url() -> AsyncIterator[str]:
    spec = AgentSpec.from_dict(
        {"model": {"path": "scripted", "served_model_name": SERVED}, "agent": {"name": "engine"},
         "frontend": {"kind": "openai"}, "sessions": {"enabled": False}}, source="tests/engine.yaml",
    )  # fmt: skip
    app = create_app(Agent(spec, Slow(echo_users, chunk_size=50), tools=[]))
    async with serve_in_loop(app) as url:
        yield f"{url}/v1"


class Replica:
    """One ``qwenrun up`` process of the agent file on ``port``."""

    def __init__(self, path: Path, port: int, url: str, log: Path) -> None:
        self.path, self.port, self.url, self.log = path, port, url, log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {**os.environ, "QWENRUN_DATABASE_URL": self.url}
        command = [str(Path(sys.executable).parent / "qwenrun"), "up", str(self.path), "--set", "frontend.kind=openai",
                   "--set", f"frontend.port={self.port}"]  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient() as http:
            while True:
                assert self.process.poll() is None, f"replica exited: {self.log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"replica did not start: {self.log.read_text()[-3000:]}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.base}/health", timeout=2)).status_code == 200:
                        return
                await asyncio.sleep(0.3)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="module")
def database(postgres: PostgresServer) -> str:
    return postgres.database()


@pytest.fixture(scope="module")
def replicas(
    engine_url: str, database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    root = tmp_path_factory.mktemp("replicas")
    agent = {
        "model": {"path": SERVED, "served_model_name": SERVED},
        "engine": {"kind": "openai", "base_url": engine_url, "model": SERVED},
        "agent": {"name": AGENT, "system_prompt": "You answer."},
        "frontend": {"kind": "openai"},
        "sessions": {"store": "postgres", "url": "${QWENRUN_DATABASE_URL}"},
    }
    path = root / "agent.yaml"
    path.write_text(yaml.safe_dump(agent, allow_unicode=True), encoding="utf-8")
    pair = [Replica(path, free_port(), database, root / f"replica-{n}.log") for n in range(2)]
    yield pair
    for replica in pair:
        replica.stop()


async def started(replicas: list[Replica]) -> list[Replica]:
    for replica in replicas:
        if replica.process is None or replica.process.poll() is not None:
            await replica.start()
    return replicas


async def respond(
    http: httpx.AsyncClient, replica: Replica, text: str, previous: str | None
) -> dict[str, Any]:
    body = {"model": SERVED, "input": text, "previous_response_id": previous}
    answer = await http.post(f"{replica.base}/v1/responses", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def output_text(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")  # fmt: skip


async def chat(http: httpx.AsyncClient, replica: Replica, session: str, text: str) -> str:
    body = {"model": AGENT, "messages": [{"role": "user", "content": text}]}
    answer = await http.post(f"{replica.base}/v1/chat/completions", json=body, timeout=120,
                             headers={"X-Qwenrun-Session": session})  # fmt: skip
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["message"]["content"])


async def test_a_conversation_started_on_one_replica_continues_on_the_other(replicas: list[Replica]) -> None:
    a, b = await started(replicas)
    async with httpx.AsyncClient() as http:
        first = await respond(http, a, "广州天气?", None)
        second = await respond(http, b, "明天呢?", first["id"])
        assert output_text(second) == "广州天气?|明天呢?"
        third = await respond(http, a, "后天?", second["id"])
        assert output_text(third) == "广州天气?|明天呢?|后天?"
        assert (await http.get(f"{b.base}/v1/responses/{third['id']}")).json()["id"] == third["id"]
        assert (await http.delete(f"{b.base}/v1/responses/{second['id']}")).status_code == 200
        assert (await http.get(f"{a.base}/v1/responses/{second['id']}")).status_code == 404
        fourth = await respond(http, b, "大后天?", third["id"])  # its parent deleted: still whole
        assert output_text(fourth) == "广州天气?|明天呢?|后天?|大后天?"
        assert await chat(http, a, "chat-1", "一") == "一"
        assert await chat(http, b, "chat-1", "二") == "一|二"  # resumed from the database
        assert await chat(http, a, "chat-1", "三") == "一|二|三"


async def test_many_concurrent_conversations_over_both_replicas_mix_nothing(replicas: list[Replica]) -> None:
    pair = await started(replicas)
    # uvicorn closes a connection idle for 5 s, httpx reuses one idle up to 5 s: at equal limits
    # a request can go out on a connection the server is closing (ReadError). Expire sooner.
    limits = httpx.Limits(max_connections=200, keepalive_expiry=2.0)
    gate = asyncio.Semaphore(150)

    async def conversation(n: int) -> None:
        async with gate:
            first = await respond(http, pair[n % 2], f"c{n}-1", None)
            assert output_text(first) == f"c{n}-1"
            second = await respond(http, pair[(n + 1) % 2], f"c{n}-2", first["id"])
            assert output_text(second) == f"c{n}-1|c{n}-2"
            session = f"many-{n}"
            assert await chat(http, pair[n % 2], session, f"s{n}-1") == f"s{n}-1"
            assert await chat(http, pair[(n + 1) % 2], session, f"s{n}-2") == f"s{n}-1|s{n}-2"

    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(conversation(n) for n in range(CONVERSATIONS)))


async def test_a_killed_replica_loses_no_completed_turn_and_the_other_serves(
    replicas: list[Replica], database: str
) -> None:
    a, b = await started(replicas)
    async with httpx.AsyncClient() as http:
        assert await chat(http, a, "killed", "第一") == "第一"
        first = await respond(http, a, "前", None)
        body = {"model": AGENT, "messages": [{"role": "user", "content": SLOW}], "stream": True}
        async with http.stream("POST", f"{a.base}/v1/chat/completions", json=body, timeout=60,
                               headers={"X-Qwenrun-Session": "killed"}) as stream:  # fmt: skip
            async for line in stream.aiter_lines():
                if '"content"' in line:  # the slow turn is under way
                    break
            a.stop(signal.SIGKILL)
        assert (await chat(http, b, "killed", "第三")).startswith("第一|")
        second = await respond(http, b, "后", first["id"])
        assert output_text(second) == "前|后"
    import psycopg

    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT data FROM qwenrun_records WHERE session_id = 'killed' AND kind = 'message' ORDER BY seq"
        ).fetchall()
    users = [m for (m,) in rows if '"role": "user"' in m]
    assert '"第一"' in users[0] and '"第三"' in users[-1]  # the first turn, then the one on b


async def test_restarting_both_replicas_keeps_everything(replicas: list[Replica]) -> None:
    a, b = await started(replicas)
    async with httpx.AsyncClient() as http:
        first = await respond(http, a, "重启前", None)
        assert await chat(http, b, "restart", "一") == "一"
        for replica in replicas:
            replica.stop()
        await started(replicas)
        second = await respond(http, b, "重启后", first["id"])
        assert output_text(second) == "重启前|重启后"
        assert await chat(http, a, "restart", "二") == "一|二"
