"""Who may do what: API keys and their scopes, the keyless loopback mode (this machine's own users only), and
the per-client limits of the expensive routes."""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated
from urllib.parse import urlsplit

import psutil
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from bento.core.config import LimitsSettings, get_settings
from bento.core.errors import (
    Forbidden,
    RateLimited,
)
from bento.http.auth import KeyTable, Principal, Scope, is_loopback, presented_key

logger = logging.getLogger("ris.service")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=1)
def key_table() -> KeyTable:
    auth = get_settings().auth
    return KeyTable.from_settings(auth.keys, auth.keys_file, auth.anonymous_scopes)


@functools.lru_cache(maxsize=1)
def listening_on_loopback_only() -> bool:
    """Whether every socket this API worker listens on is bound to a loopback address.

    BentoML hands its workers an already bound socket, and the ASGI scope names only the address a
    client reached, so the answer comes from the process's own listening sockets. When they cannot be
    read, the answer is no (the safe side: no writes without keys)."""
    try:
        listening = [c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        logger.warning("cannot read this process's listening sockets; treating the service as exposed")
        return False
    return bool(listening) and all(is_loopback(address.ip) for address in listening)


LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def refuse_other_sites(request: Request, scope: Scope) -> None:
    """The keyless loopback mode is open to this machine's own users only: not to a web page that a DNS
    rebinding points at 127.0.0.1 (its Host is another name), and not to another site's form posting
    across origins (no CORS preflight protects a multipart POST)."""
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
    if host not in LOCAL_NAMES:
        raise Forbidden(f"With no API keys this service answers only to localhost, not to the host name {host!r}.")
    origin = urlsplit(request.headers.get("origin", "")).hostname
    cross_site = request.headers.get("sec-fetch-site") == "cross-site" or (origin is not None and origin not in LOCAL_NAMES)
    if scope != "search" and cross_site:
        raise Forbidden("With no API keys, writes from another site's pages are refused.")


# The two ways to present a key, declared as OpenAPI security schemes (the docs' "Authorize" button, and
# clients generated from the schema); auto_error off: the key table decides, with the API's own errors.
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="An API key (`python -m bento.http.auth new`)."
)
BEARER = HTTPBearer(scheme_name="Bearer", auto_error=False, description="The same key as `Authorization: Bearer KEY`.")


def allowed(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A route dependency: the caller's principal, when it may act in ``scope`` (401/403 otherwise)."""

    async def check(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
        x_api_key: Annotated[str | None, Security(API_KEY_HEADER)] = None,
    ) -> Principal:
        loopback = listening_on_loopback_only()
        table = key_table()
        if loopback and not table.configured:
            refuse_other_sites(request, scope)
        authorization = f"Bearer {bearer.credentials}" if bearer else None
        principal = table.identify(presented_key(authorization, x_api_key), loopback)
        table.require(principal, scope, loopback)
        request.state.principal = principal  # the error handler shows failures' details to admins only
        return principal

    return check


Searcher = Annotated[Principal, Depends(allowed("search"))]


Writer = Annotated[Principal, Depends(allowed("write"))]


Admin = Annotated[Principal, Depends(allowed("admin"))]


class ClientLimits:
    """Per-client limits of the expensive routes (a moving window per minute). Counted in this worker's
    memory, or in a shared store (RIS_LIMITS_STORAGE_URI, e.g. Redis) so that several replicas count
    together. Admin principals (the operators' tools, e.g. the remote ingest) are not limited."""

    def __init__(self, per_minute: int, storage_uri: str = "memory://", trusted: Sequence[Network] = ()) -> None:
        self.item = RateLimitItemPerMinute(per_minute) if per_minute > 0 else None
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))
        self.trusted = tuple(trusted)

    @classmethod
    def from_settings(cls, limits: LimitsSettings) -> ClientLimits:
        return cls(limits.expensive_per_minute, limits.storage_uri, limits.trusted_networks)

    def charge(self, request: Request, principal: Principal, route: str) -> None:
        if self.item is None or "admin" in principal.scopes:
            return
        client = f"key:{principal.name}" if principal.name else f"ip:{client_address(request, self.trusted)}"
        if not self.limiter.hit(self.item, route, client):
            reset = self.limiter.get_window_stats(self.item, route, client).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise RateLimited(f"Too many {route} requests; at most {self.item.amount} a minute per client.", wait)


def client_address(request: Request, trusted: Sequence[Network]) -> str:
    """The client's address: the connection's, or, when the connection comes from a trusted proxy, the
    nearest address in X-Forwarded-For that is not a trusted proxy (read from the right: the entries on
    the left are whatever the client sent, and anyone can send one)."""
    peer = request.client.host if request.client else "?"
    if not trusted or not _is_in(peer, trusted):
        return peer
    hops = [hop.strip() for header in request.headers.getlist("x-forwarded-for") for hop in header.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        if not _is_in(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # not an address: the header cannot be trusted
    return peer


def _is_in(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)
