"""Dependencies point one way: jobs -> pipeline -> model; model never imports Ray or LanceDB."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model": {"ray", "lancedb", "lance", "lance_ray", "pipeline", "jobs"},
    "pipeline": {"jobs"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_layers_point_one_way():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for f in (ROOT / package).rglob("*.py"):
            hit = _imports(f) & forbidden
            if hit:
                bad.append(f"{f.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, bad


def test_no_private_ray_imports():
    for package in ("pipeline", "jobs"):
        for f in (ROOT / package).rglob("*.py"):
            assert "ray.data._internal" not in f.read_text(), f
