"""The S3 image store against a real S3 server (rclone serve s3): private bucket, presigned URLs."""

import time
import uuid
from datetime import timedelta

import httpx
import pytest

from bento.errors import BackendUnavailable, NotFound
from bento.imaging import content_hash
from bento.storage import S3ImageStore


@pytest.fixture
def store(s3_server):
    return S3ImageStore(
        s3_server.endpoint, f"b-{uuid.uuid4().hex[:10]}", s3_server.access_key, s3_server.secret_key,
        secure=False, region="us-east-1", prefix="tenant-a", presign_expiry_s=60,
    )


def test_round_trip_in_a_bucket_it_creates(store):
    data = b"\xff\xd8 some jpeg bytes"
    image_id = content_hash(data)
    assert not store.exists(image_id, "original")
    assert store.client.bucket_exists(store.bucket)  # created on first use
    store.put(image_id, "original", data)
    store.put(image_id, "original", data)  # idempotent
    store.put(image_id, "thumbnail", b"thumb")
    assert store.get(image_id, "original") == data and store.get(image_id, "thumbnail") == b"thumb"
    names = [o.object_name for o in store.client.list_objects(store.bucket, recursive=True)]
    assert sorted(names) == sorted([f"tenant-a/originals/{image_id[:2]}/{image_id}", f"tenant-a/thumbnails/{image_id[:2]}/{image_id}"])
    store.delete(image_id)
    assert not store.exists(image_id, "original")
    with pytest.raises(NotFound):
        store.get(image_id, "original")
    store.ping()


def test_presigned_urls_work_and_cannot_be_forged_or_reused_late(store, s3_server):
    data = b"private image"
    image_id = content_hash(data)
    store.put(image_id, "original", data)
    url = store.presigned_url(image_id, "original")
    assert httpx.get(url).content == data
    tampered = url.replace(image_id, content_hash(b"another"))
    assert httpx.get(tampered).status_code in (400, 403)
    forged = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    assert httpx.get(forged).status_code in (400, 403)
    anonymous = f"http://{s3_server.endpoint}/{store.bucket}/tenant-a/originals/{image_id[:2]}/{image_id}"
    assert httpx.get(anonymous).status_code in (400, 403), "the bucket must refuse anonymous reads"
    store.expiry = timedelta(seconds=1)
    short_lived = store.presigned_url(image_id, "original")
    time.sleep(2.5)
    assert httpx.get(short_lived).status_code in (400, 403)


def test_wrong_credentials_and_unreachable_servers_are_503s(s3_server):
    wrong = S3ImageStore(s3_server.endpoint, "b-x", s3_server.access_key, "not-the-secret", secure=False, region="us-east-1")
    with pytest.raises(BackendUnavailable, match="credentials"):
        wrong.ping()
    from scripts.devstack import free_port

    nowhere = S3ImageStore(f"127.0.0.1:{free_port()}", "b-x", "a", "b", secure=False, region="us-east-1", timeout_s=1)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="unavailable"):
        nowhere.exists("0" * 64, "original")
    assert time.monotonic() - started < 30, "an unreachable store must fail fast, not hang"
