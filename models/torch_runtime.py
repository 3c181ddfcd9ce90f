"""The PyTorch side of the runtimes: eager inference (the fp32 reference and the GPU path) and the
conversion of a torch module to OpenVINO. Imported only where PyTorch is installed: the CPU image, which
ships an OpenVINO model converted at build time (``python -m models export-openvino``), never loads it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from models.preprocess import Preprocessing
from models.runtime import (
    InferenceRuntime,
    RuntimeChoice,
    check_fidelity,
    compile_openvino,
    fidelity_probe,
)

logger = logging.getLogger(__name__)


class _PixelsToFeatures(nn.Module):
    """uint8 NHWC pixels -> features, so a converted graph includes the (one) normalisation recipe."""

    def __init__(self, module: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.module = module
        self.preprocessing = preprocessing

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(self.preprocessing.normalise(pixels))


class TorchRuntime:
    """PyTorch eager: the fp32 reference on CPU, autocast + channels-last on CUDA."""

    def __init__(self, module: nn.Module, preprocessing: Preprocessing, choice: RuntimeChoice) -> None:
        self.choice = choice
        self.preprocessing = preprocessing
        self.device = torch.device(choice.device)
        module = module.eval().to(self.device)
        if self.device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(choice.precision)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
            x = self.preprocessing.normalise(batch)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if self._autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                    out = self.module(x)
            else:
                out = self.module(x)
            return out.float().cpu().numpy()

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"torch {self.choice.precision} on cuda ({torch.cuda.get_device_name(self.device)})"
        return f"torch {self.choice.precision} on cpu ({torch.get_num_threads()} threads)"


def convert_to_openvino(module: nn.Module, preprocessing: Preprocessing) -> Any:
    """The torch module, normalisation folded in, as an fp32 OpenVINO model taking uint8 NHWC pixels."""
    import openvino as ov

    wrapper = _PixelsToFeatures(module.eval(), preprocessing).eval()
    crop = preprocessing.crop
    example = torch.zeros((1, crop, crop, 3), dtype=torch.uint8)
    with torch.no_grad():
        return ov.convert_model(wrapper, example_input=example, input=[(-1, crop, crop, 3), ov.Type.u8])


def reference_features(module: nn.Module, preprocessing: Preprocessing, pixels: np.ndarray) -> np.ndarray:
    """The fp32 PyTorch features of ``pixels``: what every fast runtime is checked against."""
    return TorchRuntime(module, preprocessing, RuntimeChoice("torch", "fp32", "cpu", "fidelity reference")).features(pixels)


def check_other_sides(runtime: InferenceRuntime, module: nn.Module, preprocessing: Preprocessing) -> float:
    """The fidelity check at every other input side of the recipe (a view's 112 px: OpenVINO compiles the
    same graph reshaped), on probe images of that side; the smallest cosine (1.0 without such sides)."""
    worst = 1.0
    for side in preprocessing.input_sides[1:]:
        probe = fidelity_probe(side)
        worst = min(worst, check_fidelity(runtime, probe, reference_features(module, preprocessing, probe)))
    return worst


def build_runtime(
    module: nn.Module,
    preprocessing: Preprocessing,
    choice: RuntimeChoice,
    calibration: np.ndarray | None = None,
) -> InferenceRuntime:
    """Build the chosen runtime; for a fast path, check it against the fp32 reference before use."""
    if choice.runtime == "torch":
        return TorchRuntime(module, preprocessing, choice)
    started = time.monotonic()
    runtime = compile_openvino(convert_to_openvino(module, preprocessing), choice, calibration)
    # Checked on the calibration photos where there are some (int8), else on the probe images.
    probe = calibration[:8] if calibration is not None and len(calibration) else fidelity_probe(preprocessing.crop)
    worst = check_fidelity(runtime, probe, reference_features(module, preprocessing, probe))
    worst = min(worst, check_other_sides(runtime, module, preprocessing))
    logger.info(
        "%s built in %.1f s; fidelity vs fp32: min cosine %.5f over %d images",
        choice.label, time.monotonic() - started, worst, len(probe),
    )
    return runtime
