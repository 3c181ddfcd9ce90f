"""Inference runtimes: selection rules, fidelity of the fast CPU paths against the fp32 reference on
real photos (and no loss of near-duplicate recall), the fidelity guard, decode-time downscaling."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bento.core.config import Settings
from models.imaging import DecodeLimits, decode_image
from models.pipeline import prepare_image
from models.runtime import (
    FIDELITY_FLOOR,
    RuntimeChoice,
    RuntimeUnavailable,
    _openvino_cpu_capabilities,
    check_fidelity,
    choose_runtime,
)
from models.store import load_embedder

LIMITS = DecodeLimits(10**8, 10**8)
HAS_BF16 = "BF16" in _openvino_cpu_capabilities()


def _settings(model: str, **fields) -> Settings:
    """With the low-res view (its smaller input side is converted and checked too), unless told otherwise."""
    return Settings(data_dir=Path("unused"), model={"name": model, "views": "low-res-64", **fields})


def _pixels(embedder, blobs: list[bytes], draft_scale: float = 0.0) -> np.ndarray:
    pre = embedder.preprocessing
    return np.stack([prepare_image(b, LIMITS, pre, None, draft_scale).pixels for b in blobs])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


# --- selection -----------------------------------------------------------------------------------


def test_auto_picks_openvino_on_cpu_with_the_best_precision_the_cpu_and_model_allow():
    choice = choose_runtime("auto", "auto", "cpu")
    assert choice.runtime == "openvino" and choice.device == "cpu"
    assert choice.precision == ("bf16" if HAS_BF16 else "fp32")
    assert "OpenVINO" in choice.reason
    # A precision-sensitive model (EfficientNet-Lite0, measured) stays fp32 under auto.
    assert choose_runtime("auto", "auto", "cpu", cpu_auto_precision="fp32").precision == "fp32"


def test_each_backbone_names_the_cpu_precision_auto_may_use(bentoml_home):
    from models.backbones import EfficientNetLite0, ResNet50

    assert ResNet50.cpu_auto_precision == "bf16" and EfficientNetLite0.cpu_auto_precision == "fp32"
    lite = load_embedder(_settings(model="efficientnet-lite0"))
    assert (lite.info.runtime, lite.info.precision) == ("openvino", "fp32")


def test_torch_is_the_fp32_reference_on_cpu():
    assert choose_runtime("torch", "auto", "cpu") == RuntimeChoice("torch", "fp32", "cpu", "requested (RIS_MODEL_RUNTIME=torch)")
    assert choose_runtime("torch", "bf16", "cpu").precision == "bf16"


@pytest.mark.parametrize(
    ("runtime", "precision", "device", "message"),
    [
        ("torch", "int8", "cpu", "needs RIS_MODEL_RUNTIME=openvino"),
        ("openvino", "fp16", "cpu", "fp16 is a GPU precision"),
        ("auto", "int8", "cuda", "CUDA"),  # no CUDA here: asking for it is an error, not a silent CPU fallback
    ],
)
def test_impossible_combinations_are_refused_with_the_reason(runtime, precision, device, message):
    with pytest.raises(RuntimeUnavailable, match=message):
        choose_runtime(runtime, precision, device)


def test_int8_without_calibration_images_is_refused_before_any_work(bentoml_home, tmp_path):
    with pytest.raises(RuntimeUnavailable, match="RIS_MODEL_INT8_CALIBRATION_DIR"):
        load_embedder(_settings(model="efficientnet-lite0", runtime="openvino", precision="int8"))
    with pytest.raises(RuntimeUnavailable, match="does not exist"):
        load_embedder(
            _settings(model="efficientnet-lite0", precision="int8", int8_calibration_dir=tmp_path / "missing")
        )
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(RuntimeUnavailable, match="No decodable images"):
        load_embedder(_settings(model="efficientnet-lite0", precision="int8", int8_calibration_dir=tmp_path))


# --- fidelity against the fp32 reference, on real photos -------------------------------------------


@pytest.fixture(scope="module")
def lite_reference(bentoml_home):
    return load_embedder(_settings(model="efficientnet-lite0", runtime="torch", precision="fp32"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_matches_the_fp32_reference_on_real_photos(lite_reference, photo_set, precision):
    if precision == "bf16" and not HAS_BF16:
        pytest.skip("this CPU has no bf16 instructions")
    fast = load_embedder(_settings(model="efficientnet-lite0", runtime="openvino", precision=precision))
    assert fast.info.runtime == "openvino" and fast.info.precision == precision
    assert fast.info.model_id == lite_reference.info.model_id, "same weights, same model id"
    names = sorted(photo_set["originals"])
    blobs = [photo_set["originals"][n] for n in names] + [photo_set["queries"][n] for n in names]
    pixels = _pixels(lite_reference, blobs)
    cosines = _cosines(fast.embed(pixels), lite_reference.embed(pixels))
    assert cosines.min() >= FIDELITY_FLOOR, dict(zip(names * 2, cosines.round(4), strict=True))
    # The low-res view's smaller input side: the same graph reshaped, just as faithful.
    pre = lite_reference.preprocessing
    small = np.stack([pre.view_pixels(decode_image(b, LIMITS).image)[1] for b in blobs])
    assert small.shape[1:] == (112, 112, 3)
    cosines = _cosines(fast.embed(small), lite_reference.embed(small))
    assert cosines.min() >= FIDELITY_FLOOR, dict(zip(names * 2, cosines.round(4), strict=True))

    # No loss of near-duplicate recall@1 against originals embedded by the reference (mixed runtimes).
    originals = lite_reference.embed(_pixels(lite_reference, [photo_set["originals"][n] for n in names]))
    queries = fast.embed(_pixels(lite_reference, [photo_set["queries"][n] for n in names]))
    reference_queries = lite_reference.embed(_pixels(lite_reference, [photo_set["queries"][n] for n in names]))
    recall_fast = np.mean((queries @ originals.T).argmax(axis=1) == np.arange(len(names)))
    recall_reference = np.mean((reference_queries @ originals.T).argmax(axis=1) == np.arange(len(names)))
    assert recall_fast >= recall_reference


def test_int8_resnet50_is_calibrated_on_photos_and_stays_faithful_on_others(bentoml_home, photo_set, tmp_path):
    """ResNet-50 (random init: the architecture and the quantiser are real; ImageNet weights can't be
    downloaded here) quantised to int8 with NNCF on half the photos, checked on the other half."""
    names = sorted(photo_set["originals"])
    calibration_dir = tmp_path / "calibration"
    calibration_dir.mkdir()
    for name in names[::2]:
        (calibration_dir / f"{name}.jpg").write_bytes(photo_set["originals"][name])
    held_out = [photo_set["originals"][n] for n in names[1::2]] + [photo_set["queries"][n] for n in names[1::2]]
    base = {"model": "resnet50", "resnet50_weights": "random"}
    reference = load_embedder(_settings(**base, runtime="torch", precision="fp32"))
    int8 = load_embedder(_settings(**base, runtime="openvino", precision="int8", int8_calibration_dir=calibration_dir))
    assert int8.info.precision == "int8" and "openvino" in int8.device_name
    pixels = _pixels(reference, held_out)
    cosines = _cosines(int8.embed(pixels), reference.embed(pixels))
    assert cosines.min() >= FIDELITY_FLOOR, cosines.round(4)


class _Degraded:
    """A runtime that drifts from the reference, as a broken compiled model would."""

    choice = RuntimeChoice("openvino", "int8", "cpu", "test")

    def __init__(self, reference, noise: float) -> None:
        self.reference = reference
        self.noise = noise

    def features(self, pixels):
        out = self.reference(pixels)
        rng = np.random.default_rng(0)
        return out + rng.normal(0, self.noise, out.shape) * np.linalg.norm(out, axis=1, keepdims=True) / np.sqrt(out.shape[1])

    def describe(self):
        return "degraded"


def test_the_fidelity_guard_refuses_a_runtime_that_drifts(lite_reference, photo_set):
    pixels = _pixels(lite_reference, list(photo_set["originals"].values())[:6])
    reference = lite_reference.runtime.features
    assert check_fidelity(_Degraded(reference, noise=0.01), pixels, reference(pixels)) >= FIDELITY_FLOOR
    with pytest.raises(RuntimeUnavailable, match="differ from the fp32 reference"):
        check_fidelity(_Degraded(reference, noise=0.5), pixels, reference(pixels))


# --- decode-time downscaling ---------------------------------------------------------------------


def test_draft_decoding_keeps_the_original_size_and_embedding(lite_reference):
    from ingest.demo import grainy_jpeg, photos

    blobs = [grainy_jpeg(image, (1920, 1280), seed=i, grain=6.0) for i, (_, _, image) in enumerate(photos())]
    first = decode_image(blobs[0], LIMITS, min_side=2 * lite_reference.preprocessing.resize)
    full = decode_image(blobs[0], LIMITS)
    assert (first.width, first.height) == (full.width, full.height), "metadata records the original size"
    assert min(first.image.size) < min(full.image.size), "the JPEG was decoded at a reduced scale"
    assert min(first.image.size) >= 2 * lite_reference.preprocessing.resize

    drafted = lite_reference.embed(_pixels(lite_reference, blobs, draft_scale=2.0))
    exact = lite_reference.embed(_pixels(lite_reference, blobs, draft_scale=0.0))
    cosines = _cosines(drafted, exact)
    assert cosines.min() >= FIDELITY_FLOOR, cosines.round(4)


def test_draft_decoding_respects_exif_rotation():
    image = Image.new("RGB", (2400, 1200), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed as 1200 wide, 2400 high
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    decoded = decode_image(out.getvalue(), LIMITS, min_side=300)
    assert (decoded.width, decoded.height) == (1200, 2400)
    assert decoded.image.width < decoded.image.height and decoded.image.width >= 300


# --- adaptive batching settings ------------------------------------------------------------------


def _embed_api_config(**env: str) -> str:
    import os
    import subprocess
    import sys

    code = (
        "from service import Embedder; m, s = Embedder.apis['embed'], Embedder.apis['embed_small']; "
        "same = (s.batchable, s.max_batch_size, s.max_latency_ms) == (m.batchable, m.max_batch_size, m.max_latency_ms); "
        "print(m.batchable, m.max_batch_size, m.max_latency_ms, Embedder.config['runner_connection']['max_requests'], same)"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RIS_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, "BENTOML_DO_NOT_TRACK": "true", **env},
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_batching_settings_reach_the_embedder_api():
    batchable, size, latency, recycle, same = _embed_api_config().split()
    assert (batchable, size, latency) == ("True", "32", "3000"), "the measured defaults (README: Adaptive batching)"
    assert same == "True", "the low-res side's batcher (embed_small) is configured as the main one"
    assert int(recycle) >= 10**6, "callers must not recycle their connection to the embedder every 100 requests"
    assert _embed_api_config(RIS_BATCHING_MAX_BATCH_SIZE="8", RIS_BATCHING_MAX_LATENCY_MS="500").split()[:3] == ["True", "8", "500"]
    assert _embed_api_config(RIS_BATCHING_MAX_BATCH_SIZE="1").split()[0] == "False", "a batch of one is batching off"


def test_a_batch_size_bentoml_cannot_use_is_refused_by_the_settings():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings(batching={"max_batch_size": 0})


# --- runtime cache (cold start) ------------------------------------------------------------------


def test_runtime_cache_is_reused_verified_and_keyed_by_everything_that_changes_output(
    bentoml_home, photo_set, tmp_path, caplog
):
    import logging

    from models.runtime import RuntimeCache

    settings = _settings(model="efficientnet-lite0", runtime="openvino", precision="fp32", runtime_cache_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="models"):
        fresh = load_embedder(settings)
        assert "built in" in caplog.text and "fidelity vs fp32" in caplog.text
        entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
        assert len(entries) == 1 and (entries[0] / "model.xml").exists() and (entries[0] / "model.bin").exists()
        caplog.clear()
        cached = load_embedder(settings)
        assert "loaded from the runtime cache" in caplog.text and "built in" not in caplog.text
    pixels = _pixels(fresh, list(photo_set["originals"].values())[:4])
    assert np.allclose(fresh.embed(pixels), cached.embed(pixels), atol=1e-5)

    pre = fresh.preprocessing
    key = RuntimeCache.key(fresh.info.model_id, pre, "fp32", None)
    assert key == entries[0].name
    assert RuntimeCache.key("efficientnet-lite0@other", pre, "fp32", None) != key
    assert RuntimeCache.key(fresh.info.model_id, pre, "bf16", None) != key
    assert RuntimeCache.key(fresh.info.model_id, pre, "fp32", pixels) != key
    # The input sides decide which sides an entry was checked at before it was written.
    assert RuntimeCache.key(fresh.info.model_id, pre.model_copy(update={"views": ()}), "fp32", None) != key

    # A damaged entry is rebuilt, not trusted.
    (entries[0] / "model.xml").write_text("<not a model/>")
    with caplog.at_level(logging.INFO, logger="models"):
        caplog.clear()
        rebuilt = load_embedder(settings)
        assert "unreadable" in caplog.text and "built in" in caplog.text
    assert np.allclose(rebuilt.embed(pixels), fresh.embed(pixels), atol=1e-5)
