"""Search-by-URL fetching (bento/adapters/fetch.py): what it refuses before sending anything, and what it bounds.
A plain HTTP server on loopback (tests/conftest.py image_host) plays an intranet host on the allow-list."""

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest

from bento.adapters.fetch import AllowEntry, UrlFetcher, public
from bento.core.config import FetchSettings
from bento.core.errors import ImageTooLarge, InvalidRequest, UrlFetchFailed


class _Fetcher:
    """The async fetcher, called as the tests' synchronous code would (one event loop per fetch)."""

    def __init__(self, fetcher: UrlFetcher) -> None:
        self.fetcher = fetcher

    def fetch(self, url: str) -> bytes:
        return anyio.run(self.fetcher.fetch, url)


def _fetcher(allow: str = "", timeout_s: float = 5.0, max_bytes: int = 1_000_000) -> _Fetcher:
    return _Fetcher(UrlFetcher(FetchSettings(allow=allow, timeout_s=timeout_s), max_bytes))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/", "http://localhost/", "http://[::1]/", "http://0.0.0.0/", "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/", "http://192.168.1.1/", "http://172.16.0.1/", "http://100.64.0.1/", "http://224.0.0.1/",
        "http://[::ffff:127.0.0.1]/", "http://[fe80::1]/", "http://[fc00::1]/", "http://2130706433/", "http://0x7f.1/",
        "http://[64:ff9b::a00:1]/", "http://[2002:7f00:1::]/", "http://240.0.0.1/", "http://255.255.255.255/",
    ],
)
def test_non_public_addresses_are_refused_before_connecting(url):
    with pytest.raises(UrlFetchFailed, match="Refused: .* non-public address\\.$"):
        _fetcher().fetch(url)


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        ("file:///etc/passwd", InvalidRequest, "Only http"),
        ("ftp://example.com/a.jpg", InvalidRequest, "Only http"),
        ("gopher://127.0.0.1:70/", InvalidRequest, "Only http"),
        ("http://user:pw@example.com/a.jpg", InvalidRequest, "credentials"),
        ("http:///a.jpg", InvalidRequest, "no host"),
        ("http://example.com:99999/", InvalidRequest, "not valid"),
        ("http://1.1.1.1:8080/a.jpg", UrlFetchFailed, "port 8080"),
        ("http://a..b/x.jpg", InvalidRequest, "not a valid host name"),
        ("http://" + "x" * 64 + ".example/x.jpg", InvalidRequest, "not a valid host name"),
        ("http://[fec0::1]/", UrlFetchFailed, "non-public"),
    ],
)
def test_other_refusals_say_why(url, error, message):
    with pytest.raises(error, match=message):
        _fetcher().fetch(url)


def test_public_is_global_unicast_only():
    import ipaddress

    assert public(ipaddress.ip_address("1.1.1.1")) and public(ipaddress.ip_address("2606:4700:4700::1111"))
    assert not public(ipaddress.ip_address("::ffff:10.0.0.1")) and public(ipaddress.ip_address("::ffff:1.1.1.1"))


def test_allow_list_entries_parse_and_match():
    import ipaddress

    local = ipaddress.ip_address("127.0.0.1")
    assert AllowEntry.parse("127.0.0.1:8080").admits("x", local, 8080)
    assert not AllowEntry.parse("127.0.0.1:8080").admits("x", local, 80)
    assert AllowEntry.parse("10.0.0.0/8").admits("x", ipaddress.ip_address("10.1.2.3"), 9000)
    assert AllowEntry.parse("images.intra").admits("images.intra", local, 443)
    assert AllowEntry.parse("[::1]:81").admits("x", ipaddress.ip_address("::1"), 81)
    assert AllowEntry.parse("[fd00::]/8").admits("x", ipaddress.ip_address("fd12::5"), 443)
    assert AllowEntry.parse("[fd00::/8]:8443").admits("x", ipaddress.ip_address("fd12::5"), 8443)
    with pytest.raises(ValueError):
        AllowEntry.parse("bad/entry/x")


