"""Run history and rollback on real Lance tables written by the real committer (no Ray)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import lance
import pytest
from committed import META, docs, make, table, three_runs, write

from pipeline.history import rollback, run_history
from pipeline.sink import read_table_metadata, table_uri
from pipeline.storage import StorageConfig

STORAGE = StorageConfig({})


@pytest.fixture
def db(tmp_path) -> str:
    three_runs(table_uri(str(tmp_path), "t"))
    return str(tmp_path)


def _by_id(db: str) -> dict:
    return {r.run_id: r for r in run_history(db, "t", STORAGE)}


def test_history_lists_each_run_with_its_kind_counts_and_versions(db):
    lance.dataset(table_uri(db, "t")).create_scalar_index("id", "BTREE")  # no run's commit: left out
    runs = run_history(db, "t", STORAGE)
    assert [(r.run_id, r.kind, r.state) for r in runs] == [
        ("r1", "create", "complete"), ("r2", "reembed", "complete"), ("r3", "reembed", "complete")]
    assert [(r.rows, r.added, r.changed, r.deleted) for r in runs] == [(4, 3, 0, 0), (1, 0, 1, 0), (0, 0, 0, 1)]
    assert not any(r.partial for r in runs)
    versions = [v for r in runs for v in (r.first_version, r.last_version)]
    assert versions == sorted(versions) and versions[0] < versions[1]  # oldest first, runs do not overlap
    assert all(r.tagged_version == r.last_version for r in runs) and runs[0].started.utcoffset() == timedelta(0)
    assert all(a.ended <= b.started for a, b in zip(runs, runs[1:], strict=False))


def test_an_interrupted_run_is_unfinished_with_the_counts_its_windows_committed(db):
    uri = table_uri(db, "t")
    c = make(uri, "reembed", dataclasses.replace(META, run_id="r4"), commit_every_rows=1)
    c.begin()
    c.add(write(uri, docs({"a": 1, "d": 2}, version="v4", status="new")))  # one window, committed at once
    c.delete_documents(["b"])  # ... and the process dies: no finish()
    r4 = _by_id(db)["r4"]
    assert (r4.state, r4.partial, r4.tagged_version) == ("unfinished", True, None)
    assert (r4.rows, r4.added, r4.changed, r4.deleted) == (3, 2, 0, 1)
    assert r4.last_version == lance.dataset(uri).version


@pytest.mark.parametrize("by", ["run id", "version"])
def test_rollback_restores_a_runs_rows_and_metadata_in_one_commit(db, by):
    uri = table_uri(db, "t")
    r1 = _by_id(db)["r1"]
    latest = lance.dataset(uri).version
    new = rollback(db, "t", "r1" if by == "run id" else str(r1.last_version), STORAGE)
    assert new == latest + 1
    assert table(uri) == table(uri, r1.last_version) == [("a", 0, "a-v1"), ("b", 0, "b-v1"), ("b", 1, "b-v1"),
                                                          ("c", 0, "c-v1")]
    meta = read_table_metadata(uri, {})
    assert (meta.run_id, meta.written_at, meta.state) == ("r1", "by r1", "complete")
    back = run_history(db, "t", STORAGE)[-1]
    assert (back.kind, back.state, back.restored, back.first_version) == ("rollback", "complete", r1.last_version, new)
    assert table(uri, latest) != table(uri)  # the versions after it stay


def test_tags_keep_finished_runs_through_cleanup_and_untagged_versions_fail_clearly(db):
    uri = table_uri(db, "t")
    r2 = _by_id(db)["r2"]
    window = r2.first_version + 1  # r2's metadata commit, then its one window
    rollback(db, "t", "r3", STORAGE)  # a new latest, so r3's version is no longer the current one
    lance.dataset(uri).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True,
                                             error_if_tagged_old_versions=False)  # keep tagged, do not raise
    with pytest.raises(ValueError, match=rf"version {window} of table t does not exist .*cleanup_old_versions"):
        rollback(db, "t", str(window), STORAGE)
    rollback(db, "t", "r2", STORAGE)
    assert read_table_metadata(uri, {}).written_at == "by r2" and table(uri) == table(uri, r2.last_version)


def test_bad_targets_say_what_exists(db, tmp_path):
    with pytest.raises(ValueError, match=r"unknown run id 'nope' in table t; known runs, newest first: r3, r2, r1$"):
        rollback(db, "t", "nope", STORAGE)
    with pytest.raises(ValueError, match=r"version 999 of table t does not exist \(it has versions 1\.\.\d+;"):
        rollback(db, "t", "999", STORAGE)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rollback(str(tmp_path / "elsewhere"), "t", "r1", STORAGE)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_history(str(tmp_path / "elsewhere"), "t", STORAGE)


def test_unknown_run_error_lists_only_the_ten_newest(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    for n in range(12):
        c = make(uri, "create" if n == 0 else "append", dataclasses.replace(META, run_id=f"x{n:02}"))
        c.begin()
        c.finish()
    with pytest.raises(ValueError, match=r"newest first: x11, x10, x09, .*, x02 \(and 2 older\)$"):
        rollback(str(tmp_path), "t", "nope", STORAGE)
