"""`ris`, the one command (ingest/cli.py, a [project.scripts] entry): every subcommand's help, the version,
the settings table, search in this process with its table and --json, and the exit codes (0 done, 1 the
work failed, 2 a usage error)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bento.core.ids import content_hash
from tests.support import PYTHON, ROOT, run_cli, service_env

RIS = str(Path(PYTHON).parent / "ris")
SUBCOMMANDS = ["search", "ingest", "evaluate", "duplicates", "reembed", "backup", "restore", "models", "keys", "settings"]


def ris(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RIS, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return service_env(tmp_path / "data", RIS_MODEL_NAME="efficientnet-lite0")


def test_version_and_the_list_of_commands(env):
    from ingest.cli import product_version

    version = ris(["--version"], env)
    assert version.returncode == 0 and version.stdout.strip() == f"ris {product_version()}" != "ris unknown"
    listing = ris(["--help"], env)
    assert listing.returncode == 0
    for command in SUBCOMMANDS:
        assert f"    {command}" in listing.stdout, command
    assert "Exit codes" in listing.stdout
    assert ris([], env).returncode == 2  # a command is required


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_under_its_ris_name(env, command):
    answer = ris([command, "--help"], env)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.startswith(f"usage: ris {command}"), answer.stdout[:200]


def test_settings_as_a_table_as_json_and_into_a_closed_pipe(env):
    rows = json.loads(ris(["settings", "--json"], env).stdout)
    by_name = {row["variable"]: row for row in rows}
    assert by_name["RIS_MODEL_NAME"]["default"] == "auto" and by_name["RIS_MODEL_NAME"]["meaning"]
    assert len(rows) > 40
    # `ris settings | head -1`: the reader leaves early; no BrokenPipe traceback.
    piped = subprocess.run(f"'{RIS}' settings | head -1", shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert piped.stdout.startswith("| variable") and "Traceback" not in piped.stderr, piped.stderr[-2000:]
    same = subprocess.run([PYTHON, "-m", "bento.core.config", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert same.returncode == 0 and same.stdout.startswith("usage:")


def test_usage_errors_exit_2_and_failures_exit_1(env, tmp_path):
    missing = ris(["search", str(tmp_path / "nope.jpg")], env)
    assert missing.returncode == 2 and "is not a file" in missing.stderr and "Traceback" not in missing.stderr
    image = tmp_path / "q.jpg"
    image.write_bytes(b"\xff\xd8 not really")
    assert ris(["search", str(image), "--top-k", "0"], env).returncode == 2
    assert ris(["search", str(image), "--mode", "nonsense"], env).returncode == 2
    bad_setting = ris(["search", str(image)], {**env, "RIS_MILVUS_TIMEOUT_S": "soon"})
    assert bad_setting.returncode == 2 and "settings are invalid" in bad_setting.stderr
    unreachable = ris(["search", str(image), "--service-url", "http://127.0.0.1:9"], env)
    assert unreachable.returncode == 1 and "search failed" in unreachable.stderr and "Traceback" not in unreachable.stderr


def test_search_in_this_process_as_a_table_and_as_json(efficientnet, photo_set, env, tmp_path):
    folder = photo_set["root"] / "cat"
    ingested = run_cli(["-m", "ingest", str(folder), "--no-progress"], env)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    original = next(p for p in folder.iterdir() if p.is_file())
    as_json = ris(["search", str(original), "--json", "--top-k", "3"], env)
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    answer = json.loads(as_json.stdout)
    assert answer["hits"][0]["id"] == content_hash(original.read_bytes()) and answer["top_k"] == 3
    table = ris(["search", str(original), "--mode", "similar"], env)
    assert table.returncode == 0, table.stderr[-3000:]
    header, first = table.stdout.splitlines()[:2]
    assert header.split()[:3] == ["#", "score", "verdict"], header
    assert first.split()[0] == "1" and content_hash(original.read_bytes())[:12] in first, first
    assert "hits;" in table.stdout.splitlines()[-1]

    # The duplicate report of the same collection, as a table and as JSON (one image per content: none).
    report = ris(["duplicates", "--threshold", "0.99"], env)
    assert report.returncode == 0, report.stderr[-3000:]
    images = sum(1 for p in folder.iterdir() if p.is_file())
    assert report.stdout.startswith(f"{images} images:") and "s comparing" in report.stdout, report.stdout
    as_json = json.loads(ris(["duplicates", "--threshold", "0.99", "--json"], env).stdout)
    assert as_json["image_count"] == images and as_json["compare_ms"] >= 0
    # Without --threshold, the rule of the service's duplicate review: the copy model's vectors and its
    # measured threshold where one serves (here the packaged student), else the similarity model's.
    from models.packaged import PACKAGED

    by_copies = json.loads(ris(["duplicates", "--json"], env).stdout)
    assert by_copies["near_duplicate_threshold"] == PACKAGED["sscd-distilled"].thresholds[""][1]
    assert by_copies["image_count"] == images

    # An image without its copy vector (added before the copy model) would be left out of that report: refused,
    # saying what to run. (It also shows the report reads the copy collection.)
    from milvus_lite.server_manager import server_manager_instance
    from pymilvus import MilvusClient

    from bento.adapters.vectors import copy_collection
    from bento.core.config import settings_from

    settings = settings_from(env)
    client = MilvusClient(uri=settings.milvus.uri)
    try:
        client.delete(copy_collection(settings.milvus.collection), filter="view == 0")
    finally:
        client.close()
        server_manager_instance.release_server(settings.milvus.uri)  # the file is one process's at a time
    partial = ris(["duplicates"], env)
    assert partial.returncode == 1 and "have no copy vector" in partial.stderr and "ris reembed" in partial.stderr, partial.stderr
