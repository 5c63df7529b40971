"""A tiny table written through the real committer, without Ray: the fixtures of the commit and history tests.

`docs()` builds the chunk rows the embed stage hands the writer, `write()` runs the real `FragmentWriter`
on them, `make()` a `LanceCommitter` that commits only when asked (no timed windows).
"""

from __future__ import annotations

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

