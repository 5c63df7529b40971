"""`python -m jobs.backfill ...`: the backfill job as a module, for `ray job submit` entrypoints.

Same flags as `embedlake backfill` (see jobs/cli.py for launch commands: local, ray job submit, KubeRay).
"""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["backfill", *sys.argv[1:]]))