def test_an_allowed_intranet_host_is_fetched(image_host):
    (image_host.root / "a.bin").write_bytes(b"\x89PNG fake but bytes")
    fetcher = _fetcher(allow=f"127.0.0.1:{image_host.port}")
    assert fetcher.fetch(f"{image_host.url}/a.bin") == b"\x89PNG fake but bytes"
    with pytest.raises(UrlFetchFailed, match="HTTP 404"):
        fetcher.fetch(f"{image_host.url}/missing.jpg")
    with pytest.raises(UrlFetchFailed, match="non-public"):  # the same host on another port is not allowed
        fetcher.fetch(f"http://127.0.0.1:{image_host.port + 1}/a.bin")


def test_every_redirect_is_vetted_again(image_host):
    (image_host.root / "b.bin").write_bytes(b"fine")
    fetcher = _fetcher(allow=f"127.0.0.1:{image_host.port}")
    assert fetcher.fetch(f"{image_host.url}/redirect?to=/b.bin") == b"fine"
    with pytest.raises(UrlFetchFailed, match="non-public"):
        fetcher.fetch(f"{image_host.url}/redirect?to=http://127.0.0.1:9091/healthz")
    with pytest.raises(UrlFetchFailed, match="non-public"):
        fetcher.fetch(f"{image_host.url}/redirect?to=http://169.254.169.254/latest/meta-data/")
    loop = f"{image_host.url}/redirect?to=" + f"{image_host.url}/redirect?to=" * 4 + "/b.bin"
    with pytest.raises(UrlFetchFailed, match="redirected more than"):
        fetcher.fetch(loop)


class _Hostile(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/drip-headers":  # one header byte at a time: per-read timeouts never fire
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(200):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.1)
            return
        if self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/gzip":
            body = gzip.compress(b"\0" * 1_000_000)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"y" * 65536)
        else:
            self.send_response(200)
            self.send_header("Content-Length", "5000000")
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", server.server_port
    server.shutdown()


def test_bodies_are_bounded_in_bytes_time_and_encoding(hostile_host):
    base, port = hostile_host
    fetcher = _fetcher(allow=f"127.0.0.1:{port}", timeout_s=1.5, max_bytes=100_000)
    started = time.monotonic()
    with pytest.raises(UrlFetchFailed, match="longer than 1.5 s"):
        fetcher.fetch(f"{base}/trickle")
    assert time.monotonic() - started < 4, "one deadline for the whole fetch, not per read"
    started = time.monotonic()
    with pytest.raises(UrlFetchFailed, match="longer than 1.5 s"):
        fetcher.fetch(f"{base}/drip-headers")
    assert time.monotonic() - started < 3, "the deadline covers the response headers too"
    with pytest.raises(UrlFetchFailed, match="gzip-compressed"):
        fetcher.fetch(f"{base}/gzip")
    with pytest.raises(ImageTooLarge):
        fetcher.fetch(f"{base}/endless")
    with pytest.raises(ImageTooLarge):
        fetcher.fetch(f"{base}/declared-too-big")


def test_proxies_from_the_environment_are_ignored(image_host, monkeypatch):
    (image_host.root / "c.bin").write_bytes(b"direct")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert _fetcher(allow=f"127.0.0.1:{image_host.port}").fetch(f"{image_host.url}/c.bin") == b"direct"


def test_a_full_house_answers_at_once_instead_of_queueing(image_host):
    from bento.core.errors import BackendUnavailable

    fetcher = UrlFetcher(FetchSettings(allow=f"127.0.0.1:{image_host.port}", max_concurrent=1), 1000)
    fetcher._in_flight = 1  # one fetch already running
    with pytest.raises(BackendUnavailable, match="Too many URL searches"):
        anyio.run(fetcher.fetch, f"{image_host.url}/x")
