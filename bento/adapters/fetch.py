"""Fetching an image by URL for search-by-URL, safe to offer to the internet (no SSRF).

Every hop (the URL and each redirect) is vetted before anything is sent: http(s) only, no credentials in
the URL, the host resolved here and *every* address it resolves to must be global (not loopback, private,
link-local, CGNAT, multicast, reserved, unspecified, nor an IPv4 address hidden in IPv6), ports 80/443
only, unless an allow-list entry (``RIS_FETCH_ALLOW``) names the host or network (an intranet). The
connection then goes to the vetted address itself (the Host header and TLS name stay the URL's), so a
second DNS answer cannot swap in an internal address. One deadline covers resolving, connecting, every
redirect and the body; the body is read raw (no decompression) and capped; proxies from the environment
are ignored; only so many fetches run at once. Errors say what was refused, never what a host answered
beyond its HTTP status.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import anyio
import httpx

from bento.core.config import FetchSettings
from bento.core.errors import BackendUnavailable, ImageTooLarge, InvalidRequest, UrlFetchFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_REDIRECTS = 3
DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class AllowEntry:
    """An allow-list entry: a host name or a network, optionally one port."""

    host: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        text = text.strip()
        port: int | None = None
        body = text
        if text.startswith("["):  # [v6]:port, [v6/len]:port or [v6]/len
            body, _, rest = text[1:].partition("]")
            if rest.startswith("/"):
                prefix, _, rest = rest[1:].partition(":")
                body, rest = f"{body}/{prefix}", f":{rest}" if rest else ""
            port = int(rest[1:]) if rest.startswith(":") else None
        elif text.count(":") == 1:
            body, port_text = text.split(":")
            port = int(port_text)
        try:
            return cls(None, ipaddress.ip_network(body, strict=False), port)
        except ValueError:
            if not body or "/" in body:
                raise ValueError(f"RIS_FETCH_ALLOW: {text!r} is not a host, host:port, CIDR or CIDR:port") from None
            return cls(body.lower().rstrip("."), None, port)

    def admits(self, host: str, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address in self.network
        return host == self.host


def public(address: IPAddress) -> bool:
    """A global unicast address (an IPv4 address inside IPv6 is judged as itself)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return public(embedded)
    site_local = isinstance(address, ipaddress.IPv6Address) and address.is_site_local
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_link_local or site_local)


class UrlFetcher:
    """One per API worker, used from its event loop: ``await fetcher.fetch(url)``."""

    def __init__(self, settings: FetchSettings, max_bytes: int) -> None:
        self.settings = settings
        self.max_bytes = max_bytes
        self.allow = [AllowEntry.parse(entry) for entry in settings.allow.split(",") if entry.strip()]
        self._in_flight = 0
        # Loading the CA bundle costs ~25 ms: once per worker, not once per fetch. (A client per fetch stays:
        # each connects to the address vetted for that fetch, and a client is tied to its event loop.)
        self._tls = httpx.create_ssl_context()

    async def fetch(self, url: str) -> bytes:
        # A slot or an answer now: a request never queues behind slow fetches (503, Retry-After).
        if self._in_flight >= self.settings.max_concurrent:
            raise BackendUnavailable("Too many URL searches are running right now; try again in a few seconds.", public=True)
        self._in_flight += 1
        try:
            # One deadline for everything (resolving, connecting, headers, redirects, body): cancellation,
            # not per-read timeouts, so a server that drips its headers cannot hold a fetch open.
            with anyio.fail_after(self.settings.timeout_s):
                return await self._follow(url)
        except TimeoutError as exc:
            raise UrlFetchFailed(f"Fetching the URL took longer than {self.settings.timeout_s} s.") from exc
        finally:
            self._in_flight -= 1

    async def _follow(self, url: str) -> bytes:
        # trust_env=False: no proxy (nor .netrc) from the environment; redirects are followed (and vetted) here.
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None, verify=self._tls) as client:
            for _ in range(MAX_REDIRECTS + 1):
                host, address, port, scheme = await self._vet(url)
                request = self._request(client, url, host, address, port, scheme)
                try:
                    response = await client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise UrlFetchFailed(f"Fetching the URL failed: {exc.__class__.__name__}.") from exc
                try:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise UrlFetchFailed(f"Fetching the URL answered HTTP {response.status_code}.")
                    return await self._body(response)
                finally:
                    await response.aclose()
        raise UrlFetchFailed(f"The URL redirected more than {MAX_REDIRECTS} times.")

    async def _vet(self, url: str) -> tuple[str, IPAddress, int, str]:
        """(host as ASCII, the address to connect to, port, scheme), or the reason the URL is refused."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidRequest(f"The URL is not valid: {exc}.") from exc
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise InvalidRequest("Only http(s) URLs can be fetched.")
        if parts.username is not None or parts.password is not None:
            raise InvalidRequest("URLs with credentials are not fetched.")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise InvalidRequest("The URL has no host.")
        try:
            host = host.encode("idna").decode("ascii")  # an internationalised name, as DNS and Host know it
        except UnicodeError as exc:
            raise InvalidRequest("The URL's host is not a valid host name.") from exc
        port = port or DEFAULT_PORTS[scheme]
        addresses = await self._resolve(host, port)
        for address in addresses:
            allowed = any(entry.admits(host, address, port) for entry in self.allow)
            if not allowed and not public(address):
                # The address itself is not told: it would map internal names for anyone who asks.
                raise UrlFetchFailed(f"Refused: {host} resolves to a non-public address.")
            if not allowed and port not in DEFAULT_PORTS.values():
                raise UrlFetchFailed(f"Refused: port {port}; only ports 80 and 443 are fetched.")
        return host, addresses[0], port, scheme

    @staticmethod
    async def _resolve(host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as exc:
            raise UrlFetchFailed(f"The host {host} cannot be resolved.") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
        if not addresses:
            raise UrlFetchFailed(f"The host {host} cannot be resolved.")
        return addresses

    @staticmethod
    def _request(client: httpx.AsyncClient, url: str, host: str, address: IPAddress, port: int, scheme: str) -> httpx.Request:
        parts = urlsplit(url)
        literal = f"[{address}]" if address.version == 6 else str(address)
        target = f"{scheme}://{literal}:{port}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
        default = DEFAULT_PORTS[scheme] == port
        headers = {"Host": host if default else f"{host}:{port}", "Accept-Encoding": "identity", "Accept": "image/*"}
        try:
            return client.build_request(
                "GET", target, headers=headers, extensions={"sni_hostname": host} if scheme == "https" else {}
            )
        except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
            raise InvalidRequest(f"The URL is not valid: {exc.__class__.__name__}.") from exc

    async def _body(self, response: httpx.Response) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise UrlFetchFailed(f"Refused: the server sent a {encoding}-compressed body.")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageTooLarge(f"The image at the URL is over the {self.max_bytes}-byte limit.")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.max_bytes:
                    raise ImageTooLarge(f"The image at the URL is over the {self.max_bytes}-byte limit.")
                chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise UrlFetchFailed(f"Fetching the URL failed: {exc.__class__.__name__}.") from exc
        return b"".join(chunks)
