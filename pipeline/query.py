"""Search a table written by the embed job, embedding the query the way the table was embedded."""

from __future__ import annotations

import functools

import lancedb

from model import Encoder, load_encoder
from pipeline.sink import read_table_metadata, table_uri
from pipeline.storage import StorageConfig


@functools.cache
def _encoder(model_ref: str) -> Encoder:
    return load_encoder(model_ref)


def search(
    db: str,
    table: str,
    text: str,
    *,
    column: str | None = None,
    k: int = 10,
    storage_options: dict | None = None,
) -> list[dict]:
    """Top-k chunks by cosine similarity: id, chunk, score, text."""
    storage = StorageConfig.from_env(storage_options)
    meta = read_table_metadata(table_uri(db, table), storage.lance_options())
    dims = [int(d) for d in meta["dims"].split(",")]
    column = column or f"vector_{dims[0]}"
    if column not in {f"vector_{d}" for d in dims}:
        raise ValueError(f"column {column!r} is not in table {table}; vector columns: {[f'vector_{d}' for d in dims]}")
    dim = int(column.removeprefix("vector_"))
    encoder = _encoder(meta["model_ref"])
    if encoder.info.identity != meta["model"]:
        raise ValueError(f"model {meta['model_ref']} is now {encoder.info.identity}, but the table holds {meta['model']}")
    query = encoder.encode([text], task=meta.get("query_task") or None, dim=None if dim == encoder.dim else dim)[0]
    tbl = lancedb.connect(db, storage_options=storage.lance_options()).open_table(table)
    hits = (
        tbl.search(query, vector_column_name=column)
        .distance_type("cosine")
        .limit(k)
        .select(["id", "chunk", "text", "_distance"])
        .to_list()
    )
    return [{"id": h["id"], "chunk": h["chunk"], "score": 1.0 - h["_distance"], "text": h["text"]} for h in hits]
