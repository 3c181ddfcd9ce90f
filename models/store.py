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
from typing import TYPE_CHECKING, Literal

import bentoml
import numpy as np
from bentoml.exceptions import NotFound as BentoNotFound

from bento.core.config import ModelSettings, Settings
from bento.core.errors import ModelUnavailable
from models.backbones import (
    WEIGHTS_PROBE_TIMEOUT_S,
    Backbone,
    Role,
    Weights,
    WeightsUnavailable,
    backbones_of,
    get_backbone,
)
from models.embedding import Embedders, ImageEmbedder
from models.imaging import DecodeLimits
from models.info import ModelInfo
from models.packaged import (
    PACKAGE,
    PACKAGED,
    PackagedModel,
    build_packaged_runtime,
    choose_packaged_runtime,
    packaged_installed,
)
from models.packaged import PREPROCESSING as PACKAGED_PREPROCESSING
from models.pipeline import prepare_image
from models.preprocess import DEFAULT_VIEW_SETS, VIEW_SETS, Preprocessing
from models.runtime import (
    InferenceRuntime,
    OpenVINORuntime,
    RuntimeCache,
    RuntimeChoice,
    RuntimeUnavailable,
    calibration_pixels,
    calibration_views,
    check_fidelity,
    choose_runtime,
    compile_openvino,
    fidelity_probe,
    library_versions,
    torch_installed,
)

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

STORE_PREFIX = "ris-"
WEIGHTS_FILE = "weights.pt"

# Two kinds of stored model share the metadata below (info, weights request, normalisation):
# - "torch": the backbone's weights (`ris-<backbone>`), loaded into PyTorch and run by any runtime;
# - "openvino": the same weights converted to an OpenVINO model at build time (`ris-<backbone>-openvino`,
#   `python -m models export-openvino`), with the fp32 PyTorch features of a few images, so that an
#   installation without PyTorch (the CPU image) can check its compiled model against the reference.
# Both carry the weights' model_id, so their vectors go into the same collections.
Kind = Literal["torch", "openvino"]
OPENVINO_SUFFIX = "-openvino"
IR_FILE = "model.xml"
FIDELITY_PIXELS_FILE = "fidelity-pixels.npy"
FIDELITY_REFERENCE_FILE = "fidelity-reference.npy"
# Photos (from --fidelity-images) an export is checked on and ships, beside the synthetic probe images.
EXPORT_FIDELITY_PHOTOS = 8
# An export ships a check for every smaller input side a view set can use (the low-res view's 112 px),
# whatever RIS_MODEL_VIEWS it was made with: the views are chosen where it runs. One view per side.
EXPORT_SIDE_VIEWS = tuple({view.input_side: view for views in VIEW_SETS.values() for view in views if view.input_side}.values())


def _fidelity_files(side: int | None) -> tuple[str, str]:
    """(pixels, reference) file names of the check at ``side`` (None: the main crop)."""
    if side is None:
        return FIDELITY_PIXELS_FILE, FIDELITY_REFERENCE_FILE
    return f"fidelity-pixels-{side}.npy", f"fidelity-reference-{side}.npy"


def _ships_checks(model: bentoml.Model, preprocessing: Preprocessing) -> bool:
    """Whether an exported model ships the fidelity check of every input side this recipe uses."""
    return all(os.path.exists(model.path_of(_fidelity_files(side)[1])) for side in preprocessing.input_sides[1:])


def role_setting(role: Role) -> str:
    """The environment variable that names a role's model."""
    return "RIS_MODEL_NAME" if role == "similarity" else "RIS_MODEL_COPY_NAME"


def role_name(settings: ModelSettings, role: Role) -> str:
    return settings.name if role == "similarity" else settings.copy_name


def role_views(settings: ModelSettings, role: Role) -> tuple[str, ...]:
    return settings.view_sets if role == "similarity" else settings.copy_view_sets


@dataclass
class StoredModel:
    info: ModelInfo
    preprocessing: Preprocessing
    tag: str
    kind: Kind = "torch"


def _store_name(backbone: str, kind: Kind = "torch") -> str:
    return f"{STORE_PREFIX}{backbone}{OPENVINO_SUFFIX if kind == 'openvino' else ''}"


def _loadable_kinds() -> tuple[Kind, ...]:
    """What this installation can load, best first: weights need PyTorch; exported models need only OpenVINO."""
    return ("torch", "openvino") if torch_installed() else ("openvino",)


