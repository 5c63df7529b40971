"""Faults inside one run (issue #12 "Exactly-once resume", issue #13 "Files and storage").

An encoder actor killed, a worker node removed, a writer task's process dying after it wrote
fragments, a flaky and a briefly unreachable S3 endpoint: each run must end with the table an
uninterrupted run writes (same (id, chunk, content_hash) set, vectors within 1e-4 at float32, no
duplicates), or fail cleanly so that a re-run of the same command completes it exactly.

Real components only: the session's local Ray or a two-node `ray.cluster_utils.Cluster`, real Lance
tables, the moto S3 server behind a loopback HTTP proxy that injects the faults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster
from test_cluster import OBJECT_STORE, _forget_address_file
from test_incremental import assert_same_table, config, corpus, rows, write_corpus

from pipeline.commit import LanceCommitter
from pipeline.preflight import check_input
from pipeline.run import LIGHT_TASK_CPUS, build_dataset, output_schema, resolve, run_job, table_metadata
from pipeline.sink import WRITER_MAX_RETRIES, table_uri, write_dataset
from pipeline.storage import StorageConfig

DOCS, WINDOW = 96, 20  # ~5 encoder calls of 20 documents, a commit window after each
ENCODER = "MapWorker(MapBatches(EmbedStage))"  # Ray Data's class name for the EmbedStage pool actors


@pytest.fixture(scope="module")
def reference(ray_up, tmp_path_factory, passages) -> tuple[str, pa.Table]:
    """The corpus (local Parquet shards) and the table an uninterrupted run makes of it."""
    root = tmp_path_factory.mktemp("faults")
    src = write_corpus(root / "in", corpus(passages, DOCS, seed=3))
    db = str(root / "reference")
    run_job(config(src, db, "docs", commit_every_rows=WINDOW))
    want = rows(db, "docs")
    assert want.num_rows > 2 * WINDOW
    return src, want


def _latest_what(uri: str, storage_options: dict[str, str]) -> str | None:
    """`embedlake.what` of the table's latest commit ("window", "metadata", "complete"), None if none."""
    try:
        ds = lance.dataset(uri, storage_options=storage_options)
        return ds.read_transaction(ds.version).transaction_properties.get("embedlake.what")
    except (OSError, ValueError):
        return None


class AfterFirstWindow(threading.Thread):
    """Runs `action()` once the run's first window is committed; records what the table said then."""

    def __init__(self, uri: str, action: Callable[[], object], storage_options: dict[str, str] | None = None,
                 timeout_s: float = 240):
        super().__init__(daemon=True)
        self.uri, self.action, self.storage_options, self.timeout_s = uri, action, storage_options or {}, timeout_s
        self.result: object = None
        self.error: BaseException | None = None
        self.state_at_action: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                what = _latest_what(self.uri, self.storage_options)
                if what in ("window", "complete"):
                    self.state_at_action = what
                    self.result = self.action()
                    return
                time.sleep(0.05)
        except BaseException as e:  # surfaced by check()
            self.error = e

    def check(self) -> object:
        """The action's result, after asserting that it ran while the run was still writing windows."""
        self.join(timeout=60)
        if self.error is not None:
            raise self.error
        assert self.state_at_action == "window", f"the fault came too late (table state {self.state_at_action})"
        return self.result


def _encoder_actors() -> list[dict]:
    # ray.util.state.list_actors needs the dashboard, which the test clusters run without; this is
    # the same GCS actor table it reads.
    from ray._private.state import actors

    return [a for a in actors().values() if a["ActorClassName"] == ENCODER and a["State"] == "ALIVE"]


