"""The ingest job on both backends: labels, idempotency, rejected files, SIGKILL, model guard."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ingest.job import IngestJob, IngestOptions, scan_folder
from tests.support import PYTHON, ROOT, local_catalog, make_images, run_cli


def test_scan_gives_labels_from_top_level_folders(tmp_path):
    (tmp_path / "cat" / "sub").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ["cat/a.jpg", "cat/sub/b.jpg", "root.jpg", ".hidden/c.jpg", "cat/.d.jpg"]:
        (tmp_path / rel).write_bytes(b"x")
    found = {str(p.relative_to(tmp_path)): label for p, label in scan_folder(tmp_path)}
    assert found == {"cat/a.jpg": "cat", "cat/sub/b.jpg": "cat", "root.jpg": ""}


def _job(backend, embedder, **options):
    catalog = local_catalog(backend.settings(), embedder)
    return IngestJob(catalog, IngestOptions(progress=False, **options)), catalog.vectors, catalog.store


def test_ingest_then_rerun_skips_everything(backend, efficientnet, photo_set, tmp_path):
    root: Path = photo_set["root"]
    folder = tmp_path / "set"
    os.symlink(root, folder)
    # Bad files sit beside good ones and are reported, never fatal.
    extra = tmp_path / "extra"
    (extra / "junk").mkdir(parents=True)
    (extra / "junk" / "notes.txt").write_text("a sidecar: counted as not an image, not rejected")
    (extra / "junk" / "fake.png").write_text("not an image")
    good = (root / "cat" / "chelsea.jpg").read_bytes()
    (extra / "junk" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (extra / "junk" / "copy-of-chelsea.jpg").write_bytes(good)  # a duplicate of a file in the main set

    job, vectors, _ = _job(backend, efficientnet, batch_size=8, workers=2)
    expected = sum(1 for _ in scan_folder(root))
    first = job.run(folder)
    assert (first.scanned, first.ingested, first.skipped_existing, first.rejected) == (expected, expected, 0, [])
    assert first.image_count == expected

    second = job.run(extra)
    assert second.ingested == 0 and second.skipped_existing == 1 and second.not_images == 1
    reasons = {r.path: r.reason for r in second.rejected}
    assert set(reasons) == {"junk/fake.png", "junk/truncated.jpg"}
    # One rate, of what the progress bar counts: every file of the shard dealt with (not the sidecar).
    assert second.handled == 3 and second.files_per_s == pytest.approx(3 / second.seconds, rel=0.05, abs=0.06)
    assert f"{second.files_per_s:.1f} files/s" in second.summary() and "images/s" not in second.summary()
    assert json.loads(second.model_dump_json())["files_per_s"] == second.files_per_s
    assert "not an image" in reasons["junk/fake.png"] and "truncated" in reasons["junk/truncated.jpg"]

    third = job.run(folder)
    assert (third.ingested, third.skipped_existing) == (0, expected)
    assert vectors.count() == expected
    stored = vectors.get(sorted(backend.blob_ids()))
    labels = {m.source: m.label for m in stored}
    assert len(stored) == expected and labels["cat/chelsea.jpg"] == "cat" and labels["texture/brick.jpg"] == "texture"
    vectors.close()


def test_half_written_images_are_repaired_on_rerun(backend, efficientnet, photo_set):
    """Blob without vector row, and vector row without blob (a crash between the two writes)."""
    job, vectors, store = _job(backend, efficientnet, batch_size=16)
    job.run(photo_set["root"])
    lost_blob, lost_row = sorted(backend.blob_ids())[:2]
    store.delete(lost_blob)
    vectors.delete([lost_row])
    report = job.run(photo_set["root"])
    assert report.ingested == 2 and report.skipped_existing == report.scanned - 2
    assert store.exists(lost_blob, "original") and store.exists(lost_blob, "thumbnail")
    assert vectors.count() == report.scanned and vectors.existing_ids([lost_row]) == {lost_row}
    vectors.close()


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_a_clean_run(backend, efficientnet, tmp_path, request):
    from tests.support import make_backend

    folder = tmp_path / "many"
    make_images(folder, 240)
    clean = make_backend(backend.name, tmp_path / "clean", request)
    args = [PYTHON, "-m", "ingest", str(folder), "--batch-size", "8", "--no-progress"]

    process = subprocess.Popen(args, cwd=ROOT, env=backend.process_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(backend.blob_ids()) < 40 and process.poll() is None:
        time.sleep(0.1)
    assert process.poll() is None, "the ingest finished before it could be killed; make the set bigger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(backend.blob_ids())
    assert 0 < partial < 240

    rerun = run_cli([*args[1:], "--json"], backend.process_env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)
    assert report["ingested"] + report["skipped_existing"] == 240 and report["skipped_existing"] > 0
    clean_run = run_cli(["-m", "ingest", str(folder), "--no-progress"], clean.process_env())
    assert clean_run.returncode == 0, clean_run.stderr[-3000:]

    killed_ids, clean_ids = backend.stored_ids(), clean.stored_ids()
    assert len(clean_ids) == 240
    assert killed_ids == clean_ids, "the interrupted + resumed ingest must equal a clean one"
    assert backend.blob_ids() == killed_ids, "no orphan blobs, no vector without its image"


def test_ingest_with_another_model_is_refused_clearly(backend, efficientnet, photo_set):
    folder = str(photo_set["root"] / "cat")
    first = run_cli(["-m", "ingest", folder, "--no-progress"], backend.process_env(RIS_MODEL_NAME="efficientnet-lite0"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(["-m", "ingest", folder, "--no-progress"], backend.process_env(RIS_MODEL_NAME="resnet50", RIS_MODEL_RESNET50_WEIGHTS="random"))
    assert second.returncode == 1
    assert "holds embeddings of another model" in second.stderr
    assert len(backend.stored_ids()) == 1  # nothing mixed in


def test_ingest_with_another_copy_model_is_refused_before_anything_is_written(backend, efficientnet, photo_set):
    """A copy model other than the copy collection's is refused with nothing written (no originals either,
    though blobs go first in the write order)."""
    first = run_cli(["-m", "ingest", str(photo_set["root"] / "cat"), "--no-progress"], backend.process_env())
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(
        ["-m", "ingest", str(photo_set["root"]), "--no-progress"], backend.process_env(RIS_MODEL_COPY_NAME="sscd-int8")
    )
    assert second.returncode == 1, second.stderr[-3000:]
    assert "holds embeddings of another model" in second.stderr and "__copy" in second.stderr, second.stderr[-2000:]
    stored = backend.stored_ids()  # read only now: a Lite file is held by one process at a time
    assert len(stored) == 1 and backend.blob_ids() == stored


def test_a_missing_or_empty_folder_is_a_usage_error(tmp_path):
    """Exit 2 (a usage error), said plainly, with no "rerun to continue" advice: nothing was started."""
    from tests.support import service_env

    env = service_env(tmp_path / "data", RIS_MODEL_NAME="efficientnet-lite0")
    missing = run_cli(["-m", "ingest", str(tmp_path / "nope"), "--no-progress"], env)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr, missing.stderr[-2000:]
    empty = tmp_path / "empty"
    (empty / "label").mkdir(parents=True)
    (empty / ".DS_Store").write_bytes(b"\0" * 64)
    (empty / "label" / "notes.txt").write_text("no photos yet")
    result = run_cli(["-m", "ingest", str(empty), "--no-progress"], env)
    assert result.returncode == 2 and "holds no images" in result.stderr, result.stderr[-2000:]
    for answer in (missing, result):
        assert "rerun" not in answer.stderr.lower() and "Traceback" not in answer.stderr


def test_sidecar_and_hidden_files_are_skipped_not_rejected(efficientnet, tmp_path):
    """A real photo folder: editors' sidecars, notes, Thumbs.db and macOS' hidden files beside the photos
    are counted as not images (hidden ones not at all); a file that claims to be a photo and is not is
    still rejected."""
    from tests.support import service_env

    folder = tmp_path / "photos"
    make_images(folder, 3)
    label = next(p for p in folder.iterdir() if p.is_dir())
    (label / "0000.jpg.xmp").write_text("<x:xmpmeta/>")
    (label / "notes.txt").write_text("trip")
    (label / "IMG_0001.AAE").write_text("<plist/>")
    (label / "Thumbs.db").write_bytes(b"\0" * 32)
    (label / ".DS_Store").write_bytes(b"\0" * 32)
    (label / "._0000.jpg").write_bytes(b"\0" * 32)
    (label / "broken.jpg").write_bytes(b"not a jpeg")
    env = service_env(tmp_path / "data", RIS_MODEL_NAME="efficientnet-lite0")
    result = run_cli(["-m", "ingest", str(folder), "--no-progress", "--json"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ingested"] == 3 and report["not_images"] == 4, report
    assert [Path(r["path"]).name for r in report["rejected"]] == ["broken.jpg"], report["rejected"]
    assert "Warning" not in result.stderr, "library warnings (torch's) are kept out of the output"


def test_shards_split_a_folder_without_overlap_each_reading_only_its_share(efficientnet, photo_set, tmp_path):
    """N shard runs (a Kubernetes Indexed Job) together ingest every image exactly once, and each reads
    only its own files (the shard is chosen by the file's name, before any read)."""
    from bento.core.config import Settings
    from ingest.job import check_shard
    from ingest.sources import FolderSource

    class CountingFolder(FolderSource):
        def __init__(self, root):
            super().__init__(root)
            self.read_names: list[str] = []

        def read(self, file):
            self.read_names.append(file.name)
            return super().read(file)

    catalog = local_catalog(Settings(data_dir=tmp_path / "data"), efficientnet)
    vectors = catalog.vectors
    total = sum(1 for _ in scan_folder(photo_set["root"]))
    ingested, read = [], []
    for index in range(3):
        source = CountingFolder(photo_set["root"])
        job = IngestJob(catalog, IngestOptions(progress=False, shard_index=index, shard_count=3))
        report = job.run(source)
        assert report.ingested + report.other_shards == total
        assert len(source.read_names) == total - report.other_shards, "a shard reads only its own files"
        ingested.append(report.ingested)
        read.extend(source.read_names)
    assert sum(ingested) == total == vectors.count() and all(ingested), ingested
    assert sorted(read) == sorted(file.name for file in FolderSource(photo_set["root"]).files()), "each file read once"
    check_shard(0, 1)
    with pytest.raises(Exception, match="outside"):
        check_shard(3, 3)
    vectors.close()


def test_ingest_into_a_lite_file_the_service_holds_fails_at_once_with_advice(live_service, photo_set):
    """Milvus Lite allows one process per file: no minutes of retries, a clear way out instead."""
    if live_service.backend.name != "lite-local":
        pytest.skip("only Milvus Lite files are single-process")
    started = time.monotonic()
    result = run_cli(["-m", "ingest", str(photo_set["root"] / "cat"), "--no-progress"], live_service.env)
    assert result.returncode == 1 and "one process per file" in result.stderr
    assert time.monotonic() - started < 50, "a held Lite file is not an outage: no retry loop"


def test_int8_ingest_calibrates_on_its_own_folder_and_is_recorded(tmp_path, photo_set):
    """RIS_MODEL_PRECISION=int8 without a calibration folder calibrates on the photos being ingested, passes
    the fidelity guard (ResNet-50 architecture), and the collection records which runtime wrote it."""
    from pymilvus import MilvusClient

    from tests.support import Backend

    backend = Backend("lite-local", tmp_path / "data")
    env = backend.process_env(RIS_MODEL_NAME="resnet50", RIS_MODEL_RESNET50_WEIGHTS="random", RIS_MODEL_PRECISION="int8")
    done = run_cli(["-m", "ingest", str(photo_set["root"]), "--no-progress", "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "openvino-int8 built in" in done.stderr and "fidelity vs fp32" in done.stderr
    report = json.loads(done.stdout)
    assert report["ingested"] + report["duplicates"] == report["scanned"] - len(report["rejected"])
    client = MilvusClient(uri=backend.settings().milvus.uri)
    try:
        properties = client.describe_collection(backend.settings().milvus.collection)["properties"]
    finally:
        client.close()
    assert properties["ris.runtimes"] == "openvino-int8"
