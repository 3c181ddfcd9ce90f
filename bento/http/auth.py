"""API keys with scopes (the model of Immich's API keys).

- ``search``: search, read images, thumbnails and metadata, the public status;
- ``write``: add and delete images (and everything ``search`` may);
- ``admin``: rebuild the index, ``/api/embed`` (the remote ingest's GPU time), the full status (and
  everything ``write`` may).

The service keeps only the sha256 of each key (``RIS_AUTH_KEYS`` or a mounted file, ``RIS_AUTH_KEYS_FILE``),
one entry per key: ``name:scope:sha256hex``. A presented key is hashed and compared with every stored
hash in constant time. Requests without a key get ``RIS_AUTH_ANONYMOUS_SCOPES`` (``search`` by default);
with no keys configured at all, a service bound to a loopback address is fully open (a laptop demo),
and one bound to any other address refuses writes and admin actions.

``python -m bento.http.auth new --name ingest --scope write`` makes a key and prints the entry to configure.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from bento.core.errors import Forbidden, Unauthenticated

logger = logging.getLogger(__name__)

Scope = Literal["search", "write", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
# Each scope grants the ones before it.
_GRANTS: dict[str, frozenset[Scope]] = {scope: frozenset(SCOPES[: i + 1]) for i, scope in enumerate(SCOPES)}
_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9_.-]{1,64}):(?P<scope>search|write|admin):(?P<digest>[0-9a-f]{64})$")
KEY_PREFIX = "ris_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def scopes_of(scope: str) -> frozenset[Scope]:
    return _GRANTS[scope]


@dataclass(frozen=True)
class StoredKey:
    name: str
    scopes: frozenset[Scope]
    digest: str


@dataclass(frozen=True)
class Principal:
    """Who is asking: a named key, or nobody (``name`` empty)."""

    name: str
    scopes: frozenset[Scope]


def parse_entries(text: str, origin: str) -> list[StoredKey]:
    """Entries separated by commas or new lines; blank lines and ``#`` comments are skipped."""
    keys = []
    without_comments = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for number, raw in enumerate(re.split(r"[,\n]", without_comments), start=1):
        entry = raw.strip()
        if not entry:
            continue
        match = _ENTRY.match(entry)
        if match is None:
            raise ValueError(
                f"{origin}: entry {number} is not 'name:scope:sha256hex' with a scope of {', '.join(SCOPES)} "
                "(make one with `python -m bento.http.auth new --name NAME --scope SCOPE`)."
            )
        keys.append(StoredKey(match["name"], scopes_of(match["scope"]), match["digest"]))
    return keys


class KeyTable:
    """Decides what a request may do from its key (or its absence) and where the service listens."""

    def __init__(self, keys: list[StoredKey], anonymous: frozenset[Scope]) -> None:
        self.keys = keys
        self.anonymous = anonymous

    @classmethod
    def from_settings(cls, keys: str, keys_file: Path | None, anonymous_scopes: str) -> KeyTable:
        entries = parse_entries(keys, "RIS_AUTH_KEYS")
        if keys_file is not None:
            entries += parse_entries(keys_file.read_text(encoding="utf-8"), str(keys_file))
        anonymous: set[Scope] = set()
        for scope in (s.strip() for s in anonymous_scopes.split(",")):
            if scope:
                if scope not in SCOPES:
                    raise ValueError(f"RIS_AUTH_ANONYMOUS_SCOPES: {scope!r} is not one of {', '.join(SCOPES)}")
                anonymous |= scopes_of(scope)
        return cls(entries, frozenset(anonymous))

    @property
    def configured(self) -> bool:
        return bool(self.keys)

    def open_scopes(self, loopback: bool) -> frozenset[Scope]:
        """What a request without a key may do."""
        if not self.configured and loopback:
            return frozenset(SCOPES)
        return self.anonymous

    def identify(self, presented: str | None, loopback: bool) -> Principal:
        if not presented:
            return Principal("", self.open_scopes(loopback))
        digest = hash_key(presented)
        found: StoredKey | None = None
        for key in self.keys:  # every hash is compared: the time does not tell which one matched
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise Unauthenticated("The API key is not valid.")
        return Principal(found.name, found.scopes)

    def require(self, principal: Principal, scope: Scope, loopback: bool) -> None:
        if scope in principal.scopes:
            return
        if principal.name:
            raise Forbidden(f"The API key '{principal.name}' does not have the '{scope}' scope this action needs.")
        if not self.configured and not loopback:
            raise Forbidden(
                f"'{scope}' actions are disabled: no API keys are configured and the service listens on a "
                "non-loopback address. Configure RIS_AUTH_KEYS (python -m bento.http.auth new ...)."
            )
        raise Unauthenticated(f"This action needs an API key with the '{scope}' scope (Authorization: Bearer KEY).")

    def describe(self, loopback: bool) -> str:
        """One line for the log at start: exactly what is open."""
        anonymous = ", ".join(sorted(self.open_scopes(loopback), key=SCOPES.index)) or "nothing"
        names = ", ".join(f"{k.name} ({max(k.scopes, key=SCOPES.index)})" for k in self.keys) or "none"
        return f"API keys: {names}; without a key: {anonymous}"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key of ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    if api_key:
        return api_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def main(argv: list[str] | None = None, prog: str = "python -m bento.http.auth") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Make an API key.")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("new", help="make a key; print it once, and the entry to configure")
    make.add_argument("--name", required=True, help="who holds it (letters, digits, . _ -)")
    make.add_argument("--scope", required=True, choices=SCOPES)
    args = parser.parse_args(argv)
    key = new_key()
    entry = f"{args.name}:{args.scope}:{hash_key(key)}"
    parse_entries(entry, "--name")  # the name must fit the entry format
    print(f"key (give it to the client; it is not stored):  {key}")  # noqa: T201 (a CLI)
    print(f"entry (add to RIS_AUTH_KEYS or the keys file):  {entry}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
