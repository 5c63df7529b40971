"""A tiny table written through the real committer, without Ray: the fixtures of the commit and history tests.

`docs()` builds the chunk rows the embed stage hands the writer, `write()` runs the real `FragmentWriter`
on them, `make()` a `LanceCommitter` that commits only when asked (no timed windows).
"""

from __future__ import annotations

import dataclasses

import lance
import pyarrow as pa

from pipeline.commit import LanceCommitter
from pipeline.sink import FragmentWriter
from pipeline.storage import StorageConfig
from pipeline.table_meta import TableMetadata

SCHEMA = pa.schema([("id", pa.string()), ("chunk", pa.int32()), ("text", pa.string()), ("content_hash", pa.string())])
META = TableMetadata(run_id="r1", job_key="job-a", state="running", model="m@1", model_ref="m", model_family="test",
                     task=None, query_task=None, dims=(8,), vector_dtype="float32", precision="float32",
                     chunking={"mode": "fixed"})


def docs(spec: dict[str, int], *, version: str = "v1", status: str | None = None) -> pa.Table:
    """Chunk rows for {id: chunks}, as the embed stage hands them to the writer."""
    rows = [(i, c, n) for i, n in spec.items() for c in range(n)]
    return pa.table({
        "id": [i for i, _, _ in rows],
        "chunk": pa.array([c for _, c, _ in rows], pa.int32()),
        "text": [f"{i} {version} chunk {c}" for i, c, _ in rows],
        "content_hash": [f"{i}-{version}" for i, _, _ in rows],
        "_doc_chunks": pa.array([n for _, _, n in rows], pa.int32()),
        "_status": pa.array([status] * len(rows), pa.string()),
    })


def make(uri: str, mode: str = "create", meta: TableMetadata = META, **kw) -> LanceCommitter:
    return LanceCommitter(uri, SCHEMA, StorageConfig({}), mode, meta, commit_every_s=3600, **kw)


def table(uri: str, version: int | None = None) -> list[tuple[str, int, str]]:
    t = lance.dataset(uri, version=version).to_table()
    return sorted(zip(t["id"].to_pylist(), t["chunk"].to_pylist(), t["content_hash"].to_pylist(), strict=True))


def write(uri: str, rows: pa.Table, *, staged: bool = False) -> pa.Table:
    return FragmentWriter(uri, SCHEMA, {}, fresh_field_ids=staged)(rows)



def three_runs(uri: str) -> None:
    """Runs r1 (create a, b, c), r2 (reembed: b changed), r3 (reembed: c deleted), each finished.

    Each run's metadata says which run wrote it (`written_at`), so a restored version shows whose it is.
    """
    steps = [("r1", "create", docs({"a": 1, "b": 2, "c": 1}, status="new"), []),
             ("r2", "reembed", docs({"b": 1}, version="v2", status="changed"), []),
             ("r3", "reembed", None, ["c"])]
    for run_id, mode, rows, deleted in steps:
        c = make(uri, mode, dataclasses.replace(META, run_id=run_id, written_at=f"by {run_id}"))
        c.begin()
        if rows is not None:
            c.add(write(uri, rows))
        if deleted:
            c.delete_documents(deleted)
        c.finish()
