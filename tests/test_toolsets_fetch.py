"""The ``fetch`` toolset against real HTTP servers on 127.0.0.1 and 127.0.0.2: the host allow-list,
the refusal of non-public addresses (by default, after DNS resolution, on every redirect), the
size cap, the time limit, and what the model reads."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwenrun.agent.plugins import load_tools
from qwenrun.errors import ToolError
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool
from qwenrun.toolsets.fetch import refusal
from qwenrun.toolsets.spec import FetchToolset

RELEASE = threading.Event()  # set at teardown: the slow handlers stop waiting


class Handler(BaseHTTPRequestHandler):
    """/hello, /json, /big, /gzip-bomb, /binary, /missing, /slow, /drip, /redirect?to=URL, /loop."""

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def send(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        host = self.headers.get("Host", "")
        if path == "/hello":
            at = "" if self.server.server_address[0] == "127.0.0.1" else f" at {self.server.server_address[0]}"
            self.send(200, f"hello from {host}{at}".encode())
        elif path == "/json":
            self.send(200, b'{"ok": true}', "application/json")
        elif path == "/big":
            self.send(200, b"x" * 1_000_000)
        elif path == "/gzip-bomb":
            self.send(200, gzip.compress(b"0" * 5_000_000), Content_Encoding="gzip")
        elif path == "/binary":
            self.send(200, b"\x89PNG\x00\x00", "image/png")
        elif path == "/missing":
            self.send(404, b"no such page")
        elif path == "/slow":
            RELEASE.wait(30)
            self.send(200, b"late")
        elif path == "/drip":  # a byte at a time, each well inside any read timeout, forever
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            while not RELEASE.wait(0.05):
                self.wfile.write(b".")
                self.wfile.flush()
        elif path == "/redirect":
            self.send(302, b"", Location=query.removeprefix("to="))
        elif path == "/loop":
            self.send(302, b"", Location="/loop")
        else:
            self.send(500, b"?")


def serve(address: str) -> Iterator[int]:
    server = ThreadingHTTPServer((address, 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        RELEASE.set()
        server.shutdown()
        server.server_close()
        RELEASE.clear()


@pytest.fixture
def port() -> Iterator[int]:
    yield from serve("127.0.0.1")


@pytest.fixture
def other_port() -> Iterator[int]:
    """A second server, on 127.0.0.2 (another loopback address)."""
    yield from serve("127.0.0.2")


def fetch_tool(**settings: Any) -> Tool:
    entry = {"toolset": "fetch", "allow_hosts": ["127.0.0.1"], **settings}
    (tool,) = load_tools(AgentSpec.from_dict({"model": {"path": "x"}, "tools": [entry]}))
    return tool


async def test_a_page_on_an_allowed_private_address(port: int) -> None:
    tool = fetch_tool(ports=[port], allow_private=True)
    text = await tool.call({"url": f"http://127.0.0.1:{port}/hello#part"})
    head = f"HTTP 200 OK (text/plain; charset=utf-8) from http://127.0.0.1:{port}/hello"
    assert text == f"{head}\n\nhello from 127.0.0.1:{port}"  # the Host header keeps the name
    assert (await tool.call({"url": f"http://127.0.0.1:{port}/json"})).endswith('\n\n{"ok": true}')
    binary = await tool.call({"url": f"http://127.0.0.1:{port}/binary"})
    assert binary.endswith("(6 bytes of image/png: not shown)")
    with pytest.raises(ToolError, match=r"HTTP 404 Not Found .*\n\nno such page"):
        await tool.call({"url": f"http://127.0.0.1:{port}/missing"})


async def test_loopback_is_refused_by_default(port: int) -> None:
    tool = fetch_tool(ports=[port], allow_hosts=["127.0.0.1", "localhost", "2130706433", "0x7f.1", "[::1]", "0"])
    for url, address in [
        (f"http://127.0.0.1:{port}/hello", "127.0.0.1"),
        (f"http://localhost:{port}/hello", "(127.0.0.1|::1)"),  # a name, checked after resolution
        (f"http://2130706433:{port}/hello", "127.0.0.1"),  # 127.0.0.1 written as one number
        (f"http://0x7f.1:{port}/hello", "127.0.0.1"),
        (f"http://0:{port}/hello", "0.0.0.0"),
    ]:
        with pytest.raises(ToolError, match=rf"resolves to {address}, a (loopback|unspecified|private) address; refused"):
            await tool.call({"url": url})


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"), ("100.64.0.1", "not a public address"), ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("::1", "loopback"), ("fe80::1", "link-local"),
        ("fc00::1", "private"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"), ("64:ff9b::a00:1", "private"), ("ff02::1", "multicast"),
        ("93.184.216.34", None), ("2606:4700::1111", None),
    ],
)  # fmt: skip
def test_which_addresses_are_refused(address: str, reason: str | None) -> None:
    settings = FetchToolset(toolset="fetch", allow_hosts=["*"])
    found = refusal(ipaddress.ip_address(address), settings)
    assert (found is None) if reason is None else (found is not None and reason in found)
    allowed = FetchToolset(toolset="fetch", allow_hosts=["*"], allow_networks=["10.0.0.0/8"])
    assert (refusal(ipaddress.ip_address("10.9.9.9"), allowed), refusal(ipaddress.ip_address("10.9.9.9"), settings)) == (
        None, "a private address"
    )  # fmt: skip


async def test_allow_networks_lets_one_private_network_in(port: int) -> None:
    tool = fetch_tool(ports=[port], allow_networks=["127.0.0.1/32"])
    assert (await tool.call({"url": f"http://127.0.0.1:{port}/hello"})).endswith(f"hello from 127.0.0.1:{port}")


async def test_every_redirect_is_checked_again(port: int, other_port: int) -> None:
    hosts = ["127.0.0.1", "127.0.0.2", "localhost"]
    open_tool = fetch_tool(ports=[port, other_port], allow_hosts=hosts, allow_private=True)
    to_other = f"http://127.0.0.1:{port}/redirect?to=http://127.0.0.2:{other_port}/hello"
    assert (await open_tool.call({"url": to_other})).endswith(f"hello from 127.0.0.2:{other_port} at 127.0.0.2")
    # the first hop's network is allowed, the redirect's address is not: refused at the redirect
    tool = fetch_tool(ports=[port, other_port], allow_hosts=hosts, allow_networks=["127.0.0.1/32"])
    with pytest.raises(ToolError, match=r"'127\.0\.0\.2' resolves to 127\.0\.0\.2, a loopback address; refused"):
        await tool.call({"url": to_other})
    relative = f"http://127.0.0.1:{port}/redirect?to=/hello"
    assert (await tool.call({"url": relative})).endswith(f"hello from 127.0.0.1:{port}")
    # a host outside allow_hosts, a port outside ports, a scheme that is not HTTP: refused too
    for target, problem in [(f"http://127.0.0.3:{port}/hello", "host '127.0.0.3' is not in allow_hosts"),
                            ("http://127.0.0.1:1/hello", "port 1 is not allowed"),
                            ("file:///etc/passwd", "only http:// and https://")]:  # fmt: skip
        with pytest.raises(ToolError, match=problem):
            await open_tool.call({"url": f"http://127.0.0.1:{port}/redirect?to={target}"})
    with pytest.raises(ToolError, match=r"more than 5 redirects \(max_redirects\)"):
        await open_tool.call({"url": f"http://127.0.0.1:{port}/loop"})


async def test_urls_that_try_to_get_past_the_allow_list(port: int) -> None:
    tool = fetch_tool(ports=[port, 80, 443], allow_hosts=["docs.example.org", "*.example.net"], allow_private=True)
    for url, problem in [
        (f"http://docs.example.org@127.0.0.1:{port}/hello", "user name or password"),
        (f"http://127.0.0.1:{port}/hello?docs.example.org", "host '127.0.0.1' is not in allow_hosts"),
        ("http://docs.example.org.evil.test/", "host 'docs.example.org.evil.test' is not in allow_hosts"),
        ("http://evilexample.net/", "host 'evilexample.net' is not in allow_hosts"),
        ("http://docs%2eexample%2eorg/", "is not in allow_hosts"),
        ("http://dоcs.example.org/", "host 'xn--dcs-.*' is not in allow_hosts"),  # a Cyrillic о
        ("ftp://docs.example.org/", "only http:// and https://"),
        ("docs.example.org/page", "only http:// and https://|not a URL"),
        ("http://docs.example.org:8080/", "port 8080 is not allowed"),
    ]:
        with pytest.raises(ToolError, match=problem):
            await tool.call({"url": url})
    with pytest.raises(ToolError, match=r"cannot resolve 'docs\.example\.org'"):
        await tool.call({"url": "http://DOCS.Example.ORG./"})  # allowed (case and final dot): resolved
    with pytest.raises(ToolError, match="invalid arguments for fetch"):
        await tool.call({"url": f"http://127.0.0.1:{port}/hello", "allow_private": True})
    with pytest.raises(ToolError, match="invalid arguments for fetch"):
        await tool.call({"url": f"http://127.0.0.1:{port}/hello", "headers": {"Host": "docs.example.org"}})


async def test_bodies_are_cut_at_max_bytes_after_decompression(port: int) -> None:
    tool = fetch_tool(ports=[port], allow_private=True, max_bytes=1000)
    big = await tool.call({"url": f"http://127.0.0.1:{port}/big"})
    assert big.endswith("x" * 1000 + "\n[cut at 1000 bytes (max_bytes)]") and "x" * 1001 not in big
    bomb = await tool.call({"url": f"http://127.0.0.1:{port}/gzip-bomb"})
    assert bomb.endswith("0" * 1000 + "\n[cut at 1000 bytes (max_bytes)]") and "0" * 1001 not in bomb


async def test_a_slow_server_meets_the_time_limit(port: int) -> None:
    tool = fetch_tool(ports=[port], allow_private=True, timeout_s=0.3)
    with pytest.raises(ToolError, match=r"timed out after 0.3 s \(timeout_s\)"):
        await tool.call({"url": f"http://127.0.0.1:{port}/slow"})  # the server answers after 30 s
    with pytest.raises(ToolError, match=r"timed out after 0.3 s \(timeout_s\)"):
        await tool.call({"url": f"http://127.0.0.1:{port}/drip"})  # never stops, never pauses long
    assert tool.timeout_s == pytest.approx(1.3)  # the agent's limit leaves room for the fetch's own


# -- the connection goes to the checked address -----------------------------------------------------


def resolving(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Make the running loop's getaddrinfo answer ``answers`` (name -> addresses, one per call, the
    last one repeated) and return the names it was asked for."""
    loop = asyncio.get_running_loop()
    asked: list[str] = []

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        asked.append(host)
        found = answers[host]
        address = found.pop(0) if len(found) > 1 else found[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return asked


async def test_a_dns_answer_that_changes_after_the_check_is_never_used(
    monkeypatch: pytest.MonkeyPatch, port: int, other_port: int
) -> None:
    """DNS rebinding: the name resolves to an allowed address when checked, to another one after;
    the request goes to the checked address (the server there answers), and the name is resolved
    once per hop, by the check."""
    asked = resolving(monkeypatch, {"rebind.test": ["127.0.0.1", "127.0.0.2"]})
    tool = fetch_tool(ports=[port, other_port], allow_hosts=["rebind.test"], allow_networks=["127.0.0.1/32"])
    text = await tool.call({"url": f"http://rebind.test:{port}/hello"})
    assert text.endswith(f"hello from rebind.test:{port}")  # 127.0.0.1's server, the name in Host
    assert asked == ["rebind.test"]
    with pytest.raises(ToolError, match=r"'rebind\.test' resolves to 127\.0\.0\.2, a loopback address"):
        await tool.call({"url": f"http://rebind.test:{other_port}/hello"})  # the next answer: checked too


async def test_a_name_with_one_refused_address_among_several_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in ("93.184.216.34", "10.0.0.7")]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    with pytest.raises(ToolError, match=r"'mixed\.test' resolves to 10\.0\.0\.7, a private address; refused"):
        await fetch_tool(allow_hosts=["mixed.test"]).call({"url": "http://mixed.test/"})


