"""API keys and scopes (bento/http/auth.py): what each key, and no key, may do."""

import pytest

from bento.core.errors import Forbidden, Unauthenticated
from bento.http.auth import KeyTable, hash_key, main, new_key, parse_entries, presented_key


def _table(anonymous: str = "search", **keys: str) -> KeyTable:
    entries = ",".join(f"{name}:{scope}:{hash_key(key)}" for name, (scope, key) in ((n, v.split("=")) for n, v in keys.items()))
    return KeyTable.from_settings(entries, None, anonymous)


def test_scopes_grant_the_ones_below_them():
    table = _table(reader="search=k1", uploader="write=k2", ops="admin=k3")
    assert table.identify("k1", loopback=False).scopes == {"search"}
    assert table.identify("k2", loopback=False).scopes == {"search", "write"}
    assert table.identify("k3", loopback=False).scopes == {"search", "write", "admin"}
    table.require(table.identify("k3", False), "write", False)
    with pytest.raises(Forbidden, match="'reader' does not have the 'write' scope"):
        table.require(table.identify("k1", False), "write", False)


def test_unknown_keys_and_missing_keys():
    table = _table(uploader="write=secret")
    with pytest.raises(Unauthenticated, match="not valid"):
        table.identify("guess", loopback=True)
    anonymous = table.identify(None, loopback=True)
    table.require(anonymous, "search", True)
    with pytest.raises(Unauthenticated, match="needs an API key with the 'write' scope"):
        table.require(anonymous, "write", True)
    closed = _table(anonymous="", uploader="write=secret")
    with pytest.raises(Unauthenticated):
        closed.require(closed.identify(None, False), "search", False)


def test_no_keys_is_open_on_loopback_and_read_only_elsewhere():
    table = _table()
    assert table.identify(None, loopback=True).scopes == {"search", "write", "admin"}
    exposed = table.identify(None, loopback=False)
    table.require(exposed, "search", False)
    with pytest.raises(Forbidden, match="no API keys are configured"):
        table.require(exposed, "write", False)
    assert "without a key: search, write, admin" in table.describe(loopback=True)
    assert "without a key: search" in table.describe(loopback=False)


def test_only_hashes_are_configured_and_entries_are_checked(tmp_path):
    key = new_key()
    assert key.startswith("ris_") and len(key) > 40 and hash_key(key) != key
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the ops team, and nobody else\nops:admin:{hash_key(key)}  # rotated monthly, by hand\n\n")
    table = KeyTable.from_settings("", keys_file, "search")
    assert table.identify(key, loopback=False).name == "ops"
    for bad in ("ops:root:" + "0" * 64, "ops:admin:" + key, "no-colons", "a b:search:" + "0" * 64):
        with pytest.raises(ValueError, match="name:scope:sha256hex"):
            parse_entries(bad, "RIS_AUTH_KEYS")
    with pytest.raises(ValueError, match="not one of"):
        KeyTable.from_settings("", None, "everything")


def test_keys_come_from_either_header():
    assert presented_key("Bearer abc ", None) == "abc" and presented_key("bearer abc", None) == "abc"
    assert presented_key(None, "xyz") == "xyz" and presented_key("Basic dXNlcg==", None) is None


def test_the_cli_makes_a_key_and_its_entry(capsys):
    assert main(["new", "--name", "ingest", "--scope", "admin"]) == 0
    out = capsys.readouterr().out
    key = out.split("key (give it to the client; it is not stored):")[1].split()[0]
    entry = out.split("entry (add to RIS_AUTH_KEYS or the keys file):")[1].split()[0]
    assert entry == f"ingest:admin:{hash_key(key)}" and parse_entries(entry, "x")[0].name == "ingest"
