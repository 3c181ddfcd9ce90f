"""The per-client limit of the expensive routes behind a reverse proxy: the client is the nearest address in
X-Forwarded-For that is not a trusted proxy (RIS_LIMITS_TRUSTED_PROXIES), never a value the client made up,
and never the proxy itself (one client could otherwise throttle everyone behind the Ingress)."""

from __future__ import annotations

import ipaddress

import pytest
from starlette.requests import Request

from bento.core.config import LimitsSettings
from bento.core.errors import RateLimited
from bento.http.access import ClientLimits, client_address
from bento.http.auth import Principal

PROXIES = (ipaddress.ip_network("10.0.0.0/8"),)
ANONYMOUS = Principal(name="", scopes=frozenset({"search"}))


def request(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request({"type": "http", "method": "POST", "path": "/api/search/url", "headers": headers, "client": (peer, 40000)})


def test_the_client_behind_a_trusted_proxy_is_the_nearest_untrusted_hop():
    assert client_address(request("10.1.2.3", "203.0.113.7"), PROXIES) == "203.0.113.7"
    # The client wrote its own X-Forwarded-For entry: the proxy appended the real address after it.
    assert client_address(request("10.1.2.3", "198.51.100.1, 203.0.113.7"), PROXIES) == "203.0.113.7"
    # Two proxies (a load balancer, then the Ingress controller), both trusted, both skipped.
    assert client_address(request("10.1.2.3", "203.0.113.7, 10.9.9.9"), PROXIES) == "203.0.113.7"
    assert client_address(request("10.1.2.3", "203.0.113.7", "10.9.9.9"), PROXIES) == "203.0.113.7"  # two headers
    assert client_address(request("10.1.2.3", "2001:db8::1"), PROXIES) == "2001:db8::1"


def test_without_a_trusted_proxy_the_header_is_ignored():
    assert client_address(request("203.0.113.9", "198.51.100.1"), PROXIES) == "203.0.113.9"  # not from a proxy
    assert client_address(request("10.1.2.3", "198.51.100.1"), ()) == "10.1.2.3"  # no proxy configured
    assert client_address(request("10.1.2.3"), PROXIES) == "10.1.2.3"  # a proxy that sent no header
    assert client_address(request("10.1.2.3", "not-an-ip"), PROXIES) == "10.1.2.3"  # a header that is not one
    assert client_address(request("10.1.2.3", "10.5.5.5"), PROXIES) == "10.1.2.3"  # only proxies in it


def test_clients_behind_one_proxy_have_their_own_budgets():
    limits = ClientLimits(2, "memory://", PROXIES)
    for _ in range(2):
        limits.charge(request("10.1.2.3", "203.0.113.7"), ANONYMOUS, "URL search")
    with pytest.raises(RateLimited):
        limits.charge(request("10.1.2.3", "203.0.113.7"), ANONYMOUS, "URL search")
    # Another client through the same Ingress controller is not throttled by the first one...
    limits.charge(request("10.1.2.3", "203.0.113.8"), ANONYMOUS, "URL search")
    # ...and the first one cannot escape by reaching another proxy, or by inventing a forwarded address.
    with pytest.raises(RateLimited):
        limits.charge(request("10.4.4.4", "203.0.113.7"), ANONYMOUS, "URL search")
    with pytest.raises(RateLimited):
        limits.charge(request("10.1.2.3", "192.0.2.55, 203.0.113.7"), ANONYMOUS, "URL search")


def test_the_limit_settings_are_checked_and_read():
    limits = LimitsSettings(trusted_proxies="10.0.0.0/8, 192.168.1.10", storage_uri="memory://")
    assert limits.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.10/32"))
    assert ClientLimits.from_settings(limits).trusted == limits.trusted_networks
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        LimitsSettings(trusted_proxies="10.0.0.0/8, the-ingress")
    with pytest.raises(ValueError, match="STORAGE_URI"):
        LimitsSettings(storage_uri="localhost:6379")
