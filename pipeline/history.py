"""A table's runs and rollback, read from the table's own Lance version history.

What it reads: nothing but the table. Every commit `pipeline.commit.LanceCommitter` makes carries Lance
transaction properties (`embedlake.run_id`, `.kind`, `.what`, counts); `run_history` walks the
main-line versions (`ds.versions()` + `read_transaction(v)`) and groups them by run id. The final
commit of a finished run (`what` = complete, or the staged runs' `switch`) carries the run's counts;
an unfinished run's counts are the sums of what its windows and delete commits say (each window names
its chunk rows and new and changed documents), and the record is marked partial. Versions without
embedlake properties (index builds, compaction, the empty `Overwrite` a create starts from) belong to
no run and are left out. A staged run's windows are detached versions, outside the main line: it
shows as its one `switch` commit, and one interrupted before that switch does not show at all.

Rollback is ONE `Restore(version)` commit on top of the latest version: readers then see that
version's data AND its table metadata (`TableMetadata` lives in the manifest), so a rolled-back
table reads, resumes and re-embeds as it did then. The versions after it stay in the history.

Tags keep versions alive: the committer tags every finished run's final version `run_tag(run_id)`,
and `cleanup_old_versions` never removes a tagged version (in pylance 14 it raises when one is old
enough to go, unless called with `error_if_tagged_old_versions=False`, which keeps it and cleans the
rest), so `rollback` to a finished run works after any cleanup. An untagged version (a window, an
unfinished run's last commit) is gone once cleaned up, and a rollback to it fails with a clear error.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Literal

import lance
from lance import LanceOperation

from pipeline.commit import PROPERTY_PREFIX, run_tag
from pipeline.lance_commit import open_existing
from pipeline.sink import table_uri
from pipeline.storage import StorageConfig

log = logging.getLogger(__name__)

FINAL = ("complete", "switch")  # the `what` of a finished run's last commit
MAX_LISTED_RUNS = 10  # run ids an unknown-run error lists


@dataclass(frozen=True)
class RunRecord:
    """One run as the table's versions tell it; counts are documents, `rows` chunk rows."""

    run_id: str
    kind: str  # create, append, overwrite, reembed, full, rollback, ...
    state: Literal["complete", "unfinished"]
    started: datetime  # UTC timestamp of its first main-line version
    ended: datetime  # ... and of its last
    first_version: int
    last_version: int
    tagged_version: int | None  # the version its tag keeps from cleanup
    rows: int | None  # None where the commits do not say: a rollback's counts, an unfinished run's added/changed
    added: int | None
    changed: int | None
    deleted: int | None
    partial: bool  # counts summed over an unfinished run's windows
    restored: int | None = None  # the version a rollback restored

    def to_dict(self) -> dict:
        return {**asdict(self), "started": self.started.isoformat(), "ended": self.ended.isoformat()}


@dataclass(frozen=True)
class _Commit:
    version: int
    at: datetime
    props: dict[str, str]  # without the prefix

    def count(self, name: str) -> int | None:
        return int(self.props[name]) if name in self.props else None


def _open(uri: str, storage: StorageConfig) -> lance.LanceDataset:
    ds = open_existing(uri, storage.lance_options())
    if ds is None:
        raise FileNotFoundError(f"table {uri} does not exist")
    return ds


def _commits_by_run(ds: lance.LanceDataset) -> dict[str, list[_Commit]]:
    """The main line's embedlake commits, oldest first, grouped by run id (runs in order of first commit)."""
    runs: dict[str, list[_Commit]] = {}
    for v in ds.versions():
        tx = ds.read_transaction(v["version"])
        props = {k.removeprefix(PROPERTY_PREFIX): val for k, val in (tx.transaction_properties if tx else {}).items()
                 if k.startswith(PROPERTY_PREFIX)}
        if "run_id" in props:
            # pylance gives naive local time; made UTC here so JSON and logs compare across machines.
            at = v["timestamp"].astimezone(timezone.utc)
            runs.setdefault(props["run_id"], []).append(_Commit(v["version"], at, props))
    return runs


def _sum(commits: list[_Commit], what: str, name: str) -> int:
    return sum(c.count(name) or 0 for c in commits if c.props.get("what") == what)


def _record(run_id: str, commits: list[_Commit], tags: dict[str, int]) -> RunRecord:
    first, last = commits[0], commits[-1]
    final = next((c for c in reversed(commits) if c.props.get("what") in FINAL), None)
    if final is not None:
        counts = {"rows": final.count("rows"), "added": final.count("documents_new"),
                  "changed": final.count("documents_changed"), "deleted": final.count("documents_deleted")}
    else:  # an unfinished run: what its windows and delete commits say
        counts = {"rows": _sum(commits, "window", "rows"), "added": _sum(commits, "window", "documents_new"),
                  "changed": _sum(commits, "window", "documents_changed"),
                  "deleted": _sum(commits, "delete", "documents")}
    return RunRecord(
        run_id=run_id, kind=last.props.get("kind", "?"), state="unfinished" if final is None else "complete",
        started=first.at, ended=last.at, first_version=first.version, last_version=last.version,
        tagged_version=tags.get(run_tag(run_id)), partial=final is None, restored=last.count("to"), **counts,
    )


def _history(ds: lance.LanceDataset) -> list[RunRecord]:
    tags = {name: info["version"] for name, info in ds.tags.list().items()}
    return [_record(run_id, commits, tags) for run_id, commits in _commits_by_run(ds).items()]


def run_history(db: str, table: str, storage: StorageConfig) -> list[RunRecord]:
    """Every run that committed to the table, oldest first (see the module docstring for what is read)."""
    return _history(_open(table_uri(db, table), storage))


def _target_version(ds: lance.LanceDataset, table: str, to: str) -> int:
    """`to` as a version: a run id the history knows (its tagged version, else its last), else a version number."""
    runs = {r.run_id: r for r in _history(ds)}
    if to in runs:
        run = runs[to]
        return run.last_version if run.tagged_version is None else run.tagged_version
    if not to.isdigit():
        recent = list(runs)[-MAX_LISTED_RUNS:]
        known = ", ".join(reversed(recent)) + (f" (and {len(runs) - len(recent)} older)" if len(runs) > len(recent) else "")
        raise ValueError(f"unknown run id {to!r} in table {table}; known runs, newest first: {known or 'none'}")
    versions = [v["version"] for v in ds.versions()]
    if int(to) not in versions:
        raise ValueError(f"version {to} of table {table} does not exist (it has versions {versions[0]}..{versions[-1]}; "
                         "an untagged version removed by cleanup_old_versions is gone)")
    return int(to)


def rollback(db: str, table: str, to: str, storage: StorageConfig) -> int:
    """Make the table read as it did after version or run `to`, in one commit; returns the new version.

    A known run id wins over a version number of the same spelling. Lance does not count a `Restore`
    as conflicting with a commit that lands between our read and our commit, so such a commit is
    undone with the rest (logged): stop writers first.
    """
    uri = table_uri(db, table)
    ds = _open(uri, storage)
    version = _target_version(ds, table, to)
    props = {"run_id": uuid.uuid4().hex[:12], "kind": "rollback", "what": "switch", "to": str(version)}
    tx = lance.Transaction(ds.version, LanceOperation.Restore(version),
                           transaction_properties={PROPERTY_PREFIX + k: v for k, v in props.items()})
    new = lance.LanceDataset.commit(uri, tx, storage_options=storage.lance_options()).version
    if new != ds.version + 1:
        log.warning("versions %d..%d were committed during the rollback and are undone by it", ds.version + 1, new - 1)
    return new
