"""The model layer: preprocessing fidelity, the real ResNet-50 architecture, the model store, `auto`."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bento.core.config import Settings
from bento.core.errors import InvalidRequest
from models.backbones import ResNet50
from models.pipeline import prepare_image
from models.store import import_model, load_embedder, resolve_model


def _settings(**model) -> Settings:
    return Settings(data_dir=Path("unused"), model=model)


def test_preprocessing_matches_torchvision_transforms_exactly():
    from torchvision.models import ResNet50_Weights

    image = Image.effect_noise((500, 375), 60).convert("RGB")
    recipe = ResNet50._preprocessing_of("IMAGENET1K_V2")
    ours = recipe.normalise(torch.from_numpy(recipe.to_pixels(image))[None])[0]
    reference = ResNet50_Weights.IMAGENET1K_V2.transforms()(image)
    assert ours.shape == reference.shape == (3, 224, 224)
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (232, 232), (1001, 233), (640, 641), (3000, 2000)])
def test_pillow_preprocessing_is_pixel_identical_to_torchvision(size):
    """to_pixels runs plain Pillow (no torch in the API process); it must equal torchvision's transforms."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    image = Image.effect_noise(size, 80).convert("RGB")
    recipe = ResNet50._preprocessing_of("IMAGENET1K_V2")
    expected = F.center_crop(F.resize(image, [recipe.resize], interpolation=InterpolationMode.BILINEAR, antialias=True), [224, 224])
    assert np.array_equal(recipe.to_pixels(image), np.asarray(expected))


def test_preprocessing_version_changes_with_the_recipe():
    v2 = ResNet50._preprocessing_of("IMAGENET1K_V2")
    v1 = ResNet50._preprocessing_of("IMAGENET1K_V1")
    assert v2.resize == 232 and v1.resize == 256
    assert v1.version != v2.version


@pytest.fixture(scope="module")
def random_resnet(bentoml_home):
    return load_embedder(_settings(name="resnet50", resnet50_weights="random"))


def test_random_resnet50_end_to_end(random_resnet):
    """The real torchvision architecture: 2048-d, unit length, batch of N == N singles."""
    assert random_resnet.info.dim == 2048 and random_resnet.info.backbone == "resnet50"
    assert not random_resnet.info.pretrained and "random" in random_resnet.info.weights
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 224, 224, 3), dtype=np.uint8)
    batch = random_resnet.embed(pixels)
    assert batch.shape == (5, 2048) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([random_resnet.embed(pixels[i : i + 1]) for i in range(5)])
    assert np.allclose(batch, singles, atol=1e-4)
    assert not np.allclose(batch[0], batch[1]), "different images must embed differently"


def test_embed_refuses_wrong_pixel_shapes(random_resnet):
    with pytest.raises(InvalidRequest):
        random_resnet.embed(np.zeros((1, 100, 100, 3), dtype=np.uint8))
    with pytest.raises(InvalidRequest):
        random_resnet.embed(np.zeros((1, 224, 224, 3), dtype=np.float32))


def test_resnet50_from_a_local_pth_file(tmp_path, random_resnet):
    """A .pth with the classifier still attached (as torchvision ships it) loads; identity is its digest."""
    torch.manual_seed(1)
    from torchvision.models import resnet50

    path = tmp_path / "resnet50-custom.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    stored = import_model(_settings(name="resnet50", resnet50_weights=str(path)))
    assert stored.info.pretrained and stored.info.weights == "local file resnet50-custom.pth"
    assert stored.info.model_id != random_resnet.info.model_id
    again = import_model(_settings(name="resnet50", resnet50_weights=str(path)))
    assert again.tag == stored.tag, "importing the same weights twice reuses the stored model"


def test_auto_falls_back_to_efficientnet_when_resnet_weights_cannot_be_had(bentoml_home, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    stored = import_model(_settings(name="auto"))
    assert stored.info.backbone == "efficientnet-lite0" and stored.info.pretrained
    assert "ResNet-50 weights unavailable" in stored.info.reason
    # The service side resolves the same model from the store without any network access.
    assert resolve_model(_settings(name="auto"), import_if_missing=False).info.model_id == stored.info.model_id


def test_auto_never_picks_random_weights(bentoml_home):
    stored = import_model(_settings(name="auto", resnet50_weights="random"))
    assert stored.info.backbone == "efficientnet-lite0"
    assert "never chosen by auto" in stored.info.reason


def test_unknown_weights_are_a_clear_error(bentoml_home):
    from bento.core.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="neither a torchvision weights name"):
        import_model(_settings(name="resnet50", resnet50_weights="/no/such/file.pth"))


def test_efficientnet_embeddings_are_meaningful(efficientnet, photo_set):
    """Genuine ImageNet weights: each near-duplicate query finds its original (recall@1)."""
    from models.imaging import DecodeLimits

    limits = DecodeLimits(10**8, 10**8)
    names = sorted(photo_set["originals"])
    pre = efficientnet.preprocessing
    originals = efficientnet.embed(np.stack([prepare_image(photo_set["originals"][n], limits, pre, None).pixels for n in names]))
    queries = efficientnet.embed(np.stack([prepare_image(photo_set["queries"][n], limits, pre, None).pixels for n in names]))
    nearest = (queries @ originals.T).argmax(axis=1)
    recall = float(np.mean(nearest == np.arange(len(names))))
    assert recall >= 0.9, f"near-duplicate recall@1 {recall:.2f}: {[(names[i], names[j]) for i, j in enumerate(nearest) if i != j]}"