@pytest.fixture
def tls_port(tmp_path: Path) -> Iterator[tuple[int, ssl.SSLContext]]:
    """An HTTPS server on 127.0.0.1 whose certificate names tls.test, and a context trusting its CA."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("tls.test")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("tls.test")]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    names: list[str | None] = []
    server_context.sni_callback = lambda sock, server_name, context: names.append(server_name)  # type: ignore[assignment,func-returns-value]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    try:
        yield server.server_address[1], client
    finally:
        server.shutdown()
        server.server_close()
    assert set(names) <= {"tls.test", "other.test"}  # the TLS server name was always a name, never the IP


async def test_https_to_the_checked_address_verifies_the_name(
    monkeypatch: pytest.MonkeyPatch, tls_port: tuple[int, ssl.SSLContext]
) -> None:
    """HTTPS: the connection goes to the checked address, while the TLS server name and the
    certificate check keep the URL's name (a certificate for another name is refused)."""
    port, trusted = tls_port
    client = httpx.AsyncClient

    def trusting(**options: Any) -> httpx.AsyncClient:
        return client(**options, verify=trusted)

    monkeypatch.setattr(httpx, "AsyncClient", trusting)
    resolving(monkeypatch, {"tls.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    tool = fetch_tool(ports=[port], allow_hosts=["tls.test", "other.test"], allow_networks=["127.0.0.1/32"])
    text = await tool.call({"url": f"https://tls.test:{port}/hello"})
    assert text.endswith(f"hello from tls.test:{port}")
    with pytest.raises(ToolError, match=r"cannot fetch https://other\.test.*(CERTIFICATE_VERIFY_FAILED|Hostname mismatch)"):
        await tool.call({"url": f"https://other.test:{port}/hello"})
