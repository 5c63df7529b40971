"""Crash-safe, windowed writes of a Ray Dataset into a LanceDB table (a Lance dataset).

Two phases, as in lance-ray (spec §2.2, §2.4): Ray workers run `FragmentWriter`, which writes Lance
data files with `lance.fragment.write_fragments` and returns only their metadata; the driver's
`LanceCommitter` makes them visible with `LanceDataset.commit`, guarded by the version it read.
We do not use Ray's own Lance sink or `ray.data.checkpoint`: Ray 2.60's `write_lance` is broken with
pylance >= 6 (spec §0.1), and Ray's post-write checkpoint loses rows with a Lance sink because Lance
commits only at the very end (spec §0.2, experiment E6). Here the driver commits while the job runs:

* create / append: every window (`commit_every_rows` rows or `commit_every_s` seconds of results) is
  ONE atomic commit. The first commit of a create is `Overwrite(schema, fragments)`, later ones are
  `Append(fragments)` with `read_version` = the last version we committed; Lance rebases appends over
  concurrent commits. A crash loses at most the uncommitted window; every visible version holds whole
  windows. Data files of an uncommitted window stay on storage unreferenced until
  `cleanup_old_versions(delete_unverified=True)` removes them.
* overwrite: fragments accumulate and ONE `Overwrite` commit happens in `finish()`, so readers never
  see a half-replaced table. A crash before `finish()` leaves the old table untouched.

Run metadata (model, task, dims, chunking, run id, ...) is stored as Lance *table metadata*
(the manifest's key/value map, written with a `LanceOperation.UpdateConfig` commit in `finish()`),
not in the Arrow schema metadata, so schema comparisons for append stay about columns only. Read it
back with `read_table_metadata`. Each commit's `commit_message` names the run (`metadata["run_id"]`),
so `LanceDataset.read_transaction(v)` tells which run wrote version v.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance import LanceOperation
from lance.fragment import FragmentMetadata, write_fragments

if TYPE_CHECKING:
    import ray.data

Mode = Literal["create", "append", "overwrite"]
IndexType = Literal["auto", "ivf_pq", "ivf_flat", "hnsw_sq"]

INTERNAL_PREFIX = "_"  # columns starting with this carry per-row stats/flags, never stored
REJECT_COLUMN = "_reject_reason"  # null = accepted; otherwise why the row was not embedded
RUN_ID_KEY = "run_id"  # metadata key whose value goes into every commit message

# Tables below this many rows get an exact-within-partition IVF_FLAT index: PQ needs >= 256 training
# rows per codebook, and on small tables PQ's recall loss buys nothing.
PQ_MIN_ROWS = 100_000

_TABLE_NAME = re.compile(r"^[A-Za-z0-9_\-.]+$")


def table_uri(db: str, table: str) -> str:
    """The Lance dataset URI of LanceDB table `table` in database `db` (a local path or s3://...)."""
    if not _TABLE_NAME.match(table):
        raise ValueError(f"invalid table name {table!r}: use letters, digits, '_', '-' and '.'")
    return f"{db.rstrip('/')}/{table}.lance"


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


class FragmentWriter:
    """Ray `map_batches` callable: write a batch's accepted rows as uncommitted Lance fragments.

    Returns ONE row per call: `fragments` (JSON list of `FragmentMetadata.to_json()`), `num_rows`
    (rows written), `rejects` (JSON list of {"id", "reason"} for rows whose `_reject_reason` is set)
    and, for every other numeric internal column `_x`, its sum over the whole batch in column `_x`.
    Nothing is visible until `LanceCommitter` commits the fragments.
    """

    def __init__(
        self,
        uri: str,
        schema: pa.Schema,
        storage_options: Mapping[str, str],
        *,
        mode: Mode = "append",
        id_column: str = "id",
        max_rows_per_file: int = 1024 * 1024,
    ):
        if mode not in get_args(Mode):
            raise ValueError(f"mode must be one of {get_args(Mode)}, got {mode!r}")
        self.uri = uri
        self.schema = schema
        self.storage_options = dict(storage_options)
        self.id_column = id_column
        self.max_rows_per_file = max_rows_per_file
        # "append" checks the batch against the existing table and reuses its field ids; a create or
        # overwrite assigns fresh ids from `schema`, the same ones the Overwrite commit will assign.
        self._write_mode = "append" if mode == "append" else "overwrite"

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

        accepted, rejects = batch, []
        if REJECT_COLUMN in names:
            is_accepted = pc.is_null(batch[REJECT_COLUMN])
            accepted = batch.filter(is_accepted)
            rejected = batch.filter(pc.invert(is_accepted))
            if rejected.num_rows:
                if self.id_column not in names:
                    raise ValueError(
                        f"rows were rejected but the batch has no {self.id_column!r} column to report them by"
                    )
                rejects = [
                    {"id": i, "reason": r}
                    for i, r in zip(
                        rejected[self.id_column].to_pylist(), rejected[REJECT_COLUMN].to_pylist(), strict=True
                    )
                ]

        data = _conform(accepted, self.schema)
        fragments: list[FragmentMetadata] = []
        if data.num_rows:
            fragments = write_fragments(
                data,
                self.uri,
                schema=self.schema,
                mode=self._write_mode,
                max_rows_per_file=self.max_rows_per_file,
                storage_options=self.storage_options,
            )
        written = sum(f.physical_rows for f in fragments)
        if written != data.num_rows:
            raise RuntimeError(f"write_fragments wrote {written} rows of {data.num_rows}; this is a bug")

        out: dict[str, pa.Array] = {
            "fragments": pa.array([json.dumps([f.to_json() for f in fragments])], pa.string()),
            "num_rows": pa.array([written], pa.int64()),
            "rejects": pa.array([json.dumps(rejects)], pa.string()),
        }
        for name in batch.column_names:
            if name.startswith(INTERNAL_PREFIX) and name != REJECT_COLUMN:
                summed = _numeric_sum(batch[name])
                if summed is not None:
                    out[name] = pa.array([summed[1]], summed[0])
                elif pa.types.is_string(batch[name].type) or pa.types.is_large_string(batch[name].type):
                    # String stats (e.g. which actor embedded a row) travel as value -> row count.
                    counts = pc.value_counts(batch[name].drop_null()).to_pylist()
                    out[name] = pa.array([json.dumps({c["values"]: c["counts"] for c in counts})], pa.string())
        return pa.table(out)


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitSummary:
    """What a finished write made visible. `rows_committed` equals the sum of the writers' `num_rows`."""

    version: int  # table version after the last commit (data or metadata)
    rows_committed: int
    fragments_committed: int
    commits: int  # data commits (windows); the metadata commit is not counted
    versions: tuple[int, ...]  # the version each data commit produced, in order
    rejects: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int | float] = field(default_factory=dict)  # sums of the internal `_x` columns
    tallies: dict[str, dict[str, int]] = field(default_factory=dict)  # string `_x` columns: value -> rows


