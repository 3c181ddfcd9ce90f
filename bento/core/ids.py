"""The image id rule, once: an image's id is the sha256 of its exact bytes (lowercase hex), so the same
file is stored once whatever its name, and no other string is accepted as an id."""

from __future__ import annotations

import hashlib
import re

from bento.core.errors import InvalidParameters

IMAGE_ID_PATTERN = r"^[0-9a-f]{64}$"
_ID_RE = re.compile(IMAGE_ID_PATTERN)


def content_hash(data: bytes) -> str:
    """The id of an image's bytes."""
    return hashlib.sha256(data).hexdigest()


def validate_image_id(image_id: str) -> str:
    """``image_id`` itself, or InvalidParameters (422, as a malformed id in a JSON body) when it is not an id."""
    if not _ID_RE.fullmatch(image_id):
        raise InvalidParameters("An image id is a 64-character lowercase sha256 hex digest.")
    return image_id