def _stored_versions(backbone: str, kind: Kind = "torch") -> list[bentoml.Model]:
    try:
        models = bentoml.models.list(_store_name(backbone, kind))
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
    kind: Kind = "openvino" if meta.get("format") == "openvino" else "torch"
    return StoredModel(info=info, preprocessing=preprocessing, tag=str(model.tag), kind=kind)


def _measured_thresholds(backbone_name: str, views: str) -> dict[str, float | None]:
    """The verdict thresholds measured for this backbone and views (none where they were not measured)."""
    backbone = get_backbone(backbone_name)
    measured = backbone.thresholds.get(views) or (None, None)
    return {"same_image_score": measured[0], "near_duplicate_score": measured[1], "similar_score": backbone.similar_floor}


def _stored_match(
    backbone: Backbone, request: str, pretrained_only: bool, kinds: Sequence[Kind] = ("torch",)
) -> bentoml.Model | None:
    for kind in kinds:
        for model in _stored_versions(backbone.name, kind):
            meta = model.info.metadata
            if meta.get("weights_request") == request and (meta.get("info", {}).get("pretrained") or not pretrained_only):
                return model
    return None


def _find_stored(settings: ModelSettings, kinds: Sequence[Kind] = ("torch",), role: Role = "similarity") -> StoredModel | None:
    """The newest stored model of the first of ``kinds`` that satisfies the settings, without touching
    the network."""
    name = role_name(settings, role)
    if name != "auto":
        backbone = get_backbone(name)
        found = _stored_match(backbone, backbone.weights_request(settings), pretrained_only=False, kinds=kinds)
        return _describe(found, f"requested explicitly ({role_setting(role)}={name})") if found else None
    passed_over: list[str] = []
    for backbone in backbones_of(role):
        request = backbone.weights_request(settings)
        found = None if backbone.auto_refusal(request) else _stored_match(backbone, request, pretrained_only=True, kinds=kinds)
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


def _obtain(settings: ModelSettings, role: Role = "similarity") -> tuple[Backbone, Weights, str]:
    """(backbone, weights, reason) following the selection rules in the module docstring."""
    name = role_name(settings, role)
    if name != "auto":
        backbone = get_backbone(name)
        weights = backbone.obtain_weights(backbone.weights_request(settings), WEIGHTS_PROBE_TIMEOUT_S)
        return backbone, weights, f"requested explicitly ({role_setting(role)}={name})"
    skipped: list[str] = []
    for backbone in backbones_of(role):
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


def import_model(settings: Settings, role: Role = "similarity") -> StoredModel:
    """Put the chosen backbone into the BentoML model store (no-op when identical weights are stored)."""
    backbone, weights, reason = _obtain(settings.model, role)
    backbone_name = backbone.name
    digest = weights.digest
    model_id = f"{backbone_name}@{digest}"
    for existing in _stored_versions(backbone_name):
        if existing.info.metadata.get("info", {}).get("model_id") == model_id:
            logger.info("Model %s already in the store as %s", model_id, existing.tag)
            return _describe(existing, reason, role_views(settings.model, role))
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
        "info": info.model_dump(
            exclude={"store_tag", "vectors_per_image", "same_image_score", "near_duplicate_score", "similar_score"}
        ),
        "weights_request": backbone.weights_request(settings.model),
        "preprocessing": weights.preprocessing.normalisation(),
    }
    import torch

    with bentoml.models.create(_store_name(backbone_name), metadata=metadata, labels={"backbone": backbone_name}) as ref:
        torch.save(weights.state_dict, ref.path_of(WEIGHTS_FILE))
    stored = _describe(bentoml.models.get(ref.tag), None, role_views(settings.model, role))
    logger.info("Imported %s into the BentoML model store as %s (%s)", model_id, stored.tag, reason)
    return stored


def resolve_model(settings: Settings, import_if_missing: bool = True, role: Role = "similarity") -> StoredModel:
    """The model to serve, with the recipe the settings ask for (RIS_MODEL_VIEWS / RIS_MODEL_COPY_VIEWS)."""
    stored = _resolve_stored(settings, import_if_missing, role)
    model = bentoml.models.get(stored.tag)
    return _describe(model, stored.info.reason, role_views(settings.model, role))


