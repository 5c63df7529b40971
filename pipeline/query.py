"""Search a table written by the embed job, embedding the query the way the table was embedded."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import lancedb

from model import Encoder, load_encoder
from pipeline.sink import read_table_metadata, table_uri
from pipeline.storage import StorageConfig
from pipeline.table_meta import TableMetadata


@functools.cache
def _encoder(model_ref: str, precision: str, options: tuple[tuple[str, object], ...]) -> Encoder:
    return load_encoder(model_ref, dtype=precision, storage_options=dict(options))


@dataclass(frozen=True)
class QuerySide:
    """A table opened for queries: its metadata, the encoder it names, and the vector column to search."""

    meta: TableMetadata
    encoder: Encoder
    column: str
    dim: int
    table: lancedb.table.Table

    def embed(self, texts: list[str]):
        return self.encoder.encode(texts, task=self.meta.query_task, dim=None if self.dim == self.encoder.dim else self.dim)


def open_for_queries(db: str, table: str, column: str | None, storage: StorageConfig) -> QuerySide:
    """The table's model at the table's precision and query task; fails if the model changed since."""
    meta = read_table_metadata(table_uri(db, table), storage.lance_options())
    column = column or meta.vector_columns()[0]
    if column not in meta.vector_columns():
        raise ValueError(f"column {column!r} is not in table {table}; vector columns: {meta.vector_columns()}")
    ref = meta.model_ref
    encoder = _encoder(ref, meta.precision, tuple(sorted(storage.fsspec_options(ref).items())))
    if encoder.info.identity != meta.model:
        raise ValueError(f"model {ref} is now {encoder.info.identity}, but the table holds {meta.model}")
    tbl = lancedb.connect(db, storage_options=storage.lance_options()).open_table(table)
    return QuerySide(meta, encoder, column, int(column.removeprefix("vector_")), tbl)


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
    side = open_for_queries(db, table, column, StorageConfig.from_env(storage_options))
    hits = (
        side.table.search(side.embed([text])[0], vector_column_name=side.column)
        .distance_type("cosine")
        .limit(k)
        .select(["id", "chunk", "text", "_distance"])
        .to_list()
    )
    return [{"id": h["id"], "chunk": h["chunk"], "score": 1.0 - h["_distance"], "text": h["text"]} for h in hits]
