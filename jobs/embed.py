"""`python -m jobs.embed ...`: the embed job as a module, for `ray job submit` entrypoints.

Same flags as `embedlake embed` (see jobs/cli.py for launch commands: local, ray job submit, KubeRay).
"""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
