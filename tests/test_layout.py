"""The layout's rules, checked: the import contracts (and that they catch a violation), settings that
agree with the model registry without importing it, the vector operations declared once, and the one
way to build the catalog."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "violation", "broken"),
    [
        ("bento/core/errors.py", "import bento.http.edge", "bento.core is not allowed to import bento.http"),
        ("models/preprocess.py", "import bento.domain.catalog", "models is not allowed to import bento.domain"),
        ("bento/domain/listing.py", "import bento.adapters.vectors", "bento.domain is not allowed to import bento.adapters"),
        ("bento/core/config.py", "import models.backbones", "bento.core.config is not allowed to import models"),
        ("models/runtime.py", "import models.store", "No cycles are allowed in models"),  # a cycle in a layer
    ],
)
def test_a_deliberate_violation_breaks_a_contract(tmp_path, module, violation, broken):
    """The contracts are not vacuous: one import against the rule, in a copy of the tree, fails the check."""
    for package in ("bento", "models", "ingest"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{violation}  # deliberate\n")
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1, result.stdout[-3000:]
    assert "BROKEN" in result.stdout and broken in result.stdout, result.stdout[-3000:]


def test_the_settings_accept_exactly_the_registry_s_models_and_views():
    """bento.core.config lists the choices itself (it may not import models/); they must be the registry's."""
    from bento.core import config
    from models.backbones import model_choices
    from models.preprocess import VIEW_SETS

    assert config.SIMILARITY_MODELS == model_choices()
    assert config.COPY_MODELS == model_choices("copy")
    assert config.VIEW_SET_NAMES == tuple(VIEW_SETS)


def _public_methods(cls: type) -> dict[str, list[str]]:
    return {
        name: list(inspect.signature(member).parameters)[1:]
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_the_vector_operations_are_declared_once():
    """The VectorStore port declares them; the Milvus adapter and the RPC client implement each with the
    same parameters, and the VectorSearch service serves nothing else (but its health probe)."""
    from bento.adapters.remote import RemoteVectors
    from bento.adapters.vectors import VectorIndex
    from bento.domain.ports import VectorStore

    declared = _public_methods(VectorStore)
    assert len(declared) >= 15, declared
    for implementation in (VectorIndex, RemoteVectors):
        methods = _public_methods(implementation)
        for name, parameters in declared.items():
            assert name in methods, f"{implementation.__name__} lacks {name}"
            assert methods[name][: len(parameters)] == parameters, f"{implementation.__name__}.{name}{methods[name]}"
    import service

    served = set(service.VectorSearch.apis)
    assert served and served - {"health"} <= set(declared), served - set(declared)


def test_the_catalog_is_built_in_one_place():
    """Every entry point builds its catalog through bento.adapters.assembly.open_catalog, which reads the
    settings (limits, thumbnails, verdict thresholds): no caller assembles one by hand and forgets a part."""
    built_at = []
    for path in [ROOT / "service.py", *(ROOT / "bento").rglob("*.py"), *(ROOT / "ingest").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        if re.search(r"(?<![\w.])Catalog\(", path.read_text()):
            built_at.append(path.relative_to(ROOT).as_posix())
    assert built_at == ["bento/adapters/assembly.py"]
