"""How --device and --actors become the encoder pool, and how the report reads the pool over time (issue #17).

Pure functions, no Ray; the real autoscaling cluster runs in tests/pipeline/test_elastic_cluster.py.
"""

from __future__ import annotations

import pytest
from shared_data import minilm_dir

from pipeline.config import ActorRange, EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.elastic import actor_call, choose_layout, pool_timeline
from pipeline.run import resolve


@pytest.mark.parametrize(
    ("device", "actors", "gpus_now", "max_gpus", "want"),
    [
        # auto: the pre-#17 rule, one actor per GPU up, else the CPU count
        ("auto", None, 2, 8, ("gpu", 2, 2)),
        ("auto", None, 0, 8, ("cpu", 3, 3)),  # GPUs reachable but none up: CPU, as before
        ("auto", "4", 0, None, ("cpu", 4, 4)),  # --actors 4 on a cluster without GPUs up: four CPU actors
        # gpu: one-GPU actors whether or not a GPU is up; the default grows to what the autoscaler reaches
        ("gpu", None, 0, 8, ("gpu", 1, 8)),
        ("gpu", None, 2, None, ("gpu", 1, 2)),  # limits unreadable: up to the GPUs up now
        ("gpu", None, 0, None, ("gpu", 1, 1)),  # nothing known: still one GPU actor, to make the autoscaler act
        ("gpu", "2..4", 0, 8, ("gpu", 2, 4)),
        ("gpu", "2..4", 4, 8, ("gpu", 2, 4)),
        ("gpu", "2..", 0, 8, ("gpu", 2, 8)),
        ("gpu", "3..", 0, 2, ("gpu", 3, 3)),  # never below the minimum asked for
        ("gpu", "4", 0, None, ("gpu", 4, 4)),
        # cpu: never a GPU, even when GPUs are up
        ("cpu", None, 4, 8, ("cpu", 3, 3)),
        ("cpu", "1..2", 4, 8, ("cpu", 1, 2)),
    ],
)
def test_layout(device, actors, gpus_now, max_gpus, want):
    layout = choose_layout(device, None if actors is None else ActorRange.of(actors), gpus_now=gpus_now,
                           max_gpus=max_gpus, cpu_actors=3)
    assert (layout.device, layout.min_actors, layout.max_actors) == want
    assert layout.why.startswith(f"device {device}")  # the log line says what was chosen and why


@pytest.mark.parametrize(("text", "want"), [(4, (4, 4)), ("4", (4, 4)), ("1..4", (1, 4)), (" 2.. ", (2, None)),
                                            (ActorRange(1, 2), (1, 2))])
def test_actor_range_reads_every_form_once(text, want):
    got = ActorRange.of(text)
    assert (got.min, got.max) == want
    assert ActorRange.of(str(got)) == got  # the log's spelling reads back the same


def _cfg(**encode) -> JobConfig:
    return JobConfig(source=SourceConfig(input="unused"), encode=EncodeConfig(model=str(minilm_dir()), **encode),
                     sink=SinkConfig(db="unused", table="t"))


def test_resolve_on_a_cluster_scaled_to_zero_gpus():
    cluster = {"CPU": 2}  # the head only: the GPU group is at zero
    assert (resolve(_cfg(), cluster=cluster, max_gpus=4).gpus_per_actor) == 0  # auto: CPU, as before
    job = resolve(_cfg(device="gpu"), cluster=cluster, max_gpus=4)
    assert (job.gpus_per_actor, job.min_actors, job.actors) == (1, 1, 4)
    assert job.prepare_tasks == 2  # no GPU actor fits on the head: its CPUs are the readers'
    assert "reach 4 GPU(s)" in job.layout_why


def test_pool_timeline_counts_busy_actors_per_interval_and_names_the_nodes():
    a, b, c = "node=n1 pid=1 gpus=0", "node=n2 pid=2 gpus=0", "node=n3 pid=3 gpus=0"
    calls = [actor_call(a, 100.0, 101.0), actor_call(a, 112.0, 125.0),  # a spans intervals 1 and 2
             actor_call(b, 111.0, 112.0), actor_call(c, 141.0, 142.0)]  # nobody busy in [130, 140)
    pool = pool_timeline({k: 1 for k in calls}, interval_s=10.0)
    assert pool["counts"] == [1, 2, 1, 0, 1]
    assert (pool["min"], pool["max"], pool["actors"], pool["nodes"]) == (0, 2, 3, ["n1", "n2", "n3"])
    assert pool_timeline({})["max"] == 0


@pytest.mark.parametrize(("device", "actors", "gpus_now", "asked"),
                         [("gpu", None, 0, 8), ("gpu", "1..2", 1, 2), ("gpu", "2..4", 4, None),
                          ("auto", None, 2, None), ("cpu", "1..4", 0, None)])
def test_the_pool_starts_full_only_to_ask_the_autoscaler_for_gpus_not_up(device, actors, gpus_now, asked):
    layout = choose_layout(device, None if actors is None else ActorRange.of(actors), gpus_now=gpus_now,
                           max_gpus=8, cpu_actors=3)
    assert layout.initial_actors == asked


def test_the_ray_shim_reads_an_api_this_ray_has(ray_up):
    """pipeline/ray_shim.py is the one reader of Ray internals: pin what it relies on, so a Ray upgrade that
    moves it fails here instead of silently sizing every pool from the GPUs up now."""
    import inspect

    import ray._private.state

    from pipeline.ray_shim import autoscaler_max_gpus

    reader = ray._private.state.state.get_max_resources_from_cluster_config
    assert callable(reader) and not inspect.signature(reader).parameters
    assert autoscaler_max_gpus() is None  # a local cluster has no autoscaler, so no limits to read


def test_gpu_actors_a_private_local_ray_cannot_place_fail_before_the_job_instead_of_hanging():
    """`--device gpu` on a machine without GPUs, run locally (no RAY_ADDRESS): the job's own Ray has no
    autoscaler, so its one-GPU actors would pend forever. run_job checks this after starting that Ray."""
    from pipeline.run import check_placeable

    cluster = {"CPU": 2}
    job = resolve(_cfg(device="gpu", actors=ActorRange(1, 2)), cluster=cluster)
    with pytest.raises(ValueError, match=r"--device gpu needs 1 GPU\(s\) .* this machine has 0 .* no autoscaler"):
        check_placeable(job, gpus=0)
    check_placeable(job, gpus=1)  # the pool's minimum fits: it runs, and grows no further than the GPUs here
    check_placeable(resolve(_cfg(device="cpu"), cluster=cluster), gpus=0)
    check_placeable(resolve(_cfg(), cluster=cluster), gpus=0)  # auto on a machine without GPUs: CPU actors