def _open_existing(uri: str, storage_options: Mapping[str, str]) -> lance.LanceDataset | None:
    """The dataset at `uri`, or None when there is none (any other failure is raised)."""
    try:
        return lance.dataset(uri, storage_options=dict(storage_options))
    except FileNotFoundError:
        return None
    except ValueError as e:
        # pylance 14 reports a missing dataset as ValueError("Dataset at path ... was not found: ...").
        if "not found" in str(e).lower():
            return None
        raise


def _schema_differences(expected: pa.Schema, actual: pa.Schema) -> list[str]:
    """Column-level differences (name and type; order and nullability ignored)."""
    want = {f.name: f.type for f in expected}
    have = {f.name: f.type for f in actual}
    diffs = [f"missing in table: {n} ({t})" for n, t in want.items() if n not in have]
    diffs += [f"extra in table: {n} ({t})" for n, t in have.items() if n not in want]
    diffs += [f"{n}: table has {have[n]}, writing {t}" for n, t in want.items() if n in have and have[n] != t]
    return diffs


def read_table_metadata(uri: str, storage_options: Mapping[str, str]) -> dict[str, str]:
    """The run metadata `LanceCommitter.finish()` stored (Lance table metadata of the latest version)."""
    return dict(lance.dataset(uri, storage_options=dict(storage_options)).metadata)


