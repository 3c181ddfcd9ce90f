"""The one image pipeline shared by the service and the ingest job: bytes -> checked, decoded,
thumbnailed and preprocessed image, ready for the embedder."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bento.core.errors import InvalidRequest
from bento.core.ids import content_hash
from models.imaging import DecodeLimits, decode_image, draft_min_side, make_thumbnail, usable_cpus
from models.preprocess import Preprocessing


@dataclass
class PreparedImage:
    id: str
    data: bytes
    mime: str
    width: int
    height: int
    pixels: np.ndarray  # (crop, crop, 3) uint8, the main view: what a query is embedded from
    thumbnail: bytes | None
    # equal for the same picture in other bytes (other metadata, a lossless re-save); images to store only (the
    # exact-duplicate key): a query does not need it, and hashing the decoded pixels costs ~2.5 ms of a ~20 ms search
    pixel_hash: str | None
    # every view of the recipe, main first, each (side, side, 3) at its input side (images to store only)
    views: tuple[np.ndarray, ...] | None = None
    # a small query at each smaller input side of the views it meets (Preprocessing.query_sides; queries only)
    side_pixels: dict[int, np.ndarray] = field(default_factory=dict)
    # the copy model's input (the whole image at its side; None without a copy model) and, for an image to
    # store, every view of the copy recipe (main first)
    copy_pixels: np.ndarray | None = None
    copy_views: tuple[np.ndarray, ...] | None = None


# The most images, and pixel bytes, one embedding call may carry (the /api/embed batches of the remote ingest
# client): 1024 images at 224 px; fewer at the copy model's 288 px.
MAX_PIXELS_BATCH = 1024
MAX_PIXELS_BYTES = MAX_PIXELS_BATCH * 224 * 224 * 3


def max_batch(side: int) -> int:
    """The most images of ``side`` x ``side`` one embedding call may carry."""
    return min(MAX_PIXELS_BATCH, MAX_PIXELS_BYTES // (side * side * 3))


def check_pixels(pixels: np.ndarray, sides: Sequence[int]) -> None:
    """The embedder's input contract: (N <= max_batch(side), side, side, 3) uint8, one of the recipe's
    input sides (the main crop, and a smaller one where a view is embedded smaller) per call."""
    check_pixel_shape(pixels.dtype, pixels.shape, sides)


def check_pixel_shape(dtype: np.dtype, shape: tuple[int, ...], sides: Sequence[int], at_least: int = 0) -> None:
    """The same contract from a dtype and shape (a .npy header, before anything is allocated)."""
    square = len(shape) == 4 and shape[1] == shape[2] and shape[3] == 3
    if dtype != np.uint8 or not square or shape[1] not in sides or not at_least <= shape[0] <= max_batch(shape[1]):
        expected = " or ".join(f"(N<={max_batch(side)}, {side}, {side}, 3)" for side in sides)
        raise InvalidRequest(f"Expected uint8 pixels of shape {expected}; got {dtype} {shape}.")


# Large JPEGs decode at a reduced DCT scale that keeps the shorter side >= this x the model's resize size:
# 3x faster on 1080p photos; 2x keeps cosine >= 0.997 to a full decode where 1x fell to 0.985 on grainy
# photos (bench/runtimes.py, tests/test_runtime.py). 0 would mean a full decode.
DRAFT_SCALE = 2.0


def prepare_image(
    data: bytes,
    limits: DecodeLimits,
    preprocessing: Preprocessing,
    thumbnail_size: int | None,
    draft_scale: float = DRAFT_SCALE,
    *,
    all_views: bool = False,
    copy: Preprocessing | None = None,
) -> PreparedImage:
    """Raise an InvalidImage/ImageTooLarge/UnsupportedImageFormat error for bad input. ``all_views`` for an
    image to store (every view of the recipe); a query needs only the main view. ``copy``: the copy model's
    recipe, whose pixels are made from the same decoded image (one decode for both models)."""
    largest = max(preprocessing.resize, copy.resize if copy is not None else 0)
    decoded = decode_image(data, limits, draft_min_side(largest, draft_scale))
    image = decoded.image
    # The copy model's pixels are made beside the similarity model's: Pillow releases the GIL while it
    # resizes, so a lone query on 2 cores is prepared in about the time of one model's resize.
    copy_work: Future[tuple[np.ndarray, ...]] | None = None
    if copy is not None:
        copy_work = _beside().submit(copy.view_pixels if all_views else lambda whole: (copy.to_pixels(whole),), image)
    try:
        views = preprocessing.view_pixels(image) if all_views else None
        pixels = views[0] if views is not None else preprocessing.to_pixels(image)
        sides = [] if all_views else preprocessing.query_sides(decoded.width, decoded.height)
        side_pixels = {side: preprocessing.to_pixels(image, side) for side in sides}
        thumbnail = make_thumbnail(image, thumbnail_size) if thumbnail_size else None
        exact_key = pixel_hash(image) if all_views else None
    except BaseException:
        if copy_work is not None:
            copy_work.cancel()  # not started yet: never runs; running: its result is dropped
        raise
    copy_made = copy_work.result() if copy_work is not None else None
    copy_views = copy_made if all_views else None
    return PreparedImage(
        id=content_hash(data),
        data=data,
        mime=decoded.mime,
        width=decoded.width,
        height=decoded.height,
        pixels=pixels,
        thumbnail=thumbnail,
        pixel_hash=exact_key,
        views=views,
        side_pixels=side_pixels,
        copy_pixels=copy_made[0] if copy_made is not None else None,
        copy_views=copy_views,
    )


_BESIDE_LOCK = threading.Lock()
_beside_pool: ThreadPoolExecutor | None = None


def _beside() -> ThreadPoolExecutor:
    """The threads that prepare the copy model's pixels beside the similarity model's (started on first use)."""
    global _beside_pool
    with _BESIDE_LOCK:
        if _beside_pool is None:
            _beside_pool = ThreadPoolExecutor(max_workers=max(2, usable_cpus()), thread_name_prefix="prepare-copy")
        return _beside_pool


def pixel_hash(image: Image.Image) -> str:
    """A short digest of the decoded pixels (and size): the exact-duplicate key. Deterministic for the same
    compressed picture, so a copy that differs only in its metadata hashes the same."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=12)
    digest.update(f"{image.width}x{image.height}".encode())
    return digest.hexdigest()
