"""Fetching an image by URL for search-by-URL: bounded in bytes and time."""

from __future__ import annotations

import httpx

from bento.errors import ImageTooLarge, InvalidRequest, UrlFetchFailed


class UrlFetcher:
    """One pooled HTTP client for every fetch, made on first use and closed with the service."""

    def __init__(self, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._client: httpx.Client | None = None

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_s, follow_redirects=True, max_redirects=3)
        return self._client

    def fetch(self, url: str) -> bytes:
        if not url.lower().startswith(("http://", "https://")):
            raise InvalidRequest("Only http(s) URLs can be fetched.")
        try:
            with self._http().stream("GET", url) as response:
                if response.status_code != 200:
                    raise UrlFetchFailed(f"Fetching the URL answered HTTP {response.status_code}.")
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ImageTooLarge(f"The image at the URL is over the {self.max_bytes}-byte limit.")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise UrlFetchFailed(f"Fetching the URL failed: {exc.__class__.__name__}: {exc}") from exc
        return b"".join(chunks)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
