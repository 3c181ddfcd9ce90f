"""The embedding step: preprocessed uint8 pixels -> L2-normalised vectors, through one inference runtime."""

from __future__ import annotations

import logging

import numpy as np

from bento.schemas import ModelDescription, ModelInfo
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

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(N, side, side, 3) uint8 -> (N, dim) float32, each row of unit length; side: one of the
        recipe's input sides (the main crop, or a view's smaller one)."""
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
