"""The embed job on an autoscaling cluster whose GPU nodes start at zero, come up for the job, and go away
(issue #17), on this CPU-only machine.

Ray's fake multi-node provider stands in for the cloud: a head with 2 CPUs and a `gpu_node` type of
{CPU: 1, GPU: 1}, 0 to 2 of them, that the autoscaler (v2, as KubeRay runs it) starts as local Ray nodes.
Ray's own `AutoscalingCluster` runs `ray stop --force` and reads an example YAML the wheel lacks, so the
head is ours (tests/ray_head.py: loopback only, token auth, its own process group, killed at the end) and
so is the config. The provider is named as an `external` one: the `fake_multinode` name makes autoscaler
v2 read that missing YAML for defaults. The job runs as users run it, the real CLI with RAY_ADDRESS.

Every process of the cluster is in the head's process group, and each node's processes carry the
node's id in RAY_OVERRIDE_NODE_ID_FOR_TESTING: that is how the tests see which fake node runs an
encoder actor, and how one is killed (all its processes, SIGKILL: a preempted spot node).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lance
import lancedb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ray_head import HOST, LocalHead, free_ports, local_head
from shared_data import minilm_dir

from model import load_encoder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HEAD_ID = "f" * 51 + "00000"  # the fake provider's head id; its workers are f...00001, f...00002, ...
NODE_ID_VAR = b"RAY_OVERRIDE_NODE_ID_FOR_TESTING="
ENCODER = b"MapWorker"  # in the process title of Ray Data pool actors: here only the encoders
N_DOCS = 160  # 20 encoder calls of 8 passages: long enough for a second GPU node to join and one to go
RUN_S = 150


def _autoscaler_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "elastic-test",
        "max_workers": 2,
        "idle_timeout_minutes": 1,
        "upscaling_speed": 1.0,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "disable_launch_config_check": True, "disable_node_updaters": True,
                     # Fake nodes join this address, not :6379 on the machine's network address.
                     "gcs_address": gcs_address, "launch_multiple": True, "head_node_id": HEAD_ID},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory) -> Iterator[LocalHead]:
    (gcs_port,) = free_ports(1)
    config = tmp_path_factory.mktemp("autoscaler") / "cluster.yaml"
    config.write_text(yaml.safe_dump(_autoscaler_config(f"{HOST}:{gcs_port}")))
    env = {"RAY_FAKE_CLUSTER": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node on 127.0.0.1, none on the network address
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": HEAD_ID,
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_ID, "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "PYTHONPATH": str(ROOT)}  # workers import the checkout's pipeline and model
    with local_head(num_cpus=2, extra_args=("--num-gpus", "0", "--autoscaling-config", str(config)),
                    env=env, ports={"--port": gcs_port}) as head:
        yield head


def _node_processes(head: LocalHead) -> dict[str, list[tuple[int, bytes]]]:
    """The cluster's processes by node id: (pid, command line). Ray starts workers in sessions of their
    own, so the cluster is the head's process group and every descendant of it."""
    parents, info = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        parents[pid] = (int(stat[1]), int(stat[2]))  # (ppid, pgid)
        node = next((v[len(NODE_ID_VAR):].decode() for v in environ if v.startswith(NODE_ID_VAR)), HEAD_ID)
        info[pid] = (node, cmdline)
    ours = {pid for pid, (_, pgid) in parents.items() if pgid == head.pgid}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in parents.items() if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    nodes: dict[str, list[tuple[int, bytes]]] = {}
    for pid in ours:
        node, cmdline = info[pid]
        nodes.setdefault(node, []).append((pid, cmdline))
    return nodes


def _gpu_nodes(head: LocalHead) -> dict[str, list[tuple[int, bytes]]]:
    return {n: ps for n, ps in _node_processes(head).items() if n != HEAD_ID}


def _encoder_nodes(head: LocalHead) -> set[str]:
    return {n for n, ps in _gpu_nodes(head).items() if any(ENCODER in cmd for _, cmd in ps)}


def _corpus(tmp_path: Path, passages, make_shards) -> list[str]:
    texts = passages(N_DOCS, size=450)
    (tmp_path / "in").mkdir()
    for k, shard in enumerate(make_shards(texts, shards=4)):
        pq.write_table(shard, tmp_path / "in" / f"part-{k}.parquet", row_group_size=8)
    return texts


