"""The one image pipeline shared by the service and the ingest job: bytes -> checked, decoded,
thumbnailed and preprocessed image, ready for the embedder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bento.imaging import DecodeLimits, content_hash, decode_image, make_thumbnail
from models.preprocess import Preprocessing


@dataclass
class PreparedImage:
    id: str
    data: bytes
    mime: str
    width: int
    height: int
    pixels: np.ndarray  # (crop, crop, 3) uint8, the embedder's input
    thumbnail: bytes | None


def prepare_image(
    data: bytes, limits: DecodeLimits, preprocessing: Preprocessing, thumbnail_size: int | None
) -> PreparedImage:
    """Raise an InvalidImage/ImageTooLarge/UnsupportedImageFormat error for bad input."""
    decoded = decode_image(data, limits)
    pixels = preprocessing.to_pixels(decoded.image)
    thumbnail = make_thumbnail(decoded.image, thumbnail_size) if thumbnail_size else None
    return PreparedImage(
        id=content_hash(data),
        data=data,
        mime=decoded.mime,
        width=decoded.width,
        height=decoded.height,
        pixels=pixels,
        thumbnail=thumbnail,
    )
