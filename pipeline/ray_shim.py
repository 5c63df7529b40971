"""The one place that reads Ray internals (STYLE: a host framework's private modules go through one shim,
with a test pinning what it relies on: tests/pipeline/test_elastic.py).

Ray 2.60 has no public API for how large an autoscaling cluster may grow. Its own libraries (Ray Data's
cluster autoscaler, Ray Train's worker group) read the cluster config the autoscaler reported to the GCS
(`ray._private.state`); so does this.
"""

from __future__ import annotations

import logging

log = logging.getLogger("embedlake")


def autoscaler_max_gpus() -> int | None:
    """GPUs the autoscaler may reach (per node type: GPUs x max workers, summed, capped by the cluster's
    max resources), or None when no autoscaler reported its config to the GCS, or it allows no GPU.

    Needs a connected Ray. An unlimited group (max workers -1) reads as sys.maxsize: the caller caps it.
    """
    import ray._private.state

    try:
        limits = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception as err:  # an internal API: a changed signature must not fail the job
        log.warning("could not read the autoscaler's limits from the GCS (%s: %s)", type(err).__name__, err)
        return None
    gpus = int((limits or {}).get("GPU", 0) or 0)
    return gpus or None