def _start_job(head: LocalHead, tmp_path: Path, *flags: str) -> subprocess.Popen:
    """`python -m jobs.embed` joining the cluster through RAY_ADDRESS, as on a cluster's head."""
    argv = [sys.executable, "-m", "jobs.embed", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "db"),
            "--table", "docs", "--model", str(minilm_dir()), "--precision", "float32", "--sort-window", "8",
            "--commit-every-rows", "16", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | head.client_env()
    env["PYTHONPATH"] = str(ROOT)
    out = (tmp_path / "job.log").open("w")
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(job: subprocess.Popen, tmp_path: Path, during=None) -> dict:
    """Wait for the job (calling `during()` meanwhile); its stored report."""
    deadline = time.monotonic() + RUN_S
    while job.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            pytest.fail(f"the job ran over {RUN_S} s:\n{(tmp_path / 'job.log').read_text()[-4000:]}")
        if during is not None:
            during()
        time.sleep(0.3)
    log = (tmp_path / "job.log").read_text()
    assert job.returncode == 0, log[-4000:]
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "db" / "docs.reports").glob("*.json")]
    return report


def _actors(report: dict) -> list[dict[str, str]]:
    """The report's encoder actors: 'node=ab12 pid=7 gpus=0 device=cpu dtype=...' as a dict each."""
    return [dict(part.split("=", 1) for part in actor.split()) for actor in report["actors"]]


def _check_table_exact(tmp_path: Path, texts: list[str]) -> None:
    rows = lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow().sort_by("id")
    assert rows["id"].to_pylist() == [f"doc-{i:04d}" for i in range(N_DOCS)]  # each once: nothing lost or doubled
    assert rows["text"].to_pylist() == texts
    want = load_encoder(str(minilm_dir()), device="cpu", dtype=torch.float32).encode(texts)
    np.testing.assert_allclose(np.stack(rows["vector_384"].to_numpy(zero_copy_only=False)), want, atol=1e-5)


def test_device_cpu_never_asks_for_a_gpu(gpu_cluster, tmp_path, passages, make_shards):
    assert not _gpu_nodes(gpu_cluster)  # the GPU group is at zero
    texts = _corpus(tmp_path, passages, make_shards)
    seen: set[str] = set()
    report = _finish(_start_job(gpu_cluster, tmp_path, "--device", "cpu", "--actors", "1"), tmp_path,
                     during=lambda: seen.update(_gpu_nodes(gpu_cluster)))
    assert not seen, seen  # the autoscaler was never asked for a GPU node
    assert report["encoder_pool"]["device"] == "cpu"
    assert {a["gpus"] for a in _actors(report)} == {"none"}
    _check_table_exact(tmp_path, texts)


def test_device_gpu_grows_from_zero_gpu_nodes_and_a_lost_node_costs_only_its_batches(gpu_cluster, tmp_path, passages,
                                                                                       make_shards):
    """`--device gpu --actors 1..2` on a cluster with no GPU node: the autoscaler brings two up for the pool,
    whose encoders run there and only there, one GPU each, two at once; then one node is SIGKILLed mid-run
    (a preempted spot node) and the run still completes with the table exact. One run for both, as each
    costs a cluster's worth of start-up."""
    assert not _gpu_nodes(gpu_cluster), "the GPU group must start at zero"
    texts = _corpus(tmp_path, passages, make_shards)
    t0, up = time.monotonic(), {}
    job = _start_job(gpu_cluster, tmp_path, "--device", "gpu", "--actors", "1..2")
    killed: dict = {}

    def watch_then_preempt_one_node() -> None:
        """Note GPU nodes as they come up; once a window is committed and encoders run on two GPU nodes,
        SIGKILL every process of one."""
        nodes = _gpu_nodes(gpu_cluster)
        for node in nodes:
            up.setdefault(node, round(time.monotonic() - t0, 1))
        if killed:
            return
        encoders = sorted(_encoder_nodes(gpu_cluster))
        table = tmp_path / "db" / "docs.lance"
        rows = lance.dataset(str(table)).count_rows() if table.exists() and len(encoders) == 2 else 0
        if not rows:
            return
        for pid, _ in nodes.get(encoders[0], []):
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.kill(pid, signal.SIGKILL)
        killed.update({"node": encoders[0], "encoder_nodes": encoders, "rows": rows})

    report = _finish(job, tmp_path, during=watch_then_preempt_one_node)
    print(f"GPU nodes up after (s): {up}; killed {killed}; pool {report['encoder_pool']}; run {report['wall_s']} s")
    assert killed, "the run ended before two encoders were up and a window committed"
    assert killed["rows"] < N_DOCS  # the node went mid-run
    actors = _actors(report)
    assert {a["node"] for a in actors} <= set(up), (actors, up)  # on the fake GPU nodes only
    assert all(a["gpus"] != "none" and len(a["gpus"].split(",")) == 1 for a in actors)  # one GPU each
    assert len(killed["encoder_nodes"]) == 2  # two GPU nodes ran encoders at once: the pool grew past one
    pool = report["encoder_pool"]
    # Busy actors per 10 s: 2 while both nodes run, 3 in the interval where the lost node's actor gave way to
    # its replacement (both worked in it), never more.
    assert (pool["device"], pool["bounds"]) == ("gpu", [1, 2]) and 2 <= pool["max"] <= 3, pool
    _check_table_exact(tmp_path, texts)
