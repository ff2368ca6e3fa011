"""Shared fixtures: the tiny Qwen2 model (built once, cached in .cache/tiny-qwen2), its agent
spec, and one started vLLM engine for the whole session (it takes about a minute on 2 CPUs);
the tiny model's Qwen3 flavours (.cache/tiny-qwen3, .cache/tiny-qwen3-coder) and ``flavour_engine``,
a started engine of each, one at a time (pytest runs the tests of one flavour, then the other).

The real-model tier (``@pytest.mark.real_model``): ``real_model_dir`` fetches Qwen2.5-Coder-0.5B
through :mod:`qwenrun.weights.fetch` into the shared cache (once per machine, about a minute), ``real_spec``
is ``agents/weather-small.yaml`` on it, and ``real_engine`` one started engine for the session."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import tempfile
import warnings

# Before anything imports vLLM or transformers: no hub, a small CPU KV cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Agents record their sessions by default: never into the user's own database during tests.
os.environ["QWENRUN_SESSIONS_DB"] = os.path.join(
    tempfile.mkdtemp(prefix="qwenrun-test-sessions-"), "sessions.db"
)

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pg_server import PostgresServer, postgres_server

from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.sessions.postgres import PostgresStore
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.weights.fetch import fetch
from qwenrun.weights.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-model tier runs last: its engine, once started, lives to the end of the session, and
    must not be running beside the tiny engine while the other tiers measure memory or time."""
    items.sort(key=lambda item: item.get_closest_marker("real_model") is not None)  # stable


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny model, built on first use into the git-ignored ``.cache/tiny-qwen2``."""
    return build_tiny_model(ROOT / ".cache" / "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir() -> Path:
    """The tiny model's qwen3 flavour (Qwen3's template: thinking, Hermes calls)."""
    return build_tiny_model(ROOT / ".cache" / "tiny-qwen3", flavour="qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_coder_dir() -> Path:
    """The tiny model's qwen3_coder flavour (Qwen3-Coder's template: XML calls)."""
    return build_tiny_model(ROOT / ".cache" / "tiny-qwen3-coder", flavour="qwen3_coder")


def flavour_spec(directory: Path, flavour: str) -> AgentSpec:
    """The engine spec of a Qwen3 flavour. The qwen3 one has a thinking budget, so its engine runs
    vLLM's qwen3 reasoning parser (which vLLM's thinking_token_budget needs); qwen3_coder's has none."""
    agent = {"thinking_budget": 64} if flavour == "qwen3" else {}
    return AgentSpec.from_dict(
        {
            "model": {"path": str(directory), "served_model_name": f"tiny-{flavour.replace('_', '-')}"},
            "engine": {"dtype": "float32", "gpu_memory_utilization": 0.2, "max_model_len": 2048,
                       "max_num_seqs": 32, "enforce_eager": True, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
            "sampling": {"max_tokens": 200, "temperature": 0},
            "agent": agent,
        },
        source=f"tests/{flavour}.yaml",
    )  # fmt: skip


@pytest_asyncio.fixture(scope="session", loop_scope="session", params=["qwen3", "qwen3_coder"])
async def flavour_engine(request: pytest.FixtureRequest) -> AsyncIterator[VLLMEngine]:
    """A started engine of the tiny model's qwen3 or qwen3_coder flavour (``engine.spec`` says
    which); pytest keeps one alive at a time and shuts the last one down at the end."""
    flavour = request.param
    directory = build_tiny_model(ROOT / ".cache" / f"tiny-{flavour.replace('_', '-')}", flavour=flavour)
    async with started_engine(flavour_spec(directory, flavour)) as engine:
        yield engine


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir: Path) -> AgentSpec:
    return AgentSpec.from_dict(
        {
            "model": {"path": str(tiny_model_dir), "served_model_name": "tiny-qwen2"},
            "engine": {
                "dtype": "float32",
                "gpu_memory_utilization": 0.2,
                "max_model_len": 2048,
                "max_num_seqs": 64,
                "enforce_eager": True,
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            },
            "sampling": {"max_tokens": 32, "temperature": 0},
        },
        source="tests/tiny.yaml",
    )


@asynccontextmanager
async def started_engine(spec: AgentSpec) -> AsyncIterator[VLLMEngine]:
    """A started engine of ``spec``, shut down (and its warnings silenced) on exit."""
    engine = VLLMEngine(spec)
    with warnings.catch_warnings():
        # torch 2.13 warns when vLLM's config code imports torch.utils.mkldnn (torch's own code)
        warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning)
        await engine.start()
    try:
        yield engine
    finally:
        with warnings.catch_warnings():
            # vLLM never terminates its ZMQ context; pyzmq warns when it is collected
            warnings.filterwarnings("ignore", r"Unclosed context", ResourceWarning)
            await engine.shutdown()
            await asyncio.sleep(0.1)  # let the cancelled output tasks finish
            gc.collect()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny_spec: AgentSpec) -> AsyncIterator[VLLMEngine]:
    """One started engine for the whole session, shut down at the end."""
    async with started_engine(tiny_spec) as engine:
        yield engine


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, fetched and converted once into the cache (shared, atomic)."""
    return fetch("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def real_spec(real_model_dir: Path) -> AgentSpec:
    """``agents/weather-small.yaml`` on the fetched model (float32, temperature 0)."""
    return AgentSpec.from_file(ROOT / "agents" / "weather-small.yaml", [f"model.path={real_model_dir}"])


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def real_engine(real_spec: AgentSpec) -> AsyncIterator[VLLMEngine]:
    """One started engine on the real model for the whole session (about 50 s to start here)."""
    async with started_engine(real_spec) as engine:
        yield engine


# -- the session stores: SQLite and a real PostgreSQL (tests/pg_server.py) ------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL cluster for the session (skips where no server is installed)."""
    with postgres_server() as server:
        yield server


class StoreDB:
    """One database of a kind (``sqlite`` or ``postgres``); :meth:`open` gives a store on it, as many
    as wanted (like replicas of a server), all closed at the end of the test."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind, self.where = kind, where
        self.opened: list[SQLiteStore | PostgresStore] = []

    def open(self) -> SQLiteStore | PostgresStore:
        store = SQLiteStore(self.where) if self.kind == "sqlite" else PostgresStore(self.where)
        self.opened.append(store)
        return store

    def table(self, name: str) -> str:
        return name if self.kind == "sqlite" else f"qwenrun_{name}"

    def rows(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """The rows of a query, on a connection of its own (what is committed)."""
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.where)) as conn:
                return conn.execute(query, args).fetchall()
        import psycopg

        with psycopg.connect(self.where, autocommit=True) as conn:
            cursor = conn.execute(query.replace("?", "%s"), args)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []


@pytest.fixture(params=["sqlite", "postgres"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreDB]:
    """A fresh database of each store kind."""
    if request.param == "sqlite":
        db = StoreDB("sqlite", str(tmp_path / "sessions.db"))
    else:
        db = StoreDB("postgres", request.getfixturevalue("postgres").database())
    yield db
    for store in db.opened:
        store.close()