def _wait_for_encoder(timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while not (alive := _encoder_actors()):
        assert time.monotonic() < deadline, "no live encoder actor"
        time.sleep(0.05)
    return alive[0]


def _kill_encoder() -> int:
    """SIGKILL the encoder actor's process (a crash, not a graceful exit); returns its pid."""
    pid = _wait_for_encoder()["Pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def _assert_exact(report: dict, got: pa.Table, want: pa.Table) -> None:
    ids = list(zip(got["id"].to_pylist(), got["chunk"].to_pylist(), strict=True))
    assert len(ids) == len(set(ids)), "duplicate (id, chunk) rows"
    assert report["chunks_written"] == want.num_rows
    assert sum(report["actors"].values()) == want.num_rows  # chunk rows embedded, per actor: none twice
    assert_same_table(got, want)


# --------------------------------------------------------------------------------------------------
# Ray restarts and retries within one run
# --------------------------------------------------------------------------------------------------


def test_encoder_actor_killed_mid_run_is_restarted_and_exactly_once(reference, tmp_path):
    src, want = reference
    db = str(tmp_path / "db")
    killer = AfterFirstWindow(table_uri(db, "docs"), _kill_encoder)
    killer.start()
    report = run_job(config(src, db, "docs", commit_every_rows=WINDOW))
    killed = killer.check()

    # Ray Data pool actors have max_restarts=-1 and max_task_retries=-1: the pool's actor came back
    # (a new process) and redid the call the killed one had in flight.
    pids = {a.split("pid=")[1].split()[0] for a in report["actors"]}
    assert str(killed) in pids and len(pids) == 2, report["actors"]
    _assert_exact(report, rows(db, "docs"), want)


def _die_once_after_a_write(marker: Path, data_dir: Path) -> Callable[[pa.Table], pa.Table]:
    """A stage fused into the writer task: its first run arms a watcher that exits the process as soon
    as the writer beside it has finished a data file.

    The task still has batches to write then, so its result never reaches the driver; Ray retries it
    (a system failure), and the retry writes every fragment again under new names.
    """

    def stage(batch: pa.Table) -> pa.Table:
        try:
            with open(marker, "x") as fh:  # armed once, in one task of the whole run
                fh.write(ray.get_runtime_context().get_task_id())
        except FileExistsError:
            return batch
        before = set(data_dir.glob("*.lance"))

        def watch() -> None:
            while not set(data_dir.glob("*.lance")) - before:
                time.sleep(0.002)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
        return batch

    return stage


def test_writer_task_dying_after_a_write_is_retried_and_committed_once(reference, tmp_path):
    src, want = reference
    cfg = config(src, str(tmp_path / "db"), "docs", commit_every_rows=WINDOW)
    job = resolve(cfg)
    files, source = check_input(cfg.source, job.storage)
    uri = table_uri(cfg.sink.db, cfg.sink.table)
    committer = LanceCommitter(uri, output_schema(job, source), job.storage,
                               "create", table_metadata(job, "create"), commit_every_rows=WINDOW)
    committer.begin()
    marker = tmp_path / "writer-failed"
    per_call = 8  # rows per writer call: several calls, so several fragments, per writer task
    # The same remote args as the writer, so Ray Data fuses this stage into the writer's tasks.
    ds = build_dataset(job, files).map_batches(
        _die_once_after_a_write(marker, Path(uri, "data")), batch_format="pyarrow", batch_size=per_call,
        compute=ray.data.TaskPoolStrategy(size=1), num_cpus=LIGHT_TASK_CPUS, max_retries=WRITER_MAX_RETRIES)
    summary = write_dataset(ds, committer, writer_num_cpus=LIGHT_TASK_CPUS, batch_size=per_call)

    assert marker.exists(), "no writer task failed"
    table = lance.dataset(uri)
    referenced = {f.path for frag in table.get_fragments() for f in frag.data_files()}
    on_disk = {p.name for p in Path(uri, "data").glob("*.lance")}
    assert referenced < on_disk, "the failed attempt wrote no fragment: the fault hit before any write"
    assert summary.rows_committed == want.num_rows
    got = rows(cfg.sink.db, cfg.sink.table)
    assert got.num_rows == want.num_rows
    assert_same_table(got, want)


# --------------------------------------------------------------------------------------------------
# A worker node removed from a two-node cluster
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def two_nodes(spread_over_actors) -> Iterator[Cluster]:
    """A head without GPUs and a worker with one logical GPU: the one encoder actor runs on the worker."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "num_gpus": 0, "object_store_memory": OBJECT_STORE})
    try:
        _forget_address_file(cluster.address)
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        with spread_over_actors():
            yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_worker_node_removed_mid_run_is_exactly_once(reference, tmp_path, two_nodes):
    src, want = reference
    db = str(tmp_path / "db")
    # The job runs in a thread: Cluster.add_node starts processes and must run on the main thread.
    job = RunInThread(config(src, db, "docs", commit_every_rows=WINDOW))
    deadline = time.monotonic() + 240
    while _latest_what(table_uri(db, "docs"), {}) not in ("window", "complete"):
        assert time.monotonic() < deadline and job.is_alive(), "no window was committed"
        time.sleep(0.05)
    assert _latest_what(table_uri(db, "docs"), {}) == "window", "the run ended before the node could be removed"
    node_id = _wait_for_encoder()["Address"]["NodeID"]
    [node] = [n for n in two_nodes.worker_nodes if n.node_id == node_id]
    two_nodes.remove_node(node, allow_graceful=False)
    # A preemptible node's replacement: the restarted actor needs a node with a GPU to land on.
    two_nodes.add_node(num_cpus=2, num_gpus=1, object_store_memory=OBJECT_STORE)
    report = job.result(timeout_s=300)

    assert node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    _assert_exact(report, rows(db, "docs"), want)


class RunInThread(threading.Thread):
    """`run_job(cfg)` on a daemon thread; `result()` joins and returns the report or raises its error."""

    def __init__(self, cfg: object):
        super().__init__(daemon=True)
        self.cfg = cfg
        self.report: dict | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.report = run_job(self.cfg)
        except BaseException as e:  # re-raised by result()
            self.error = e

    def result(self, timeout_s: float) -> dict:
        self.join(timeout=timeout_s)
        assert not self.is_alive(), f"the run did not finish within {timeout_s} s of the fault"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


# --------------------------------------------------------------------------------------------------
# Flaky S3: a loopback proxy in front of moto
# --------------------------------------------------------------------------------------------------

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te"}


class FlakyS3Proxy(ThreadingHTTPServer):
    """An HTTP/1.1 proxy on 127.0.0.1 in front of the moto server that fails a share of requests.

    Each request, chosen by a seeded RNG, is answered with 503 SlowDown, or its connection is reset
    (RST) before anything is forwarded, or it is forwarded. `outage(s)` resets every request for
    `s` seconds: the endpoint is unreachable. The proxy stops itself after `lifetime_s`.
    """

    daemon_threads = True

    def __init__(self, target: str, *, slowdown: float, reset: float, seed: int = 0, lifetime_s: float = 300):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.slowdown, self.reset = slowdown, reset
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.conditional_seen = 0
        self.reset_conditional: set[int] = set()  # which conditional PUTs (1-based) to reset
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.shutdown)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> FlakyS3Proxy:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self.shutdown()
        self.server_close()

    def outage(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds

    def fault(self, *, conditional: bool) -> str:
        """What to do with the next request. A conditional PUT (a Lance commit's PUT-if-absent) is reset
        only during an outage or when `reset_conditional` names it: a reset one is not retried, see
        `test_reset_commit_put_fails_cleanly_and_resumes`."""
        with self._lock:
            if time.monotonic() < self._down_until:
                kind = "outage"
            else:
                r = self._rng.random()
                kind = "slowdown" if r < self.slowdown else "reset" if r < self.slowdown + self.reset else "forward"
                if kind == "reset" and conditional:
                    kind = "forward"
                if conditional:
                    self.conditional_seen += 1
                    if self.conditional_seen in self.reset_conditional:
                        kind = "reset"
            self.counts[kind] += 1
            return kind


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it
    server: FlakyS3Proxy

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _handle(self) -> None:
        body = self._body()
        # A Lance commit writes its manifest with a conditional PUT (If-None-Match: *).
        conditional = self.command == "PUT" and ("If-None-Match" in self.headers or "If-Match" in self.headers)
        fault = self.server.fault(conditional=conditional)
        if fault in ("reset", "outage"):
            self._reset()
            return
        if fault == "slowdown":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOWDOWN_BODY)
            return
        upstream = http.client.HTTPConnection(*self.server.target, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
        finally:
            upstream.close()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the socket _reset() closed
            super().finish()


def _upload_corpus(local: str, moto_s3, prefix: str) -> str:
    """The corpus shards written straight to moto (no proxy); returns the input URL."""
    url = moto_s3.url(prefix, "in")
    fs = StorageConfig(moto_s3.storage_options).pyarrow_filesystem(url)
    for f in sorted(Path(local).glob("*.parquet")):
        pq.write_table(pq.read_table(f), f"{url.removeprefix('s3://')}/{f.name}", filesystem=fs)
    return url


def _s3_config(src: str, db: str, moto_s3, proxy: FlakyS3Proxy) -> object:
    cfg = config(src, db, "docs", commit_every_rows=WINDOW)
    return dataclasses.replace(cfg, storage_options={**moto_s3.storage_options, "endpoint": proxy.url})


def _s3_rows(db: str, moto_s3) -> pa.Table:
    """The table read straight from moto."""
    ds = lance.dataset(table_uri(db, "docs"), storage_options=moto_s3.storage_options)
    return ds.to_table().sort_by([("id", "ascending"), ("chunk", "ascending")])


def test_flaky_s3_input_and_output_lose_and_duplicate_nothing(reference, moto_s3, tmp_path):
    src, want = reference
    prefix = f"flaky-{tmp_path.name}"
    s3_src, db = _upload_corpus(src, moto_s3, prefix), moto_s3.url(prefix, "db")
    with FlakyS3Proxy(moto_s3.endpoint_url, slowdown=0.12, reset=0.12, seed=1) as proxy:
        report = run_job(_s3_config(s3_src, db, moto_s3, proxy))
    assert proxy.counts["slowdown"] >= 3 and proxy.counts["reset"] >= 3, proxy.counts  # faults were injected
    _assert_exact(report, _s3_rows(db, moto_s3), want)


def _assert_whole_windows(partial: pa.Table, want: pa.Table) -> None:
    """A failed run's table: no duplicates, and only whole documents of the uninterrupted run's."""
    key = ["id", "chunk", "content_hash"]
    got = set(zip(*(partial[k].to_pylist() for k in key), strict=True))
    assert len(got) == partial.num_rows, "duplicate rows"
    wanted = set(zip(*(want[k].to_pylist() for k in key), strict=True))
    ids = {i for i, _, _ in got}
    assert got == {r for r in wanted if r[0] in ids}, "a document was committed in part"
    assert len(got) < len(wanted)


def _complete_or_resume(cfg: object, moto_s3, want: pa.Table) -> tuple[str, str]:
    """Run; if the run fails, its committed windows must be whole and a re-run of the same command
    (a new run id, the same job) must resume and complete. Returns (what happened, the error)."""
    try:
        run_job(cfg)
        return "completed", ""
    except Exception as e:  # the run failed: what it committed must hold, and a re-run finish it
        _assert_whole_windows(_s3_rows(cfg.sink.db, moto_s3), want)
        report = run_job(dataclasses.replace(cfg, run_id=cfg.run_id + "r"))
        assert report["resumed_from"] is not None, report
        return "resumed", f"{type(e).__name__}: {e}"


def test_reset_commit_put_is_checked_and_retried(reference, moto_s3, tmp_path):
    """A connection reset on a commit's conditional PUT is not retried by Lance's object store client
    (it cannot know whether the PUT landed); the committer looks for its transaction among the new
    versions and commits again only if it is not there (`pipeline.commit.commit_once`): the run
    completes, exactly."""
    src, want = reference
    prefix = f"commitreset-{tmp_path.name}"
    s3_src, db = _upload_corpus(src, moto_s3, prefix), moto_s3.url(prefix, "db")
    with FlakyS3Proxy(moto_s3.endpoint_url, slowdown=0.0, reset=0.0) as proxy:
        # Conditional PUTs, in order: the table, its metadata, the rejected table, the duplicate-id
        # index, its BTREE index, then the windows: reset one of each kind.
        proxy.reset_conditional = {2, 4, 7, 9}
        outcome, error = _complete_or_resume(_s3_config(s3_src, db, moto_s3, proxy), moto_s3, want)
    assert proxy.counts["reset"] == 4, proxy.counts
    assert outcome == "completed", (outcome, error)
    assert_same_table(_s3_rows(db, moto_s3), want)


@pytest.mark.slow
def test_s3_outage_mid_write_rides_it_out_or_resumes_exactly(reference, moto_s3, tmp_path):
    src, want = reference
    prefix = f"outage-{tmp_path.name}"
    s3_src, db = _upload_corpus(src, moto_s3, prefix), moto_s3.url(prefix, "db")
    with FlakyS3Proxy(moto_s3.endpoint_url, slowdown=0.0, reset=0.0) as proxy:
        cfg = _s3_config(s3_src, db, moto_s3, proxy)
        outage = AfterFirstWindow(table_uri(db, "docs"), lambda: proxy.outage(10), moto_s3.storage_options)
        outage.start()
        _complete_or_resume(cfg, moto_s3, want)
        outage.check()
    assert proxy.counts["outage"] > 0, proxy.counts  # requests failed while the endpoint was down
    got = _s3_rows(db, moto_s3)
    assert got.num_rows == len(set(zip(got["id"].to_pylist(), got["chunk"].to_pylist(), strict=True)))
    assert_same_table(got, want)
