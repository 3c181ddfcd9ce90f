"""Inference runtimes: how one backbone turns preprocessed uint8 pixels into feature vectors.

Two runtimes behind one small protocol, chosen by ``RIS_MODEL_RUNTIME`` / ``RIS_MODEL_PRECISION``:

- ``torch``: PyTorch eager. The reference (fp32) and the GPU path (fp16/bf16 autocast, channels-last).
- ``openvino``: the fast CPU path. The torch module, with the pixel normalisation folded in, is converted
  to an OpenVINO model and compiled for this CPU in bf16 (AVX-512 BF16 / AMX) or fp32, or quantised to
  int8 by NNCF post-training quantisation calibrated on real images (``RIS_MODEL_INT8_CALIBRATION_DIR``).
  fp32 is already at this class of CPU's AVX-512 ceiling; only bf16 and int8 go faster.

Every fast path is checked against the fp32 reference when it is built (``check_fidelity``): a runtime
whose embeddings drift below the cosine floor is refused with an error instead of silently serving
vectors that do not match the collection.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from bento.core.config import PrecisionChoice, RuntimeName
from bento.core.errors import ModelUnavailable, SearchError
from models.imaging import usable_cpus
from models.preprocess import Preprocessing

logger = logging.getLogger(__name__)


# Per-image cosine similarity to the fp32 reference below which a fast runtime is refused.
FIDELITY_FLOOR = 0.99
CALIBRATION_IMAGES = 128
# The code that decides a converted model's output: part of every runtime cache key.
_CONVERSION_SOURCES = tuple(Path(__file__).with_name(name) for name in ("runtime.py", "torch_runtime.py", "preprocess.py"))
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class RuntimeUnavailable(ModelUnavailable):
    """The requested runtime/precision cannot run here (missing library, CPU feature, calibration data)."""


@dataclass(frozen=True)
class RuntimeChoice:
    runtime: Literal["torch", "openvino", "onnxruntime"]
    precision: Literal["fp32", "fp16", "bf16", "int8"]
    device: str  # "cpu" or "cuda"
    reason: str

    @property
    def label(self) -> str:
        return f"{self.runtime}-{self.precision}"


class InferenceRuntime(Protocol):
    choice: RuntimeChoice

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """(N, side, side, 3) uint8 -> (N, dim) float32 features (not yet normalised), for any input side
        of the recipe (the main crop, a view's smaller one)."""

    def describe(self) -> str:
        """A human-readable line: runtime, precision, device, threads."""


def _openvino_cpu_capabilities() -> set[str]:
    try:
        import openvino as ov
    except ImportError:
        return set()
    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def torch_installed() -> bool:
    """Whether PyTorch can be imported here (the CPU image ships OpenVINO models and no torch)."""
    return importlib.util.find_spec("torch") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_runtime(
    runtime: RuntimeName, precision: PrecisionChoice, device: str, cpu_auto_precision: str = "bf16"
) -> RuntimeChoice:
    """Resolve ``auto`` and check that the combination can run here; raise RuntimeUnavailable if not.

    ``cpu_auto_precision`` is the lowest precision the backbone keeps faithful on CPU (bf16 or fp32)."""
    has_torch = torch_installed()
    if not has_torch and (device == "cuda" or runtime == "torch"):
        raise RuntimeUnavailable(
            f"RIS_MODEL_{'DEVICE=cuda' if device == 'cuda' else 'RUNTIME=torch'} needs PyTorch, which this installation "
            "does not have (the CPU image runs OpenVINO only); use the default (CUDA) image for the GPU or PyTorch."
        )
    cuda = has_torch and _cuda_available()
    use_cuda = device == "cuda" or (device == "auto" and cuda)
    if device == "cuda" and not cuda:
        raise RuntimeUnavailable("RIS_MODEL_DEVICE=cuda but no CUDA device is visible to torch.")
    if use_cuda:
        if runtime == "openvino":
            raise RuntimeUnavailable("The OpenVINO runtime is the CPU path; use RIS_MODEL_RUNTIME=torch (or auto) on CUDA.")
        if precision in ("int8",):
            raise RuntimeUnavailable("int8 is a CPU (OpenVINO) precision; on CUDA use fp16, bf16 or fp32.")
        chosen = "fp16" if precision == "auto" else precision
        return RuntimeChoice("torch", chosen, "cuda", "CUDA device present: PyTorch with autocast")

    capabilities = _openvino_cpu_capabilities()
    if not capabilities and not has_torch:
        raise RuntimeUnavailable("Neither PyTorch nor OpenVINO is installed: nothing can run the model.")
    if runtime == "auto":
        if capabilities:
            runtime_name, why = "openvino", "CPU: OpenVINO is the fast CPU path"
        else:
            runtime_name, why = "torch", "CPU: OpenVINO is not installed, using PyTorch eager"
    else:
        runtime_name, why = runtime, f"requested (RIS_MODEL_RUNTIME={runtime})"

    if runtime_name == "torch":
        if precision in ("int8", "fp16"):
            raise RuntimeUnavailable(f"{precision} on CPU needs RIS_MODEL_RUNTIME=openvino (PyTorch eager runs fp32/bf16).")
        return RuntimeChoice("torch", "fp32" if precision == "auto" else precision, "cpu", why)

    if not capabilities:
        raise RuntimeUnavailable("RIS_MODEL_RUNTIME=openvino but the openvino package is not installed.")
    if precision == "auto":
        if cpu_auto_precision != "bf16":
            return RuntimeChoice("openvino", "fp32", "cpu", f"{why}; this model stays fp32 (bf16 loses fidelity)")
        if "BF16" in capabilities:
            return RuntimeChoice("openvino", "bf16", "cpu", f"{why}; the CPU has bf16 instructions")
        return RuntimeChoice("openvino", "fp32", "cpu", f"{why}; no bf16 instructions on this CPU")
    if precision == "bf16" and "BF16" not in capabilities:
        raise RuntimeUnavailable("RIS_MODEL_PRECISION=bf16 but this CPU has no bf16 instructions (AVX-512 BF16 or AMX).")
    if precision == "fp16":
        raise RuntimeUnavailable("fp16 is a GPU precision; on CPU use bf16, int8 or fp32.")
    if precision == "int8" and importlib.util.find_spec("nncf") is None:
        raise RuntimeUnavailable(
            "RIS_MODEL_PRECISION=int8 needs the nncf package, which this installation does not have (the CPU image "
            "ships fp32 only); use fp32 or bf16, or the default image."
        )
    return RuntimeChoice("openvino", precision, "cpu", why)


class OpenVINORuntime:
    """OpenVINO on the CPU: an OpenVINO model (fp32 graph or NNCF int8) compiled for this CPU.

    One stream using every core (LATENCY): a lone query is as fast as it gets, and BentoML's adaptive
    batching supplies the parallelism. Splitting batches between streams (THROUGHPUT) was measured on
    2 cores and gave nothing (EfficientNet-Lite0 fp32: 121-151 images/s either way at batch 32, the end
    to end ingest pipeline 92 vs 94); it only looked faster while other work competed for the cores.

    The model's input side is static (a static shape compiles to faster kernels); another side (a view
    embedded at 112 px) is the same graph reshaped and compiled on its first use (ImageEmbedder.warm_up
    makes that first use the start)."""

    def __init__(self, model: Any, choice: RuntimeChoice) -> None:
        import openvino as ov

        self.choice = choice
        self.model = model  # kept so it can be written to the runtime cache
        self.threads = usable_cpus()
        self._config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads,
            # int8 graphs keep their non-quantised ops in bf16 where the CPU can (faster, same fidelity).
            "INFERENCE_PRECISION_HINT": "f32" if choice.precision == "fp32" else "bf16",
        }
        if choice.precision == "int8" and "BF16" not in _openvino_cpu_capabilities():
            self._config["INFERENCE_PRECISION_HINT"] = "f32"
        self._side = int(model.input(0).get_partial_shape()[1].get_length())
        # One infer request per input side, used by one thread at a time: BentoML may call a sync API from
        # several threads.
        self._requests = {self._side: ov.Core().compile_model(model, "CPU", self._config).create_infer_request()}
        self._lock = threading.Lock()

    def _request_for(self, side: int) -> Any:
        request = self._requests.get(side)
        if request is None:
            import openvino as ov

            reshaped = self.model.clone()
            reshaped.reshape({reshaped.input(0).get_any_name(): ov.PartialShape([-1, side, side, 3])})
            request = self._requests[side] = ov.Core().compile_model(reshaped, "CPU", self._config).create_infer_request()
            logger.info("OpenVINO model compiled for %d-px input as well", side)
        return request

    def features(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self._request_for(pixels.shape[1]).infer({0: np.ascontiguousarray(pixels)})
            return np.array(result[0], dtype=np.float32)  # copy: the request reuses its output buffer

    def describe(self) -> str:
        import openvino as ov

        return f"openvino {ov.__version__.split('-')[0]} {self.choice.precision} on cpu ({self.threads} threads)"


class RuntimeCache:
    """Converted (and quantised) OpenVINO models on disk, so a restart skips conversion, calibration and
    the fidelity check (cold start).

    Safe to reuse: an entry is named by a digest of everything that decides its output (model id =
    backbone + weights digest, preprocessing recipe, precision, calibration images, torch/openvino/nncf
    versions and this module's source), it is written only after passing the fidelity check, and it
    appears atomically (written aside, then renamed). Anything else (a changed model or code) misses
    and rebuilds; an unreadable entry is rebuilt and replaced.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def key(model_id: str, preprocessing: Preprocessing, precision: str, calibration: np.ndarray | None) -> str:
        h = hashlib.sha256()
        # The normalisation is inside the converted model; the views are not, but their input sides decide
        # which sides the fidelity check covered before the entry was written.
        normalisation = json.dumps(preprocessing.normalisation(), sort_keys=True)
        sides = json.dumps(preprocessing.input_sides)
        for part in (model_id, normalisation, sides, precision, json.dumps(library_versions(), sort_keys=True)):
            h.update(part.encode() + b"\0")
        for source in _CONVERSION_SOURCES:
            h.update(source.read_bytes())
        if calibration is not None:
            h.update(np.ascontiguousarray(calibration).tobytes())
        return h.hexdigest()[:24]

    def load(self, key: str, choice: RuntimeChoice) -> OpenVINORuntime | None:
        path = self.root / key / "model.xml"
        if not path.exists():
            return None
        import openvino as ov

        try:
            return OpenVINORuntime(ov.Core().read_model(path), choice)
        except RuntimeError as exc:  # OpenVINO reports unreadable/corrupt IR as RuntimeError
            logger.warning("runtime cache entry %s is unreadable (%s); rebuilding it", path.parent, exc)
            return None

    def save(self, key: str, runtime: OpenVINORuntime) -> None:
        import openvino as ov

        final = self.root / key
        if final.exists():
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
            ov.save_model(runtime.model, staging / "model.xml", compress_to_fp16=False)
            os.replace(staging, final)
        except OSError as exc:  # a read-only or full disk only costs the next start its conversion time
            logger.warning("could not write the runtime cache at %s: %s", final, exc)


def _quantise_int8(model: object, calibration: np.ndarray | None) -> object:
    if calibration is None or len(calibration) == 0:
        raise RuntimeUnavailable(
            "RIS_MODEL_PRECISION=int8 needs calibration images: set RIS_MODEL_INT8_CALIBRATION_DIR to a folder of "
            "typical photos (a few hundred are plenty; the ingest job's input folder works)."
        )
    try:
        import nncf
    except ImportError as exc:
        raise RuntimeUnavailable("RIS_MODEL_PRECISION=int8 needs the nncf package (pip install nncf).") from exc
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    # NNCF draws progress bars on stdout, which belongs to the caller (e.g. `python -m ingest --json`).
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(model, dataset, subset_size=len(calibration), preset=nncf.QuantizationPreset.PERFORMANCE)


def calibration_pixels(
    folder: Path, to_pixels: Callable[[bytes], np.ndarray], limit: int = CALIBRATION_IMAGES
) -> np.ndarray:
    """Up to ``limit`` images of a folder (recursively, in a stable order) as (N, crop, crop, 3) uint8.

    Files that are not decodable images are skipped."""
    return calibration_views(folder, lambda data: (to_pixels(data),), limit)[0]


def calibration_views(
    folder: Path, to_views: Callable[[bytes], tuple[np.ndarray, ...]], limit: int = CALIBRATION_IMAGES
) -> tuple[np.ndarray, ...]:
    """The same, each image read and decoded once into several views (one stacked array per view)."""
    if not folder.is_dir():
        raise RuntimeUnavailable(f"The int8 calibration folder {folder} does not exist.")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    # Spread the sample over the whole folder (class folders sort together) instead of its first classes.
    step = max(1, len(paths) // limit)
    views = []
    for path in paths[::step][:limit]:
        try:
            views.append(to_views(path.read_bytes()))
        except (SearchError, OSError) as exc:  # not a decodable image: calibration only needs typical content
            logger.debug("calibration: skipping %s: %s", path, exc)
    if not views:
        raise RuntimeUnavailable(f"No decodable images in the int8 calibration folder {folder}.")
    return tuple(np.stack(column) for column in zip(*views, strict=True))


def check_fidelity(runtime: InferenceRuntime, pixels: np.ndarray, reference: np.ndarray) -> float:
    """The smallest per-image cosine between ``runtime`` and the fp32 reference features of the same
    ``pixels`` (computed by PyTorch, or stored with an exported model); refuse below the floor."""
    fast = _unit(runtime.features(pixels))
    exact = _unit(np.asarray(reference, dtype=np.float32))
    worst = float(np.min(np.sum(fast * exact, axis=1)))
    if worst < FIDELITY_FLOOR:
        raise RuntimeUnavailable(
            f"{runtime.choice.label} embeddings differ from the fp32 reference (min cosine {worst:.4f} < "
            f"{FIDELITY_FLOOR}); refusing it. Use RIS_MODEL_PRECISION=fp32 or another runtime."
        )
    return worst


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fidelity_probe(crop: int, count: int = 4, seed: int = 0) -> np.ndarray:
    """Image-like pixels (smooth gradients + texture) for the build-time fidelity check when no real
    calibration images are configured. Real photos are what the tests use; this only catches a broken
    or badly degraded compiled model."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:crop, 0:crop].astype(np.float32) / crop
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([a * xx + (1 - a) * yy, b * (1 - xx) + (1 - b) * yy, c * xx * yy], axis=-1)
        texture = rng.normal(0, 0.08, (crop // 8, crop // 8, 3)).repeat(8, 0).repeat(8, 1)
        images.append(np.clip((base + texture) * 255, 0, 255).astype(np.uint8))
    return np.stack(images)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "openvino", "nncf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def compile_openvino(model: Any, choice: RuntimeChoice, calibration: np.ndarray | None = None) -> OpenVINORuntime:
    """An fp32 OpenVINO model (converted just now, or exported at build time) compiled for the chosen
    precision; int8 is NNCF-quantised first, calibrated on ``calibration``."""
    if choice.precision == "int8":
        model = _quantise_int8(model, calibration)
    return OpenVINORuntime(model, choice)
