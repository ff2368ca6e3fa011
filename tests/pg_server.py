"""A real PostgreSQL server for the tests: ``initdb`` a cluster in a temporary directory, ``pg_ctl``
it on a free loopback port, remove it afterwards. As root, the server runs as the ``postgres`` user
(it refuses root), which then owns the directory. Without the server binaries the tests skip with
how to install them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "free_port", "postgres_server"]

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not on PATH: install them "
    "(Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql@15) to run these tests"
)


class PostgresServer:
    """A running cluster; :meth:`database` makes a fresh database and gives its URL."""

    def __init__(self, port: int, user: str, password: str, run_as: list[str]) -> None:
        self.port, self.user, self.password, self._run_as = port, user, password, run_as

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database's URL (each test gets its own)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for versions in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (versions / name).exists():
            return str(versions / name)
    return None


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL cluster (skips the test when there is no server binary)."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(INSTALL_HINT)
    run_as: list[str] = []
    root = tempfile.mkdtemp(prefix="qwenrun-pg-")
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port, password = os.path.join(root, "data"), free_port(), uuid.uuid4().hex
    pwfile = os.path.join(root, "pw")
    with open(pwfile, "w", encoding="utf-8") as out:
        out.write(password)
    if run_as:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    try:
        subprocess.run([*run_as, initdb, "-D", data, "-U", "qwenrun", "--pwfile", pwfile, "-A", "scram-sha-256",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
        subprocess.run([*run_as, pg_ctl, "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w",
                        "-t", "60", "start"], check=True, capture_output=True)  # fmt: skip
        try:
            yield PostgresServer(port, "qwenrun", password, run_as)
        finally:
            subprocess.run(
                [*run_as, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True
            )
    except subprocess.CalledProcessError as exc:
        log = Path(root, "log")
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else exc.stderr.decode()[-2000:]
        raise RuntimeError(f"cannot start PostgreSQL: {detail}") from exc
    finally:
        shutil.rmtree(root, ignore_errors=True)
