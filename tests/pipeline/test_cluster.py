"""The embed job on differently shaped Ray clusters: GPU pinning without GPUs, and two nodes.

Each test starts its own cluster (shutting down the session's local Ray first) and shuts it down at
the end; tests/conftest.py brings the session's `ray_local` back for later tests that ask for it.
Ray's logical GPUs need no CUDA: `num_gpus=1` actors get distinct GPU ids, and `EmbedStage` runs
on CPU when torch sees no device.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import lancedb
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from shared_data import minilm_dir

from model import load_encoder
from pipeline.config import EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.run import resolve, run_job

OBJECT_STORE = 200 * 1024 * 1024  # per node; the default (30% of RAM) is far more than these jobs need
N_DOCS = 64  # passages: 8 or more actor calls of ~0.3 s each


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(str(minilm_dir()), device="cpu", dtype=torch.float32)


@pytest.fixture
def own_ray(spread_over_actors) -> Iterator[None]:
    """No Ray before the test, none after it; Ray Data set so that both actors get work."""
    ray.shutdown()
    with spread_over_actors():
        try:
            yield
        finally:
            ray.shutdown()


def _job(tmp_path, texts, make_shards, write_shards) -> JobConfig:
    # Row groups of one actor call (8 documents): every shard becomes two read blocks, so bundles reach
    # the pool in pairs and the second goes to the other actor while the first is busy. With one block
    # per shard, prepare tasks slower than the encoder (each looks its ids up in Lance) let one actor
    # take every bundle (seen once in a full run).
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    for k, shard in enumerate(make_shards(texts, shards=4)):
        pq.write_table(shard, tmp_path / "in" / f"part-{k}.parquet", row_group_size=8)
    return JobConfig(
        source=SourceConfig(input=str(tmp_path / "in"), keep_columns=("n",)),
        # actors=None: resolve() decides (one per GPU). sort_window: documents per actor call.
        encode=EncodeConfig(model=str(minilm_dir()), dims=(384, 64), sort_window=8, precision="float32"),
        sink=SinkConfig(db=str(tmp_path / "db"), table="docs"),
    )


def _check_rows_exact(cfg: JobConfig, report: dict, expected: list[str], minilm) -> None:
    rows = lancedb.connect(cfg.sink.db).open_table("docs").to_arrow().sort_by("id")
    assert rows.num_rows == report["chunks_written"] == report["documents_embedded"] == N_DOCS
    assert rows["id"].to_pylist() == [f"doc-{i:04d}" for i in range(N_DOCS)]
    assert rows["text"].to_pylist() == expected and rows["n"].to_pylist() == list(range(N_DOCS))
    for d in (384, 64):
        got = np.stack(rows[f"vector_{d}"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, minilm.encode(expected, dim=None if d == 384 else d), atol=1e-5)
    assert sum(report["actors"].values()) == N_DOCS


def _forget_address_file(address: str) -> None:
    """Keep other processes on this machine off our test cluster.

    `Cluster` records its address in /tmp/ray/ray_current_cluster "for convenience in unit testing", so
    that any `ray.init()` without an address, in any process here, joins it (and one passing num_cpus
    fails). We connect by explicit address, so the record is removed, and only if it is ours.
    """
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.is_file() and path.read_text().strip() == address:
        path.unlink()


def _parse(actor: str) -> dict[str, str]:
    """'node=ab12 pid=7 gpus=0 device=cpu' -> {'node': 'ab12', 'pid': '7', 'gpus': '0', 'device': 'cpu'}."""
    return dict(re.findall(r"(\w+)=(\S+)", actor))


def test_one_actor_per_gpu_pinned_to_distinct_gpus(
    own_ray, tmp_path, passages, make_shards, write_shards, minilm
):
    ray.init(
        address="local", num_cpus=4, num_gpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE
    )
    texts = passages(N_DOCS)
    cfg = _job(tmp_path, texts, make_shards, write_shards)
    job = resolve(cfg)
    assert (job.actors, job.gpus_per_actor) == (2, 1)

    report = run_job(cfg)

    actors = [_parse(a) for a in report["actors"]]
    assert len(actors) == 2, report["actors"]
    assert sorted(a["gpus"] for a in actors) == ["0", "1"]  # each actor pinned to its own GPU
    assert {a["device"] for a in actors} == {"cpu"}  # no CUDA here: the encoder fell back to CPU
    assert len({a["pid"] for a in actors}) == 2
    _check_rows_exact(cfg, report, texts, minilm)


def test_two_node_cluster_one_actor_per_node(own_ray, tmp_path, passages, make_shards, write_shards, minilm):
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 1, "object_store_memory": OBJECT_STORE},
    )
    try:
        # One GPU per node: the two GPU-pinned actors cannot share a node.
        _forget_address_file(cluster.address)
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2

        texts = passages(N_DOCS)
        cfg = _job(tmp_path, texts, make_shards, write_shards)
        assert resolve(cfg).actors == 2
        report = run_job(cfg)

        actors = [_parse(a) for a in report["actors"]]
        assert len(actors) == 2, report["actors"]
        assert {a["node"] for a in actors} == nodes  # one actor on each node
        assert [a["gpus"] for a in actors] == ["0", "0"]  # each node's only GPU
        _check_rows_exact(cfg, report, texts, minilm)
    finally:
        ray.shutdown()
        cluster.shutdown()
