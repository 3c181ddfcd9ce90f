"""The CPU image's model path: weights converted to OpenVINO at build time (`python -m models export-openvino`)
and served by an installation without PyTorch, with vectors that go into the same collections.

Each step runs in its own process with its own model store: "without PyTorch" is a process in which
`import torch` fails (tests/notorch/sitecustomize.py), and the session's model store stays untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.imaging import DecodeLimits, decode_image
from models.pipeline import prepare_image
from models.runtime import FIDELITY_FLOOR, RuntimeUnavailable, choose_runtime
from tests.support import ROOT, run_cli, service_env

WITHOUT_TORCH = ROOT / "tests" / "notorch"

# Loads the embedder the settings choose, embeds the pixels in argv[1] into argv[2], imports the service
# module, and reports the model and every torch module that got imported.
EMBED = """
import json, logging, sys
import numpy as np
logging.basicConfig(level=logging.INFO)
from bento.core.config import get_settings
from models.store import load_embedder
embedder = load_embedder(get_settings(), import_if_missing=False)
np.save(sys.argv[2], embedder.embed(np.load(sys.argv[1])))
if len(sys.argv) > 4:  # pixels at the low-res view's side
    np.save(sys.argv[4], embedder.embed(np.load(sys.argv[3])))
import service  # the whole bento's entry module
print(json.dumps({
    "info": embedder.info.model_dump(),
    "device": embedder.device_name,
    "torch_modules": sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "torchvision", "nncf")),
}))
"""


def _run(args: list[str], env: dict[str, str], without_torch: bool = False):
    if without_torch:
        env = {**env, "PYTHONPATH": str(WITHOUT_TORCH)}
    return run_cli(args, env, timeout=300)


def _ok(done) -> str:
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.slow
def test_an_exported_model_serves_without_torch_into_the_same_collections(efficientnet_alone, photo_set, tmp_path):
    # The recipe with the low-res view (an export ships the check of its smaller input side either way; the
    # recipe decides whether serving needs it).
    efficientnet = efficientnet_alone
    home = tmp_path / "bentoml-home"
    env = service_env(tmp_path / "data", BENTOML_HOME=str(home), RIS_MODEL_RUNTIME_CACHE_DIR=str(tmp_path / "cache"), RIS_MODEL_VIEWS="low-res-64")
    names = sorted(photo_set["originals"])
    limits = DecodeLimits(10**8, 10**8)
    pixels = np.stack([prepare_image(photo_set["originals"][n], limits, efficientnet.preprocessing, None).pixels for n in names])
    np.save(tmp_path / "pixels.npy", pixels)
    decoded = [decode_image(photo_set["originals"][n], limits).image for n in names]
    small = np.stack([efficientnet.preprocessing.view_pixels(image)[1] for image in decoded])
    assert small.shape[1:] == (112, 112, 3)
    np.save(tmp_path / "small.npy", small)
    embed = ["-c", EMBED, str(tmp_path / "pixels.npy"), str(tmp_path / "vectors.npy"), str(tmp_path / "small.npy"), str(tmp_path / "small-vectors.npy")]

    # The guard first: PyTorch's `import torch` really fails in these processes.
    assert "ModuleNotFoundError: import of torch halted" in _run(["-c", "import torch"], env, without_torch=True).stderr

    _ok(_run(["-m", "models", "import", "--model", "efficientnet-lite0"], env))
    # Weights alone cannot be served without PyTorch: the error says what to build.
    refused = _run(embed, env, without_torch=True)
    assert refused.returncode != 0 and "export-openvino" in refused.stderr and "no PyTorch" in refused.stderr

    export = ["-m", "models", "export-openvino", "--model", "efficientnet-lite0", "--fidelity-images", str(photo_set["root"])]
    first = json.loads(_ok(_run(export, env)))
    again = json.loads(_ok(_run(export, env)))
    assert first["store_tag"] == again["store_tag"] and first["store_tag"].startswith("ris-efficientnet-lite0-openvino:")
    assert first["model_id"] == efficientnet.info.model_id, "the same weights: the same model id"
    exported = home / "models" / "ris-efficientnet-lite0-openvino" / first["store_tag"].split(":")[1]
    shipped = np.load(exported / "fidelity-pixels.npy")
    assert len(shipped) == 4 + 8, "the probe images and 8 of the photos are checked and shipped"
    assert np.load(exported / "fidelity-pixels-112.npy").shape == (4 + 8, 112, 112, 3), "and at the low-res view's side"

    served = json.loads(_ok(_run(embed, env, without_torch=True)))
    assert served["torch_modules"] == []
    assert served["info"]["store_tag"] == first["store_tag"] and served["info"]["runtime"] == "openvino"
    assert served["info"]["model_id"] == efficientnet.info.model_id
    vectors = np.load(tmp_path / "vectors.npy")
    cosines = np.sum(vectors * efficientnet.embed(pixels), axis=1)
    assert cosines.min() >= FIDELITY_FLOOR, cosines
    cosines = np.sum(np.load(tmp_path / "small-vectors.npy") * efficientnet.embed(small), axis=1)
    assert cosines.min() >= FIDELITY_FLOOR, cosines

    # int8 needs NNCF (and calibration), which an installation without PyTorch does not have: refused at once.
    int8 = _run(embed, {**env, "RIS_MODEL_PRECISION": "int8", "RIS_MODEL_INT8_CALIBRATION_DIR": str(photo_set["root"])}, without_torch=True)
    assert int8.returncode != 0 and "needs the nncf package" in int8.stderr

    # With PyTorch installed, the OpenVINO runtime compiles the exported twin instead of converting again.
    with_torch = _run(embed, {**env, "RIS_MODEL_RUNTIME": "openvino"})
    _ok(with_torch)
    assert "compiled from the exported model" in with_torch.stderr and "built in" not in with_torch.stderr

    # A compiled model that computes otherwise than PyTorch did at build time is refused at start, at
    # either input side.
    for name in ("fidelity-reference.npy", "fidelity-reference-112.npy"):
        reference = np.load(exported / name)
        np.save(exported / name, np.roll(reference, 1, axis=0))
        drifted = _run(embed, env, without_torch=True)
        assert drifted.returncode != 0 and "differ from the fp32 reference" in drifted.stderr, name
        np.save(exported / name, reference)
    # An export without the low-res side's check (made before the recipe had one): refused without PyTorch,
    # passed over for a conversion of the weights with it.
    (exported / "fidelity-reference-112.npy").rename(tmp_path / "kept.npy")
    old = _run(embed, env, without_torch=True)
    assert old.returncode != 0 and "ships no fidelity check" in old.stderr
    converted = _run(embed, {**env, "RIS_MODEL_RUNTIME": "openvino"})
    _ok(converted)
    assert "lacks a check" in converted.stderr and "built in" in converted.stderr
    (tmp_path / "kept.npy").rename(exported / "fidelity-reference-112.npy")

    # Another check (other photos) is another export: an export is reused only when everything that
    # decides it is the same.
    other = json.loads(_ok(_run([*export[:-1], str(Path(photo_set["root"]) / "coffee")], env)))
    assert other["store_tag"] != first["store_tag"] and other["model_id"] == first["model_id"]


def test_without_torch_only_the_openvino_cpu_path_is_offered(monkeypatch):
    monkeypatch.setattr("models.runtime.torch_installed", lambda: False)
    assert choose_runtime("auto", "auto", "auto", "fp32").runtime == "openvino"
    assert choose_runtime("auto", "auto", "cpu", "fp32").label == "openvino-fp32"
    with pytest.raises(RuntimeUnavailable, match="RIS_MODEL_RUNTIME=torch needs PyTorch"):
        choose_runtime("torch", "auto", "auto", "fp32")
    with pytest.raises(RuntimeUnavailable, match="RIS_MODEL_DEVICE=cuda needs PyTorch"):
        choose_runtime("auto", "auto", "cuda", "fp32")


def test_the_embedder_asks_for_a_gpu_only_where_pytorch_can_use_it(monkeypatch):
    from bento.core.config import Settings
    from bento.http import deployment

    def settings(device: str) -> Settings:
        return Settings(data_dir=Path("unused"), model={"device": device})

    monkeypatch.setattr(deployment.shutil, "which", lambda name: f"/usr/bin/{name}")  # a GPU node
    monkeypatch.setattr(deployment, "torch_installed", lambda: True)
    assert deployment.embedder_resources(settings("auto")) == {"gpu": 1}
    assert deployment.embedder_resources(settings("cpu")) == {}
    monkeypatch.setattr(deployment, "torch_installed", lambda: False)  # the CPU image on a GPU node
    assert deployment.embedder_resources(settings("auto")) == {}
