import pytest

from bento.adapters.storage import LocalImageStore
from bento.core.errors import InvalidRequest, NotFound
from bento.core.ids import content_hash


def test_put_get_exists_delete_round_trip(tmp_path):
    store = LocalImageStore(tmp_path)
    data = b"image bytes"
    image_id = content_hash(data)
    assert not store.exists(image_id, "original")
    store.put(image_id, "original", data)
    store.put(image_id, "thumbnail", b"thumb")
    store.put(image_id, "original", data)  # idempotent
    assert store.get(image_id, "original") == data
    assert store.get(image_id, "thumbnail") == b"thumb"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()].count(image_id) == 2
    assert not list(tmp_path.rglob(".tmp-*")), "no temp files left behind"
    store.delete(image_id)
    assert not store.exists(image_id, "original")
    with pytest.raises(NotFound):
        store.get(image_id, "original")
    store.delete(image_id)  # deleting again is fine


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/", ""])
def test_client_supplied_names_never_become_paths(tmp_path, bad_id):
    store = LocalImageStore(tmp_path / "store")
    with pytest.raises(InvalidRequest):
        store.put(bad_id, "original", b"x")
    with pytest.raises(InvalidRequest):
        store.get(bad_id, "original")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))


def test_local_store_has_no_presigned_urls(tmp_path):
    assert LocalImageStore(tmp_path).presigned_url("0" * 64, "original") is None
