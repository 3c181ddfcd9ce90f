"""Decoding untrusted image bytes safely, content hashing, thumbnails, and location privacy.

What an upload can cost is bounded before any pixel is decoded: its bytes, its pixel count (from the
header), and the memory its decoded pixels take (``max_decoded_bytes``, from the header, mode and the
reduced scale it will be decoded at). At most ``DECODE_SLOTS`` images decode at once per process, so a
burst of large uploads waits for a slot instead of multiplying memory. Large images shrink right after
decoding (JPEG: at decode time, by DCT scaling), so rotations, colour conversion and the thumbnail work on
a small copy.
"""

from __future__ import annotations

import io
import math
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from bento.core.errors import BackendUnavailable, ImageTooLarge, InvalidImage, UnsupportedImageFormat

try:  # HEIC/HEIF (iPhone photos) through the pillow-heif plugin; AVIF is built into Pillow.
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - a dependency; without it HEIC is refused as unsupported
    pass

# The formats accepted (Pillow's name -> the media type originals are served with). Only these decoders
# ever see the bytes; anything else is a clear 415.
SUPPORTED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # multi-picture JPEG (many phones): its first picture is the image
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "AVIF": "image/avif",
    "HEIF": "image/heic",
}
# Decoders tried (the JPEG one also opens MPO files, which Pillow registers no opener of their own for).
_ACCEPTED = [name for name in SUPPORTED_FORMATS if name != "MPO"]
# EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose).
_UPRIGHT: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}



def usable_cpus() -> int:
    """The CPUs this process may use: decode slots and inference threads. The fewer of its CPU
    affinity and its cgroup's CPU quota (a Kubernetes `limits.cpu`, rounded up): a 2-CPU pod on a 32-core
    node that ran 32 threads would spend its quota in a few milliseconds and be throttled for the rest."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return min(cpus, quota) if quota else cpus


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs the cgroup's quota allows, rounded up (cgroup v2 cpu.max, else v1 cfs_quota_us); None without one."""
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
            if int(quota) <= 0:
                return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup filesystem (not Linux, a sandbox): no quota to respect
        return None


# Concurrent decodes per process: one per core (decoding is CPU-bound; more only adds memory).
DECODE_SLOTS = max(2, usable_cpus())
# How long a decode waits for a free slot before the request is told to come back (503, Retry-After).
DECODE_WAIT_S = 30.0
_slots = threading.BoundedSemaphore(DECODE_SLOTS)


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int
    max_decoded_bytes: int = 1 << 62


def draft_min_side(resize: int, scale: float) -> int | None:
    """Shortest side an image may be reduced to for a model that resizes to ``resize``; None = keep it.

    Reducing to >= 2x the resize size leaves the antialiased resize that follows enough pixels to give
    the same embedding (cosine >= 0.99 measured and tested; 1x alone was not enough for fine textures).
    """
    return round(resize * scale) if scale > 0 else None


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, possibly reduced (never below min_side)
    mime: str
    width: int  # of the original, as displayed (after EXIF rotation)
    height: int


def check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise InvalidImage("The upload is empty.")
    if size > max_bytes:
        raise ImageTooLarge(f"The image is {size} bytes; the limit is {max_bytes} bytes.")


def _bytes_per_pixel(mode: str) -> int:
    """The peak memory a pixel of this mode takes while it is decoded and made 8-bit RGB at full size:
    Pillow stores multi-band images 4 bytes a pixel; palette images become RGBA before they can be
    reduced; 16/32-bit greyscale is scaled through a copy."""
    if mode in ("1", "L"):
        return 2
    if mode in ("P", "PA"):
        return 5
    if mode.startswith("I;16"):
        return 4
    if mode in ("I", "F"):
        return 9
    return 4


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_ACCEPTED)
    except UnidentifiedImageError:
        pass
    try:  # Which other format is it? Only its header is read, to say so in the error.
        other = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise InvalidImage("The file is not an image Pillow can read.") from exc
    raise UnsupportedImageFormat(
        f"Image format {other.format or 'unknown'} is not supported; use one of {', '.join(SUPPORTED_FORMATS)}."
    )


