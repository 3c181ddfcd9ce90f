import io

import pytest
from PIL import Image

from bento.core.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from bento.core.ids import content_hash
from models.imaging import DecodeLimits, decode_image, make_thumbnail
from tests.support import png_header_claiming

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


# --- formats people upload, memory, location privacy ---------------------------------------------


def test_multi_picture_jpeg_decodes_its_first_picture():
    first, second = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (40, 30), (10, 10, 200))
    decoded = decode_image(_encode(first, "MPO", save_all=True, append_images=[second]), LIMITS)
    assert decoded.mime == "image/jpeg" and decoded.image.getpixel((20, 15))[0] > 150


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(fmt):
    import numpy as np

    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1)))
    assert ramp.mode == "I;16"
    decoded = decode_image(_encode(ramp, fmt), LIMITS).image
    row = [decoded.getpixel((x, 4))[0] for x in (0, 64, 128, 192, 255)]
    assert row == sorted(row) and row[0] < 5 and 60 < row[1] < 70 and row[-1] > 250, row


@pytest.mark.parametrize(("fmt", "mime"), [("HEIF", "image/heic"), ("AVIF", "image/avif"), ("WEBP", "image/webp")])
def test_modern_formats_decode(fmt, mime):
    decoded = decode_image(_encode(Image.new("RGB", (64, 48), (30, 160, 90)), fmt, quality=90), LIMITS)
    assert decoded.mime == mime and (decoded.width, decoded.height) == (64, 48)
    assert abs(decoded.image.getpixel((32, 24))[1] - 160) < 12


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_decode_their_first_frame(fmt):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    decoded = decode_image(_encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True), LIMITS)
    assert decoded.image.getpixel((16, 16))[0] > 200


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "ICO", "QOI", "JPEG2000"])
def test_formats_not_accepted_are_named_in_a_415(fmt):
    with pytest.raises(UnsupportedImageFormat, match=f"format {fmt}"):
        decode_image(_encode(Image.new("RGB", (16, 16)), fmt), LIMITS)


def test_decoded_memory_counts_bands_not_only_pixels():
    limits = DecodeLimits(max_bytes=10**7, max_pixels=50_000_000, max_decoded_bytes=12_000_000)
    decode_image(_encode(Image.new("L", (2500, 2000), 9), "PNG"), limits)  # 10 MB at its peak as greyscale: fine
    with pytest.raises(ImageTooLarge, match="takes 20000000 bytes"):
        decode_image(_encode(Image.new("RGBA", (2500, 2000), (1, 2, 3, 4)), "PNG"), limits)


def test_large_images_are_reduced_right_after_decoding():
    decoded = decode_image(_encode(Image.new("RGBA", (4000, 3000), (9, 9, 9, 200)), "PNG"), LIMITS, min_side=464)
    assert (decoded.width, decoded.height) == (4000, 3000) and 464 <= min(decoded.image.size) < 2 * 464


def _gps_exif() -> Image.Exif:
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCam"
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (48.0, 51.0, 30.0)}
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"])
def test_location_is_removed_and_the_rest_kept(fmt):
    import numpy as np
    from PIL import ExifTags

    from models.imaging import without_location

    image = Image.effect_noise((64, 48), 40).convert("RGB")
    data = _encode(image, fmt, exif=_gps_exif().tobytes())
    assert ExifTags.IFD.GPSInfo in Image.open(io.BytesIO(data)).getexif()
    clean = Image.open(io.BytesIO(without_location(data)))
    assert ExifTags.IFD.GPSInfo not in clean.getexif() and clean.getexif()[ExifTags.Base.Make] == "PhoneCam"
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF"):  # pixel data untouched
        assert np.array_equal(np.asarray(clean.convert("RGB")), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    plain = _encode(image, fmt)
    assert without_location(plain) == plain, "no location: the bytes are served as stored"


def test_location_in_xmp_and_legacy_png_text_is_removed_too():
    from PIL import ExifTags, PngImagePlugin

    from models.imaging import without_location

    image = Image.effect_noise((64, 48), 40).convert("RGB")
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description exif:GPSLatitude="48,51.5N"/></x:xmpmeta>'
    jpeg = _encode(image, "JPEG", xmp=xmp)
    assert b"GPSLatitude" in jpeg and b"GPSLatitude" not in without_location(jpeg)
    webp = _encode(image, "WEBP", xmp=xmp)
    assert b"GPSLatitude" in webp and b"GPSLatitude" not in without_location(webp)
    # ImageMagick's way: EXIF as hex text in a "Raw profile type exif" chunk (Pillow reads GPS from it).
    exif_hex = _gps_exif().tobytes()[6:].hex()
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", f"\nexif\n{len(exif_hex) // 2}\n{exif_hex}\n")
    text.add_itxt("XML:com.adobe.xmp", xmp.decode(), zip=True)
    png = _encode(image, "PNG", pnginfo=text)
    assert ExifTags.IFD.GPSInfo in Image.open(io.BytesIO(png)).getexif(), "the legacy chunk does carry a location"
    clean = without_location(png)
    assert ExifTags.IFD.GPSInfo not in Image.open(io.BytesIO(clean)).getexif()
    assert b"Raw profile" not in clean and b"XML:com.adobe.xmp" not in clean
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(clean))), np.asarray(image))


def test_float_greyscale_is_stretched_into_8_bits():
    ramp = Image.new("F", (64, 8))
    ramp.putdata([float(x % 64) * 0.5 for x in range(64 * 8)])
    decoded = decode_image(_encode(ramp, "TIFF"), LIMITS).image
    assert decoded.getpixel((0, 0))[0] == 0 and decoded.getpixel((63, 0))[0] == 255


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads, not one
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_cpu_quota_is_read_as_whole_cpus(tmp_path, files, expected):
    from models.imaging import cgroup_cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected
