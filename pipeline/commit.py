"""The driver half of the two-phase Lance write: atomic windows of whole documents, exactly once.

Invariant: the table holds, for every id, all chunks of exactly one version of that document. So the
table itself is the progress record: a document is done iff its id is in the table with the source's
`content_hash`. Nothing else records progress, so progress and data can never disagree; a re-run
(resume, `reembed`) looks each source document up by id and embeds only what is absent or changed
(`pipeline.diff`). Resume granularity is whole documents, committed in windows.

Windows. `FragmentWriter` results are grouped so that a window never splits a document (a document's
chunk rows can arrive in two results; `DocWindows` keeps them together) and close every
`commit_every_rows` rows or `commit_every_s` seconds. Each window is ONE Lance commit:
* live (create, append, reembed): `Append(fragments)`, or, when the window replaces documents the
  table already holds, `Update(removed/updated fragments = their old chunks, new_fragments)`: readers
  see each document's old chunks or its new ones, never both and never neither. The deletions are
  computed against the latest version and the commit is guarded by it; a concurrent writer's
  conflicting commit makes us recompute and retry (`CONFLICT_RETRIES`).
* staged (overwrite, `reembed --full`): windows are *detached* commits (spec §2.4: never the latest
  version, invisible to readers) chained from an empty `Overwrite`; `finish()` switches readers over
  with one `Restore` of the last staged version, data and metadata together. A pointer file
  `<table>.staging/<job_key>.json` names the last staged version so a re-run continues from it; it is
  written after the commit, so a crash in between only costs that window's recomputation.

Metadata (`TableMetadata`) is committed before the first window (state "running") and marked
"complete" at the end, so the table is queryable after every commit and a re-run of the same command
(same `job_key`) knows it may resume. Every commit carries the run id, the command kind and the
window's counts as Lance transaction properties: `pipeline.history` reads them back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance import LanceOperation
from lance.fragment import FragmentMetadata, write_fragments

from pipeline.lance_commit import commit_once, open_existing, retry_conflicts, retry_io
from pipeline.sink import INTERNAL_PREFIX
from pipeline.storage import StorageConfig, url_path
from pipeline.table_meta import TableMetadata

Mode = Literal["create", "append", "overwrite", "reembed", "full", "backfill"]
T = TypeVar("T")
MAX_REJECT_SAMPLE = 100  # rejected rows listed in the summary; all are counted by reason
# Every commit's Lance transaction properties are named with this prefix; `pipeline.history` reads them.
PROPERTY_PREFIX = "embedlake."
_RESULT_COLUMNS = ("fragments", "num_rows", "rejected", "reject_sample", "documents", "replace", "edges",
                   "rejected_fragments", "rejected_keys")
REJECTED_SCHEMA = pa.schema([("key", pa.string()), ("run_id", pa.string()), ("file", pa.string()),
                             ("row", pa.int64()), ("id", pa.string()), ("reason", pa.string())])


def staging_url(uri: str, name: str) -> str:
    """Where a run keeps what it stages beside the table (never inside the Lance directory, whose
    cleanup owns every file there): `<table>.staging/<name>`."""
    return f"{uri.removesuffix('.lance')}.staging/{name}"


def rejected_uri(uri: str) -> str:
    """`<table>_rejected` beside the table: one row per rejected source row (or skipped file)."""
    return f"{uri.removesuffix('.lance')}_rejected.lance"


@dataclass
class WriterResult:
    """One `FragmentWriter` output row."""

    fragments: list[FragmentMetadata]
    rows: int
    replace: list[str]  # ids whose previous chunks these rows replace
    edges: dict[str, list[int]]  # id -> [chunks here, chunks of the document] for split documents
    rejected_fragments: list[FragmentMetadata] = field(default_factory=list)  # rows for `<table>_rejected`
    rejected_keys: list[str] = field(default_factory=list)  # their keys (file#row)
    documents: dict[str, int] = field(default_factory=dict)  # new / changed / unchanged -> documents


class DocWindows:
    """Groups writer results into commit-ready sets that never split a document.

    A result without split documents is ready at once. Results that share a split document form one
    group (union over shared ids), ready when each of its split documents has all its chunks.
    """

    def __init__(self) -> None:
        self._groups: dict[int, tuple[list[WriterResult], dict[str, list[int]]]] = {}
        self._group_of: dict[str, int] = {}  # split id -> group key
        self._next = 0
        self.ready: list[WriterResult] = []

    def add(self, result: WriterResult) -> None:
        if not result.edges:
            self.ready.append(result)
            return
        keys = {self._group_of[i] for i in result.edges if i in self._group_of}
        results, seen = [result], {}
        for k in keys:
            other_results, other_seen = self._groups.pop(k)
            results += other_results
            for i, (n, total) in other_seen.items():
                seen[i] = [seen.get(i, [0, total])[0] + n, total]
        for i, (n, total) in result.edges.items():
            seen[i] = [seen.get(i, [0, total])[0] + n, total]
        if any(n > total for n, total in seen.values()):
            raise RuntimeError(f"more chunks than a document has arrived ({seen}); this is a bug")
        for i in seen:
            self._group_of.pop(i, None)
        if all(n == total for n, total in seen.values()):
            self.ready.extend(results)
            return
        key, self._next = self._next, self._next + 1
        self._groups[key] = (results, seen)
        for i in seen:
            self._group_of[i] = key

    @property
    def waiting(self) -> int:
        return sum(len(r) for r, _ in self._groups.values())


@dataclass(frozen=True)
class Resume:
    """What `begin()` found: the version whose documents count as done (None: nothing to look up)."""

    base_version: int | None
    resumed: bool  # a re-run continuing its own interrupted run
    staged: bool
    rows_before: int  # rows the base version already holds


@dataclass(frozen=True)
class CommitSummary:
    """What a finished write made visible. `rows_committed` equals the sum of the writers' `num_rows`."""

    version: int
    rows_committed: int
    fragments_committed: int
    commits: int  # data commits (windows)
    versions: tuple[int, ...]
    resume: Resume
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> rows
    reject_sample: list[dict] = field(default_factory=list)
    documents: dict[str, int] = field(default_factory=dict)  # new / changed / unchanged -> documents
    replaced_rows: int = 0  # old chunk rows the windows removed
    deleted_documents: int = 0  # documents gone from the source, removed (`--delete-missing`)
    missing_kept: int = 0  # documents gone from the source, counted and kept (set by the job)
    stats: dict[str, int | float] = field(default_factory=dict)  # sums of the internal `_x` columns
    tallies: dict[str, dict[str, int]] = field(default_factory=dict)  # string `_x` columns: value -> rows


def _sql_list(ids: list[str]) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in ids)


def deletions_for(ds: lance.LanceDataset, ids: list[str], column: str = "id") -> tuple[list[int], list[FragmentMetadata], int]:
    """(removed fragment ids, updated fragments, rows deleted) that drop every row whose `column` is in
    `ids` from `ds`.

    The lookup scans only that column (a BTREE index on it, when present, makes it a lookup);
    deletion vectors are then written for the fragments that hold those ids only.
    """
    if not ids:
        return [], [], 0
    hits = ds.scanner(columns=[column], filter=pc.field(column).isin(ids), with_row_address=True).to_table()
    by_fragment: dict[int, set[str]] = {}
    for i, addr in zip(hits[column].to_pylist(), hits["_rowaddr"].to_pylist(), strict=True):
        by_fragment.setdefault(addr >> 32, set()).add(i)
    removed, updated = [], []
    for fid, fids in sorted(by_fragment.items()):
        new = ds.get_fragment(fid).delete(f"{column} IN ({_sql_list(sorted(fids))})")
        if new is None:
            removed.append(fid)
        else:
            updated.append(new)
    return removed, updated, hits.num_rows


def _replacing(ds: lance.LanceDataset, column: str, keys: list[str], fragments: list[FragmentMetadata],
               properties: dict[str, str]) -> tuple[lance.Transaction | None, int]:
    """The transaction that drops the rows of `keys` and adds `fragments`, based on `ds`'s version."""
    removed, updated, deleted = deletions_for(ds, keys, column)
    if not fragments and not deleted:
        return None, 0
    if removed or updated:
        op = LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated, new_fragments=fragments)
    else:
        op = LanceOperation.Append(fragments)
    props = {**properties, "embedlake.replaced_rows": str(deleted)}
    return lance.Transaction(ds.version, op, transaction_properties=props), deleted


