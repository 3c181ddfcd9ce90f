"""The one preprocessing recipe: decoded RGB image -> fixed-size uint8 pixels -> normalised tensor.

Resizing and cropping run on the CPU beside decoding (service workers, ingest threads); the cheap
normalisation runs on the embedder's device, so only 224x224x3 bytes per image cross processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

# Bump when the recipe below changes in a way that changes embeddings.
RECIPE_VERSION = 1


# Resizing the short side of a 4000x3 strip to 256 would make a 341,333-pixel-long image (260 MB): the long
# side is first cut to this many times the short one, around the centre. The centre crop that follows keeps
# only the middle square, so nothing it uses is lost; shapes up to this ratio are pixel-identical to
# torchvision (tested).
MAX_ASPECT = 8


def _clip_aspect(image: Image.Image) -> Image.Image:
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= MAX_ASPECT * short:
        return image
    if width > height:
        left = (width - MAX_ASPECT * short) // 2
        return image.crop((left, 0, left + MAX_ASPECT * short, height))
    top = (height - MAX_ASPECT * short) // 2
    return image.crop((0, top, width, top + MAX_ASPECT * short))


class Preprocessing(BaseModel):
    """The recipe; a typed value that crosses processes (model-store metadata, the embedder's description)."""

    model_config = ConfigDict(frozen=True)

    resize: int  # short side, before the centre crop
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def version(self) -> str:
        """Recorded in the collection: embeddings made with another recipe must not mix."""
        mean = ",".join(f"{v:.4f}" for v in self.mean)
        std = ",".join(f"{v:.4f}" for v in self.std)
        return f"v{RECIPE_VERSION}:bilinear-resize{self.resize}-crop{self.crop}-mean{mean}-std{std}"

    def to_pixels(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> (crop, crop, 3) uint8, exactly as torchvision's classification transforms.

        Plain Pillow, because that is what torchvision runs for PIL input (resize of the short side with
        PIL's bilinear filter, then a centre crop); a test pins the equality. Keeping torch out of this
        module keeps it out of the API and vector-search processes, which start much faster."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        image = _clip_aspect(image)
        width, height = image.size
        # torchvision: the short side becomes `resize`, the long side int(resize * long / short).
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        resized = image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image
        left = int(round((resized.width - self.crop) / 2.0))
        top = int(round((resized.height - self.crop) / 2.0))
        if left < 0 or top < 0:
            raise ValueError(f"resize {self.resize} is smaller than crop {self.crop}")
        cropped = resized.crop((left, top, left + self.crop, top + self.crop))
        return np.array(cropped, dtype=np.uint8)  # a writable copy torch can wrap

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on any device -> (N, 3, H, W) float32 normalised."""
        import torch

        x = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)
