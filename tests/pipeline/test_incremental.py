"""Re-embedding and resume end to end: real Ray, real LanceDB, MiniLM, late chunking.

The table must always equal a from-scratch run of the current corpus: same (id, chunk, content_hash)
set, equal vectors; and a re-run must embed only what changed or what a killed run did not commit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import minilm_dir

from pipeline.config import ChunkingConfig, EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.run import run_job
from pipeline.sink import table_uri

ROOT = Path(__file__).resolve().parents[2]
DIMS = (384, 64)
ATOL = 1e-4


def corpus(passages, n: int, *, seed: int = 0) -> dict[str, str]:
    """n passages of varied length (1-4 late chunks of 64 tokens each)."""
    rng = np.random.default_rng(seed)
    base = passages(n)
    return {f"doc-{i:04d}": p[: int(rng.integers(150, 900))] for i, p in enumerate(base)}


def write_corpus(root: Path, docs: dict[str, str], shards: int = 4) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*.parquet"):
        old.unlink()
    ids = sorted(docs)
    per = -(-len(ids) // shards)
    for k in range(shards):
        part = ids[k * per:(k + 1) * per]
        pq.write_table(pa.table({"id": part, "text": [docs[i] for i in part]}), root / f"part-{k}.parquet")
    return str(root)


def config(src: str, db: str, table: str, **sink) -> JobConfig:
    return JobConfig(
        source=SourceConfig(input=src),
        encode=EncodeConfig(model=str(minilm_dir()), dims=DIMS, actors=1, precision="float32"),
        sink=SinkConfig(db=db, table=table, commit_every_rows=sink.pop("commit_every_rows", 50), **sink),
        chunking=ChunkingConfig(mode="fixed", chunk_tokens=64),
        run_id=uuid.uuid4().hex[:12],
    )


def rows(db: str, table: str) -> pa.Table:
    return lance.dataset(table_uri(db, table)).to_table().sort_by([("id", "ascending"), ("chunk", "ascending")])


def assert_same_table(got: pa.Table, want: pa.Table) -> None:
    key = ["id", "chunk", "content_hash", "start", "end", "text"]
    assert got.select(key).equals(want.select(key))
    for d in DIMS:
        a = np.stack(got[f"vector_{d}"].to_numpy(zero_copy_only=False))
        b = np.stack(want[f"vector_{d}"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(a, b, atol=ATOL)



def test_reembed_embeds_exactly_what_changed_and_equals_a_fresh_embed(ray_up, tmp_path, passages):
    v1 = corpus(passages, 100)
    src = write_corpus(tmp_path / "in", v1)
    db = str(tmp_path / "db")
    first = run_job(config(src, db, "docs"))
    assert first["documents_new"] == 100 and first["commits"] >= 2

    v2 = dict(v1)
    ids = sorted(v1)
    changed, deleted = ids[:10], ids[10:15]
    for i in changed:  # other text, often another chunk count
        v2[i] = v1[i][::-1] if len(v1[i]) > 400 else v1[i] + " " + v1[i]
    for i in deleted:
        del v2[i]
    added = {f"new-{k}": passages(5 + k)[-1][:500] for k in range(5)}
    v2.update(added)
    write_corpus(tmp_path / "in", v2)

    report = run_job(config(src, db, "docs"), mode="reembed", delete_missing=True)
    assert (report["documents_new"], report["documents_changed"], report["documents_unchanged"]) == (5, 10, 85)
    assert report["documents_deleted"] == 5 and report["documents_missing_kept"] == 0
    assert report["documents_embedded"] == 15  # counted at the encoder input: only new and changed
    assert report["documents_read"] == len(v2)

    fresh = run_job(config(write_corpus(tmp_path / "fresh_in", v2), db, "fresh"))
    assert fresh["documents_embedded"] == len(v2)
    assert_same_table(rows(db, "docs"), rows(db, "fresh"))

    # Unchanged corpus: no encoder work, nothing written; a document dropped without
    # --delete-missing is counted and kept.
    del v2[ids[50]]
    write_corpus(tmp_path / "in", v2)
    again = run_job(config(src, db, "docs"), mode="reembed")
    assert again["documents_embedded"] == 0 and again["tokens"] == 0 and again["commits"] == 0
    assert again["documents_unchanged"] == len(v2) and again["documents_missing_kept"] == 1
    assert ids[50] in set(rows(db, "docs")["id"].to_pylist())


def test_settings_change_is_refused_and_full_replaces_in_one_switch(ray_up, tmp_path, passages):
    docs = corpus(passages, 30)
    src = write_corpus(tmp_path / "in", docs)
    db = str(tmp_path / "db")
    run_job(config(src, db, "docs"))
    before = lance.dataset(table_uri(db, "docs")).version
    other = dataclasses.replace(config(src, db, "docs"), chunking=ChunkingConfig(mode="fixed", chunk_tokens=32))
    with pytest.raises(ValueError, match=r"chunking: table has .*'chunk_tokens': 64.*--full"):
        run_job(other, mode="reembed")
    assert lance.dataset(table_uri(db, "docs")).version == before  # untouched

    report = run_job(other, mode="full")
    assert report["documents_embedded"] == 30 and report["output"]["version"] == before + 1
    run_job(dataclasses.replace(other, sink=dataclasses.replace(other.sink, table="fresh")))
    assert_same_table(rows(db, "docs"), rows(db, "fresh"))


# --------------------------------------------------------------------------------------------------
# SIGKILL the driver's process group after its first committed window, re-run the same command
# --------------------------------------------------------------------------------------------------

KILL_DOCS, KILL_WINDOW = 140, 20


@pytest.fixture(scope="module")
def kill_corpus(ray_up, tmp_path_factory, passages):
    root = tmp_path_factory.mktemp("kill")
    docs = corpus(passages, KILL_DOCS, seed=1)
    src = write_corpus(root / "in", docs)
    db = str(root / "reference")
    run_job(config(src, db, "docs", commit_every_rows=KILL_WINDOW))
    return src, docs, rows(db, "docs")


def command(src: str, db: str, mode: str) -> list[str]:
    return [sys.executable, "-m", "jobs.embed", "--input", src, "--output", db, "--table", "docs",
            "--model", str(minilm_dir()), "--dims", ",".join(map(str, DIMS)), "--precision", "float32",
            "--chunking", "fixed", "--chunk-tokens", "64", "--actors", "1", "--mode", mode,
            "--commit-every-rows", str(KILL_WINDOW)]


def first_window_committed(db: str) -> bool:
    uri = table_uri(db, "docs")
    pointers = list(Path(db, "docs.staging").glob("*.json"))
    try:
        # staged: the pointer names the last staged version
        version = json.loads(pointers[0].read_text())["version"] if pointers else lance.dataset(uri).version
        props = lance.dataset(uri, version=version).read_transaction(version).transaction_properties
    except (OSError, ValueError, KeyError):
        return False
    return props.get("embedlake.what") == "window"


def run_cli(cmd: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def latest_report(db: str) -> dict:
    reports = sorted(Path(db, "docs.reports").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["create", "append", "overwrite"])
def test_sigkill_after_a_window_then_rerun_is_exactly_once(mode, kill_corpus, tmp_path, passages):
    src, docs, reference = kill_corpus
    db = str(tmp_path / "db")
    if mode in ("append", "overwrite"):  # a table to add to, or to replace
        seed_docs = {i: docs[i] for i in sorted(docs)[:10]} if mode == "append" else corpus(passages, 10, seed=7)
        seed_cfg = config(write_corpus(tmp_path / "seed", seed_docs), db, "docs", commit_every_rows=1000)
        run_job(dataclasses.replace(seed_cfg, sink=dataclasses.replace(seed_cfg.sink, commit_every_rows=1000)))
    old_rows = rows(db, "docs") if mode == "overwrite" else None

    proc = run_cli(command(src, db, mode))
    deadline = time.monotonic() + 240
    while not first_window_committed(db) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    finished_early = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    assert not finished_early, f"the job ended before it could be killed:\n{out[-3000:]}"
    if mode == "overwrite":  # readers still see the old table
        assert_same_table(rows(db, "docs"), old_rows)
    else:
        partial = rows(db, "docs")
        assert 0 < partial.num_rows < reference.num_rows

    rerun = run_cli(command(src, db, mode))
    out = rerun.communicate(timeout=400)[0]
    assert rerun.returncode == 0, out[-3000:]
    report = latest_report(db)
    assert report["resumed_from"] is not None, report
    assert report["documents_embedded"] < KILL_DOCS  # committed work was not recomputed
    assert report["documents_embedded"] + report["documents_unchanged"] == KILL_DOCS
    assert_same_table(rows(db, "docs"), reference)


def test_reembed_full_and_rollback_on_s3(s3_env, ray_up, passages):
    """The same machinery against the moto S3 endpoint: lookups, replacement, the staged pointer file,
    the duplicate-id staging dataset, the rejected table and rollback all live on object storage."""
    from pipeline.commit import rejected_uri
    from pipeline.history import rollback, run_history
    from pipeline.storage import StorageConfig

    storage = StorageConfig.from_env()
    prefix = s3_env.url(f"incr-{uuid.uuid4().hex[:8]}")
    fs = storage.fsspec_filesystem(prefix)
    docs = corpus(passages, 30, seed=3)

    def put(d: dict[str, str], extra: list[tuple[str, str]] = ()) -> str:
        ids = sorted(d) + [i for i, _ in extra]
        table = pa.table({"id": ids, "text": [d[i] for i in sorted(d)] + [t for _, t in extra]})
        with fs.open(f"{prefix.removeprefix('s3://')}/in/part-0.parquet", "wb") as fh:
            pq.write_table(table, fh)
        return f"{prefix}/in"

    src, db = put(docs, [(sorted(docs)[0], "a duplicate id")]), f"{prefix}/db"
    first = run_job(config(src, db, "docs"))
    assert first["documents_embedded"] == 30 and first["rejected_by_reason"] == {"duplicate_id": 1}
    rejected = lance.dataset(rejected_uri(table_uri(db, "docs")), storage_options=storage.lance_options())
    assert rejected.to_table()["reason"].to_pylist() == ["duplicate_id"]

    changed = dict(docs)
    victim = sorted(docs)[5]
    changed[victim] = docs[victim][::-1]
    del changed[sorted(docs)[6]]
    src = put(changed)
    report = run_job(config(src, db, "docs"), mode="reembed", delete_missing=True)
    assert (report["documents_changed"], report["documents_deleted"], report["documents_embedded"]) == (1, 1, 1)

    other = dataclasses.replace(config(src, db, "docs"), chunking=ChunkingConfig(mode="fixed", chunk_tokens=32))
    full = run_job(other, mode="full")
    assert full["documents_embedded"] == 29
    staging = f"{db.removeprefix('s3://')}/docs.staging"
    fs.invalidate_cache()
    assert not (fs.ls(staging) if fs.exists(staging) else [])  # the pointer and the ids index are gone
    runs = run_history(db, "docs", storage)
    assert [r.kind for r in runs] == ["create", "reembed", "full"]

    rollback(db, "docs", runs[1].run_id, storage)
    back = lance.dataset(table_uri(db, "docs"), storage_options=storage.lance_options()).to_table()
    assert victim in back["id"].to_pylist() and sorted(docs)[6] not in back["id"].to_pylist()
    assert json.loads(lance.dataset(table_uri(db, "docs"), storage_options=storage.lance_options())
                      .metadata["chunking"])["chunk_tokens"] == 64  # the metadata came back with the data
