"""The ``fetch`` toolset: one tool, an HTTP(S) GET of a page on an allowed host, read as text.

Every hop (the first URL and each redirect, followed here, never by httpx) is checked in turn:

* the URL: ``http`` or ``https``, no user name or password, a port of ``ports``, and a host that
  ``allow_hosts`` names (compared in its IDNA/punycode form, lower case, without a final dot);
* the host is resolved (``getaddrinfo``) and **every** address it resolves to must be public: not
  loopback, private, link-local, shared, reserved, unspecified or multicast (IPv4-mapped, 6to4 and
  NAT64 IPv6 addresses are judged by the IPv4 address inside), unless ``allow_private`` or
  ``allow_networks`` allows it;
* the request then goes to the **checked address itself** (the URL's host is replaced by it; the
  ``Host`` header and, for HTTPS, the TLS server name and certificate check keep the name), so a DNS
  answer that changes between the check and the connection (DNS rebinding) is never used.

The body is streamed and cut at ``max_bytes`` (after decompression); the whole fetch, redirects
included, is bounded by ``timeout_s``. No proxy is used and no cookie is kept between calls.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from qwenrun.errors import ToolError
from qwenrun.toolsets.spec import FetchToolset

if TYPE_CHECKING:
    import httpx

__all__ = ["Fetcher", "refusal"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_TEXT = ("text/", "application/json", "application/xml", "application/xhtml", "application/javascript",
         "application/ld+json", "application/rss", "application/atom")  # fmt: skip


class Fetcher:
    """The ``fetch`` tool of one entry, bound to its allow-list and limits."""

    def __init__(self, settings: FetchToolset) -> None:
        self.settings = settings

    def described(self) -> str:
        hosts = "any host" if "*" in self.settings.allow_hosts else ", ".join(self.settings.allow_hosts)
        return f"Allowed hosts: {hosts}. At most {self.settings.max_bytes} bytes of a page are read."

    async def fetch(self, url: Annotated[str, Field(min_length=1, max_length=2048)]) -> str:
        """Fetch a web page or file over HTTP(S) (GET) and read it as text.

        Args:
            url: The address, e.g. "https://docs.python.org/3/library/ipaddress.html".
        """
        limit = self.settings.timeout_s
        try:
            async with asyncio.timeout(limit):
                return await self._fetch(url)
        except TimeoutError:
            raise ToolError(f"fetching {url} timed out after {limit:g} s (timeout_s)") from None

    async def _fetch(self, url: str) -> str:
        import httpx  # on the first fetch: `qwenrun validate` builds the tool without it

        timeout = httpx.Timeout(self.settings.timeout_s)
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout) as client:
            current = url
            for _ in range(self.settings.max_redirects + 1):
                target = self.check_url(current)
                address = await self.checked_address(target)
                headers = {"Host": _host_header(target), "User-Agent": self.settings.user_agent,
                           "Accept": "text/html, text/*, application/json, */*;q=0.5"}  # fmt: skip
                extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
                pinned = target.copy_with(host=str(address))
                try:
                    async with client.stream(
                        "GET", pinned, headers=headers, extensions=extensions
                    ) as response:
                        if response.is_redirect:
                            location = response.headers.get("location")
                            if not location:
                                raise ToolError(f"{current}: HTTP {response.status_code} without a Location")
                            current = str(target.join(location))
                            continue
                        return await self._read(response, str(target))
                except httpx.HTTPError as exc:
                    raise ToolError(f"cannot fetch {current}: {type(exc).__name__}: {exc}") from None
            raise ToolError(f"{url}: more than {self.settings.max_redirects} redirects (max_redirects)")

    def check_url(self, url: str) -> httpx.URL:
        """The parsed ``url`` if its scheme, credentials, port and host are allowed; else ToolError."""
        import httpx

        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as exc:
            raise ToolError(f"{url!r} is not a URL: {exc}") from None
        if target.scheme not in ("http", "https"):
            raise ToolError(f"{url}: only http:// and https:// URLs can be fetched")
        if target.userinfo:
            raise ToolError(f"{url}: a user name or password in the URL is refused")
        host = target.raw_host.decode("ascii").lower().rstrip(".")
        if not host:
            raise ToolError(f"{url}: the URL names no host")
        port = target.port or (443 if target.scheme == "https" else 80)
        if port not in self.settings.ports:
            raise ToolError(f"{url}: port {port} is not allowed (ports: {self.settings.ports})")
        if not host_allowed(host, self.settings.allow_hosts):
            raise ToolError(
                f"{url}: host {host!r} is not in allow_hosts ({', '.join(self.settings.allow_hosts)})"
            )
        return target.copy_with(fragment=None)

    async def checked_address(self, target: httpx.URL) -> Address:
        """The address to connect to: every address the host resolves to must be allowed."""
        host = target.raw_host.decode("ascii").rstrip(".")
        port = target.port or (443 if target.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        try:
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ToolError(f"cannot resolve {host!r}: {exc.strerror}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in found]
        if not addresses:
            raise ToolError(f"{host!r} resolves to no address")
        for address in addresses:
            reason = refusal(address, self.settings)
            if reason:
                raise ToolError(f"{host!r} resolves to {address}, {reason}; refused (allow_private)")
        return addresses[0]

    async def _read(self, response: httpx.Response, url: str) -> str:
        cap = self.settings.max_bytes
        chunks: list[bytes] = []
        size = 0
        cut = False
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                cut = True
                break
        body = b"".join(chunks)[:cap]
        kind = response.headers.get("content-type", "")
        head = (
            f"HTTP {response.status_code} {response.reason_phrase} ({kind or 'no content type'}) from {url}"
        )
        if kind and not kind.lower().startswith(_TEXT):
            text = f"({len(body)}{'+' if cut else ''} bytes of {kind}: not shown)"
        else:
            text = body.decode(response.charset_encoding or "utf-8", errors="replace")
        note = f"\n[cut at {cap} bytes (max_bytes)]" if cut else ""
        if response.status_code >= 400:
            raise ToolError(f"{head}\n\n{text[:2000]}")
        return f"{head}\n\n{text}{note}"


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Whether ``host`` (IDNA form, lower case) is one of ``allowed`` or under a ``*.`` entry."""
    for entry in allowed:
        if entry == "*" or entry == host:
            return True
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
    return False


def refusal(address: Address, settings: FetchToolset) -> str | None:
    """Why ``address`` may not be fetched from (None: it may)."""
    inner: Address = address
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            inner = address.ipv4_mapped
        elif address.sixtofour is not None:
            inner = address.sixtofour
        elif address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in network or inner in network for network in settings.allow_networks):
        return None
    if settings.allow_private:
        return None
    for checked in dict.fromkeys((inner, address)):  # the IPv4 address inside first: its kind
        for label in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
            if getattr(checked, f"is_{label}"):
                return f"a {label.replace('_', '-')} address"
        if not checked.is_global:
            return "not a public address"
    return None


def _host_header(target: httpx.URL) -> str:
    host = target.host
    shown = f"[{host}]" if ":" in host else target.raw_host.decode("ascii")
    return shown if target.port is None else f"{shown}:{target.port}"
