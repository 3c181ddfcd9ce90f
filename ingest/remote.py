"""Embedding through a running service (``--service-url``): same pipeline, the model runs there."""

from __future__ import annotations

import io
import logging
import time

import httpx
import numpy as np

from bento.errors import BackendUnavailable, ModelMismatch
from bento.schemas import ModelInfo
from models.preprocess import Preprocessing

logger = logging.getLogger(__name__)


class RemoteEmbedding:
    """Sends preprocessed pixels (.npy) to ``POST /api/embed``; retries transient failures."""

    def __init__(self, base_url: str, timeout_s: float = 120.0, retries: int = 4) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        description = self._request("GET", "/api/model").json()
        self.info = ModelInfo.model_validate(description["info"])
        self.preprocessing = Preprocessing.from_dict(description["preprocessing"])
        logger.info("Embedding through %s with %s", self.base_url, self.info.model_id)

    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        delay = 1.0
        for attempt in range(1, self.retries + 1):
            try:
                response = self._client.request(method, path, **kwargs)  # type: ignore[arg-type]
            except httpx.TransportError as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise BackendUnavailable(f"{self.base_url}{path} answered {response.status_code}: {response.text[:300]}")
                    return response
                problem = f"HTTP {response.status_code}"
            if attempt < self.retries:
                logger.warning("%s %s failed (%s); retrying in %.0f s", method, path, problem, delay)
                time.sleep(delay)
                delay *= 2
        raise BackendUnavailable(f"The embedding service at {self.base_url} failed {self.retries} times: {problem}")

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        body = io.BytesIO()
        np.save(body, pixels, allow_pickle=False)
        response = self._request(
            "POST", "/api/embed", content=body.getvalue(), headers={"Content-Type": "application/x-npy"}
        )
        served = response.headers.get("X-Model-Id", "")
        if served and served != self.info.model_id:
            raise ModelMismatch(f"The service switched models mid-run ({self.info.model_id} -> {served}).")
        return np.load(io.BytesIO(response.content), allow_pickle=False)

    def close(self) -> None:
        self._client.close()