def _resolve_stored(settings: Settings, import_if_missing: bool, role: Role = "similarity") -> StoredModel:
    stored = _find_stored(settings.model, _loadable_kinds(), role)
    if stored is not None:
        return stored
    setting = f"{role_setting(role)}={role_name(settings.model, role)}"
    if not torch_installed():
        raise ModelUnavailable(
            f"No exported OpenVINO model for {setting} in the BentoML model store, and this "
            "installation has no PyTorch to load weights with (the CPU image). Build it from a bento that packages "
            "one: `python -m models export-openvino --fidelity-images DIR`, then `bentoml build -f bentofile.cpu.yaml`."
        )
    if not import_if_missing:
        raise ModelUnavailable(f"No model for {setting} in the BentoML model store; run `python -m models import`.")
    logger.info("No suitable %s model in the BentoML model store yet; importing one now", role)
    return import_model(settings, role)


def load_embedder(settings: Settings, import_if_missing: bool = True, role: Role = "similarity") -> ImageEmbedder:
    """Load the chosen model of ``role`` from the BentoML model store onto the configured device."""
    started = time.monotonic()
    stored = resolve_model(settings, import_if_missing, role)
    backbone = get_backbone(stored.info.backbone)
    # RIS_MODEL_PRECISION is the similarity model's (int8 needs its calibration photos); the copy model's is auto.
    precision = settings.model.precision if role == "similarity" else "auto"
    choice = choose_runtime(settings.model.runtime, precision, settings.model.device, backbone.cpu_auto_precision)
    calibration = _calibration(settings, stored.preprocessing) if choice.precision == "int8" else None
    cache = RuntimeCache(_runtime_cache_dir(settings)) if choice.runtime == "openvino" else None
    key = RuntimeCache.key(stored.info.model_id, stored.preprocessing, choice.precision, calibration) if cache else ""
    runtime: InferenceRuntime | None = cache.load(key, choice) if cache else None
    if runtime is None:
        # int8 from the weights where they are here: calibrated and checked on the same photos.
        twin = choice.runtime == "openvino" and choice.precision != "int8"
        exported = stored if stored.kind == "openvino" else _exported_twin(stored) if twin else None
        if exported is not None:
            runtime = _runtime_from_export(exported, choice, calibration)
        elif stored.kind == "torch":
            runtime = _runtime_from_weights(stored, choice, calibration)
        else:
            raise ModelUnavailable(f"{stored.tag} is an exported OpenVINO model; RIS_MODEL_RUNTIME=torch needs its weights.")
        # An exported model compiles in a fraction of a second; only a conversion or a quantisation is worth keeping.
        if cache and isinstance(runtime, OpenVINORuntime) and (exported is None or choice.precision == "int8"):
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


def load_embedders(settings: Settings, import_if_missing: bool = True) -> Embedders:
    """Both roles' models: the similarity model and the copy model (RIS_MODEL_NAME, RIS_MODEL_COPY_NAME)."""
    return Embedders(load_embedder(settings, import_if_missing), load_copy_embedder(settings, import_if_missing))


def load_copy_embedder(settings: Settings, import_if_missing: bool = True) -> ImageEmbedder | None:
    """The copy-detection model (RIS_MODEL_COPY_NAME), or None when it is `none`.

    ``auto``: Meta's SSCD ResNet-50 where it runs on a GPU and its weights are in the model store (or can be
    had); on a CPU the packaged distilled student (measured on 2 cores: the int8 ResNet-50's copy recall@1,
    0.994, at about 10x its images/s; docs/models.md); Meta's weights on the CPU where the package is
    missing."""
    name = settings.model.copy_name
    if name == "none":
        return None
    if name in PACKAGED:
        return _packaged_embedder(settings, PACKAGED[name], f"requested explicitly (RIS_MODEL_COPY_NAME={name})")
    if name != "auto":
        return load_embedder(settings, import_if_missing, role="copy")
    gpu = settings.model.device == "cuda" or (settings.model.device == "auto" and torch_installed() and _cuda_here())
    if gpu or not packaged_installed():
        try:
            return load_embedder(settings, import_if_missing, role="copy")
        except ModelUnavailable as exc:
            if not packaged_installed():
                raise
            why = f"auto: Meta's SSCD weights unavailable ({exc.message}); the packaged student serves, on the CPU"
            logger.warning(why)
            return _packaged_embedder(settings, PACKAGED["sscd-distilled"], why)
    return _packaged_embedder(
        settings, PACKAGED["sscd-distilled"], "auto: on a CPU the packaged distilled SSCD is as accurate as the ResNet-50 and faster"
    )


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def _packaged_embedder(settings: Settings, model: PackagedModel, reason: str) -> ImageEmbedder:
    """A packaged ONNX copy model, read from the installed package (never stored: its licence)."""
    started = time.monotonic()
    choice = choose_packaged_runtime(model, "auto")
    runtime = build_packaged_runtime(model, choice)
    views = settings.model.copy_view_sets
    preprocessing = Preprocessing.of_backbone(PACKAGED_PREPROCESSING.normalisation(), views)
    measured = model.thresholds.get(",".join(views))
    info = ModelInfo(
        backbone=model.name,
        model_id=f"{model.name}@{model.digest()}",
        dim=model.dim,
        preprocessing=preprocessing.version,
        vectors_per_image=preprocessing.vectors_per_image,
        same_image_score=measured[0] if measured else None,
        near_duplicate_score=measured[1] if measured else None,
        weights=f"{model.title}: {model.path().name} from the installed {PACKAGE} {model.package_version()} (unmodified)",
        pretrained=True,
        reason=reason,
    )
    embedder = ImageEmbedder(runtime, info, preprocessing)
    logger.info("Copy model %s (%s) with %s, loaded in %.1f s", info.model_id, reason, embedder.device_name, time.monotonic() - started)
    return embedder


