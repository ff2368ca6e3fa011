"""The ``memory`` toolset: ``remember``, ``recall`` and ``forget`` facts kept in the session store.

A fact is a short key and its text. Facts are rows of the store's ``memories`` table (SQLite or
PostgreSQL, :class:`~qwenrun.sessions.store.MemoryStore`), by *namespace* (``namespace``, default
the agent's name) and *scope*: with ``scope: agent`` (the default) one set for every session of
the namespace, with ``scope: session`` one set per session (:data:`qwenrun.context.SESSION_ID`).
They so survive a restart, and replicas on one PostgreSQL database share them. An agent without a
store (``sessions.enabled: false``, or a library ``Agent`` given none) keeps them in a private
in-memory SQLite store for as long as it lives. The tools are sync functions (the store is
synchronous): each runs on a thread of its own.
"""

from __future__ import annotations

import threading
from typing import Annotated

from pydantic import Field

from qwenrun.context import SESSION_ID
from qwenrun.errors import ToolError
from qwenrun.sessions.store import Fact, MemoryStore
from qwenrun.toolsets.spec import MemoryToolset

__all__ = ["Memory"]

KEY = r"^[\w.:\- ]{1,100}$"
"""A fact's key: 1 to 100 letters, digits, ``_ . : -`` or spaces."""


class Memory:
    """The three tools of one ``memory`` entry, bound to its store and namespace."""

    def __init__(self, settings: MemoryToolset, agent: str, store: MemoryStore | None) -> None:
        self.settings = settings
        self.namespace = settings.namespace or agent
        self._store = store
        self._lock = threading.Lock()

    def described(self) -> str:
        where = "for this conversation only" if self.settings.scope == "session" else "across conversations"
        kept = "" if self._store is not None else " (no session store: kept while the agent runs)"
        return f"Facts are kept {where}{kept}; at most {self.settings.max_facts}."

    @property
    def store(self) -> MemoryStore:
        with self._lock:
            if self._store is None:
                from qwenrun.sessions.sqlite import SQLiteStore

                self._store = SQLiteStore(":memory:")
            return self._store

    def scope(self) -> str:
        """The scope of the running call: "" (the namespace's) or the session id."""
        if self.settings.scope == "agent":
            return ""
        session = SESSION_ID.get()
        if not session:
            raise ToolError("this memory is kept per session, and the call runs outside a session")
        return session

    def remember(
        self,
        key: Annotated[str, Field(pattern=KEY)],
        fact: Annotated[str, Field(min_length=1)],
    ) -> str:
        """Remember a fact for later (it replaces what was remembered under the same key).

        Args:
            key: A short name for the fact, e.g. "user name" or "preferred units".
            fact: What to remember, e.g. "The user's name is Ada".
        """
        limit = self.settings.max_value_chars
        if len(fact) > limit:
            raise ToolError(f"the fact is longer than {limit} characters (max_value_chars)")
        scope = self.scope()
        known = {existing.key for existing in self.store.facts(self.namespace, scope)}
        if key not in known and len(known) >= self.settings.max_facts:
            raise ToolError(f"already {len(known)} facts (max_facts); forget one first")
        self.store.put_fact(self.namespace, scope, key, fact)
        return f"Remembered {key!r}."

    def recall(self, query: Annotated[str, Field(max_length=200)] = "") -> str:
        """Recall remembered facts: those whose key or text holds a word of the query, or all of them.

        Args:
            query: Words to look for (case-insensitive); empty for every fact.
        """
        facts = self.store.facts(self.namespace, self.scope())
        words = query.casefold().split()
        if words:
            facts = [fact for fact in facts if any(word in _text(fact) for word in words)]
        if not facts:
            return "No fact is remembered." if not words else f"No remembered fact matches {query!r}."
        shown = facts[: self.settings.max_results]
        more = len(facts) - len(shown)
        lines = [f"- {fact.key}: {fact.value}" for fact in shown]
        tail = [f"({more} more; narrow the query)"] if more else []
        return "\n".join([f"{len(facts)} fact{'s' if len(facts) != 1 else ''}:", *lines, *tail])

    def forget(self, key: Annotated[str, Field(pattern=KEY)]) -> str:
        """Forget a remembered fact.

        Args:
            key: The key it was remembered under.
        """
        if not self.store.delete_fact(self.namespace, self.scope(), key):
            raise ToolError(f"no fact is remembered under {key!r}")
        return f"Forgot {key!r}."


def _text(fact: Fact) -> str:
    return f"{fact.key} {fact.value}".casefold()
