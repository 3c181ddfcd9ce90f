"""The ingest job: labels, idempotency, rejected files, interruption by SIGKILL, model guard."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pymilvus import MilvusClient

from bento.config import Settings
from bento.storage import LocalImageStore
from bento.vectors import VectorIndex
from ingest.job import IngestJob, IngestOptions, scan_folder
from tests.conftest import PYTHON, ROOT, run_cli, service_env


def _stored_ids(data_dir: Path) -> set[str]:
    client = MilvusClient(str(data_dir / "milvus.db"))
    try:
        client.load_collection("images")
        rows = client.query("images", filter='id != ""', output_fields=["id"], limit=16384)
        return {row["id"] for row in rows}
    finally:
        client.close()


def _blob_ids(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "images" / "originals").rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_scan_gives_labels_from_top_level_folders(tmp_path):
    (tmp_path / "cat" / "sub").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ["cat/a.jpg", "cat/sub/b.jpg", "root.jpg", ".hidden/c.jpg", "cat/.d.jpg"]:
        (tmp_path / rel).write_bytes(b"x")
    found = {str(p.relative_to(tmp_path)): label for p, label in scan_folder(tmp_path)}
    assert found == {"cat/a.jpg": "cat", "cat/sub/b.jpg": "cat", "root.jpg": ""}


def test_ingest_then_rerun_skips_everything(efficientnet, photo_set, tmp_path):
    root: Path = photo_set["root"]
    folder = tmp_path / "set"
    os.symlink(root, folder)
    # Bad files sit beside good ones and are reported, never fatal.
    extra = tmp_path / "extra"
    (extra / "junk").mkdir(parents=True)
    (extra / "junk" / "notes.txt").write_text("not an image")
    good = (root / "cat" / "chelsea.jpg").read_bytes()
    (extra / "junk" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (extra / "junk" / "copy-of-chelsea.jpg").write_bytes(good)  # a duplicate of a file in the main set

    settings = Settings(data_dir=tmp_path / "data")
    vectors = VectorIndex(settings, efficientnet.info)
    job = IngestJob(settings, efficientnet, LocalImageStore(settings.image_store_dir), vectors, IngestOptions(batch_size=8, workers=2, progress=False))
    expected = sum(1 for _ in scan_folder(root))
    first = job.run(folder)
    assert (first.scanned, first.ingested, first.skipped_existing, first.rejected) == (expected, expected, 0, [])
    assert first.collection_count == expected

    second = job.run(extra)
    assert second.ingested == 0 and second.skipped_existing == 1
    reasons = {r.path: r.reason for r in second.rejected}
    assert set(reasons) == {"junk/notes.txt", "junk/truncated.jpg"}
    assert "not an image" in reasons["junk/notes.txt"] and "truncated" in reasons["junk/truncated.jpg"]

    third = job.run(folder)
    assert (third.ingested, third.skipped_existing) == (0, expected)
    assert vectors.count() == expected
    labels = {m.source: m.label for m in vectors.get(sorted(vectors.existing_ids(list(_blob_ids(settings.data_dir)))))}
    assert labels["cat/chelsea.jpg"] == "cat" and labels["texture/brick.jpg"] == "texture"
    vectors.close()


def test_blob_lost_after_a_crash_is_repaired_on_rerun(efficientnet, photo_set, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    vectors = VectorIndex(settings, efficientnet.info)
    store = LocalImageStore(settings.image_store_dir)
    job = IngestJob(settings, efficientnet, store, vectors, IngestOptions(batch_size=16, progress=False))
    job.run(photo_set["root"])
    victim = sorted(_blob_ids(settings.data_dir))[0]
    store.delete(victim)
    report = job.run(photo_set["root"])
    assert report.ingested == 1 and store.exists(victim, "original") and store.exists(victim, "thumbnail")
    assert vectors.count() == report.scanned
    vectors.close()


def _many_images(folder: Path, count: int) -> None:
    from ingest.demo import GENERATED, encode

    rng = random.Random(11)
    makers = list(GENERATED.items())
    for i in range(count):
        label, make = makers[i % len(makers)]
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{i:04d}.jpg").write_bytes(encode(make(rng), "JPEG"))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_a_clean_run(efficientnet, tmp_path):
    folder = tmp_path / "many"
    _many_images(folder, 240)
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    args = [PYTHON, "-m", "ingest", str(folder), "--batch-size", "8", "--no-progress"]

    process = subprocess.Popen(args, cwd=ROOT, env=service_env(killed_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(_blob_ids(killed_dir)) < 40 and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the ingest finished before it could be killed; make the set bigger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(_blob_ids(killed_dir))
    assert 0 < partial < 240

    rerun = run_cli(["-m", "ingest", str(folder), "--batch-size", "8", "--no-progress", "--json"], service_env(killed_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    clean = run_cli(["-m", "ingest", str(folder), "--batch-size", "32", "--no-progress"], service_env(clean_dir))
    assert clean.returncode == 0, clean.stderr[-3000:]

    killed_ids, clean_ids = _stored_ids(killed_dir), _stored_ids(clean_dir)
    assert len(clean_ids) == 240
    assert killed_ids == clean_ids, "the interrupted + resumed ingest must equal a clean one"
    assert _blob_ids(killed_dir) == killed_ids, "no orphan blobs, no vector without its image"
    import json

    report = json.loads(rerun.stdout)
    assert report["ingested"] + report["skipped_existing"] == 240 and report["skipped_existing"] > 0


def test_ingest_with_another_model_is_refused_clearly(efficientnet, photo_set, tmp_path):
    data_dir = tmp_path / "data"
    first = run_cli(["-m", "ingest", str(photo_set["root"] / "cat"), "--no-progress"], service_env(data_dir, RIS_MODEL="efficientnet-lite0"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(
        ["-m", "ingest", str(photo_set["root"] / "cat"), "--no-progress"],
        service_env(data_dir, RIS_MODEL="resnet50", RIS_RESNET50_WEIGHTS="random"),
    )
    assert second.returncode == 1
    assert "holds embeddings of another model" in second.stderr
    assert _stored_ids(data_dir) and len(_stored_ids(data_dir)) == 1  # nothing mixed in


def test_missing_folder_is_a_clear_error(tmp_path):
    result = run_cli(["-m", "ingest", str(tmp_path / "nope"), "--no-progress"], service_env(tmp_path / "data", RIS_MODEL="efficientnet-lite0"))
    assert result.returncode == 1 and "is not a folder" in result.stderr
