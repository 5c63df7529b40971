"""Search a table written by the embed job, embedding the query the way the table was embedded."""

from __future__ import annotations

import functools

import lancedb

from model import Encoder, load_encoder
from pipeline.sink import read_table_metadata, table_uri
from pipeline.storage import StorageConfig


@functools.cache
def _encoder(model_ref: str, precision: str, options: tuple[tuple[str, object], ...]) -> Encoder:
    return load_encoder(model_ref, dtype=precision, storage_options=dict(options))


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
    ref = meta["model_ref"]
    encoder = _encoder(ref, meta.get("precision", "auto"), tuple(sorted(storage.fsspec_options(ref).items())))
    if encoder.info.identity != meta["model"]:
        raise ValueError(f"model {ref} is now {encoder.info.identity}, but the table holds {meta['model']}")
    tbl = lancedb.connect(db, storage_options=storage.lance_options()).open_table(table)
    # Metadata is committed after the data; a crash between the two leaves it stale. Rows say truly.
    sample = tbl.search().limit(1).select(["model"]).to_list()
    if sample and sample[0]["model"] != meta["model"]:
        raise ValueError(f"table {table} metadata names {meta['model']} but its rows hold {sample[0]['model']}; re-run the job")
    query = encoder.encode([text], task=meta.get("query_task") or None, dim=None if dim == encoder.dim else dim)[0]
    hits = (
        tbl.search(query, vector_column_name=column)
        .distance_type("cosine")
        .limit(k)
        .select(["id", "chunk", "text", "_distance"])
        .to_list()
    )
    return [{"id": h["id"], "chunk": h["chunk"], "score": 1.0 - h["_distance"], "text": h["text"]} for h in hits]
