"""How a job's defaults are decided against the model and the cluster (no Ray needed: the cluster is given)."""

from __future__ import annotations

import pytest
from shared_data import minilm_dir

from pipeline.config import EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.run import resolve


def _cfg(**encode) -> JobConfig:
    return JobConfig(source=SourceConfig(input="unused"), encode=EncodeConfig(model=str(minilm_dir()), **encode),
                     sink=SinkConfig(db="unused", table="t"))


@pytest.mark.parametrize(
    ("cluster", "encode", "want"),
    [
        # (actors, gpus per actor, torch threads, concurrent prepare tasks)
        ({"CPU": 2}, {}, (1, 0, 2, 1)),  # one CPU actor computing on both cores; one prepare task
        ({"CPU": 16}, {}, (8, 0, 2, 8)),
        ({"CPU": 2}, {"actors": 2, "cpus_per_actor": 0.75}, (2, 0, 1, 1)),
        ({"CPU": 16, "GPU": 2}, {}, (2, 1, 8, 14)),  # GPU actors leave 14 cores to tokenize
    ],
)
def test_layout_follows_the_cluster(cluster, encode, want):
    job = resolve(_cfg(**encode), cluster=cluster)
    assert (job.actors, job.gpus_per_actor, job.cpu_threads, job.prepare_tasks) == want


def test_dims_are_checked_by_the_models_rule_once_each():
    assert resolve(_cfg(dims=(64, 384, 64)), cluster={"CPU": 2}).dims == (64, 384)
    assert resolve(_cfg(), cluster={"CPU": 2}).dims == (384,)  # none asked: the full dim
    with pytest.raises(ValueError, match=r"dim 385 is not available from .*; valid dims: 1\.\.384"):
        resolve(_cfg(dims=(64, 385)), cluster={"CPU": 2})
