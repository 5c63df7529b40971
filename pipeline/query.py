"""Search a table written by the embed job, embedding the query the way the table was embedded.

A query is a text or an image (models that embed images: jina-v4), embedded with the table's model, its query
task and query prompt. On a `vector_<d>` column the hits rank by cosine similarity. On the multivector column
they rank by late interaction, MaxSim: the sum over the query's token vectors of the best dot product with
the chunk's token vectors (all unit length, so dot = cosine). LanceDB's multivector search finds the
candidates (exact without an index; with one, an over-fetched approximate search per query vector); each
candidate's MaxSim is then computed here from its stored token vectors, so the score printed is the
definition's, whatever the index did.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import lancedb
import numpy as np

from model import Encoder, load_encoder
from pipeline.sink import read_table_metadata, table_uri
from pipeline.storage import StorageConfig
from pipeline.table_meta import MULTIVECTOR, TableMetadata

MODALITIES = ("text", "image")
MAXSIM_OVERFETCH = 4  # candidates per hit asked of an indexed multivector search, before exact MaxSim reranks


@functools.cache
def _encoder(model_ref: str, precision: str, options: tuple[tuple[str, object], ...]) -> Encoder:
    return load_encoder(model_ref, dtype=precision, storage_options=dict(options))


def maxsim(query: np.ndarray, doc: np.ndarray) -> float:
    """Late-interaction score: for each query token vector its best dot product over the document's, summed."""
    return float((query.astype(np.float32) @ doc.astype(np.float32).T).max(axis=1).sum())


@dataclass(frozen=True)
class QuerySide:
    """A table opened for queries: its metadata, the encoder it names, and the vector column to search."""

    meta: TableMetadata
    encoder: Encoder
    column: str
    table: lancedb.table.Table

    @property
    def multi(self) -> bool:
        return self.column == MULTIVECTOR

    @property
    def dim(self) -> int | None:
        """The Matryoshka dim to truncate to; None for the full dim (and for the multivector column)."""
        dim = None if self.multi else int(self.column.removeprefix("vector_"))
        return None if dim == self.encoder.dim else dim

    def _prompt(self) -> dict:
        return {"prompt": self.meta.query_prompt} if self.meta.query_prompt else {}

    def embed(self, texts: list[str]) -> np.ndarray | list[np.ndarray]:
        """Query vectors: one per text, or one (tokens, 128) array per text on the multivector column."""
        if self.multi:
            return self.encoder.encode_multi(texts, task=self.meta.query_task, **self._prompt())
        return self.encoder.encode(texts, task=self.meta.query_task, dim=self.dim, **self._prompt())

    def embed_images(self, images: list[bytes]) -> np.ndarray | list[np.ndarray]:
        if "image" not in self.encoder.info.modalities:
            raise ValueError(f"{self.encoder.info.name} does not embed images; query with --text")
        if self.multi:
            return self.encoder.encode_multi(images, task=self.meta.query_task)
        return self.encoder.encode_images(images, task=self.meta.query_task, dim=self.dim)


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
    return QuerySide(meta, encoder, column, tbl)


def _hit(h: dict, score: float) -> dict:
    return {"id": h["id"], "chunk": h["chunk"], "score": score, "text": h["text"],
            **({"modality": h["modality"]} if "modality" in h else {})}


def ranked(side: QuerySide, query: np.ndarray, k: int, modality: str | None = None) -> list[dict]:
    """Top-k chunks for one embedded query (a vector, or token vectors on the multivector column), of one
    `modality` only if given (a filter applied before the search, so k hits come back when k exist)."""
    columns = ["id", "chunk", "text", *(["modality"] if side.meta.image_column else [])]
    search = side.table.search(query, vector_column_name=side.column).distance_type("cosine")
    if modality is not None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {modality!r}")
        if not side.meta.image_column:
            raise ValueError("this table has no image rows (it was embedded without --image-column): every row is text")
        search = search.where(f"modality = '{modality}'", prefilter=True)
    if not side.multi:
        hits = search.limit(k).select([*columns, "_distance"]).to_list()
        return [_hit(h, 1.0 - h["_distance"]) for h in hits]
    indexed = any(side.column in idx.columns for idx in side.table.list_indices())
    candidates = search.limit(k * MAXSIM_OVERFETCH if indexed else k).select([*columns, side.column]).to_list()
    scored = [(maxsim(query, np.asarray(h[side.column], dtype=np.float32)), h) for h in candidates]
    scored.sort(key=lambda sh: -sh[0])
    return [_hit(h, score) for score, h in scored[:k]]


def search(
    db: str,
    table: str,
    text: str | None = None,
    *,
    image: bytes | None = None,
    column: str | None = None,
    k: int = 10,
    modality: str | None = None,
    storage_options: dict | None = None,
) -> list[dict]:
    """Top-k chunks for a text or an image query: id, chunk, score (cosine, or MaxSim on the multivector
    column), text, and modality in tables with image rows."""
    if (text is None) == (image is None):
        raise ValueError("give a query text or a query image, one of them")
    side = open_for_queries(db, table, column, StorageConfig.from_env(storage_options))
    query = side.embed([text])[0] if text is not None else side.embed_images([image])[0]
    return ranked(side, np.asarray(query, dtype=np.float32), k, modality)