class LanceCommitter:
    """Driver-side committer of `FragmentWriter` results; see the module docstring for the semantics.

    Use: `begin()`, then `add(result_rows)` for every batch of writer output, then `finish()`.
    `metadata` is stored on the table in `finish()`; its `run_id` value, if any, labels every commit.
    `commit_every_s` is checked when results arrive (there is no background thread). The counters
    (`rows_committed`, `versions`, ...) stay readable after a failure, for reports and resume.
    """

    def __init__(
        self,
        uri: str,
        schema: pa.Schema,
        storage_options: Mapping[str, str],
        mode: Mode,
        *,
        commit_every_rows: int = 100_000,
        commit_every_s: float = 30.0,
        metadata: Mapping[str, str] | None = None,
    ):
        if mode not in get_args(Mode):
            raise ValueError(f"mode must be one of {get_args(Mode)}, got {mode!r}")
        if commit_every_rows < 1 or not commit_every_s > 0:
            raise ValueError(
                f"commit_every_rows must be >= 1 and commit_every_s > 0, got {commit_every_rows} and {commit_every_s}"
            )
        metadata = dict(metadata or {})
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise TypeError(f"metadata must map str to str; offending entries: {bad}")
        self.uri = uri
        self.schema = schema
        self.storage_options = dict(storage_options)
        self.mode: Mode = mode
        self.commit_every_rows = commit_every_rows
        self.commit_every_s = commit_every_s
        self.metadata = metadata
        self.run_id = metadata.get(RUN_ID_KEY, "")

        self._begun = False
        self._finished = False
        self._read_version: int | None = None  # version the next commit is based on
        self._pending: list[FragmentMetadata] = []
        self._pending_rows = 0
        self._last_commit_t = 0.0
        self.rows_received = 0
        self.rows_committed = 0
        self.fragments_committed = 0
        self.versions: list[int] = []
        self.rejects: list[dict[str, Any]] = []
        self.stats: dict[str, int | float] = {}
        self.tallies: dict[str, dict[str, int]] = {}

    def begin(self) -> int | None:
        """Check `mode` against the table's state; return the version read (None if no table yet)."""
        existing = _open_existing(self.uri, self.storage_options)
        if self.mode == "create" and existing is not None:
            raise FileExistsError(
                f"table {self.uri} already exists (version {existing.version}); "
                "use mode='append' to add rows or mode='overwrite' to replace it"
            )
        if self.mode == "append":
            if existing is None:
                raise FileNotFoundError(f"table {self.uri} does not exist; use mode='create' to make it")
            diffs = _schema_differences(self.schema, existing.schema)
            if diffs:
                raise ValueError(f"cannot append to {self.uri}: schema differs ({'; '.join(diffs)})")
        self._read_version = existing.version if existing is not None else None
        self._last_commit_t = time.monotonic()
        self._begun = True
        return self._read_version

    def add(self, results: pa.Table) -> None:
        """Take `FragmentWriter` output rows; commit a window when it is full (create/append modes)."""
        self._check_open()
        for row in results.to_pylist():
            fragments = [FragmentMetadata.from_json(json.dumps(d)) for d in json.loads(row["fragments"])]
            num_rows = int(row["num_rows"])
            if sum(f.physical_rows for f in fragments) != num_rows:
                raise RuntimeError(
                    f"writer reported {num_rows} rows but its fragments hold a different count; this is a bug"
                )
            self._pending.extend(fragments)
            self._pending_rows += num_rows
            self.rows_received += num_rows
            self.rejects.extend(json.loads(row["rejects"]))
            for name, value in row.items():
                if not name.startswith(INTERNAL_PREFIX) or value is None:
                    continue
                if isinstance(value, str):
                    tally = self.tallies.setdefault(name, {})
                    for key, count in json.loads(value).items():
                        tally[key] = tally.get(key, 0) + count
                else:
                    self.stats[name] = self.stats.get(name, 0) + value
            if self.mode != "overwrite" and self._window_full():
                self._commit_window()

    def finish(self) -> CommitSummary:
        """Commit what is pending (the whole replacement in overwrite mode), store metadata, summarize."""
        self._check_open()
        if self.mode == "overwrite" or (self.mode == "create" and not self.versions):
            self._commit_window(force=True)  # also creates/replaces with an empty table when no rows came
        else:
            self._commit_window()
        if self.metadata or self.mode == "overwrite":
            # Overwrite keeps the previous table metadata, so replace it even when ours is empty:
            # stale model/dims keys must not describe new vectors. Append merges keys.
            op = LanceOperation.UpdateConfig(
                table_metadata_updates=LanceOperation.UpdateMap(self.metadata, replace=self.mode != "append")
            )
            ds = lance.LanceDataset.commit(
                self.uri,
                op,
                read_version=self._read_version,
                storage_options=self.storage_options,
                commit_message=self._message("metadata"),
            )
            self._read_version = ds.version
        if self.rows_committed != self.rows_received:
            raise RuntimeError(
                f"committed {self.rows_committed} rows of {self.rows_received} received; this is a bug"
            )
        self._finished = True
        assert self._read_version is not None
        return CommitSummary(
            version=self._read_version,
            rows_committed=self.rows_committed,
            fragments_committed=self.fragments_committed,
            commits=len(self.versions),
            versions=tuple(self.versions),
            rejects=list(self.rejects),
            stats=dict(self.stats),
            tallies={k: dict(v) for k, v in self.tallies.items()},
        )

    # -- internals --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._begun:
            raise RuntimeError("call begin() before add()/finish()")
        if self._finished:
            raise RuntimeError("this committer has already finished")

    def _window_full(self) -> bool:
        if not self._pending:
            return False
        elapsed = time.monotonic() - self._last_commit_t
        return self._pending_rows >= self.commit_every_rows or elapsed >= self.commit_every_s

    def _message(self, what: str) -> str:
        return f"embedlake run={self.run_id or '-'} mode={self.mode} {what}"

    def _commit_window(self, *, force: bool = False) -> None:
        if not self._pending and not force:
            return
        first_create = self.mode == "create" and not self.versions
        if self.mode == "overwrite" or first_create:
            if first_create and _open_existing(self.uri, self.storage_options) is not None:
                # Overwrite never conflicts, so re-check right before committing to narrow the race with
                # another creator; Lance has no atomic "create if absent" for a distributed write.
                raise FileExistsError(
                    f"table {self.uri} was created by someone else while this run was writing"
                )
            op: LanceOperation.BaseOperation = LanceOperation.Overwrite(self.schema, self._pending)
        else:
            op = LanceOperation.Append(self._pending)
        window = len(self.versions) + 1
        ds = lance.LanceDataset.commit(
            self.uri,
            op,
            read_version=self._read_version,
            storage_options=self.storage_options,
            commit_message=self._message(
                f"window={window} rows={self._pending_rows} fragments={len(self._pending)}"
            ),
        )
        self._read_version = ds.version
        self.versions.append(ds.version)
        self.rows_committed += self._pending_rows
        self.fragments_committed += len(self._pending)
        self._pending, self._pending_rows = [], 0
        self._last_commit_t = time.monotonic()


