"""`make help` lists every target of the Makefile, and every target is phony (issue #14).

The help target greps the Makefile for `target: ... ## text`; a target without the comment, or with a name
the grep pattern misses, silently disappears from the list. This runs the real `make help`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from infra_files import ROOT

MAKEFILE = ROOT / "Makefile"


def makefile_targets() -> set[str]:
    """Rule names: `name:` at a line start, not a variable (`name :=`), not a special target (`.PHONY`) nor
    a file rule named by a variable (`$(STAMP):`)."""
    return set(re.findall(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*:(?!=)", MAKEFILE.read_text(), flags=re.M))


def test_makefile_targets_are_found():
    assert {"help", "install", "test", "lint"} <= makefile_targets(), makefile_targets()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_help_lists_every_target():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    described = {line.split()[0]: line.split(maxsplit=1)[1:] for line in out.splitlines() if line.strip()}
    assert listed == makefile_targets(), f"make help lists {sorted(listed)}, the Makefile has {sorted(makefile_targets())}"
    assert all(described.values()), f"a target without a description: {described}"


def test_every_target_is_phony():
    """No target names a file: `make test` must run the tests even where a file called `test` exists."""
    (phony,) = re.findall(r"^\.PHONY:(.*)$", MAKEFILE.read_text(), flags=re.M)
    assert set(phony.split()) == makefile_targets()
