"""The S3 image store against a real S3 server (rclone serve s3): private bucket, presigned URLs."""

import time
import uuid
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest
import urllib3
from pydantic import ValidationError

from bento.adapters.storage import S3ImageStore, open_image_store
from bento.core.config import Settings
from bento.core.errors import BackendUnavailable, NotFound
from bento.core.ids import content_hash


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


def _other_host(url: str, host: str) -> str:
    """The same URL (path, query and signature untouched) sent to another address of the same server."""
    return urlsplit(url)._replace(netloc=host).geturl()


def test_presigned_urls_are_signed_for_the_public_endpoint(store, s3_server):
    """In a cluster, S3 is ris-minio:9000 for the service and another host for browsers: here 127.0.0.1 and
    localhost, two names of the same server. SigV4 covers the host: a URL works only through the host it names."""
    public = S3ImageStore(
        s3_server.endpoint, store.bucket, s3_server.access_key, s3_server.secret_key, secure=False,
        region="us-east-1", prefix="tenant-a", public_endpoint=f"http://localhost:{s3_server.port}",
    )
    data = b"an image for browsers"
    image_id = content_hash(data)
    public.put(image_id, "original", data)  # stored through the in-cluster endpoint
    url = public.presigned_url(image_id, "original")
    assert urlsplit(url)[:2] == ("http", f"localhost:{s3_server.port}")
    assert urlsplit(url).path == f"/{store.bucket}/tenant-a/originals/{image_id[:2]}/{image_id}"
    assert httpx.get(url).content == data
    assert httpx.get(_other_host(url, s3_server.endpoint)).status_code == 403, "the signature must cover the host"
    internal = store.presigned_url(image_id, "original")  # no public endpoint: signed for s3_endpoint
    assert urlsplit(internal).netloc == s3_server.endpoint and httpx.get(internal).content == data
    assert httpx.get(_other_host(internal, f"localhost:{s3_server.port}")).status_code == 403


def test_public_urls_are_signed_offline_with_the_scheme_they_name():
    """Neither endpoint listens: presigning must not touch the network (the region is known)."""
    from minio import Minio

    from scripts.devstack import free_port

    store = S3ImageStore(
        f"127.0.0.1:{free_port()}", "images", "access", "secret", secure=False, region="us-east-1", timeout_s=1,
        public_endpoint="https://images.example.com",
    )
    url = store.presigned_url("a" * 64, "thumbnail")
    assert url.startswith(f"https://images.example.com/images/thumbnails/aa/{'a' * 64}?")
    assert "X-Amz-SignedHeaders=host" in url and "X-Amz-Signature=" in url
    nowhere = f"127.0.0.1:{free_port()}"
    offline = S3ImageStore(
        f"127.0.0.1:{free_port()}", "images", "a", "b", secure=False, region="us-east-1", timeout_s=1,
        public_endpoint=f"http://{nowhere}",
    )
    assert offline.presigned_url("b" * 64, "original").startswith(f"http://{nowhere}/images/originals/bb/")
    # The control: without a region, minio asks the server for the bucket's location before signing.
    with pytest.raises(urllib3.exceptions.HTTPError):
        http = urllib3.PoolManager(timeout=1, retries=False)
        Minio(nowhere, "a", "b", secure=False, http_client=http).presigned_get_object("images", "k")
    with pytest.raises(ValueError, match="region"):
        S3ImageStore("ris-minio:9000", "images", "a", "b", secure=False, region="", public_endpoint="https://images.example.com")


def test_the_public_endpoint_setting_reaches_the_store_and_bad_values_are_refused(s3_server):
    def settings(public: str) -> Settings:
        return Settings(
            _env_file=None, store={"backend": "s3"},
            s3={"endpoint": s3_server.endpoint, "secure": False, "access_key": s3_server.access_key,
                "secret_key": s3_server.secret_key, "public_endpoint": public},
        )

    store = open_image_store(settings(f"http://localhost:{s3_server.port}/"))  # a trailing slash is fine
    assert isinstance(store, S3ImageStore)
    assert urlsplit(store.presigned_url("c" * 64, "original")).netloc == f"localhost:{s3_server.port}"
    unset = open_image_store(settings(""))
    assert isinstance(unset, S3ImageStore)
    assert urlsplit(unset.presigned_url("c" * 64, "original")).netloc == s3_server.endpoint
    for bad in ("https://images.example.com/images", "images.example.com:9000", "ftp://images.example.com",
                "https://user:pw@images.example.com", "https://images.example.com?x=1", "http://x:99999"):
        with pytest.raises(ValidationError, match="RIS_S3_PUBLIC_ENDPOINT is a scheme and a host"):
            settings(bad)
