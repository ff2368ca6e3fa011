"""What the SQLite and PostgreSQL stores share: one writer thread behind a queue, and the schema
version every store keeps.

:class:`QueuedStore` never makes its caller wait for the database: ``append`` serialises the record
and queues it; one writer thread commits what is queued in one transaction (retried on an error the
store calls transient), within milliseconds. A read waits for the queued writes of what it reads
only (a session's records, one response), a list for all of them. A subclass gives
``_transaction(batch)`` and the reads.

Stored responses are kept as *deltas*: a row holds the items a response added to its
``previous_response_id`` (its ``parent``) and ``length``, the size of the whole conversation; a read
follows the chain of parents (:func:`assemble`). A deleted or expired response whose items a newer
one still needs stays as a hidden row (``deleted``) until nothing needs it.
"""

from __future__ import annotations

import atexit
import builtins
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from qwenrun.errors import StoreError
from qwenrun.sessions.store import RecordKind, SessionInfo, StoredResponse, WriteObserver

__all__ = [
    "SCHEMA_VERSION",
    "QueuedStore",
    "chain_response",
    "check_version",
    "delta_rows",
    "memory_key",
]

log = logging.getLogger("qwenrun.sessions")

SCHEMA_VERSION = 3
"""1: responses kept whole (qwenrun 0.1's SQLite files); 2: responses kept as deltas; 3: the
``memories`` table of the memory toolset."""
# ("create", SessionInfo), ("append", session_id, turn, kind, data, meta, created),
# ("response", StoredResponse, items), ("unrespond", id), ("prune", before),
# ("fact", namespace, scope, key, value, time), ("unfact", namespace, scope, key)
Op = tuple[Any, ...]


def check_version(found: int, where: str) -> None:
    """Refuse a database whose schema is newer than this qwenrun's."""
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"{where}: the session database has schema version {found}, newer than this qwenrun's "
            f"({SCHEMA_VERSION}); upgrade qwenrun (an older one must not write to it)"
        )


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def assemble(chain: Sequence[str]) -> builtins.list[dict[str, Any]]:
    """The conversation of a response from the ``items`` of its chain, oldest first."""
    conversation: builtins.list[dict[str, Any]] = []
    for items in chain:
        conversation += json.loads(items)
    return conversation


def chain_response(response_id: str, chain: Sequence[Sequence[Any]]) -> StoredResponse | None:
    """The response of a chain's rows, newest first: (parent, items, owner, created, response)."""
    if not chain:
        return None
    parent, items, owner, created, response = chain[0]
    conversation = assemble([row[1] for row in reversed(chain)])
    own = len(json.loads(items))
    return StoredResponse(response_id, owner, created, json.loads(response), conversation,
                          parent, len(conversation) - own)  # fmt: skip


def delta_rows(
    rows: Sequence[tuple[str, str, str]],
) -> builtins.list[tuple[str, str | None, str, int]]:
    """(id, parent, items, length) of responses kept whole, given as (id, response, conversation)
    oldest first: a response whose ``previous_response_id`` is kept and whose conversation starts
    with that one's keeps only its new items (the migration to schema version 2)."""
    whole: dict[str, builtins.list[Any]] = {}
    converted: builtins.list[tuple[str, str | None, str, int]] = []
    for response_id, response, conversation in rows:
        items = json.loads(conversation)
        previous = json.loads(response).get("previous_response_id")
        head = whole.get(previous) if isinstance(previous, str) else None
        if head is not None and items[: len(head)] == head:
            converted.append((response_id, previous, dumps(items[len(head) :]), len(items)))
        else:
            converted.append((response_id, None, conversation, len(items)))
        whole[response_id] = items
    return converted


def memory_key(namespace: str, scope: str) -> str:
    """What a read of a memory scope waits for (never a valid session id: it holds a ``/``)."""
    return f"memory/{namespace}/{scope}"


def _key_of(op: Op) -> str:
    """What a read waits for: a session's id, or ``responses/<id>`` (never a valid session id)."""
    if op[0] == "create":
        return str(op[1].id)
    if op[0] == "append":
        return str(op[1])
    if op[0] in ("fact", "unfact"):
        return memory_key(op[1], op[2])
    return f"responses/{op[1].id if op[0] == 'response' else op[1]}"