def decode_image(data: bytes, limits: DecodeLimits, min_side: int | None = None) -> DecodedImage:
    """Decode untrusted bytes into an RGB image, refusing what is not a sane image.

    The pixel and decoded-memory limits are checked from the header *before* any pixel is decoded, so a
    small file that claims gigapixel dimensions (a decompression bomb) costs nothing. With ``min_side``,
    the image is decoded (JPEG: DCT scaling 1/2..1/8) or reduced right after decoding to the smallest
    size whose shorter side is still >= min_side; the reported width and height stay the original's.
    """
    check_size(len(data), limits.max_bytes)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit replaces Pillow's global bomb warning/error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open(data)
            fmt = image.format or ""
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImage("The image has no pixels.")
            if width * height > limits.max_pixels:
                raise ImageTooLarge(f"The image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels.")
            if min_side is not None and fmt in ("JPEG", "MPO") and min(width, height) > 2 * min_side:
                scale = min_side / min(width, height)
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            decoded_bytes = image.size[0] * image.size[1] * _bytes_per_pixel(image.mode)
            if decoded_bytes > limits.max_decoded_bytes:
                raise ImageTooLarge(
                    f"Decoding this {width}x{height} {image.mode} image takes {decoded_bytes} bytes of memory; "
                    f"the limit is {limits.max_decoded_bytes}."
                )
            if not _slots.acquire(timeout=DECODE_WAIT_S):
                raise BackendUnavailable("Too many images are being decoded right now; try again in a few seconds.", public=True)
            try:
                image.load()
                rgb, width, height = _normalise(image, width, height, min_side)
            finally:
                _slots.release()
    except UnidentifiedImageError as exc:
        raise InvalidImage("The file is not an image Pillow can read.") from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires inside open() for absurd headers, before our check can.
        raise ImageTooLarge(f"The image claims too many pixels; the limit is {limits.max_pixels} pixels ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError, struct.error, zlib.error) as exc:
        # Pillow and its plugins (AVIF, HEIF) report truncated and corrupt streams with these.
        raise InvalidImage(f"The image could not be decoded: {exc}") from exc
    return DecodedImage(image=rgb, mime=SUPPORTED_FORMATS[fmt], width=width, height=height)


def _normalise(image: Image.Image, width: int, height: int, min_side: int | None) -> tuple[Image.Image, int, int]:
    """Loaded image -> small upright RGB image; and the original's displayed width and height."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    image = _to_8_bit(image)
    if image.mode in ("1", "P", "PA"):  # reduce() needs numeric bands
        transparent = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if transparent else "L" if image.mode == "1" else "RGB")
    if min_side is not None and min(image.size) >= 2 * min_side:
        image = image.reduce(min(image.size) // min_side)  # box filter by an integer factor: fast, one copy
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
        if orientation >= 5:  # rotated by 90 degrees: the displayed sides swap
            width, height = height, width
    return _to_rgb(image), width, height


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale scaled into 8 bits (a plain convert would clip them to white), through
    integer shifts: one extra copy, no float ones."""
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode == "I":
        pixels = np.asarray(image, dtype=np.int32)
        shift = 8 if pixels.max(initial=0) > 255 else 0  # 16-bit values stored as 32-bit, or already 8-bit
        return Image.fromarray((np.clip(pixels, 0, 65535) >> shift).astype(np.uint8))
    if image.mode == "F":
        pixels = np.nan_to_num(np.array(image, dtype=np.float32), copy=False)  # a writable copy
        low, high = float(pixels.min(initial=0.0)), float(pixels.max(initial=0.0))
        pixels -= low
        pixels *= 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(np.rint(pixels, out=pixels).astype(np.uint8))
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (a plain convert() would turn it black)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
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


# --- location privacy ----------------------------------------------------------------------------


# XMP can carry the location too (exif:GPSLatitude...); a packet that names it is dropped whole.
_XMP_LOCATION = (b"GPSLatitude", b"GPSLongitude", b"GPSAltitude", b"exif:GPS")
_XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"


def _names_location(packet: bytes) -> bool:
    return any(marker in packet for marker in _XMP_LOCATION)


def without_location(data: bytes) -> bytes:
    """The image without its location: the EXIF GPS block and XMP packets that name a location (what
    originals are served as by default).

    JPEG, PNG and WebP keep their pixel data byte for byte (only metadata segments or chunks are rewritten
    or dropped, and a PNG is never decoded for it); a multi-picture JPEG is served as its first picture;
    TIFF, HEIF and AVIF are re-encoded (TIFF losslessly) only when they carry a location. Bytes that are not
    an image we accept come back as they are (they were never stored)."""
    try:
        image = Image.open(io.BytesIO(data), formats=_ACCEPTED)
        fmt = image.format
        if fmt == "PNG":  # before getexif(), which would decode a PNG whose eXIf follows its pixels
            return _png_without_location(data)
        exif = image.getexif()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError, struct.error, zlib.error):
        return data
    if fmt == "MPO":  # the first picture alone, without the index of the others (APP2 "MPF")
        data = _jpeg_segments(_first_picture(image, data), lambda marker, segment: None if marker == 0xE2 and segment[4:8] == b"MPF\0" else segment)
    in_exif = ExifTags.IFD.GPSInfo in exif
    if not in_exif and not _names_location(data):
        return data
    if in_exif:
        del exif[ExifTags.IFD.GPSInfo]
    clean = exif.tobytes()  # b"Exif\0\0" + TIFF header and IFDs
    if fmt in ("JPEG", "MPO"):
        app1 = b"\xff\xe1" + struct.pack(">H", len(clean) + 2) + clean

        def rewrite(marker: int, segment: bytes) -> bytes | None:
            if marker == 0xE1 and segment[4:10] == b"Exif\x00\x00":
                return app1 if in_exif else segment
            if marker == 0xE1 and segment[4:33] == _XMP_JPEG and _names_location(segment):
                return None
            return segment

        return _jpeg_segments(data, rewrite)
    if fmt == "WEBP":
        return _webp_without_location(data, clean[6:] if in_exif else None)
    image.info.pop("xmp", None)
    out = io.BytesIO()
    try:
        if fmt == "TIFF":
            try:
                image.save(out, format=fmt, exif=clean, compression=image.info.get("compression", "tiff_lzw"))
            except RuntimeError:  # libtiff refuses some EXIF sub-IFDs with compression: store it raw
                out = io.BytesIO()
                image.save(out, format=fmt, exif=clean, compression="raw")
        else:
            image.save(out, format=fmt, exif=clean, quality=95)
    except (OSError, ValueError, RuntimeError):
        # Cannot be re-encoded without the location: better not served than served with it.
        raise InvalidImage("This original carries a location that cannot be removed; it is not served.") from None
    return out.getvalue()


