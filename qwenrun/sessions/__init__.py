"""Sessions that last: the store protocol and its records (:mod:`qwenrun.sessions.store`), the
SQLite store (:mod:`qwenrun.sessions.sqlite`), the PostgreSQL one (:mod:`qwenrun.sessions.postgres`),
and :func:`open_store`, the store an agent file names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwenrun.errors import ConfigError
from qwenrun.sessions.store import SessionStore, database_url, store_path

if TYPE_CHECKING:
    from qwenrun.spec.agent_file import AgentSpec

__all__ = ["open_store"]


def open_store(spec: AgentSpec) -> SessionStore | None:
    """The store a spec's ``sessions`` section names, or None when ``sessions.enabled`` is false."""
    if not spec.sessions.enabled:
        return None
    if spec.sessions.store == "postgres":
        url = database_url(spec)
        try:
            from qwenrun.sessions.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(f"{spec.source}: sessions.store: postgres needs psycopg 3: "
                              f"pip install 'qwenrun[postgres]' ({exc})") from None  # fmt: skip
        return PostgresStore(url)
    from qwenrun.sessions.sqlite import SQLiteStore

    return SQLiteStore(store_path(spec))
