"""`python -m ingest s3://bucket/prefix` against a real S3 server (rclone serve s3): labels from the keys,
shards that split the listing, resumable and idempotent like the folder ingest."""

import io
import json
import uuid

import pytest
from minio import Minio

from bento.core.ids import content_hash
from ingest.sources import FolderSource, parse_s3_location
from tests.support import Backend, local_catalog, run_cli

pytestmark = pytest.mark.slow


def _upload(s3_server, bucket: str, prefix: str, root) -> dict[str, str]:
    """Every file of the folder under the prefix; returns {content id: label}."""
    client = Minio(s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key, secure=False)
    client.make_bucket(bucket)
    expected = {}
    for file in FolderSource(root).files():
        data = (root / file.name).read_bytes()
        client.put_object(bucket, f"{prefix}{file.name}", io.BytesIO(data), len(data))
        expected[content_hash(data)] = file.label
    client.put_object(bucket, f"{prefix}.hidden/skip.jpg", io.BytesIO(b"x"), 1)
    client.put_object(bucket, "elsewhere/other.jpg", io.BytesIO(b"not under the prefix"), 20)
    return expected


def test_ingest_straight_from_a_bucket_prefix_in_shards(s3_server, efficientnet, photo_set, tmp_path):
    bucket = f"incoming-{uuid.uuid4().hex[:8]}"
    expected = _upload(s3_server, bucket, "batch-1/", photo_set["root"])
    backend = Backend("lite-local", tmp_path / "data")
    env = backend.process_env(
        RIS_MODEL_NAME="efficientnet-lite0", RIS_S3_ENDPOINT=s3_server.endpoint, RIS_S3_ACCESS_KEY=s3_server.access_key,
        RIS_S3_SECRET_KEY=s3_server.secret_key, RIS_S3_SECURE="false",
    )
    reports = []
    for index in range(2):
        run = run_cli(["-m", "ingest", f"s3://{bucket}/batch-1", "--shard-count", "2", "--shard-index", str(index), "--no-progress", "--json"], env)
        assert run.returncode == 0, run.stderr[-3000:]
        reports.append(json.loads(run.stdout))
    assert reports[0]["folder"] == f"s3://{bucket}/batch-1/"
    assert all(report["scanned"] == len(expected) and not report["rejected"] for report in reports)
    assert reports[0]["ingested"] + reports[1]["ingested"] == len(expected) and reports[0]["other_shards"] == reports[1]["ingested"]
    again = run_cli(["-m", "ingest", f"s3://{bucket}/batch-1/", "--no-progress", "--json"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout)
    assert rerun["ingested"] == 0 and rerun["skipped_existing"] == len(expected)

    # Last: this process opens the Milvus Lite file (one process per file).
    assert backend.stored_ids() == set(expected)
    catalog = local_catalog(backend.settings(), efficientnet)
    try:
        stored = catalog.vectors.get(sorted(expected))
    finally:
        catalog.close()
    assert {meta.id: meta.label for meta in stored} == expected
    assert all(meta.source.count("/") == 1 for meta in stored)  # the key under the prefix: "person/astronaut.jpg"


def test_a_missing_bucket_or_a_bad_location_fails_at_once(s3_server, efficientnet, tmp_path):
    env = Backend("lite-local", tmp_path / "data").process_env(
        RIS_MODEL_NAME="efficientnet-lite0", RIS_S3_ENDPOINT=s3_server.endpoint, RIS_S3_ACCESS_KEY=s3_server.access_key,
        RIS_S3_SECRET_KEY=s3_server.secret_key, RIS_S3_SECURE="false",
    )
    missing = run_cli(["-m", "ingest", "s3://no-such-bucket-here/x", "--no-progress", "--retry-seconds", "60"], env, timeout=120)
    assert missing.returncode == 1 and "no bucket 'no-such-bucket-here'" in missing.stderr
    # An object gone since the listing is that file's problem (reported, the ingest goes on), not an outage.
    from bento.adapters.storage import S3ImageStore

    store = S3ImageStore(s3_server.endpoint, "any", s3_server.access_key, s3_server.secret_key, secure=False, region="us-east-1")
    store.ensure_bucket()
    with pytest.raises(OSError, match="no such object"):
        store.read_object("any", "gone.jpg")
    assert parse_s3_location("s3://b/some/prefix") == ("b", "some/prefix")
    for bad in ("s3:///prefix", "s3://b/p?x=1"):
        with pytest.raises(Exception, match="s3://BUCKET/PREFIX"):
            parse_s3_location(bad)