def commit_skipped_files(uri: str, storage: StorageConfig, run_id: str, files: list[dict[str, str]]) -> None:
    """Skipped input files into `<table>_rejected` (`rejected_uri`): a row each, no id or row number,
    keyed `<file>#file`, so a re-run that skips it again replaces its row."""
    if not files:
        return
    options = storage.lance_options()
    keys = [f"{f['file']}#file" for f in files]
    table = pa.table({"key": keys, "run_id": [run_id] * len(files), "file": [f["file"] for f in files],
                      "row": pa.nulls(len(files), pa.int64()), "id": pa.nulls(len(files), pa.string()),
                      "reason": [f"skipped file: {f['reason']}" for f in files]}, schema=REJECTED_SCHEMA)
    fragments = write_fragments(table, uri, schema=REJECTED_SCHEMA, mode="append", storage_options=options)

    def attempt() -> None:
        ds = lance.dataset(uri, storage_options=options)
        props = {f"{PROPERTY_PREFIX}run_id": run_id, f"{PROPERTY_PREFIX}what": "skipped_files"}
        tx, _ = _replacing(ds, "key", keys, fragments, props)
        commit_once(uri, tx, options)

    retry_conflicts(attempt)


def run_tag(run_id: str) -> str:
    """The tag on the version a finished run left the table at."""
    return f"embedlake-run-{run_id}"


