"""``sessions:`` of the agent file: where every front end records its sessions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from qwenrun.spec.base import Settings

__all__ = ["SessionsSpec"]


class SessionsSpec(Settings):
    """Where every front end records its sessions (``qwenrun sessions`` reads them back)."""

    enabled: bool = Field(True, description="Record every turn; false: sessions live in memory only.")
    store: Literal["sqlite", "postgres"] = Field(
        "sqlite",
        description="sqlite: one file, nothing to start (the default); postgres: a PostgreSQL "
        "database that several replicas share (sessions.url).",
    )
    path: str | None = Field(
        None,
        min_length=1,
        description="SQLite file (relative: to the agent file) or ':memory:'. Default: "
        "$QWENRUN_SESSIONS_DB, else $XDG_DATA_HOME/qwenrun/sessions.db, else "
        "~/.local/share/qwenrun/sessions.db.",
    )
    url: SecretStr | None = Field(
        None,
        min_length=1,
        description="store: postgres: the database, a libpq URL (postgresql://USER:PASSWORD@HOST/DB); "
        "write ${QWENRUN_DATABASE_URL} to keep the password out of the file. Never logged. "
        "Default: $QWENRUN_DATABASE_URL.",
    )

    @model_validator(mode="after")
    def _one_store(self) -> SessionsSpec:
        if self.store == "sqlite" and self.url is not None:
            raise ValueError("url is for store: postgres (store: sqlite uses path)")
        if self.store == "postgres" and self.path is not None:
            raise ValueError("path is for store: sqlite (store: postgres uses url)")
        return self
