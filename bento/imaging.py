"""Decoding untrusted image bytes safely, content hashing and thumbnails."""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from bento.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat

# Formats a browser can also display: the web page shows originals as they are stored.
SUPPORTED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int


def draft_min_side(resize: int, scale: float) -> int | None:
    """Shortest side a JPEG may be decoded at for a model that resizes to ``resize``; None = full decode.

    Decoding at a reduced DCT scale is 3x faster on large photos, and decoding to >= 2x the resize size
    leaves the antialiased resize that follows enough pixels to give the same embedding (cosine >= 0.99
    measured and tested; 1x alone was not enough for fine textures).
    """
    return round(resize * scale) if scale > 0 else None


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    mime: str
    width: int
    height: int


def content_hash(data: bytes) -> str:
    """The image id: sha256 of the exact bytes, so the same file is stored once whatever its name."""
    return hashlib.sha256(data).hexdigest()


def check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise InvalidImage("The upload is empty.")
    if size > max_bytes:
        raise ImageTooLarge(f"The image is {size} bytes; the limit is {max_bytes} bytes.")


def decode_image(data: bytes, limits: DecodeLimits, min_side: int | None = None) -> DecodedImage:
    """Decode untrusted bytes into an RGB image, refusing what is not a sane image.

    The pixel limit is checked from the header *before* any pixel is decoded, so a small file that
    claims gigapixel dimensions (a decompression bomb) costs nothing. With ``min_side``, a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side is still >= min_side; the
    reported width and height stay those of the original.
    """
    check_size(len(data), limits.max_bytes)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit replaces Pillow's global bomb warning/error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or ""
            if fmt not in SUPPORTED_FORMATS:
                raise UnsupportedImageFormat(
                    f"Image format {fmt or 'unknown'} is not supported; use one of {', '.join(SUPPORTED_FORMATS)}."
                )
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImage("The image has no pixels.")
            if width * height > limits.max_pixels:
                raise ImageTooLarge(
                    f"The image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels."
                )
            if min_side is not None and fmt == "JPEG" and min(width, height) > 2 * min_side:
                scale = min_side / min(width, height)
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            decoded_size = image.size
            image = ImageOps.exif_transpose(image)
            if image.size != decoded_size:  # EXIF rotated by 90 degrees: the original's sides swap too
                width, height = height, width
            rgb = _to_rgb(image)
    except UnidentifiedImageError as exc:
        raise InvalidImage("The file is not an image Pillow can read.") from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires inside open() for absurd headers, before our check can.
        raise ImageTooLarge(f"The image claims too many pixels; the limit is {limits.max_pixels} pixels ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated and corrupt streams with these.
        raise InvalidImage(f"The image could not be decoded: {exc}") from exc
    return DecodedImage(image=rgb, mime=SUPPORTED_FORMATS[fmt], width=width, height=height)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (a plain convert() would turn it black)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def make_thumbnail(image: Image.Image, size: int) -> bytes:
    """A JPEG no larger than size x size, for result grids."""
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()
