"""Dependencies point one way: jobs -> pipeline -> model; model never imports Ray or LanceDB."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model": {"ray", "lancedb", "lance", "pipeline", "jobs"},
    "pipeline": {"jobs"},
}


def _modules(path: Path) -> set[str]:
    """Absolute module names a file imports (dotted, as written)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _imports(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _modules(path)}


def test_layers_point_one_way():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for f in (ROOT / package).rglob("*.py"):
            hit = _imports(f) & forbidden
            if hit:
                bad.append(f"{f.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, bad


def test_job_stages_never_import_the_evaluation():
    """pipeline/eval/ is a user of the job (it reads the tables the job writes), not one of its stages."""
    stages = [f for f in (ROOT / "pipeline").rglob("*.py") if "eval" not in f.relative_to(ROOT / "pipeline").parts]
    bad = [f"{f.relative_to(ROOT)} imports {sorted(m)}" for f in stages
           if (m := {n for n in _modules(f) if n == "pipeline.eval" or n.startswith("pipeline.eval.")})]
    assert stages and not bad, bad


def test_no_private_ray_imports():
    for package in ("pipeline", "jobs"):
        for f in (ROOT / package).rglob("*.py"):
            assert "ray.data._internal" not in f.read_text(), f
