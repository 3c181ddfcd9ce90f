"""Backups that restore: `ris backup` of a running collection (both models' collections, the originals),
restored into fresh stores (another Milvus and another image store), finds the same images by search with
the same scores; a damaged or incomplete backup is refused before anything is written."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from bento.core.cli import UsageError
from bento.core.config import Settings, settings_from
from bento.core.errors import InvalidRequest, ModelMismatch
from bento.core.retry import RetryPolicy
from bento.domain.schemas import SearchOptions
from ingest.backup import PARTIAL, PREFIX, backup, find_backup, prune, read_manifest, restore
from ingest.job import IngestJob, IngestOptions
from scripts.devstack import S3Server, stack_env
from tests.support import local_catalog, run_cli, service_env

RETRY = RetryPolicy(0.0)


def _fresh_target(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Stores that have never seen the collection, of the other kind than the source: a backup taken from
    the Milvus server and S3 goes into a new Milvus Lite file and a new S3 server (a second process, its own
    data); one taken from Milvus Lite goes into a new collection of the Milvus server and a new folder."""
    if backend_name == "server-s3":
        s3 = S3Server(tmp_path / "fresh-s3", access_key="freshaccesskey", secret_key="freshsecretkey123")
        s3.start()
        request.addfinalizer(s3.stop)
        env = stack_env(request.getfixturevalue("milvus_server"), s3, bucket="restored")
        env["RIS_MILVUS_URI"] = str(tmp_path / "fresh" / "milvus.db")
        return settings_from(service_env(tmp_path / "fresh", **env))
    milvus = request.getfixturevalue("milvus_server")
    return settings_from(service_env(tmp_path / "fresh", RIS_MILVUS_URI=milvus.uri, RIS_MILVUS_COLLECTION=f"r_{uuid.uuid4().hex[:12]}"))


def _hits(catalog, query: bytes) -> list[tuple[str, str | None, float]]:
    result = catalog.search_image(query, SearchOptions(top_k=8))
    return [(hit.image.id, hit.match, round(hit.score, 4)) for hit in result.hits]


def test_a_backup_restores_into_fresh_stores_and_finds_the_same_images(backend, both_models, photo_set, tmp_path, request):
    source = local_catalog(backend.settings(), both_models)
    try:
        report = IngestJob(source, IngestOptions(progress=False)).run(photo_set["root"])
        queries = [photo_set["queries"][name] for name in ("rocket", "chelsea", "coffee")]
        before = [_hits(source, query) for query in queries]
        originals = {image_id: source.blob(image_id, "original")[0] for image_id, _, _ in before[0]}
    finally:
        source.close()
    made = backup(backend.settings(), tmp_path / "backups", images=True, retry=RETRY, batch_size=7)
    assert made.collections == {"similarity": report.image_count, "copy": report.image_count}
    assert made.images_copied == report.image_count and made.missing_originals == 0
    folder = find_backup(tmp_path / "backups")
    manifest = read_manifest(folder)
    assert len(manifest.collections[0].chunks) == -(-report.image_count // 7), "chunks of --batch-size images"
    assert not any(p.name.endswith(PARTIAL) for p in (tmp_path / "backups").iterdir())

    target = _fresh_target(backend.name, request, tmp_path)
    restored = restore(target, tmp_path / "backups", images=True, retry=RETRY)
    assert restored.collections == made.collections and restored.images_restored == report.image_count
    again = local_catalog(target, both_models)
    try:
        assert again.vectors.count() == again.copies.count() == report.image_count
        after = [_hits(again, query) for query in queries]
        assert after == before, "the same hits, the same scores, the copies first"
        assert before[0][0][1] == "copy"
        for image_id, data in originals.items():
            assert again.blob(image_id, "original")[0] == data
            assert again.blob(image_id, "thumbnail")[0]
        meta = again.metadata(before[0][0][0])
        assert meta.label and meta.source and meta.created_at > 0, "labels, sources and dates kept"
    finally:
        again.close()
    # Restoring twice is harmless: content-keyed, nothing doubles.
    assert restore(target, folder, images=True, retry=RETRY).collections == made.collections
    check = local_catalog(target, both_models)
    try:
        assert check.vectors.count() == report.image_count
    finally:
        check.close()


@pytest.mark.parametrize("backend", ["lite-local"], indirect=True)
def test_a_damaged_or_foreign_backup_is_refused_before_anything_is_written(backend, efficientnet, photo_set, tmp_path):
    source = local_catalog(backend.settings(), efficientnet)
    try:
        IngestJob(source, IngestOptions(progress=False)).run(photo_set["root"] / "cat")
    finally:
        source.close()
    made = backup(backend.settings(), tmp_path / "b", images=False, retry=RETRY)
    assert set(made.collections) == {"similarity"}, "no copy model: one collection"
    folder = Path(made.path)
    target = settings_from(service_env(tmp_path / "fresh"))

    chunk = folder / read_manifest(folder).collections[0].chunks[0].file
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(InvalidRequest, match="damaged"):
        restore(target, folder, images=False, retry=RETRY)
    chunk.unlink()
    with pytest.raises(InvalidRequest, match="missing"):
        restore(target, folder, images=False, retry=RETRY)
    with pytest.raises(UsageError, match="without --images"):
        restore(target, folder, images=True, retry=RETRY)
    assert not (tmp_path / "fresh" / "milvus.db").exists(), "nothing written: every file is checked first"
    chunk.write_bytes(good)

    # A collection of another model is not mixed with the backup's vectors.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["collections"][0]["model"]["model_id"] = "another@model"
    other = tmp_path / f"{PREFIX}other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / chunk.name).write_bytes(good)
    restore(target, folder, images=False, retry=RETRY)
    with pytest.raises(ModelMismatch):
        restore(target, other, images=False, retry=RETRY)


def test_the_newest_complete_backup_is_found_and_old_ones_pruned(tmp_path):
    names = [f"{PREFIX}20261201T000000Z", f"{PREFIX}20261202T000000Z", f"{PREFIX}20261203T000000Z"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / f"{PREFIX}20261202T120000Z{PARTIAL}").mkdir()  # interrupted before the newest
    (tmp_path / f"{PREFIX}20261204T000000Z{PARTIAL}").mkdir()  # running now
    assert find_backup(tmp_path).name == names[-1], "a partial backup is never chosen"
    removed = {p.name for p in prune(tmp_path, keep=2)}
    assert removed == {names[0], f"{PREFIX}20261202T120000Z{PARTIAL}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [*names[1:], f"{PREFIX}20261204T000000Z{PARTIAL}"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no complete backup"):
        find_backup(tmp_path / "empty")


def test_the_commands_exit_codes(tmp_path):
    env = service_env(tmp_path / "data")
    missing = run_cli(["-m", "ingest.cli", "backup", str(tmp_path / "out")], env, timeout=120)
    assert missing.returncode == 2 and "no collection" in missing.stderr, missing.stderr
    assert not (tmp_path / "out").exists(), "nothing written for a usage error"
    nothing = run_cli(["-m", "ingest.cli", "restore", str(tmp_path)], env, timeout=120)
    assert nothing.returncode == 2 and "no complete backup" in nothing.stderr, nothing.stderr
    helped = run_cli(["-m", "ingest.cli", "backup", "--help"], env, timeout=120)
    assert helped.returncode == 0 and "--images" in helped.stdout and "--keep" in helped.stdout
