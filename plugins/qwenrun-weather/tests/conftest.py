"""A real HTTP server on 127.0.0.1 that replays recorded Open-Meteo responses (no internet).

Routes (the path picks the behaviour, so one server covers every test):

* ``/v1/search``    geocoding: Guangzhou/广州 -> recorded result (per ``language``), else no results
* ``/v1/forecast``  forecast: the recorded Guangzhou current conditions
* ``/slow/...``     waits (up to 10 s, released at teardown) before answering
* ``/error500/...`` HTTP 500 with a plain-text body
* ``/error400/...`` HTTP 400 with Open-Meteo's JSON error body
* ``/badjson/...``  HTTP 200 with an HTML body
* ``/badshape/...`` HTTP 200 with JSON lacking the expected fields
"""

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@dataclass
class FixtureServer:
    base_url: str
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    release: threading.Event
    log: list[tuple[str, dict[str, str]]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json; charset=utf-8") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout tests): nothing to answer
            pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        params = {key: values[0] for key, values in parse_qs(url.query).items()}
        self.server.log.append((url.path, params))
        path = url.path
        if path.startswith("/slow/"):
            self.server.release.wait(10)
            path = path.removeprefix("/slow")
        if path.startswith("/error500/"):
            self._send(500, b"Internal Server Error", "text/plain")
        elif path.startswith("/error400/"):
            self._send(400, load_fixture("forecast_error_400.json"))
        elif path.startswith("/badjson/"):
            self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        elif path.startswith("/badshape/"):
            self._send(200, b'{"current": {"temperature_2m": "hot"}}')
        elif path == "/v1/search":
            if params.get("name", "").lower() in {"guangzhou", "广州"}:
                language = "zh" if params.get("language") == "zh" else "en"
                self._send(200, load_fixture(f"geocoding_guangzhou_{language}.json"))
            else:
                self._send(200, load_fixture("geocoding_no_results.json"))
        elif path == "/v1/forecast":
            self._send(200, load_fixture("forecast_guangzhou.json"))
        else:
            self._send(404, b'{"error": true, "reason": "Not Found"}')


@pytest.fixture
def open_meteo() -> Iterator[FixtureServer]:
    """Start the replay server on a free port of 127.0.0.1; stop it after the test."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.release = threading.Event()
    server.log = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    fixture = FixtureServer(base_url=f"http://{host!s}:{port}")
    fixture.requests = server.log
    try:
        yield fixture
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