# --------------------------------------------------------------------------------------------------
# Ray glue
# --------------------------------------------------------------------------------------------------


def write_dataset(
    ds: ray.data.Dataset,
    committer: LanceCommitter,
    *,
    schema: pa.Schema | None = None,
    uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    writer_concurrency: int = 1,
    writer_num_cpus: float = 0.5,
    batch_size: int | None = None,
) -> CommitSummary:
    """Write `ds` through `FragmentWriter` tasks and commit on the driver; returns the summary.

    `schema`, `uri` and `storage_options` default to the committer's (passing different ones is an
    error). `batch_size` is the rows per writer call, i.e. per fragment (None = one call per block);
    keep it large, small fragments slow Lance down (spec §5). `writer_num_cpus` below 1 leaves CPUs
    for read tasks next to an actor pool (spec §0.7). The driver only ever sees fragment metadata.

    If the job fails, the exception propagates: windows committed so far stay visible, the pending
    window is never committed (its data files are orphans for `cleanup_old_versions`).
    """
    import ray.data

    for name, given, own in (
        ("schema", schema, committer.schema),
        ("uri", uri, committer.uri),
        (
            "storage_options",
            None if storage_options is None else dict(storage_options),
            committer.storage_options,
        ),
    ):
        if given is not None and given != own:
            raise ValueError(f"write_dataset got a {name} different from the committer's")

    committer.begin()
    writer = FragmentWriter(committer.uri, committer.schema, committer.storage_options, mode=committer.mode)
    # Tasks, not actors: an actor is one more process to start beside the encoders while they load,
    # and the writer keeps no state between batches. Task workers are pooled and reused.
    results = ds.map_batches(
        writer,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.TaskPoolStrategy(size=writer_concurrency),
        num_cpus=writer_num_cpus,
    )
    for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
        committer.add(batch)
    return committer.finish()


# --------------------------------------------------------------------------------------------------
# Indexes
# --------------------------------------------------------------------------------------------------


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
    vector_columns = [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]
    for column in columns:
        if column not in vector_columns:
            raise ValueError(
                f"{column!r} is not a vector column of {table!r}; vector columns: {vector_columns}"
            )
        dims = schema.field(column).type.list_size
        tbl.create_index(column, config=_index_config(index_type, rows, dims, distance_type), replace=True)
    built = {idx.columns[0]: idx.index_type for idx in tbl.list_indices() if len(idx.columns) == 1}
    missing = [c for c in columns if c not in built]
    if missing:
        raise RuntimeError(f"create_index returned but list_indices() lacks {missing}; this is a bug")
    return {c: built[c] for c in columns}
