"""Embedding through a running service (``--service-url``): same pipeline, the model runs there."""

from __future__ import annotations

import logging

import httpx
import numpy as np

from bento.adapters import npy
from bento.core.errors import BackendUnavailable, ConnectionDropped, ModelMismatch, NotFound, error_from_answer
from bento.core.retry import RetryPolicy
from bento.domain.schemas import ModelDescription
from models.backbones import Role

logger = logging.getLogger(__name__)


class RemoteEmbedding:
    """Sends preprocessed pixels (.npy) to ``POST /api/embed`` of a running service.

    Failures become typed domain errors (a dropped connection, a 5xx or a timeout: BackendUnavailable,
    retried by the caller's policy; a 4xx: the service's own error class and message)."""

    def __init__(self, base_url: str, retry: RetryPolicy, api_key: str = "", timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        # /api/embed needs a key with the admin scope wherever keys are configured (docs/security.md).
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers)
        response = retry.call(self._request, "GET", "/api/model")
        self._description = ModelDescription.model_validate_json(response.content)
        self._copy = self._copy_model(retry)
        copy = f" and copy model {self._copy.info.model_id}" if self._copy else " (no copy model)"
        logger.info("Embedding through %s with %s%s", self.base_url, self._description.info.model_id, copy)

    def _copy_model(self, retry: RetryPolicy) -> ModelDescription | None:
        try:
            response = retry.call(self._request, "GET", "/api/model", params={"role": "copy"})
        except NotFound:  # the service serves no copy model
            return None
        return ModelDescription.model_validate_json(response.content)

    def describe(self) -> ModelDescription:
        return self._description

    def describe_copy(self) -> ModelDescription | None:
        return self._copy

    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise ConnectionDropped(f"{self.base_url}{path}: {exc.__class__.__name__}: {exc}") from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"The service at {self.base_url} is unreachable: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise error_from_answer(f"{self.base_url}{path}", response.status_code, response.text)
        return response

    def embed(self, pixels: np.ndarray, role: Role = "similarity") -> np.ndarray:
        description = self._description if role == "similarity" else self._copy
        if description is None:
            raise NotFound(f"The service at {self.base_url} serves no copy model.")
        # The recipe the pixels were prepared with, as this client's code reads the service's description:
        # a service that embeds otherwise refuses them (409) instead of storing wrong vectors.
        headers = {"Content-Type": npy.MEDIA_TYPE, "X-Recipe-Version": description.preprocessing.version}
        response = self._request("POST", "/api/embed", content=npy.to_npy(pixels.astype(np.uint8, copy=False)), headers=headers, params={"role": role})
        served = response.headers.get("X-Model-Id", "")
        if served and served != description.info.model_id:
            raise ModelMismatch(f"The service switched models mid-run ({description.info.model_id} -> {served}).")
        return npy.vectors_from_npy(response.content)

    def close(self) -> None:
        self._client.close()