def _first_picture(image: Image.Image, data: bytes) -> bytes:
    entries = (getattr(image, "mpinfo", None) or {}).get(0xB002) or []
    size = entries[0].get("Size") if entries else None
    return data[:size] if isinstance(size, int) and 0 < size <= len(data) else data


def _jpeg_segments(data: bytes, rewrite: Callable[[int, bytes], bytes | None]) -> bytes:
    """Rewrite (or drop, with None) the marker segments of a JPEG before its image data, which stays as it is."""
    out, position = bytearray(data[:2]), 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: the rest is image data
            break
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        segment = rewrite(marker, data[position : position + 2 + length])
        out += segment or b""
        position += 2 + length
    return bytes(out + data[position:])


def _png_without_location(data: bytes) -> bytes:
    """Rewrite a PNG's eXIf without GPS, drop XMP that names a location and the legacy "Raw profile" EXIF
    text (Pillow reads EXIF from it too); every other chunk, the pixels included, stays byte for byte."""
    out, position, changed = bytearray(data[:8]), 8, False
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position : position + 12 + length]
        payload = chunk[8:-4]
        if kind == b"eXIf":
            exif = Image.Exif()
            exif.load(payload)
            if ExifTags.IFD.GPSInfo in exif:
                del exif[ExifTags.IFD.GPSInfo]
                clean = exif.tobytes()[6:]
                chunk = struct.pack(">I4s", len(clean), kind) + clean + struct.pack(">I", zlib.crc32(kind + clean) & 0xFFFFFFFF)
                changed = True
        elif kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword = payload.split(b"\0", 1)[0]
            if keyword.startswith(b"Raw profile type") or (keyword == b"XML:com.adobe.xmp" and _names_location(_png_text(kind, payload))):
                chunk, changed = b"", True
        out += chunk
        position += 12 + length
    return bytes(out) if changed else data


def _png_text(kind: bytes, payload: bytes) -> bytes:
    """The text of a PNG text chunk (decompressed where it is)."""
    body = payload.split(b"\0", 1)[1] if b"\0" in payload else b""
    try:
        if kind == b"zTXt":
            return zlib.decompress(body[1:])
        if kind == b"iTXt" and body[:1] == b"\x01":  # compressed flag, method, language, translated keyword
            return zlib.decompress(body[2:].split(b"\0", 2)[-1])
    except zlib.error:
        return body
    return body


def _webp_without_location(data: bytes, exif: bytes | None) -> bytes:
    """Rewrite the EXIF chunk (when ``exif`` is given) and drop an XMP chunk that names a location."""
    out, position = bytearray(), 12
    while position + 8 <= len(data):
        kind, length = struct.unpack("<4sI", data[position : position + 8])
        chunk = data[position : position + 8 + length + (length & 1)]
        if kind == b"EXIF" and exif is not None:
            chunk = struct.pack("<4sI", kind, len(exif)) + exif + (b"\0" if len(exif) & 1 else b"")
        elif kind == b"XMP " and _names_location(chunk):
            chunk = b""
        out += chunk
        position += 8 + length + (length & 1)
    return b"RIFF" + struct.pack("<I", len(out) + 4) + b"WEBP" + bytes(out)