def _load_module(stored: StoredModel) -> nn.Module:
    """The backbone with the stored weights (PyTorch)."""
    import torch

    module = get_backbone(stored.info.backbone).build()
    state = torch.load(bentoml.models.get(stored.tag).path_of(WEIGHTS_FILE), map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module


def _runtime_from_weights(stored: StoredModel, choice: RuntimeChoice, calibration: np.ndarray | None) -> InferenceRuntime:
    """PyTorch: the weights into the backbone; then PyTorch itself, or a conversion checked against it."""
    from models.torch_runtime import build_runtime

    return build_runtime(_load_module(stored), stored.preprocessing, choice, calibration)


def _exported_twin(stored: StoredModel) -> StoredModel | None:
    """An exported OpenVINO model of the same weights (same model_id), which saves converting them."""
    for model in _stored_versions(stored.info.backbone, "openvino"):
        if model.info.metadata.get("info", {}).get("model_id") != stored.info.model_id:
            continue
        if not _ships_checks(model, stored.preprocessing):  # an export older than the recipe's input sides
            logger.warning("The exported model %s lacks a check for an input side of the recipe; converting the weights instead", model.tag)
            continue
        return StoredModel(info=stored.info, preprocessing=stored.preprocessing, tag=str(model.tag), kind="openvino")
    return None


def _runtime_from_export(stored: StoredModel, choice: RuntimeChoice, calibration: np.ndarray | None) -> OpenVINORuntime:
    """The exported OpenVINO model compiled for this CPU, checked against the fp32 PyTorch features it
    shipped with (no PyTorch needed): a CPU or an OpenVINO build that computes otherwise is refused."""
    import openvino as ov

    started = time.monotonic()
    model = bentoml.models.get(stored.tag)
    runtime = compile_openvino(ov.Core().read_model(model.path_of(IR_FILE)), choice, calibration)
    if not _ships_checks(model, stored.preprocessing):
        raise ModelUnavailable(
            f"The exported model {stored.tag} ships no fidelity check for an input side RIS_MODEL_VIEWS needs "
            f"({stored.preprocessing.input_sides}); export it again with this version (`python -m models export-openvino`)."
        )
    worst, checked = 1.0, 0
    for side in (None, *stored.preprocessing.input_sides[1:]):
        pixels_file, reference_file = (model.path_of(name) for name in _fidelity_files(side))
        pixels = np.load(pixels_file, allow_pickle=False)
        worst = min(worst, check_fidelity(runtime, pixels, np.load(reference_file, allow_pickle=False)))
        checked += len(pixels)
    logger.info(
        "%s compiled from the exported model %s in %.1f s; fidelity vs fp32: min cosine %.5f over %d images",
        choice.label, stored.tag, time.monotonic() - started, worst, checked,
    )
    return runtime


def export_openvino(settings: Settings, fidelity_images: Path) -> StoredModel:
    """Convert the stored weights the settings choose to an OpenVINO model and store it beside them
    (``ris-<backbone>-openvino``): the CPU image ships it and runs without PyTorch.

    The conversion is checked here, against PyTorch fp32, on the synthetic probe images and on up to
    EXPORT_FIDELITY_PHOTOS photos of ``fidelity_images`` (real photos: a bf16 compilation that drifts on
    photos can pass on synthetic images); those pixels and their fp32 features ship with the model, so
    every start can check its compiled model again without PyTorch. A no-op when an export with the same
    key is stored: the key covers everything that decides the exported model and its check (weights,
    normalisation, torch/OpenVINO versions, the conversion code, the check's pixels)."""
    import openvino as ov

    from models.torch_runtime import convert_to_openvino, reference_features

    stored = _resolve_stored(settings, import_if_missing=True)
    if stored.kind != "torch":
        raise ModelUnavailable("Exporting needs the model's PyTorch weights in the model store (`python -m models import`).")
    preprocessing = stored.preprocessing
    limits = DecodeLimits(max_bytes=settings.limits.max_upload_bytes, max_pixels=settings.limits.max_image_pixels)
    # The probe images and the photos at the main side and at each smaller side, as the one pipeline
    # prepares an image to store (a recipe with one view per smaller side).
    check_recipe = preprocessing.model_copy(update={"views": EXPORT_SIDE_VIEWS})
    photos = calibration_views(
        fidelity_images,
        lambda data: prepare_image(data, limits, check_recipe, thumbnail_size=None, all_views=True).views,
        limit=EXPORT_FIDELITY_PHOTOS,
    )
    pixels = np.concatenate([fidelity_probe(preprocessing.crop), photos[0]])
    other_pixels = {
        view.input_side: np.concatenate([fidelity_probe(view.input_side), side_photos])
        for view, side_photos in zip(EXPORT_SIDE_VIEWS, photos[1:], strict=True)
    }
    export_key = RuntimeCache.key(
        stored.info.model_id, preprocessing, "export", np.concatenate([pixels.ravel(), *(p.ravel() for p in other_pixels.values())])
    )
    for existing in _stored_versions(stored.info.backbone, "openvino"):
        if existing.info.metadata.get("export_key") == export_key:
            logger.info("OpenVINO export of %s already in the store as %s", stored.info.model_id, existing.tag)
            return _describe(existing, stored.info.reason, settings.model.view_sets)

    source = bentoml.models.get(stored.tag)
    module = _load_module(stored)
    started = time.monotonic()
    converted = convert_to_openvino(module, preprocessing)
    reference = reference_features(module, preprocessing, pixels)
    fp32 = RuntimeChoice("openvino", "fp32", "cpu", "export check")
    runtime = compile_openvino(converted, fp32)
    # The main side and each smaller side (the same graph reshaped where it runs), on probes and photos.
    # Each check ships with the model.
    checks: dict[int | None, tuple[np.ndarray, np.ndarray]] = {None: (pixels, reference)}
    for side, side_pixels in other_pixels.items():
        checks[side] = (side_pixels, reference_features(module, preprocessing, side_pixels))
    worst = min(check_fidelity(runtime, side_pixels, side_reference) for side_pixels, side_reference in checks.values())
    metadata = {
        **source.info.metadata,
        "format": "openvino",
        "source_tag": str(source.tag),
        "converted_with": library_versions(),
        "export_key": export_key,
        "fidelity_min_cosine": worst,
        "fidelity_images": len(pixels),
    }
    name = _store_name(stored.info.backbone, "openvino")
    with bentoml.models.create(name, metadata=metadata, labels={"backbone": stored.info.backbone, "format": "openvino"}) as ref:
        # fp32 weights as they are (compress_to_fp16 would change the embeddings of every image).
        ov.save_model(converted, ref.path_of(IR_FILE), compress_to_fp16=False)
        for side, (side_pixels, side_reference) in checks.items():
            pixels_file, reference_file = _fidelity_files(side)
            np.save(ref.path_of(pixels_file), side_pixels, allow_pickle=False)
            np.save(ref.path_of(reference_file), side_reference.astype(np.float32), allow_pickle=False)
    exported = _describe(bentoml.models.get(ref.tag), stored.info.reason, settings.model.view_sets)
    logger.info(
        "Exported %s to OpenVINO as %s in %.1f s; fidelity vs PyTorch fp32: min cosine %.6f over %d images",
        stored.info.model_id, exported.tag, time.monotonic() - started, worst, len(pixels),
    )
    return exported


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
