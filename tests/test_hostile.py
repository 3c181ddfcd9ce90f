"""The hostile-input suite: unusual but valid images, broken ones, non-images, bombs, oversized bodies,
and API abuse, against the real service on both backends. Each case asserts the exact status and error
code; afterwards the service is ready and holds exactly what was validly added (then removed again).

The shared service (tests/conftest.py live_service) listens on loopback with no keys (all open) and a
decoded-memory limit of 64 MB per image; the auth probes run against a service of their own with keys.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms

from bento.core.ids import content_hash
from ingest.demo import encode
from tests.support import Backend, ServiceProcess, png_header_claiming

pytestmark = pytest.mark.slow


@dataclass
class Case:
    name: str
    data: bytes
    status: int
    error: str = ""


def _photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A distinct, photo-like image per seed (smooth gradients + noise), so every case has its own id."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    a, b, c = rng.uniform(0.3, 1.0, 3)
    base = np.stack([a * xx / size[0], b * yy / size[1], c * (xx + yy) / sum(size)], axis=-1) * 255
    noise = rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _with_gps() -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCam"
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    return exif


def _jpeg_header_claiming(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _gif_header_claiming(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00\x3b"


def valid_cases() -> list[Case]:
    """Unusual but valid images people upload: each is added (201)."""
    photo = _photo
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    gray16 = Image.fromarray((np.linspace(0, 65535, 320 * 240).reshape(240, 320)).astype(np.uint16))
    rotated = Image.Exif()
    rotated[ExifTags.Base.Orientation] = 6
    frames = [photo(40 + i) for i in range(3)]
    cases = [
        Case("baseline.jpg", encode(photo(1), "JPEG", quality=90), 201),
        Case("progressive.jpg", encode(photo(2), "JPEG", progressive=True), 201),
        Case("cmyk.jpg", encode(photo(3).convert("CMYK"), "JPEG"), 201),
        Case("grey.jpg", encode(photo(4).convert("L"), "JPEG"), 201),
        Case("exif-rotated.jpg", encode(photo(5), "JPEG", exif=rotated), 201),
        Case("icc-profile.jpg", encode(photo(6), "JPEG", icc_profile=srgb), 201),
        Case("q100-444.jpg", encode(photo(7), "JPEG", quality=100, subsampling=0), 201),
        Case("phone.mpo", encode(photo(8), "MPO", save_all=True, append_images=[photo(9)]), 201),
        Case("gps.jpg", encode(photo(10), "JPEG", exif=_with_gps()), 201),
        Case("large-4000x3000.jpg", encode(photo(11, (4000, 3000)), "JPEG", quality=70), 201),
        Case("rgb.png", encode(photo(12), "PNG"), 201),
        Case("transparent.png", encode(photo(13).convert("RGBA"), "PNG"), 201),
        Case("palette-transparency.png", encode(photo(14).convert("P"), "PNG", transparency=0), 201),
        Case("grey-16bit.png", encode(gray16, "PNG"), 201),
        Case("grey-alpha.png", encode(photo(15).convert("LA"), "PNG"), 201),
        Case("one-bit.png", encode(photo(16).convert("1"), "PNG"), 201),
        Case("gps.png", encode(photo(17), "PNG", exif=_with_gps()), 201),
        Case("one-pixel.png", encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), 201),
        Case("strip-4000x3.png", encode(photo(18, (4000, 3)), "PNG"), 201),
        Case("tall-3x4000.png", encode(photo(19, (3, 4000)), "PNG"), 201),
        Case("grey-20mp.png", encode(Image.new("L", (5000, 4000), 77), "PNG"), 201),  # 20 MB decoded: fine
        Case("static.gif", encode(photo(20).convert("P"), "GIF"), 201),
        Case("animated.gif", encode(frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames[1:]]), 201),
        Case("lossy.webp", encode(photo(21), "WEBP", quality=60), 201),
        Case("lossless-alpha.webp", encode(photo(22).convert("RGBA"), "WEBP", lossless=True), 201),
        Case("animated.webp", encode(frames[1], "WEBP", save_all=True, append_images=[frames[2], frames[0]]), 201),
        Case("rgb24.bmp", encode(photo(23), "BMP"), 201),
        Case("palette.bmp", encode(photo(24).convert("P"), "BMP"), 201),
        Case("lzw.tiff", encode(photo(25), "TIFF", compression="tiff_lzw"), 201),
        Case("grey-16bit.tiff", encode(gray16.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "TIFF"), 201),
        Case("cmyk.tiff", encode(photo(26).convert("CMYK"), "TIFF"), 201),
        Case("float.tiff", encode(photo(27).convert("F"), "TIFF"), 201),
        Case("iphone.heic", encode(photo(28), "HEIF", quality=80), 201),
        Case("modern.avif", encode(photo(29), "AVIF", quality=70), 201),
    ]
    return cases


def invalid_cases(max_upload: int) -> list[Case]:
    good = encode(_photo(90), "JPEG")
    png = encode(_photo(91), "PNG")
    little = _photo(92, (64, 48))
    cases = [
        # Formats Pillow knows but the service does not take: 415 with the format's name.
        Case("targa.tga", encode(little, "TGA"), 415, "unsupported_image_format"),
        Case("paintbrush.pcx", encode(little, "PCX"), 415, "unsupported_image_format"),
        Case("favicon.ico", encode(little, "ICO"), 415, "unsupported_image_format"),
        Case("netpbm.ppm", encode(little, "PPM"), 415, "unsupported_image_format"),
        Case("silicon.sgi", encode(little, "SGI"), 415, "unsupported_image_format"),
        Case("jpeg2000.jp2", encode(little, "JPEG2000"), 415, "unsupported_image_format"),
        Case("quite-ok.qoi", encode(little, "QOI"), 415, "unsupported_image_format"),
        Case("postscript.eps", encode(little, "EPS"), 415, "unsupported_image_format"),
        # Not images at all, or broken ones: 422.
        Case("notes.txt", b"definitely not an image\n" * 10, 422, "invalid_image"),
        Case("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', 422, "invalid_image"),
        Case("page.html", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", 422, "invalid_image"),
        Case("document.pdf", b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF", 422, "invalid_image"),
        Case("archive.zip", b"PK\x03\x04" + bytes(100), 422, "invalid_image"),
        Case("program.elf", b"\x7fELF\x02\x01\x01" + bytes(200), 422, "invalid_image"),
        Case("random.bin", np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes(), 422, "invalid_image"),
        Case("empty.jpg", b"", 422, "invalid_image"),
        Case("truncated.jpg", good[: len(good) // 2], 422, "invalid_image"),
        Case("jpeg-header-only.jpg", good[:200], 422, "invalid_image"),
        Case("truncated.png", png[: len(png) // 3], 422, "invalid_image"),
        Case("png-bad-crc.png", png[:29] + b"\x00\x00\x00\x00" + png[33:], 422, "invalid_image"),
        Case("gif-header-only.gif", b"GIF89a\x10\x00\x10\x00\x00\x00\x00", 422, "invalid_image"),
        Case("zero-width.png", png_header_claiming(0, 10), 422, "invalid_image"),
        # Bombs: by dimension (checked from the header) and by decoded memory (a 20 MP RGBA PNG is 80 MB
        # decoded, over the service's 64 MB; the same pixels in greyscale above are fine).
        Case("png-60000x60000.png", png_header_claiming(60_000, 60_000), 413, "image_too_large"),
        Case("jpeg-65500x65500.jpg", _jpeg_header_claiming(65_500, 65_500), 413, "image_too_large"),
        Case("gif-65535x65535.gif", _gif_header_claiming(65_535, 65_535), 413, "image_too_large"),
        Case("rgba-20mp.png", encode(Image.new("RGBA", (5000, 4000), (5, 6, 7, 8)), "PNG"), 413, "image_too_large"),
        Case("too-many-bytes.jpg", b"\xff\xd8" + bytes(max_upload + 100_000), 413, "image_too_large"),
        Case("gzip-bomb.png", gzip.compress(bytes(50_000_000)), 422, "invalid_image"),
    ]
    return cases


@pytest.fixture(scope="module")
def client(live_service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_service.url, timeout=120) as http:
        yield http


def test_hostile_files_get_exact_answers_and_only_valid_ones_are_added(client, live_service):
    max_upload = client.get("/api/status").json()["limits"]["max_upload_bytes"]
    valid, invalid = valid_cases(), invalid_cases(max_upload)
    assert len(valid) + len(invalid) >= 40
    before = client.get("/api/status").json()["image_count"]
    added: list[str] = []
    wrong: list[str] = []
    try:
        for case in valid + invalid:
            response = client.post("/api/images", files={"file": (case.name, case.data)}, data={"label": "hostile"})
            body = response.json()
            if response.status_code != case.status or (case.error and body.get("error") != case.error):
                wrong.append(f"{case.name}: {response.status_code} {response.text[:200]}")
            if response.status_code in (200, 201):
                added.append(body["id"])
                assert body["id"] == content_hash(case.data)
        assert not wrong, "\n".join(wrong)
        assert client.get("/readyz").status_code == 200
        assert client.get("/api/status").json()["image_count"] == before + len(valid) == before + len(set(added))

        # The same files as search queries: the same answers, no 5xx, no hang.
        for case in invalid:
            response = client.post("/api/search", files={"file": (case.name, case.data)})
            assert (response.status_code, response.json()["error"]) == (case.status, case.error), case.name
        for case in valid[:6]:
            response = client.post("/api/search", files={"file": (case.name, case.data)}, data={"top_k": "1"})
            assert response.status_code == 200 and response.json()["hits"][0]["id"] == content_hash(case.data)

        # Originals are served without their GPS location; everything else stays.
        for name in ("gps.jpg", "gps.png"):
            data = next(c.data for c in valid if c.name == name)
            served = client.get(f"/api/images/{content_hash(data)}")
            exif = Image.open(io.BytesIO(served.content)).getexif()
            assert ExifTags.IFD.GPSInfo not in exif and exif.get(ExifTags.Base.Make) == "PhoneCam", name
        mpo = next(c.data for c in valid if c.name == "phone.mpo")
        assert Image.open(io.BytesIO(client.get(f"/api/images/{content_hash(mpo)}").content)).format == "JPEG"
        meta = client.get(f"/api/images/{content_hash(next(c.data for c in valid if c.name == 'exif-rotated.jpg'))}/metadata")
        assert (meta.json()["width"], meta.json()["height"]) == (240, 320)
    finally:
        for image_id in added:
            client.delete(f"/api/images/{image_id}")
    assert client.get("/api/status").json()["image_count"] == before


def _raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """A hand-written HTTP/1.1 request (a Content-Length that lies, chunks without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def _npy(shape: tuple[int, ...], dtype: str = "|u1", body: bytes = b"") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


def test_oversized_bodies_are_refused_while_they_stream(client, live_service):
    port = int(live_service.url.rsplit(":", 1)[1])
    # A Content-Length over the limit is refused before the body is sent.
    status, body = _raw_request(port, f"POST /api/images HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {10**10}\r\n\r\n")
    assert status == 413 and json.loads(body)["error"] == "image_too_large"
    status, body = _raw_request(port, "POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\nContent-Length: 999999999999\r\n\r\n")
    assert status == 413 and json.loads(body)["error"] == "request_too_large"

    # Without a Content-Length (chunked), the body is counted as it arrives.
    def chunks(total: int) -> Iterator[bytes]:
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n\r\n"
        for _ in range(math.ceil(total / 65536)):
            yield bytes(65536)

    streamed = client.post("/api/search", content=chunks(4_000_000), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and streamed.json()["error"] == "image_too_large"
    big_json = client.post("/api/search/url", content=b'{"url": "' + b"a" * 100_000 + b'"}', headers={"Content-Type": "application/json"})
    assert big_json.status_code == 413 and big_json.json()["error"] == "request_too_large"
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("probe", "status", "error"),
    [
        # Search by URL: no SSRF (the test image host is on the allow-list, nothing else).
        (lambda c, s, h: c.post("/api/search/url", json={"url": f"{s.url}/api/status"}), 400, "url_fetch_failed"),
        (lambda c, s, h: c.post("/api/search/url", json={"url": "http://169.254.169.254/latest/meta-data/"}), 400, "url_fetch_failed"),
        (lambda c, s, h: c.post("/api/search/url", json={"url": f"{h.url}/redirect?to={s.url}/api/status"}), 400, "url_fetch_failed"),
        (lambda c, s, h: c.post("/api/search/url", json={"url": "http://[::ffff:127.0.0.1]:9091/healthz"}), 400, "url_fetch_failed"),
        (lambda c, s, h: c.post("/api/search/url", json={"url": "file:///etc/passwd"}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/search/url", json={"url": "http://user:pw@example.com/a.jpg"}), 400, "invalid_request"),
        # .npy header bombs and other bodies /api/embed must not allocate for.
        (lambda c, s, h: c.post("/api/embed", content=_npy((10**8, 224, 224, 3)), headers={"Content-Type": "application/x-npy"}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/embed", content=_npy((1, 224, 224, 3), "<f4"), headers={"Content-Type": "application/x-npy"}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/embed", content=_npy((1, 224, 224, 3), "|O"), headers={"Content-Type": "application/x-npy"}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/embed", content=_npy((2, 224, 224, 3), body=bytes(100)), headers={"Content-Type": "application/x-npy"}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/embed", content=b"\x93NUMPY\x09\x00garbage", headers={"Content-Type": "application/x-npy"}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/embed", content=_npy((1, 224, 224, 3), body=bytes(150528))), 415, "unsupported_media_type"),
        # Absurd index parameters are refused before anything is dropped.
        (lambda c, s, h: c.post("/api/index", json={"index_type": "HNSW", "params": {"M": 1_000_000}}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/index", json={"index_type": "IVF_FLAT", "params": {"nlist": 0}}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/index", json={"index_type": "DISKANN"}), 422, "validation_error"),
        (lambda c, s, h: c.post("/api/index", json={"index_type": "HNSW", "params": {"M": "16; drop"}}), 422, "validation_error"),
        # Path-shaped and malformed ids: 422 in a path as in a body (one answer for one mistake).
        (lambda c, s, h: c.get("/api/images/" + "Z" * 64), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/images/" + "A" * 64), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/images/..%2F..%2Fetc%2Fpasswd"), 404, "not_found"),
        (lambda c, s, h: c.delete("/api/images/" + "0" * 63), 422, "validation_error"),
        (lambda c, s, h: c.post("/api/search/id", json={"id": "../" * 21 + "x"}), 422, "validation_error"),
        (lambda c, s, h: c.post("/api/search/id", json={"id": "f" * 64}), 404, "not_found"),
        # Bad parameters and bodies.
        (lambda c, s, h: c.post("/api/search/id", json={"id": "f" * 64, "top_k": 100_000}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/search/id", json={"id": "f" * 64, "offset": -1}), 422, "validation_error"),
        (lambda c, s, h: c.post("/api/search/url", content=b"{not json", headers={"Content-Type": "application/json"}), 422, "validation_error"),
        (lambda c, s, h: c.post("/api/images", files={"file": ("a.png", encode(_photo(77), "PNG"))}, data={"label": "bell\x07"}), 400, "invalid_request"),
        (lambda c, s, h: c.post("/api/images", files={"file": ("a.png", encode(_photo(77), "PNG"))}, data={"label": "x" * 257}), 422, "validation_error"),
        (lambda c, s, h: c.put("/api/images"), 405, "method_not_allowed"),
        # A form field sent in the query string is refused, not silently ignored.
        (lambda c, s, h: c.post("/api/search?top_k=3", files={"file": ("a.png", encode(_photo(78), "PNG"))}), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/images", params={"limt": 5}), 422, "validation_error"),
        (lambda c, s, h: c.post("/api/search/id", json={"id": "f" * 64, "min_score": 2}), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/duplicates", params={"limit": 0}), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/duplicates", params={"limit": 100_000}), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/duplicates", params={"offset": -5}), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/images", params={"limit": 201}), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/images", params={"offset": -1}), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/images", params={"label": "x" * 257}), 422, "validation_error"),
        (lambda c, s, h: c.get("/api/images", params={"label": "bell\x07"}), 400, "invalid_request"),
        (lambda c, s, h: c.get("/api/nothing-here"), 404, "not_found"),
    ],
)
def test_api_abuse_probes_get_exact_answers(client, live_service, image_host, probe, status, error):
    response = probe(client, live_service, image_host)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["detail"]


def test_the_keyless_loopback_mode_refuses_other_sites(client, photo_set):
    """DNS rebinding (a page whose host name resolves to 127.0.0.1) and cross-site form posts."""
    data = photo_set["originals"]["clock"]
    rebound = client.get("/api/status", headers={"Host": "evil.example:80"})
    assert rebound.status_code == 403 and "only to localhost" in rebound.json()["detail"]
    assert client.post("/api/images", files={"file": ("c.jpg", data)}, headers={"Host": "attacker.test"}).status_code == 403
    posted = client.post("/api/images", files={"file": ("c.jpg", data)}, headers={"Origin": "https://evil.example"})
    assert posted.status_code == 403 and "another site" in posted.json()["detail"]
    fetch_meta = client.post("/api/images", files={"file": ("c.jpg", data)}, headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch_meta.status_code == 403
    assert client.post("/api/search", files={"file": ("q.jpg", data)}, headers={"Origin": "https://evil.example"}).status_code == 200
    assert client.get("/api/status", headers={"Host": "localhost"}).status_code == 200


def test_index_rebuild_parameters_are_checked_before_anything_changes(client):
    before = client.get("/api/status").json()["index"]
    assert client.post("/api/index", json={"index_type": "HNSW", "params": {"efConstruction": 10**9}}).status_code == 400
    assert client.get("/api/status").json()["index"] == before


@pytest.mark.parametrize(
    "label", ["cat 🐱", 'say "hi"', "back\\slash", "it's", "naïve café", "中文", "\\\"'mixed'\\", "x" * 255, "🙂" * 64],
)
def test_any_unicode_label_is_stored_returned_and_filtered(client, label):
    data = encode(_photo(abs(hash(label)) % 10_000 + 500), "PNG")
    added = client.post("/api/images", files={"file": ("l.png", data)}, data={"label": label})
    assert added.status_code == 201, added.text
    try:
        assert added.json()["image"]["label"] == label
        assert client.get(f"/api/images/{added.json()['id']}/metadata").json()["label"] == label
        hits = client.post("/api/search", files={"file": ("q.png", data)}, data={"label": label, "top_k": "3"}).json()["hits"]
        assert [h["id"] for h in hits] == [added.json()["id"]] and hits[0]["label"] == label
        by_id = client.post("/api/search/id", json={"id": added.json()["id"], "label": label, "top_k": 2}).json()["hits"]
        assert by_id[0]["label"] == label
    finally:
        client.delete(f"/api/images/{added.json()['id']}")


def test_page_and_answers_carry_the_security_headers(client):
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in page.text and 'style="' not in page.text, "no inline code for the CSP to allow"
    for response in (page, client.get("/api/status"), client.get("/static/app.js")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"


def test_image_caching_honours_a_delete(client):
    data = encode(_photo(4321), "JPEG")
    image_id = client.post("/api/images", files={"file": ("c.jpg", data)}).json()["id"]
    first = client.get(f"/api/images/{image_id}")
    assert first.headers["cache-control"] == "private, no-cache" and first.headers["etag"]
    again = client.get(f"/api/images/{image_id}", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    client.delete(f"/api/images/{image_id}")
    gone = client.get(f"/api/images/{image_id}", headers={"If-None-Match": first.headers["etag"]})
    assert gone.status_code == 404


# --- a service with API keys ----------------------------------------------------------------------


def _auth(key: str, header: str = "bearer") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}


def test_keys_and_scopes(keyed_service, keys, photo_set):
    data = photo_set["originals"]["coffee"]
    with httpx.Client(base_url=keyed_service.url, timeout=60) as http:
        anonymous = http.post("/api/images", files={"file": ("c.jpg", data)})
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthenticated"
        assert "write" in anonymous.json()["detail"] and anonymous.headers["www-authenticate"].startswith("Bearer")
        wrong = http.post("/api/images", files={"file": ("c.jpg", data)}, headers=_auth("ris_not-a-key"))
        assert wrong.status_code == 401 and wrong.json()["detail"] == "The API key is not valid."
        reader = http.post("/api/images", files={"file": ("c.jpg", data)}, headers=_auth(keys.search))
        assert reader.status_code == 403 and reader.json()["error"] == "forbidden" and "reader" in reader.json()["detail"]
        created = http.post("/api/images", files={"file": ("c.jpg", data)}, headers=_auth(keys.write))
        assert created.status_code == 201, created.text
        again = http.post("/api/images", files={"file": ("c.jpg", data)}, headers=_auth(keys.write, "x-api-key"))
        assert again.status_code == 200
        image_id = created.json()["id"]

        assert http.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["coffee"])}).status_code == 200
        assert http.get(f"/api/images/{image_id}").status_code == 200
        assert http.delete(f"/api/images/{image_id}", headers=_auth(keys.search)).status_code == 403
        assert http.post("/api/index", json={"index_type": "FLAT"}, headers=_auth(keys.write)).status_code == 403
        assert http.get("/api/duplicates").status_code == 401
        assert http.get("/api/duplicates", headers=_auth(keys.search)).status_code == 403
        assert http.get("/api/duplicates", headers=_auth(keys.write)).status_code in (200, 202)
        assert http.post("/api/index", json={"index_type": "HNSW"}, headers=_auth(keys.admin)).status_code == 200
        pixels = io.BytesIO()
        np.save(pixels, np.zeros((1, 224, 224, 3), dtype=np.uint8))
        npy = {"Content-Type": "application/x-npy"}
        assert http.post("/api/embed", content=pixels.getvalue(), headers=npy).status_code == 401
        assert http.post("/api/embed", content=pixels.getvalue(), headers={**npy, **_auth(keys.write)}).status_code == 403
        assert http.post("/api/embed", content=pixels.getvalue(), headers={**npy, **_auth(keys.admin)}).status_code == 200

        public = http.get("/api/status").json()
        assert "milvus_uri" not in public and "location" not in public["store"]
        assert public["scopes"] == ["search"] and public["keys"] is True
        assert http.get("/api/status", headers=_auth(keys.write)).json()["scopes"] == ["search", "write"]
        assert http.get("/api/images").status_code in (200, 202) and http.get("/api/labels").status_code in (200, 202)
        assert str(Path.cwd()) not in json.dumps(public) and "/" not in public["store"]["backend"]
        full = http.get("/api/status", headers=_auth(keys.admin)).json()
        assert full["milvus_uri"].endswith("milvus.db") and full["store"]["location"]
        assert http.delete(f"/api/images/{image_id}", headers=_auth(keys.write)).status_code == 200


def test_expensive_routes_are_limited_per_client(keyed_service, keys, image_host):
    with httpx.Client(base_url=keyed_service.url, timeout=60) as http:
        codes = [http.post("/api/search/url", json={"url": f"{image_host.url}/nothing.jpg"}).status_code for _ in range(6)]
        assert codes.count(429) >= 2, codes
        limited = http.post("/api/search/url", json={"url": f"{image_host.url}/nothing.jpg"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"] == "rate_limited"
        # Another client (a key of its own) has its own budget.
        other = http.post("/api/search/url", json={"url": "http://127.0.0.1/"}, headers=_auth(keys.search))
        assert other.status_code == 400


def test_no_keys_and_a_public_address_means_no_writes(tmp_path, efficientnet, photo_set):
    """Bound to 0.0.0.0 (reached here over loopback) with no keys: searching works, writing is refused."""
    env = Backend("lite-local", tmp_path / "data").process_env(RIS_MODEL_NAME="efficientnet-lite0")
    service = _PublicService(env, tmp_path / "service.log")
    service.start()
    try:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            refused = http.post("/api/images", files={"file": ("c.jpg", photo_set["originals"]["coins"])})
            assert refused.status_code == 403 and "no API keys are configured" in refused.json()["detail"]
            assert http.post("/api/index", json={"index_type": "FLAT"}).status_code == 403
            assert http.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["coins"])}).status_code == 200
        assert "without a key: search" in service.log_tail()
    finally:
        service.stop()


class _PublicService(ServiceProcess):
    def command(self) -> list[str]:
        return [*super().command()[:-4], "--host", "0.0.0.0", "--port", str(self.port)]