class QueuedStore:
    """The queue, the writer thread and its retries of a store; subclasses write and read."""

    BATCH = 500
    RETRIES = 4
    transient: tuple[type[BaseException], ...] = ()  # errors a retry may cure

    def __init__(self, on_write: WriteObserver | None = None) -> None:
        self._observers: builtins.list[WriteObserver] = [on_write] if on_write is not None else []
        self._queue: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._state = threading.Condition()
        self._queued = self._written = 0
        self._pending: dict[str, int] = {}  # writes queued but not yet done, by what they touch
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwenrun-session-store", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- writing (any thread; never waits for the database) -----------------------------------

    def create(self, info: SessionInfo) -> None:
        self._put(("create", info))

    def append(
        self, session_id: str, turn: int, kind: RecordKind, data: dict[str, Any], meta: dict[str, Any]
    ) -> None:
        # serialised now: a snapshot, and the writer thread does only SQL
        self._put(("append", session_id, turn, kind, dumps(data), dumps(meta), time.time()))

    def put_response(self, stored: StoredResponse) -> None:
        """Queue a response (its new items serialised now) and wait until it is written."""
        self._put(("response", stored, dumps(stored.conversation[stored.inherited :])))
        self._settle(f"responses/{stored.id}")

    def prune_responses(self, older_than: float) -> None:
        self._put(("prune", older_than))

    def put_fact(self, namespace: str, scope: str, key: str, value: str) -> None:
        """Queue a fact of the memory toolset and wait until it is written."""
        self._put(("fact", namespace, scope, key, value, time.time()))
        self._settle(memory_key(namespace, scope))

    def _unfact(self, namespace: str, scope: str, key: str) -> None:
        self._put(("unfact", namespace, scope, key))
        self._settle(memory_key(namespace, scope))

    def _put(self, op: Op) -> None:
        key = _key_of(op)
        with self._state:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._queued += 1
            self._pending[key] = self._pending.get(key, 0) + 1
            self._queue.put(op)

    def flush(self, timeout: float | None = None) -> None:
        with self._state:
            target = self._queued
            self._state.wait_for(lambda: self._written >= target or not self._thread.is_alive(), timeout)

    def _settle(self, key: str) -> None:
        """Wait until the queued writes of ``key`` are done (not the others')."""
        with self._state:
            self._state.wait_for(lambda: key not in self._pending or not self._thread.is_alive())

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        atexit.unregister(self.close)
        self._release()

    def _release(self) -> None:
        """Close the connections (after the writer thread ended)."""

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: builtins.list[Op] = []
            op = self._queue.get()
            while op is not None:
                batch.append(op)
                if len(batch) >= self.BATCH:
                    break
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
            stop = op is None
            if batch:
                self._write(batch)
            with self._state:
                self._written += len(batch)
                for done in batch:
                    key = _key_of(done)
                    left = self._pending.pop(key) - 1
                    if left:
                        self._pending[key] = left
                self._state.notify_all()

    def _write(self, batch: builtins.list[Op]) -> None:
        started = time.perf_counter()
        failed = True
        for attempt in range(self.RETRIES):
            try:
                self._transaction(batch)
                failed = False
                break
            except self.transient as exc:
                if attempt == self.RETRIES - 1:
                    log.error("session store %r: %d records lost: %s", self, len(batch), exc)
                else:
                    log.warning("session store %r: %s; retrying", self, exc)
                    time.sleep(0.05 * 4**attempt)
            except Exception:  # a bug or a value the database refuses: no retry cures it
                log.exception("session store %r: %d records lost", self, len(batch))
                break
        for observer in self._observers:
            try:
                observer(time.perf_counter() - started, len(batch), failed)
            except Exception:  # an observer's bug must not stop the writer
                log.exception("session store observer failed")

    def subscribe(self, observer: WriteObserver) -> None:
        """Call ``observer(seconds, records, failed)`` after each batch this store writes."""
        self._observers.append(observer)

    def _transaction(self, batch: builtins.list[Op]) -> None:
        raise NotImplementedError
