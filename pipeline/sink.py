"""The worker half of the two-phase Lance write, the Ray glue, and ANN indexes.

Two phases, as in lance-ray (spec §2.2, §2.4): Ray workers run `FragmentWriter`, which writes Lance
data files with `lance.fragment.write_fragments` and returns only their metadata and small
summaries; the driver's `pipeline.commit.LanceCommitter` makes them visible in atomic windows of
whole documents. We do not use Ray's own Lance sink or `ray.data.checkpoint`: Ray 2.60's
`write_lance` is broken with pylance >= 6 (spec §0.1), and Ray's post-write checkpoint loses rows with
a Lance sink because Lance commits only at the very end (spec §0.2, experiment E6).

A writer task that Ray retries writes its data files again under new names; only the fragments of
the attempt whose result reached the driver are ever committed, and the committer checks every
result's row count, so a retry can neither drop rows nor commit twice (the lance-ray retry bug that
drops rows came from retrying inside one task and keeping a partial list).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args

import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata, write_fragments

from pipeline.lance_commit import open_existing
from pipeline.prepare import DOC_CHUNKS, REJECT, STATUS, UNCHANGED_DOCS
from pipeline.read import SOURCE_FILE, SOURCE_ROW

if TYPE_CHECKING:
    import ray.data

    from pipeline.commit import CommitSummary, LanceCommitter

IndexType = Literal["auto", "ivf_pq", "ivf_flat", "hnsw_sq"]

INTERNAL_PREFIX = "_"  # columns starting with this carry per-row stats/flags, never stored
REJECT_SAMPLE = 20  # rejected rows a writer call lists (id, reason); the rest are only counted

# Tables below this many rows get an exact-within-partition IVF_FLAT index: PQ needs >= 256 training
# rows per codebook, and on small tables PQ's recall loss buys nothing.
PQ_MIN_ROWS = 100_000

# Rows sampled to count a multivector column's token vectors for its index (all of them in smaller tables).
MULTIVECTOR_SAMPLE_ROWS = 1024

_TABLE_NAME = re.compile(r"^[A-Za-z0-9_\-.]+$")


def table_uri(db: str, table: str) -> str:
    """The Lance dataset URI of LanceDB table `table` in database `db` (a local path or s3://...)."""
    if not _TABLE_NAME.match(table):
        raise ValueError(f"invalid table name {table!r}: use letters, digits, '_', '-' and '.'")
    return f"{db.rstrip('/')}/{table}.lance"


def read_table_metadata(uri: str, storage_options: Mapping[str, str]):
    """The table's `TableMetadata` (latest version); a clear error for tables embedlake did not finish creating."""
    from pipeline.table_meta import TableMetadata

    ds = open_existing(uri, storage_options)
    if ds is None:
        raise FileNotFoundError(f"table {uri} does not exist")
    return TableMetadata.from_metadata(ds.metadata, where=f"table {uri}")


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to `schema`, unwrapping extension types (Ray's tensor columns)."""
    columns = []
    for f in schema:
        col = table[f.name]
        if isinstance(col.type, pa.BaseExtensionType):
            col = pa.chunked_array([c.storage for c in col.chunks], type=col.type.storage_type)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise TypeError(
                    f"column {f.name!r} has type {col.type}, the table schema says {f.type}: {e}"
                ) from e
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def _numeric_sum(col: pa.ChunkedArray) -> tuple[pa.DataType, int | float] | None:
    """(output type, sum) for integer/float columns, ignoring nulls; None for anything else."""
    if pa.types.is_integer(col.type):
        return pa.int64(), int(pc.sum(col).as_py() or 0)
    if pa.types.is_floating(col.type):
        return pa.float64(), float(pc.sum(col).as_py() or 0.0)
    return None


def _value_counts(col: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    return {c["values"]: c["counts"] for c in pc.value_counts(col.drop_null()).to_pylist()}


def _split_edges(written: pa.Table) -> dict[str, list[int]]:
    """Documents whose chunks this batch holds only some of: id -> [chunks here, chunks of the document].

    Ray may cut one document's chunk rows into two blocks (an output block over its size target, a
    naive-chunking document straddling two actor calls); the committer keeps such pieces in one window.
    """
    if DOC_CHUNKS not in written.column_names or not written.num_rows:
        return {}
    grouped = written.group_by("id").aggregate([("id", "count"), (DOC_CHUNKS, "max")]).to_pylist()
    return {g["id"]: [g["id_count"], g[f"{DOC_CHUNKS}_max"]] for g in grouped if g["id_count"] < g[f"{DOC_CHUNKS}_max"]}


def _documents(batch: pa.Table, firsts: pa.Table) -> dict[str, int]:
    """Documents by status: new and changed by their first chunk rows; unchanged ones by the prepare
    stage's count (`UNCHANGED_DOCS`, one row stands for a batch of them), else by their rows."""
    if STATUS not in batch.column_names:
        return {"new": firsts.num_rows}
    counts = _value_counts(pc.fill_null(firsts[STATUS], "new"))
    if UNCHANGED_DOCS in batch.column_names:
        counts.pop("unchanged", None)
        unchanged = int(pc.sum(batch[UNCHANGED_DOCS]).as_py() or 0)
        if unchanged:
            counts["unchanged"] = unchanged
    return counts


class FragmentWriter:
    """Ray `map_batches` callable: write a batch's chunk rows as uncommitted Lance fragments.

    Returns ONE row per call: `fragments` (JSON list of `FragmentMetadata.to_json()`), `num_rows`
    (rows written), `rejected` (JSON reason -> count) with `reject_sample` (JSON list of up to
    REJECT_SAMPLE {"id", "reason"}), `documents` (JSON status -> documents, status from `_status`:
    new, changed or unchanged), `replace` (JSON list of ids whose previous chunks these rows replace),
    `edges` (see `_split_edges`) and, for every other numeric internal column `_x`, its sum over the
    batch. Rows that are rejected or unchanged are counted, never written. Nothing is visible until
    the committer commits the fragments.
    """

    def __init__(self, uri: str, schema: pa.Schema, storage_options: Mapping[str, str], *,
                 fresh_field_ids: bool = False, max_rows_per_file: int = 1024 * 1024,
                 rejected_uri: str | None = None, run_id: str = ""):
        self.uri = uri
        self.rejected_uri, self.run_id = rejected_uri, run_id
        self.schema = schema
        self.storage_options = dict(storage_options)
        self.max_rows_per_file = max_rows_per_file
        # "append" checks the batch against the existing table and reuses its field ids; a staged
        # replacement assigns fresh ids from `schema`, the same ones its Overwrite commit assigns.
        self._write_mode = "overwrite" if fresh_field_ids else "append"

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = set(batch.column_names)
        missing = [n for n in self.schema.names if n not in names]
        unexpected = [
            n for n in batch.column_names if not n.startswith(INTERNAL_PREFIX) and n not in self.schema.names
        ]
        if missing or unexpected:
            raise ValueError(
                f"batch does not match the table schema: missing columns {missing}, "
                f"unexpected non-internal columns {unexpected} (internal columns start with {INTERNAL_PREFIX!r})"
            )
        ok = pc.is_null(batch[REJECT]) if REJECT in names else pa.array([True] * batch.num_rows)
        status = batch[STATUS] if STATUS in names else pa.nulls(batch.num_rows, pa.string())
        write = pc.and_(ok, pc.fill_null(pc.not_equal(status, "unchanged"), True))
        accepted = batch.filter(write)
        rejected = batch.filter(pc.invert(ok))
        firsts = batch.filter(pc.and_(ok, pc.equal(batch["chunk"], 0))) if "chunk" in names else batch.filter(ok)

        data = _conform(accepted, self.schema)
        fragments: list[FragmentMetadata] = []
        if data.num_rows:
            fragments = write_fragments(data, self.uri, schema=self.schema, mode=self._write_mode,
                                        max_rows_per_file=self.max_rows_per_file, storage_options=self.storage_options)
        written = sum(f.physical_rows for f in fragments)
        if written != data.num_rows:
            raise RuntimeError(f"write_fragments wrote {written} rows of {data.num_rows}; this is a bug")

        sample = rejected.slice(0, REJECT_SAMPLE)
        changed = firsts.filter(pc.equal(firsts[STATUS], "changed")) if STATUS in names else firsts.slice(0, 0)
        out: dict[str, pa.Array] = {
            "fragments": pa.array([json.dumps([f.to_json() for f in fragments])], pa.string()),
            "num_rows": pa.array([written], pa.int64()),
            "rejected": pa.array([json.dumps(_value_counts(rejected[REJECT]) if REJECT in names else {})]),
            "reject_sample": pa.array([json.dumps([
                {"id": i, "reason": r} for i, r in zip(sample["id"].to_pylist(), sample[REJECT].to_pylist(), strict=True)
            ] if REJECT in names else [])]),
            "documents": pa.array([json.dumps(_documents(batch, firsts))]),
            "replace": pa.array([json.dumps(changed["id"].to_pylist())]),
            "edges": pa.array([json.dumps(_split_edges(accepted))]),
            **self._write_rejected(rejected),
        }
        for name in batch.column_names:
            if name.startswith(INTERNAL_PREFIX) and name not in (REJECT, STATUS, DOC_CHUNKS, SOURCE_FILE, SOURCE_ROW,
                                                                  UNCHANGED_DOCS):
                summed = _numeric_sum(batch[name])
                if summed is not None:
                    out[name] = pa.array([summed[1]], summed[0])
                elif pa.types.is_string(batch[name].type) or pa.types.is_large_string(batch[name].type):
                    # String stats (e.g. which actor embedded a row) travel as value -> row count.
                    out[name] = pa.array([json.dumps(_value_counts(batch[name]))], pa.string())
        return pa.table(out)


    def _write_rejected(self, rejected: pa.Table) -> dict[str, pa.Array]:
        """Rejected rows with their provenance as uncommitted fragments of `<table>_rejected`."""
        fragments: list[FragmentMetadata] = []
        keys: list[str] = []
        if self.rejected_uri and rejected.num_rows and SOURCE_FILE in rejected.column_names:
            from pipeline.commit import REJECTED_SCHEMA

            files, rows = rejected[SOURCE_FILE], rejected[SOURCE_ROW]
            keys = [f"{f}#{r}" for f, r in zip(files.to_pylist(), rows.to_pylist(), strict=True)]
            table = pa.table({"key": keys, "run_id": [self.run_id] * len(keys), "file": files, "row": rows,
                              "id": rejected["id"], "reason": rejected[REJECT]}, schema=REJECTED_SCHEMA)
            fragments = write_fragments(table, self.rejected_uri, schema=REJECTED_SCHEMA, mode="append",
                                        storage_options=self.storage_options)
        return {"rejected_fragments": pa.array([json.dumps([f.to_json() for f in fragments])]),
                "rejected_keys": pa.array([json.dumps(keys)])}


# --------------------------------------------------------------------------------------------------
# Ray glue
# --------------------------------------------------------------------------------------------------


# Retries of a writer task whose process or node died (Ray Data 2.60 retries its tasks without limit,
# `max_retries=-1`, and only on system failures). A retry is safe: it writes its fragments again under
# new file names, and only the attempt whose result reaches the driver is committed; the failed
# attempt's files are orphans for `cleanup_old_versions`. Bounded, so a writer that kills its
# worker every time (e.g. out of memory) fails the job instead of looping. Ray 2.60 has no named
# map_batches parameter for it, so it travels in the deprecated `**ray_remote_args` (gone in 2.64).
WRITER_MAX_RETRIES = 4


def write_dataset(
    ds: ray.data.Dataset,
    committer: LanceCommitter,
    *,
    writer_concurrency: int = 1,
    writer_num_cpus: float = 0.5,
    batch_size: int | None = None,
) -> CommitSummary:
    """Write `ds` through `FragmentWriter` tasks and commit on the driver; returns the summary.

    `batch_size` is the rows per writer call, i.e. per fragment (None = one call per block); keep it
    large, small fragments slow Lance down (spec §5). `writer_num_cpus` below 1 leaves CPUs for read
    tasks next to an actor pool (spec §0.7). The driver only ever sees fragment metadata and counts.

    `committer.begin()` must have been called (the job reads what it resumes from before building
    `ds`). If the job fails, the exception propagates: windows committed so far stay visible, the
    pending window is never committed (its data files are orphans for `cleanup_old_versions`).
    """
    import ray.data

    writer = FragmentWriter(committer.uri, committer.schema, committer.storage_options,
                            fresh_field_ids=committer.staged, rejected_uri=committer.rejected_uri,
                            run_id=committer.metadata.run_id)
    # Tasks, not actors: an actor is one more process to start beside the encoders while they load,
    # and the writer keeps no state between batches. Task workers are pooled and reused.
    results = ds.map_batches(
        writer,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.TaskPoolStrategy(size=writer_concurrency),
        num_cpus=writer_num_cpus,
        max_retries=WRITER_MAX_RETRIES,
    )
    for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
        committer.add(batch)
    return committer.finish()


# --------------------------------------------------------------------------------------------------
# Indexes
# --------------------------------------------------------------------------------------------------


def is_multivector(kind: pa.DataType) -> bool:
    """LanceDB's multivector layout: a list of fixed-size vectors per row (late-interaction token vectors)."""
    return pa.types.is_list(kind) and pa.types.is_fixed_size_list(kind.value_type)


def _index_config(kind: IndexType, rows: int, dims: int, distance_type: str) -> Any:
    from lancedb.index import HnswSq, IvfFlat, IvfPq

    sub_vectors = dims // 16 if dims % 16 == 0 else dims // 8 if dims % 8 == 0 else 0
    if kind == "auto":
        kind = "ivf_pq" if rows >= PQ_MIN_ROWS and sub_vectors else "ivf_flat"
    # sqrt(rows) partitions (LanceDB's default), but Lance trains at most rows/256 of them (it warns
    # "training 11 of the 54 requested IVF partitions" for 3000 rows), so ask for what it will train.
    partitions = max(1, min(math.isqrt(rows), rows // 256))
    if kind == "ivf_flat":
        return IvfFlat(distance_type=distance_type, num_partitions=partitions)
    if kind == "ivf_pq":
        if not sub_vectors or rows < 256:
            raise ValueError(
                f"ivf_pq needs dims divisible by 8 and >= 256 rows, got dims={dims}, rows={rows}"
            )
        return IvfPq(distance_type=distance_type, num_partitions=partitions, num_sub_vectors=sub_vectors)
    if kind == "hnsw_sq":
        # One HNSW graph per ~1M rows keeps graph build memory bounded (lancedb.index.HnswSq docs).
        return HnswSq(distance_type=distance_type, num_partitions=max(1, rows // 1_000_000))
    raise ValueError(f"index_type must be one of {get_args(IndexType)}, got {kind!r}")


def build_vector_indexes(
    db: str,
    table: str,
    columns: list[str],
    storage_options: Mapping[str, str],
    *,
    index_type: IndexType = "auto",
    distance_type: Literal["cosine", "l2", "dot"] = "cosine",
) -> dict[str, str]:
    """Build one ANN index per vector column through LanceDB; return column -> index type.

    "auto" picks IVF_PQ from `PQ_MIN_ROWS` rows up (when dims divide by 8) and IVF_FLAT below, with
    partitions clamped to the row count so small tables train too. Existing indexes are replaced.
    """
    import lancedb

    tbl = lancedb.connect(db, storage_options=dict(storage_options)).open_table(table)
    rows = tbl.count_rows()
    if rows == 0:
        raise ValueError(f"table {table!r} is empty; there is nothing to train an index on")
    schema = tbl.schema
    vector_columns = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) or is_multivector(f.type)]
    for column in columns:
        if column not in vector_columns:
            raise ValueError(
                f"{column!r} is not a vector column of {table!r}; vector columns: {vector_columns}"
            )
        kind = schema.field(column).type
        if is_multivector(kind):
            # Lance indexes a multivector column's token vectors, and only under the cosine metric (it refuses
            # others); a search then over-fetches per query vector and rescores candidates by MaxSim.
            # Its size is counted in token vectors, from a sample of rows: reading the whole column into the driver
            # would load every token vector of the table (tokens x 128 x 4 bytes) just to count them.
            sample = tbl.to_lance().sample(min(rows, MULTIVECTOR_SAMPLE_ROWS), columns=[column])[column]
            vectors = round(rows * float(pc.mean(pc.list_value_length(sample)).as_py() or 0.0))
            config = _index_config(index_type, vectors, kind.value_type.list_size, "cosine")
        else:
            config = _index_config(index_type, rows, kind.list_size, distance_type)
        tbl.create_index(column, config=config, replace=True)
    built = {idx.columns[0]: idx.index_type for idx in tbl.list_indices() if len(idx.columns) == 1}
    missing = [c for c in columns if c not in built]
    if missing:
        raise RuntimeError(f"create_index returned but list_indices() lacks {missing}; this is a bug")
    return {c: built[c] for c in columns}
