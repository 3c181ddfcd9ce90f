"""The one codec of the remote-embedding calls: pixels and vectors as .npy bytes (no pickles).

Used on both sides: the ingest job's client of POST /api/embed (ingest/remote.py), the RPC client of the
Embedder service (bento/adapters/remote.py), the route (bento/http/responses.py) and the Embedder's embed_npy."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from bento.core.errors import InvalidRequest, UnsupportedMediaType
from models.pipeline import check_pixel_shape

MEDIA_TYPE = "application/x-npy"
_ACCEPTED = (MEDIA_TYPE, "application/octet-stream")


def to_npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def vectors_from_npy(raw: bytes) -> np.ndarray:
    """The float32 vectors an embedder answered."""
    return np.load(io.BytesIO(raw), allow_pickle=False)


def pixels_from_npy(raw: bytes, sides: Sequence[int], content_type: str = MEDIA_TYPE) -> np.ndarray:
    """A .npy of uint8 pixels at one of the recipe's input ``sides``, checked from its header before
    anything is allocated (the pixel contract, once per boundary)."""
    if content_type.split(";")[0].strip().lower() not in _ACCEPTED:
        raise UnsupportedMediaType(f"POST /api/embed takes a .npy body (Content-Type: {MEDIA_TYPE}).")
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(stream, max_header_size=1024)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise InvalidRequest(f"The body must be a .npy array: {exc}") from exc
    if fortran_order:
        raise InvalidRequest("The .npy array must be in C order.")
    check_pixel_shape(dtype, shape, sides, at_least=1)
    if len(raw) - stream.tell() != math.prod(shape):
        raise InvalidRequest(f"The .npy header says {shape} but the body holds {len(raw) - stream.tell()} bytes of pixels.")
    return np.frombuffer(raw, dtype=np.uint8, offset=stream.tell()).reshape(shape)
