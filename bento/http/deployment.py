"""What the deployment's settings mean for the BentoML services (read when service.py defines them):
the embedder's resources and adaptive batching, and how callers pool their connections to a service."""

from __future__ import annotations

import shutil
from typing import Any

from bento.core.config import Settings
from models.runtime import torch_installed

# How callers of a service pool their connections to it. BentoML 1.4.40 replaces its HTTP session every
# 100 requests or 300 s by default and closes the old one under calls still in flight on it
# (bentoml/BentoML#5540): under load that failed searches with 500s. The session is never recycled
# (the peers are fixed service addresses); a connection the peer closes is ConnectionDropped, retried.
DEPENDENCY_CONNECTION = {"max_requests": 2**62, "max_age": 10 * 365 * 24 * 3600.0}


def embedder_resources(settings: Settings) -> dict[str, Any]:
    """One GPU for the embedder when the model is to run on CUDA (or auto and a GPU is present, and PyTorch
    is here to use it: the CPU image, on a GPU node, runs on the CPU and asks for nothing)."""
    gpu_here = shutil.which("nvidia-smi") and torch_installed()
    wants_gpu = settings.model.device == "cuda" or (settings.model.device == "auto" and gpu_here)
    return {"gpu": 1} if wants_gpu else {}


def embed_batching_options(settings: Settings) -> dict[str, Any]:
    """Adaptive batching of the embed API (docs/performance.md: "Adaptive batching"); off = one model call per request."""
    if not settings.batching.enabled:
        return {}
    return {
        "batchable": True,
        "batch_dim": 0,
        "max_batch_size": settings.batching.max_batch_size,
        "max_latency_ms": settings.batching.max_latency_ms,
    }
