"""The one preprocessing recipe: decoded RGB image -> fixed-size uint8 pixels -> normalised tensor.

Resizing and cropping run on the CPU beside decoding (service workers, ingest threads); the cheap
normalisation runs on the embedder's device, so only 224x224x3 bytes per image (and 112x112x3 per
low-res view) cross processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch

# Bump when the recipe below changes in a way that changes embeddings. 2: extra stored views per image.
# 3: a view may be embedded at its own (smaller) input side.
RECIPE_VERSION = 3


# Resizing the short side of a 4000x3 strip to 256 would make a 341,333-pixel-long image (260 MB): the long
# side is first cut to this many times the short one, around the centre. The centre crop that follows keeps
# only the middle square, so nothing it uses is lost; shapes up to this ratio are pixel-identical to
# torchvision (tested).
MAX_ASPECT = 8


NORMALISATION = ("resize", "crop", "mean", "std", "fit")
# How an image becomes the model's square input: "centre-crop" (short side to ``resize``, then the centre
# ``crop`` square, as torchvision's classification transforms) or "square" (the whole image squashed to
# ``crop`` x ``crop``, aspect not kept: nothing of the picture is cut off, as SSCD recommends for copy
# detection, and every image has one shape so that batches form).
Fit = Literal["centre-crop", "square"]


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


class View(BaseModel):
    """An extra vector stored for every image, so that an edited copy meets its original in its own domain:
    a part of the image (``box``) and/or a copy as small as a thumbnail (``shrink_to``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    box: tuple[float, float, float, float] | None = Field(None, description="(left, top, right, bottom) as fractions.")
    shrink_to: int | None = Field(None, description="Shrink the image to fit a box of this side (a thumbnail).")
    max_query_side: int | None = Field(
        None, description="Searched only for queries whose longer side is at most this (None: every query)."
    )
    margin: float = Field(0.0, ge=0, description="Subtracted from a match's score through this view.")
    input_side: int | None = Field(
        None, ge=32, description="The model's input side for this view (None: the recipe's crop, as the main view)."
    )

    def apply(self, image: Image.Image) -> Image.Image:
        if self.box is not None:
            left, top, right, bottom = self.box
            w, h = image.size
            image = image.crop((round(left * w), round(top * h), max(round(right * w), 1), max(round(bottom * h), 1)))
        if self.shrink_to is not None and max(image.size) > self.shrink_to:
            image = image.copy()
            # LANCZOS as the thumbnails people make (browsers, galleries, Pillow's own thumbnail()).
            image.thumbnail((self.shrink_to, self.shrink_to), Image.Resampling.LANCZOS)
        return image


def _crops(fraction: float) -> tuple[View, ...]:
    """Crops of ``fraction`` of each side at the four corners and the centre."""
    far, mid = 1 - fraction, (1 - fraction) / 2
    corners = {"tl": (0, 0), "tr": (far, 0), "bl": (0, far), "br": (far, far), "c": (mid, mid)}
    percent = round(fraction * 100)
    return tuple(
        View(name=f"crop{percent}-{where}", box=(left, top, left + fraction, top + fraction))
        for where, (left, top) in corners.items()
    )


# The sets of extra views RIS_MODEL_VIEWS chooses from (bench/robust_search.py measured each on photos with
# their hard negatives; docs/evaluation.md, "Finding the original", has the table):
# - low-res-64: a 64-pixel copy. A tiny thumbnail query found its original first 43 % of the time (the
#   full-size original is too sharp to look like it); with this view 74 %. One more vector per image, embedded
#   at a 112-px input: a 64-px copy holds no detail a 224-px input would see (measured: the same recall on
#   thumbnails), and the forward pass costs a quarter as much (the ingest rate is the price of this view).
# - crops-60: crops of 60 % of each side at the corners and the centre. A 60 % crop found its original (and
#   not a stored quarter of the same photo) 45 % of the time; with these views 79 %. Five more vectors.
VIEW_SETS: dict[str, tuple[View, ...]] = {
    # Searched for small queries only: a large query never looks like a 64-pixel copy, and skipping the view
    # keeps its search as cheap as with one vector per image (Milvus Lite scans every row it searches).
    # The margin keeps small crops from meeting other photos' blurry copies first (40 % crops: 0.57 without
    # it, 0.64 with it, as without the view); a true thumbnail matches its copy far above the margin.
    "low-res-64": (View(name="low-res-64", shrink_to=64, max_query_side=192, margin=0.05, input_side=112),),
    "crops-60": _crops(0.6),
}
LOW_RES = VIEW_SETS["low-res-64"][0]
# A similarity model described without settings (the model store's records): its recipe where it serves alone.
# Beside a copy model the settings store no view (RIS_MODEL_VIEWS=auto): the copy model finds thumbnails.
DEFAULT_VIEW_SETS = ("low-res-64",)


class Preprocessing(BaseModel):
    """The recipe; a typed value that crosses processes (model-store metadata, the embedder's description).

    ``resize``/``crop``/``mean``/``std`` come from the backbone's weights; ``views`` are the product's: one
    more vector per extra view for every stored image (RIS_MODEL_VIEWS). A query is embedded from its
    main view (and, when small, at the low-res views' side too: ``query_sides``) and meets each image's
    best view."""

    model_config = ConfigDict(frozen=True)

    resize: int  # short side, before the centre crop
    crop: int  # the model's input side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fit: Fit = "centre-crop"
    views: tuple[View, ...] = (LOW_RES,)

    @model_validator(mode="after")
    def _one_smaller_side(self) -> Preprocessing:
        # The embedder batches each input side apart, with one batcher for the main crop and one for a
        # smaller side (service.py: embed, embed_small): a second smaller side would share the latter.
        if len(self.input_sides) > 2:
            raise ValueError(f"the views may use one input side besides the crop's; got {self.input_sides}")
        return self

    @classmethod
    def of_backbone(cls, normalisation: dict[str, object], view_sets: Sequence[str] = DEFAULT_VIEW_SETS) -> Preprocessing:
        """The product's recipe around a backbone's normalisation (what the model store records)."""
        views = tuple(view for name in view_sets for view in VIEW_SETS[name])
        # "fit" is absent from models stored before it existed: they were all centre-crop models.
        return cls.model_validate({**{key: normalisation[key] for key in NORMALISATION if key in normalisation}, "views": views})

    def normalisation(self) -> dict[str, object]:
        return self.model_dump(include=set(NORMALISATION))

    @property
    def vectors_per_image(self) -> int:
        return 1 + len(self.views)

    @property
    def version(self) -> str:
        """Recorded in the collection: embeddings made with another recipe must not mix."""
        mean = ",".join(f"{v:.4f}" for v in self.mean)
        std = ",".join(f"{v:.4f}" for v in self.std)
        views = "".join(f"+{view.name}" + (f"@{view.input_side}" if view.input_side else "") for view in self.views)
        fit = f"square{self.crop}" if self.fit == "square" else f"resize{self.resize}-crop{self.crop}"
        return f"v{RECIPE_VERSION}:bilinear-{fit}-mean{mean}-std{std}{views}"

    def views_for_query(self, width: int, height: int) -> list[int]:
        """Which stored views (0 = main) a query of this size is compared with."""
        side = max(width, height)
        return [0] + [i + 1 for i, view in enumerate(self.views) if view.max_query_side is None or side <= view.max_query_side]

    def query_sides(self, width: int, height: int) -> list[int]:
        """The smaller input sides of the views a query of this size meets. The query is embedded at each of
        them too and searched with every vector: a thumbnail meets the low-res copies in their own domain
        (at the main side alone it looks twice as large as they do)."""
        return sorted({self.view_side(view) for view in self.views_for_query(width, height)} - {self.crop})

    def view_margins(self) -> dict[int, float]:
        return {i + 1: view.margin for i, view in enumerate(self.views) if view.margin}

    def view_side(self, view: int) -> int:
        """The model's input side for view ``view`` (0 = main)."""
        return self.crop if view == 0 or self.views[view - 1].input_side is None else self.views[view - 1].input_side

    @property
    def input_sides(self) -> tuple[int, ...]:
        """Every input side the embedder takes for this recipe (its main crop first)."""
        return tuple(dict.fromkeys(self.view_side(view) for view in range(self.vectors_per_image)))

    def view_pixels(self, image: Image.Image) -> tuple[np.ndarray, ...]:
        """Every view of a stored image, main first: (side, side, 3) uint8 each, at the view's input side."""
        return (self.to_pixels(image), *(self.to_pixels(view.apply(image), view.input_side) for view in self.views))

    def to_pixels(self, image: Image.Image, side: int | None = None) -> np.ndarray:
        """RGB PIL image -> (crop, crop, 3) uint8, exactly as torchvision's classification transforms.
        ``side``: another input side (a view's), resized in the same proportion (256/224 -> 128/112).

        Plain Pillow, because that is what torchvision runs for PIL input (resize of the short side with
        PIL's bilinear filter, then a centre crop); a test pins the equality. Keeping torch out of this
        module keeps it out of the API and vector-search processes, which start much faster. (Embedding the
        whole image instead of the centre crop was measured and did not pay: bench/robust_search.py.)"""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        crop = side or self.crop
        if self.fit == "square":
            # The whole picture: a crop of it, a thumbnail and a re-encoded copy all squash to what it does.
            squashed = image.resize((crop, crop), Image.Resampling.BILINEAR) if image.size != (crop, crop) else image
            return np.array(squashed, dtype=np.uint8)
        image = _clip_aspect(image)
        resize = round(self.resize * crop / self.crop)
        width, height = image.size
        # torchvision: the short side becomes `resize`, the long side int(resize * long / short).
        if width <= height:
            size = (resize, int(resize * height / width))
        else:
            size = (int(resize * width / height), resize)
        resized = image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image
        left = int(round((resized.width - crop) / 2.0))
        top = int(round((resized.height - crop) / 2.0))
        if left < 0 or top < 0:
            raise ValueError(f"resize {resize} is smaller than crop {crop}")
        cropped = resized.crop((left, top, left + crop, top + crop))
        return np.array(cropped, dtype=np.uint8)  # a writable copy torch can wrap

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on any device -> (N, 3, H, W) float32 normalised."""
        import torch

        x = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)
