"""The embedding step: preprocessed uint8 pixels -> L2-normalised vectors, through one inference runtime."""

from __future__ import annotations

import logging

import numpy as np

from bento.core.errors import ModelUnavailable
from models.backbones import Role
from models.info import ModelDescription, ModelInfo
from models.pipeline import check_pixels
from models.preprocess import Preprocessing
from models.runtime import InferenceRuntime

logger = logging.getLogger(__name__)

class ImageEmbedder:
    """One backbone behind one runtime (models/runtime.py). Call from one thread at a time."""

    def __init__(self, runtime: InferenceRuntime, info: ModelInfo, preprocessing: Preprocessing) -> None:
        self.runtime = runtime
        self.preprocessing = preprocessing
        # The runtime and precision travel with the model identity: /api/status and the collection show them.
        self.info = info.model_copy(update={"runtime": runtime.choice.runtime, "precision": runtime.choice.precision})

    @property
    def device_name(self) -> str:
        return self.runtime.describe()

    def describe(self) -> ModelDescription:
        return ModelDescription(info=self.info, preprocessing=self.preprocessing, device=self.device_name)

    def describe_copy(self) -> ModelDescription | None:
        """One model alone is the catalog's Embedding port without a copy model."""
        return None

    def embed(self, pixels: np.ndarray, role: Role = "similarity") -> np.ndarray:
        """(N, side, side, 3) uint8 -> (N, dim) float32, each row of unit length; side: one of the
        recipe's input sides (the main crop, or a view's smaller one). ``role``: the port's; one model
        alone serves only "similarity"."""
        if role != "similarity":
            raise ModelUnavailable("This embedding has no copy model.")
        check_pixels(pixels, self.preprocessing.input_sides)
        if len(pixels) == 0:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        features = self.runtime.features(pixels)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return (features / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 2)) -> None:
        """Run once per shape class so the first real request does not pay for lazy initialisation
        (OpenVINO compiles each input side on its first use)."""
        for side in self.preprocessing.input_sides:
            for size in batch_sizes:
                self.embed(np.zeros((size, side, side, 3), dtype=np.uint8))


class Embedders:
    """The catalog's ``Embedding`` port in one process: the similarity model, and the copy model (None when
    RIS_MODEL_COPY_NAME=none). The Embedder service holds one of these; so do the ingest job and the tools."""

    def __init__(self, similarity: ImageEmbedder, copy: ImageEmbedder | None) -> None:
        self.similarity = similarity
        self.copy = copy

    def model(self, role: Role) -> ImageEmbedder:
        model = self.similarity if role == "similarity" else self.copy
        if model is None:
            raise ModelUnavailable("No copy model serves (RIS_MODEL_COPY_NAME=none).")
        return model

    def describe(self) -> ModelDescription:
        return self.similarity.describe()

    def describe_copy(self) -> ModelDescription | None:
        return self.copy.describe() if self.copy is not None else None

    def embed(self, pixels: np.ndarray, role: Role = "similarity") -> np.ndarray:
        return self.model(role).embed(pixels)  # each model embeds for its own role

    def warm_up(self) -> None:
        for model in (self.similarity, self.copy):
            if model is not None:
                model.warm_up()
