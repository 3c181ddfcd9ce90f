"""Benchmark scripts run end to end on the CPU: the GPU check (bench/gpu_check.py, the same script the GPU
machine runs) and the load check (bench/load_check.py --quick). No timings are asserted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import PYTHON, ROOT


def table_rows(section: str) -> list[list[str]]:
    """Body rows of the first markdown table in ``section``, as lists of cell texts."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIS_", "BENTOML_HOME"))}
    result = subprocess.run(
        [PYTHON, "bench/gpu_check.py", "--smoke", "--workdir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
    out = result.stdout
    assert "\ndevice: " in out
    _, _, rest = out.partition("## A. Embedder alone")
    part_a, _, part_b = rest.partition("## B. Through the service")
    assert part_b, out

    roles = part_a.split("\n### ")[1:]
    assert [role.split(":")[0] for role in roles] == ["similarity", "copy"], part_a
    assert "sscd-resnet50@" in roles[1]
    for role in roles:
        rows = table_rows(role)
        assert [row[0] for row in rows] == ["1", "4"]
        for row in rows:
            assert len(row) == 4 and float(row[1]) > 0 and float(row[2]) > 0
        assert "floor 0.99): ok" in role

    rows = table_rows(part_b)
    assert [row[0] for row in rows] == ["on", "off"]
    for row in rows:
        assert float(row[2]) > 0 and int(row[5]) > 0
        assert row[6] == "0 (0)"  # errors (503s)
    assert "batching on / off throughput:" in part_b
    assert out.rstrip().endswith("PASS")


@pytest.mark.slow
def test_load_check_quick_runs(tmp_path: Path) -> None:
    """bench/load_check.py --quick: its own service, the three scenarios, the table, exit 0 (no timings asserted)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIS_", "BENTOML_HOME"))}
    result = subprocess.run(
        [PYTHON, "bench/load_check.py", "--quick", "--workdir", str(tmp_path), "--json-out", str(tmp_path / "out.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
    out = result.stdout
    assert "Machine: " in out and "UNEXPECTED" not in out
    rows = table_rows(out)  # the only table in the output
    assert [row[0].split(" ")[0] for row in rows] == ["A", "B", "B:", "B:", "C"]
    for row in rows:
        assert int(row[3]) > 0  # requests
    assert out.rstrip().endswith("PASS")
    assert json.loads((tmp_path / "out.json").read_text())["pass"] is True


@pytest.mark.slow
def test_robust_search_bench_quick_runs(tmp_path: Path) -> None:
    """bench/robust_search.py --quick (recipes and the duplicate finder; no timings asserted): each recipe's
    row, with the views it stores, and the planted near duplicates found."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIS_")}
    result = subprocess.run(
        [PYTHON, "bench/robust_search.py", "--quick", "--sections", "1,4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
    rows = table_rows(result.stdout.partition("## 1. Recipes")[2])
    assert [(row[0], row[1], row[2]) for row in rows[:8]] == [
        (views, siblings, vectors)
        for views, vectors in (("(none: before)", "1"), ("low-res-64", "2"), ("crops-60", "6"), ("low-res-64,crops-60", "7"))
        for siblings in ("no", "yes")
    ]
    assert all(0 <= float(row[3]) <= 1 for row in rows[:8])
    found = result.stdout.partition("## 4. Duplicate finder")[2]
    assert "40 near groups found of 40 planted" in found, found
