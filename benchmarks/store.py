"""Session store: per-turn write and read time against conversation length, SQLite and PostgreSQL
side by side, stored responses kept whole (the layout before schema 2) and as deltas.

A conversation of N turns is stored as N responses, each continuing the previous one with a user
item and an assistant item (~300 characters each). For each turn: ``write`` is ``put_response``
(it returns once the response is committed), ``read`` is ``get_response`` of it (what the next
``previous_response_id`` costs), ``stored`` the characters its row keeps. "whole" stores every
response with its whole conversation (``parent`` None), "delta" with its parent. Printed per
length: the median of the last turn's timings over the conversations, and the ratio whole/delta.

    python benchmarks/store.py                       # a throw-away PostgreSQL (initdb/pg_ctl on PATH)
    python benchmarks/store.py --url postgresql://USER:PASSWORD@HOST/DB --lengths 1 10 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from qwenrun.sessions.postgres import PostgresStore  # noqa: E402
from qwenrun.sessions.sqlite import SQLiteStore  # noqa: E402
from qwenrun.sessions.store import StoredResponse  # noqa: E402

TEXT = "广州今天多云到晴，气温28~31℃，吹轻微的偏北风。" * 12  # ~300 characters


def item(role: str, n: int) -> dict[str, Any]:
    kind = "input_text" if role == "user" else "output_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": f"{n}: {TEXT}"}]}


def conversation(store: SQLiteStore | PostgresStore, turns: int, delta: bool) -> dict[str, float]:
    """Store one conversation; the last turn's write and read seconds and stored characters."""
    prefix = uuid.uuid4().hex[:8]
    items: list[dict[str, Any]] = []
    previous: StoredResponse | None = None
    write = read = 0.0
    stored = 0
    for n in range(turns):
        new = [*items, item("user", n), item("assistant", n)]
        parent, inherited = (previous.id, len(items)) if delta and previous else (None, 0)
        response = StoredResponse(
            f"{prefix}-{n}", "", time.time(), {"id": f"{prefix}-{n}"}, new, parent, inherited
        )
        started = time.perf_counter()
        store.put_response(response)
        write = time.perf_counter() - started
        started = time.perf_counter()
        got = store.get_response(response.id)
        read = time.perf_counter() - started
        assert got is not None and got.conversation == new
        stored = len(json.dumps(new[inherited:], ensure_ascii=False))
        previous, items = response, new
    return {"write_ms": write * 1000, "read_ms": read * 1000, "stored_chars": stored}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a PostgreSQL database (default: start a throw-away cluster)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--conversations", type=int, default=5, help="per length, store and layout")
    parser.add_argument("--quick", action="store_true", help="lengths 1 and 10, 2 conversations")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.conversations = [1, 10], 2
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        url = args.url
        if url is None:
            from pg_server import postgres_server

            url = stack.enter_context(postgres_server()).database()
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        stores = {"sqlite": SQLiteStore(Path(folder) / "bench.db"), "postgres": PostgresStore(url)}
        for store in stores.values():
            stack.callback(store.close)
        for turns in args.lengths:
            for name, store in stores.items():
                row: dict[str, Any] = {"turns": turns, "store": name}
                for layout in ("whole", "delta"):
                    runs = [conversation(store, turns, layout == "delta") for _ in range(args.conversations)]
                    for key in ("write_ms", "read_ms", "stored_chars"):
                        row[f"{layout}_{key}"] = round(statistics.median(r[key] for r in runs), 3)
                rows.append(row)
    print(f"{'turns':>5} {'store':>8} | {'write ms whole/delta':>22} | {'read ms whole/delta':>21} | "
          f"{'stored chars whole/delta':>26}")  # fmt: skip
    for row in rows:
        cells = []
        for key in ("write_ms", "read_ms", "stored_chars"):
            whole, delta = row[f"whole_{key}"], row[f"delta_{key}"]
            ratio = whole / delta if delta else float("nan")
            cells.append(f"{whole:>8.2f} / {delta:>8.2f} ({ratio:4.1f}x)")
        print(f"{row['turns']:>5} {row['store']:>8} | " + " | ".join(cells))
    report = {"rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
