import io

import pytest
from PIL import Image

from bento.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from bento.imaging import DecodeLimits, content_hash, decode_image, make_thumbnail
from tests.conftest import png_header_claiming

LIMITS = DecodeLimits(max_bytes=5_000_000, max_pixels=20_000_000)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def test_decodes_jpeg_to_rgb_with_size_and_mime():
    data = _encode(Image.new("RGB", (64, 48), (200, 10, 10)), "JPEG")
    decoded = decode_image(data, LIMITS)
    assert (decoded.width, decoded.height, decoded.mime, decoded.image.mode) == (64, 48, "image/jpeg", "RGB")


def test_transparent_png_is_composited_on_white_not_black():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    decoded = decode_image(_encode(image, "PNG"), LIMITS)
    assert decoded.image.getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    decoded = decode_image(_encode(image, "JPEG", exif=exif), LIMITS)
    assert (decoded.width, decoded.height) == (20, 40)


def test_not_an_image_is_refused():
    with pytest.raises(InvalidImage, match="not an image"):
        decode_image(b"hello, this is text", LIMITS)


def test_truncated_image_is_refused():
    data = _encode(Image.effect_noise((256, 256), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage, match="truncated|decoded"):
        decode_image(data[: len(data) // 3], LIMITS)


def test_empty_upload_is_refused():
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", LIMITS)


def test_too_many_bytes_is_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(b"\xff" * 2048, DecodeLimits(max_bytes=1024, max_pixels=10**6))


def test_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode_image(png_header_claiming(100_000, 100_000), LIMITS)


def test_pixel_limit_is_ours_not_only_pillows():
    # 30 MP is below Pillow's own bomb threshold but above this product's setting.
    with pytest.raises(ImageTooLarge, match="6000x5000 pixels"):
        decode_image(png_header_claiming(6000, 5000), DecodeLimits(max_bytes=10**6, max_pixels=20_000_000))


def test_unsupported_format_gets_its_own_error():
    data = _encode(Image.new("RGB", (8, 8)), "PPM")
    with pytest.raises(UnsupportedImageFormat):
        decode_image(data, LIMITS)


def test_content_hash_is_sha256_of_bytes():
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_thumbnail_fits_the_box_and_is_jpeg():
    thumb = make_thumbnail(Image.new("RGB", (1000, 500), "blue"), 128)
    image = Image.open(io.BytesIO(thumb))
    assert image.format == "JPEG" and image.size == (128, 64)
