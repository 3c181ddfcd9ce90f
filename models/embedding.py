"""The embedding step: preprocessed uint8 pixels -> L2-normalised vectors, on CPU or GPU."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from bento.errors import InvalidRequest
from bento.schemas import ModelInfo
from models.preprocess import Preprocessing

logger = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class ImageEmbedder:
    """Holds one backbone on one device. Thread-compatible: call from one thread at a time."""

    def __init__(self, module: nn.Module, info: ModelInfo, preprocessing: Preprocessing, device: torch.device) -> None:
        self.info = info
        self.preprocessing = preprocessing
        self.device = device
        module = module.eval().to(device)
        if device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        self.module = module

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)}, fp16 autocast)"
        return f"cpu ({torch.get_num_threads()} threads, fp32)"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(N, crop, crop, 3) uint8 -> (N, dim) float32, each row of unit length."""
        crop = self.preprocessing.crop
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (crop, crop, 3):
            raise InvalidRequest(
                f"embed() takes uint8 pixels of shape (N, {crop}, {crop}, 3); got {pixels.dtype} {pixels.shape}"
            )
        if len(pixels) == 0:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
            x = self.preprocessing.normalise(batch)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.float16):
                    features = self.module(x)
            else:
                features = self.module(x)
            vectors = torch.nn.functional.normalize(features.float(), dim=1)
        return vectors.cpu().numpy()

    def warm_up(self, batch_size: int = 2) -> None:
        """Run once so the first real request does not pay for lazy initialisation."""
        crop = self.preprocessing.crop
        self.embed(np.zeros((batch_size, crop, crop, 3), dtype=np.uint8))