class LanceCommitter:
    """Driver-side committer of `FragmentWriter` results; see the module docstring for the semantics.

    Use: `begin()` (returns the `Resume` the job looks documents up against), then `add(result_rows)`
    for every batch of writer output, then `finish()`. Counters stay readable after a failure.
    """

    def __init__(
        self,
        uri: str,
        schema: pa.Schema,
        storage: StorageConfig,
        mode: Mode,
        metadata: TableMetadata,
        *,
        commit_every_rows: int = 100_000,
        commit_every_s: float = 60.0,
        kind: str | None = None,
    ):
        if commit_every_rows < 1 or not commit_every_s > 0:
            raise ValueError(
                f"commit_every_rows must be >= 1 and commit_every_s > 0, got {commit_every_rows} and {commit_every_s}"
            )
        self.uri = uri
        self.rejected_uri = rejected_uri(uri)
        self.schema = schema
        self.storage = storage
        self.storage_options = storage.lance_options()
        self.mode: Mode = mode
        self.kind = kind or mode
        self.metadata = metadata
        self.commit_every_rows = commit_every_rows
        self.commit_every_s = commit_every_s
        self.staged = False

        self._begun = self._finished = False
        self._stage_version: int | None = None
        self._windows = DocWindows()
        self._last_commit_t = 0.0
        self.resume: Resume | None = None
        self.rows_received = self.rows_committed = self.fragments_committed = self.replaced_rows = 0
        self.deleted_documents = 0
        self.versions: list[int] = []
        self.rejected: dict[str, int] = {}
        self.reject_sample: list[dict] = []
        self.documents: dict[str, int] = {}
        self.stats: dict[str, int | float] = {}
        self.tallies: dict[str, dict[str, int]] = {}

    # -- begin ------------------------------------------------------------------------------------

    def begin(self) -> Resume:
        """Check the mode against the table's state, create or resume, and say what counts as done."""
        existing = open_existing(self.uri, self.storage_options)
        meta = self._existing_metadata(existing)
        if existing is None or (meta is None and existing.count_rows() == 0):
            # No table, or an empty one whose creating run died before its metadata commit.
            if self.mode in ("append", "reembed", "full"):  # a backfill makes the table it starts
                raise FileNotFoundError(f"table {self.uri} does not exist; create it with `embedlake embed`")
            if existing is None and not self._create():
                return self.begin()  # another run created it first: begin against its table
            if existing is not None:  # the empty leftover: this run's metadata on it
                self._commit_metadata(existing.version, running=True)
            return self._resumed(None, resumed=False)
        if self.mode in ("overwrite", "full"):
            return self._begin_staged(existing)
        if meta is None:
            raise ValueError(f"table {self.uri} holds rows but no embedlake metadata; it was not written by embedlake")
        if self.mode == "create":
            if meta.job_key == self.metadata.job_key and meta.state == "running":
                return self._resumed(existing.version, resumed=True)
            raise FileExistsError(
                f"table {self.uri} already exists (version {existing.version}, run {meta.run_id}, {meta.state}); "
                "use `embedlake reembed` to update it, --mode overwrite to replace it, or another --table"
            )
        diffs = meta.setting_differences(self.metadata) + self._schema_differences(existing.schema)
        if diffs:
            hint = {"reembed": "re-run with --full to re-embed everything",
                    "backfill": "backfill into another --table, or re-embed this one with `embedlake reembed --full`",
                    }.get(self.mode, "use --mode overwrite")
            raise ValueError(f"table {self.uri} was embedded with other settings ({'; '.join(diffs)}); {hint}")
        resumed = meta.job_key == self.metadata.job_key and meta.state == "running"
        # This run's metadata, "running", before its first window: a crash leaves a table that says so.
        version = self._commit_metadata(existing.version, running=True)
        return self._resumed(version, resumed=resumed)

    def _existing_metadata(self, ds: lance.LanceDataset | None) -> TableMetadata | None:
        if ds is None:
            return None
        try:
            return TableMetadata.from_metadata(ds.metadata, where=f"table {self.uri}")
        except ValueError:
            return None

    def _schema_differences(self, actual: pa.Schema) -> list[str]:
        want = {f.name: f.type for f in self.schema}
        have = {f.name: f.type for f in actual}
        diffs = [f"column {n} missing in table" for n in want if n not in have]
        diffs += [f"column {n} only in table" for n in have if n not in want]
        diffs += [f"column {n}: table has {have[n]}, writing {t}" for n, t in want.items() if n in have and have[n] != t]
        return diffs

    def _create(self) -> bool:
        """Create the empty table, atomically if absent (Lance's create mode puts version 1 only if no
        one did: two backfills starting on a new table cannot both create it). False if one did."""
        ds = retry_io(lambda: lance.write_dataset(self.schema.empty_table(), self.uri, mode="create",
                                                  storage_options=self.storage_options),
                      lambda: open_existing(self.uri, self.storage_options) is not None)
        if ds is None:  # it exists: made by another run, or by our own attempt whose answer was lost
            return False
        self._commit_metadata(ds.version, running=True)
        return True

    def _begin_staged(self, existing: lance.LanceDataset) -> Resume:
        self.staged = True
        pointer = self._read_pointer()
        if pointer is not None and open_existing(self.uri, self.storage_options, pointer) is not None:
            self._stage_version = pointer
            return self._resumed(pointer, resumed=True)
        ds = lance.LanceDataset.commit(self.uri, LanceOperation.Overwrite(self.schema, []), read_version=existing.version,
                                       storage_options=self.storage_options, detached=True)
        self._stage_version = ds.version
        self._commit_metadata(ds.version, running=True)  # also writes the pointer
        return self._resumed(None, resumed=False)

    def _ensure_rejected_table(self) -> None:
        if open_existing(self.rejected_uri, self.storage_options) is None:
            commit_once(self.rejected_uri, lance.Transaction(0, LanceOperation.Overwrite(REJECTED_SCHEMA, [])),
                        self.storage_options)

    def _resumed(self, base: int | None, *, resumed: bool) -> Resume:
        self._ensure_rejected_table()
        rows = 0 if base is None else open_existing(self.uri, self.storage_options, base).count_rows()
        self.resume = Resume(base_version=base, resumed=resumed, staged=self.staged, rows_before=rows)
        self._last_commit_t = time.monotonic()
        self._begun = True
        return self.resume

    # -- add ----------------------------------------------------------------------------------------

    def add(self, results: pa.Table) -> None:
        """Take `FragmentWriter` output rows; commit a window when it is full."""
        self._check_open()
        for row in results.to_pylist():
            result = WriterResult(
                fragments=[FragmentMetadata.from_json(json.dumps(d)) for d in json.loads(row["fragments"])],
                rows=int(row["num_rows"]),
                replace=json.loads(row["replace"]),
                edges=json.loads(row["edges"]),
                rejected_fragments=[FragmentMetadata.from_json(json.dumps(d)) for d in json.loads(row["rejected_fragments"])],
                rejected_keys=json.loads(row["rejected_keys"]),
                documents=json.loads(row["documents"]),
            )
            if sum(f.physical_rows for f in result.fragments) != result.rows:
                raise RuntimeError("writer reported a row count its fragments do not hold; this is a bug")
            self.rows_received += result.rows
            self._count(row)
            self._windows.add(result)
            if self._window_full():
                self._commit_window()

    def _count(self, row: dict) -> None:
        for reason, n in json.loads(row["rejected"]).items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n
        room = MAX_REJECT_SAMPLE - len(self.reject_sample)
        if room > 0:
            self.reject_sample.extend(json.loads(row["reject_sample"])[:room])
        for status, n in json.loads(row["documents"]).items():
            self.documents[status] = self.documents.get(status, 0) + n
        for name, value in row.items():
            if name in _RESULT_COLUMNS or not name.startswith(INTERNAL_PREFIX) or value is None:
                continue
            if isinstance(value, str):
                tally = self.tallies.setdefault(name, {})
                for key, count in json.loads(value).items():
                    tally[key] = tally.get(key, 0) + count
            else:
                self.stats[name] = self.stats.get(name, 0) + value

    def _window_full(self) -> bool:
        if not self._windows.ready:
            return False
        ready_rows = sum(r.rows for r in self._windows.ready)
        return ready_rows >= self.commit_every_rows or time.monotonic() - self._last_commit_t >= self.commit_every_s

    # -- commit -------------------------------------------------------------------------------------

    def _properties(self, what: str, **counts: int) -> dict[str, str]:
        props = {"run_id": self.metadata.run_id, "kind": self.kind, "what": what, **{k: str(v) for k, v in counts.items()}}
        return {PROPERTY_PREFIX + k: v for k, v in props.items()}

    def _commit_window(self) -> None:
        results, self._windows.ready = self._windows.ready, []
        self._commit_rejected(results)
        fragments = [f for r in results for f in r.fragments]
        rows = sum(r.rows for r in results)
        docs = {f"documents_{k}": sum(r.documents.get(k, 0) for r in results) for k in ("new", "changed")}
        new, deleted = self._commit_replacing(sorted({i for r in results for i in r.replace}), fragments,
                                              "window", window=len(self.versions) + 1, rows=rows, **docs)
        if new is None:  # only unchanged or rejected documents: nothing to commit
            return
        self.versions.append(new.version)
        self.rows_committed += rows
        self.replaced_rows += deleted
        self.fragments_committed += len(fragments)
        self._last_commit_t = time.monotonic()

    def delete_documents(self, ids: list[str]) -> int:
        """Remove every chunk of `ids` in one commit (live tables); returns the rows removed."""
        self._check_open()
        if self.staged:
            raise RuntimeError("a staged replacement holds only this run's documents; there is nothing to delete")
        new, deleted = self._commit_replacing(ids, [], "delete", documents=len(ids))
        if new is not None:
            self.deleted_documents += len(ids)
        return deleted

    def _commit_replacing(self, ids: list[str], fragments: list[FragmentMetadata], what: str,
                          **counts: int) -> tuple[lance.LanceDataset | None, int]:
        """ONE commit that drops every chunk of `ids` and adds `fragments`, guarded by the version the
        deletions were computed on; recomputed and retried when a concurrent commit conflicts.
        Returns (the new version, rows deleted), or (None, 0) when there was nothing to change."""

        def attempt() -> tuple[lance.LanceDataset | None, int]:
            ds = lance.dataset(self.uri, version=self._stage_version if self.staged else None,
                               storage_options=self.storage_options)
            tx, deleted = _replacing(ds, "id", ids, fragments, self._properties(what, **counts))
            return (None, 0) if tx is None else (self._commit(tx), deleted)

        return retry_conflicts(attempt)

    def _commit_rejected(self, results: list[WriterResult]) -> None:
        """The window's rejected rows into `<table>_rejected`, before its data: a crash between the two
        re-rejects those rows on resume, and they replace themselves by `key` (file#row), never doubled."""
        fragments = [f for r in results for f in r.rejected_fragments]
        if not fragments:
            return
        keys = sorted({k for r in results for k in r.rejected_keys})

        def attempt() -> None:
            ds = lance.dataset(self.rejected_uri, storage_options=self.storage_options)
            tx, _ = _replacing(ds, "key", keys, fragments, self._properties("rejected", rows=len(keys)))
            if tx is not None:
                commit_once(self.rejected_uri, tx, self.storage_options)

        retry_conflicts(attempt)

    def _commit_metadata(self, read_version: int, *, running: bool, **counts: int) -> int:
        """This run's metadata as the table's, replacing the previous run's. Two live runs on one table
        (backfills of different partitions) both write it: a conflict re-reads the latest and retries.
        The final one carries the run's counts for `history`."""
        meta = replace(self.metadata, state="running" if running else "complete")
        op = LanceOperation.UpdateConfig(table_metadata_updates=LanceOperation.UpdateMap(meta.to_metadata(), replace=True))
        versions = iter([read_version])

        def attempt() -> lance.LanceDataset:
            base = next(versions, None)
            if base is None:  # a retry: the latest version, which a concurrent run moved
                base = lance.dataset(self.uri, storage_options=self.storage_options).version
            props = self._properties("metadata" if running else "complete", **counts)
            return self._commit(lance.Transaction(base, op, transaction_properties=props))

        return retry_conflicts(attempt).version

    def _commit(self, tx: lance.Transaction) -> lance.LanceDataset:
        """Commit (detached while staging: then the pointer follows the new staged version)."""
        ds = commit_once(self.uri, tx, self.storage_options, detached=self.staged)
        if self.staged:
            self._stage_version = ds.version
            self._write_pointer()
        return ds

    # -- finish -------------------------------------------------------------------------------------

    def finish(self) -> CommitSummary:
        """Commit what is pending, mark the run complete (staged: switch readers over), summarize."""
        self._check_open()
        if self._windows.waiting:
            raise RuntimeError(f"{self._windows.waiting} writer results hold documents whose other chunks never came; this is a bug")
        self._commit_window()
        if self.rows_committed != self.rows_received:
            raise RuntimeError(f"committed {self.rows_committed} rows of {self.rows_received} received; this is a bug")
        counts = {"rows": self.rows_committed, "replaced_rows": self.replaced_rows,
                  "documents_new": self.documents.get("new", 0), "documents_changed": self.documents.get("changed", 0),
                  "documents_unchanged": self.documents.get("unchanged", 0), "documents_deleted": self.deleted_documents}
        if self.staged:
            self._commit_metadata(self._stage_version, running=False, **counts)
            latest = lance.dataset(self.uri, storage_options=self.storage_options).version
            tx = lance.Transaction(latest, LanceOperation.Restore(self._stage_version),
                                   transaction_properties=self._properties("switch", **counts))
            version = commit_once(self.uri, tx, self.storage_options).version
            self._remove_pointer()
        else:
            latest = lance.dataset(self.uri, storage_options=self.storage_options).version
            version = self._commit_metadata(latest, running=False, **counts)
        # Tagged, so version cleanup keeps every finished run's table for `rollback`.
        tags = lance.dataset(self.uri, storage_options=self.storage_options).tags
        tag = run_tag(self.metadata.run_id)
        if tag in tags.list():  # a run id given twice: the tag names its latest finish
            tags.update(tag, version)
        else:
            tags.create(tag, version)
        self._finished = True
        assert self.resume is not None
        return CommitSummary(
            version=version, rows_committed=self.rows_committed, fragments_committed=self.fragments_committed,
            commits=len(self.versions), versions=tuple(self.versions), resume=self.resume,
            rejected=dict(self.rejected), reject_sample=list(self.reject_sample), documents=dict(self.documents),
            replaced_rows=self.replaced_rows, deleted_documents=self.deleted_documents, stats=dict(self.stats),
            tallies={k: dict(v) for k, v in self.tallies.items()},
        )

    def _check_open(self) -> None:
        if not self._begun:
            raise RuntimeError("call begin() before add()/finish()")
        if self._finished:
            raise RuntimeError("this committer has already finished")

    # -- staging pointer ----------------------------------------------------------------------------

    def _pointer_url(self) -> str:
        return staging_url(self.uri, f"{self.metadata.job_key}.json")

    def _read_pointer(self) -> int | None:
        url = self._pointer_url()
        fs = self.storage.fsspec_filesystem(url)
        try:
            with fs.open(url_path(url), "r") as fh:
                return int(json.load(fh)["version"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _write_pointer(self) -> None:
        url = self._pointer_url()
        fs = self.storage.fsspec_filesystem(url)
        path = url_path(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        body = json.dumps({"version": self._stage_version, "run_id": self.metadata.run_id})
        if "://" in url:  # an object-store PUT is atomic
            fs.pipe_file(path, body.encode())
        else:  # a local write is not: write beside, then rename over
            fs.pipe_file(path + ".tmp", body.encode())
            fs.mv(path + ".tmp", path)

    def _remove_pointer(self) -> None:
        url = self._pointer_url()
        fs = self.storage.fsspec_filesystem(url)
        if fs.exists(url_path(url)):
            fs.rm(url_path(url))

