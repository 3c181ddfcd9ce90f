"""The BentoML model store: import a backbone once, load it everywhere (service, ingest, bento).

Choosing the model (``RIS_MODEL_NAME``):
- a backbone's name (``resnet50``, ``efficientnet-lite0``...): that one, with the weights its settings name;
- ``auto``: the first backbone of the registry (models/backbones.py: ResNet-50, then EfficientNet-Lite0)
  whose pretrained weights can be obtained, with the reason logged and recorded. ``auto`` never picks
  random weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np
import torch
from bentoml.exceptions import NotFound as BentoNotFound

from bento.config import ModelSettings, Settings
from bento.errors import ModelUnavailable
from bento.imaging import DecodeLimits
from bento.schemas import ModelInfo
from models.backbones import BACKBONES, WEIGHTS_PROBE_TIMEOUT_S, Backbone, Weights, WeightsUnavailable, get_backbone
from models.embedding import ImageEmbedder
from models.pipeline import prepare_image
from models.preprocess import DEFAULT_VIEW_SETS, Preprocessing
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


def _stored_versions(backbone: str) -> list[bentoml.Model]:
    try:
        models = bentoml.models.list(_store_name(backbone))
    except BentoNotFound:
        return []
    return sorted(models, key=lambda m: m.info.creation_time, reverse=True)


def _describe(model: bentoml.Model, reason: str | None = None, view_sets: Sequence[str] = DEFAULT_VIEW_SETS) -> StoredModel:
    meta = model.info.metadata
    # The store records the weights' normalisation; the rest of the recipe (fit, views) is this code's, so a
    # model stored by an older version is served with today's recipe and says so in its version string.
    preprocessing = Preprocessing.of_backbone(meta["preprocessing"], view_sets)
    info = ModelInfo.model_validate(
        {
            **meta["info"],
            "store_tag": str(model.tag),
            "preprocessing": preprocessing.version,
            "vectors_per_image": preprocessing.vectors_per_image,
            **_measured_thresholds(meta["info"]["backbone"], ",".join(view_sets)),
        }
    )
    if reason is not None:
        info.reason = reason
    return StoredModel(info=info, preprocessing=preprocessing, tag=str(model.tag))


def _measured_thresholds(backbone_name: str, views: str) -> dict[str, float | None]:
    """The verdict thresholds measured for this backbone and views (none where they were not measured)."""
    measured = get_backbone(backbone_name).thresholds.get(views)
    if measured is None:
        return {"same_image_score": None, "near_duplicate_score": None}
    return {"same_image_score": measured[0], "near_duplicate_score": measured[1]}


def _stored_match(backbone: Backbone, request: str, pretrained_only: bool) -> bentoml.Model | None:
    for model in _stored_versions(backbone.name):
        meta = model.info.metadata
        if meta.get("weights_request") == request and (meta.get("info", {}).get("pretrained") or not pretrained_only):
            return model
    return None


def _find_stored(settings: ModelSettings) -> StoredModel | None:
    """The newest stored model that satisfies the settings, without touching the network."""
    if settings.name != "auto":
        backbone = get_backbone(settings.name)
        found = _stored_match(backbone, backbone.weights_request(settings), pretrained_only=False)
        return _describe(found, f"requested explicitly (RIS_MODEL_NAME={settings.name})") if found else None
    passed_over: list[str] = []
    for backbone in BACKBONES:
        request = backbone.weights_request(settings)
        found = None if backbone.auto_refusal(request) else _stored_match(backbone, request, pretrained_only=True)
        if found is not None:
            why = f"auto: pretrained {backbone.title} found in the model store"
            if passed_over:
                why = (
                    f"auto: no pretrained {' or '.join(passed_over)} in the model store; serving {backbone.name}. "
                    f"When imported: {found.info.metadata.get('info', {}).get('reason', '')}"
                )
            return _describe(found, why)
        passed_over.append(f"{backbone.title} ({request})")
    return None


def _obtain(settings: ModelSettings) -> tuple[Backbone, Weights, str]:
    """(backbone, weights, reason) following the selection rules in the module docstring."""
    if settings.name != "auto":
        backbone = get_backbone(settings.name)
        weights = backbone.obtain_weights(backbone.weights_request(settings), WEIGHTS_PROBE_TIMEOUT_S)
        return backbone, weights, f"requested explicitly (RIS_MODEL_NAME={settings.name})"
    skipped: list[str] = []
    for backbone in BACKBONES:
        request = backbone.weights_request(settings)
        why = backbone.auto_refusal(request)
        if why is None:
            started = time.monotonic()
            try:
                weights = backbone.obtain_weights(request, WEIGHTS_PROBE_TIMEOUT_S)
            except WeightsUnavailable as exc:
                why = f"{exc.message} (decided in {time.monotonic() - started:.1f} s)"
            else:
                if not skipped:
                    return backbone, weights, f"auto: {backbone.title} pretrained weights available"
                return backbone, weights, f"auto: {'; '.join(skipped)}; fell back to {backbone.name}"
        logger.warning("auto model: %s weights unavailable: %s; trying the next backbone", backbone.title, why)
        skipped.append(f"{backbone.title} weights unavailable ({why})")
    raise ModelUnavailable(f"auto: no backbone's weights can be had here: {'; '.join(skipped)}")


def import_model(settings: Settings) -> StoredModel:
    """Put the chosen backbone into the BentoML model store (no-op when identical weights are stored)."""
    backbone, weights, reason = _obtain(settings.model)
    backbone_name = backbone.name
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
        vectors_per_image=weights.preprocessing.vectors_per_image,
        weights=weights.description,
        pretrained=weights.pretrained,
        reason=reason,
    )
    metadata = {
        # What the code decides at load time (recipe views, thresholds) is not frozen into the store.
        "info": info.model_dump(exclude={"store_tag", "vectors_per_image", "same_image_score", "near_duplicate_score"}),
        "weights_request": backbone.weights_request(settings.model),
        "preprocessing": weights.preprocessing.normalisation(),
    }
    with bentoml.models.create(_store_name(backbone_name), metadata=metadata, labels={"backbone": backbone_name}) as ref:
        torch.save(weights.state_dict, ref.path_of(WEIGHTS_FILE))
    stored = _describe(bentoml.models.get(ref.tag))
    logger.info("Imported %s into the BentoML model store as %s (%s)", model_id, stored.tag, reason)
    return stored


def resolve_model(settings: Settings, import_if_missing: bool = True) -> StoredModel:
    """The model to serve, with the recipe the settings ask for (RIS_MODEL_VIEWS)."""
    stored = _resolve_stored(settings, import_if_missing)
    model = bentoml.models.get(stored.tag)
    return _describe(model, stored.info.reason, settings.model.view_sets)


def _resolve_stored(settings: Settings, import_if_missing: bool) -> StoredModel:
    stored = _find_stored(settings.model)
    if stored is not None:
        return stored
    if not import_if_missing:
        raise ModelUnavailable(
            f"No model for RIS_MODEL_NAME={settings.model.name} in the BentoML model store; run `python -m models import`."
        )
    logger.info("No suitable model in the BentoML model store yet; importing one now")
    return import_model(settings)


def load_embedder(settings: Settings, import_if_missing: bool = True) -> ImageEmbedder:
    """Load the chosen model from the BentoML model store onto the configured device."""
    started = time.monotonic()
    stored = resolve_model(settings, import_if_missing)
    backbone = get_backbone(stored.info.backbone)
    choice = choose_runtime(settings.model.runtime, settings.model.precision, settings.model.device, backbone.cpu_auto_precision)
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
    if settings.model.runtime_cache_dir is not None:
        return settings.model.runtime_cache_dir
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "ris-runtime-cache"


def _calibration(settings: Settings, preprocessing: Preprocessing) -> np.ndarray:
    if settings.model.int8_calibration_dir is None:
        raise RuntimeUnavailable(
            "RIS_MODEL_PRECISION=int8 needs RIS_MODEL_INT8_CALIBRATION_DIR: a folder of typical photos to calibrate with."
        )
    limits = DecodeLimits(max_bytes=settings.limits.max_upload_bytes, max_pixels=settings.limits.max_image_pixels)
    return calibration_pixels(
        settings.model.int8_calibration_dir, lambda data: prepare_image(data, limits, preprocessing, thumbnail_size=None).pixels
    )
