"""The committer on real Lance tables: whole-document windows, atomic replacement, staging, resume rules."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter

import lance
import pytest
from committed import META, docs, make, table, write

from pipeline.commit import DocWindows, WriterResult
from pipeline.sink import read_table_metadata, table_uri


def result(rows: int, edges: dict[str, list[int]] | None = None) -> WriterResult:
    return WriterResult(fragments=[], rows=rows, replace=[], edges=edges or {})


def test_doc_windows_hold_split_documents_together():
    w = DocWindows()
    w.add(result(2))
    assert len(w.ready) == 1
    w.add(result(3, {"a": [2, 5]}))
    w.add(result(1, {"b": [1, 2]}))
    assert len(w.ready) == 1 and w.waiting == 2
    w.add(result(4, {"a": [2, 5], "b": [1, 2]}))  # joins both groups; "a" still lacks a chunk
    assert len(w.ready) == 1 and w.waiting == 3
    w.add(result(1, {"a": [1, 5]}))
    assert len(w.ready) == 5 and w.waiting == 0
    with pytest.raises(RuntimeError, match="more chunks"):
        w.add(result(1, {"x": [3, 2]}))


def test_a_window_never_splits_a_document(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    c = make(uri, commit_every_rows=1)  # would close after every result
    c.begin()
    rows = docs({"a": 1, "b": 4, "c": 2})
    c.add(write(uri, rows.slice(0, 3)))  # a, b0, b1: a is whole but rides with b's first piece
    assert c.versions == []
    c.add(write(uri, rows.slice(3, 3)))  # b2, b3, c0
    assert c.versions == []
    c.add(write(uri, rows.slice(6, 1)))  # c1
    assert len(c.versions) == 1 and [i for i, _, _ in table(uri)] == ["a", "b", "b", "b", "b", "c", "c"]
    summary = c.finish()
    assert summary.rows_committed == 7 and summary.documents == {"new": 3}


def test_replacement_swaps_a_document_in_one_commit(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    c = make(uri)
    c.begin()
    c.add(write(uri, docs({"a": 2, "b": 1, "it's": 3})))
    c.finish()
    before = lance.dataset(uri).version

    u = make(uri, "reembed", dataclasses.replace(META, run_id="r2"))
    base = u.begin().base_version
    assert base == before + 1  # this run's "running" metadata first
    u.add(write(uri, docs({"a": 3, "it's": 1}, version="v2", status="changed")))
    summary = u.finish()
    window = summary.versions[0]
    assert table(uri, window) == [("a", 0, "a-v2"), ("a", 1, "a-v2"), ("a", 2, "a-v2"), ("b", 0, "b-v1"),
                                  ("it's", 0, "it's-v2")]
    assert table(uri, window - 1) == table(uri, before)  # the version before holds only the old chunks
    assert summary.replaced_rows == 5 and summary.documents == {"changed": 2}
    props = lance.dataset(uri).read_transaction(window).transaction_properties
    assert props["embedlake.run_id"] == "r2" and props["embedlake.kind"] == "reembed"
    assert props["embedlake.replaced_rows"] == "5"


def test_unchanged_documents_are_counted_not_written(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    c = make(uri)
    c.begin()
    c.add(write(uri, docs({"a": 2})))
    c.finish()
    u = make(uri, "reembed", dataclasses.replace(META, run_id="r2"))  # run ids are unique: each names a tag
    u.begin()
    u.add(write(uri, docs({"a": 1}, status="unchanged")))
    summary = u.finish()
    assert summary.commits == 0 and summary.documents == {"unchanged": 1} and len(table(uri)) == 2


def test_create_resumes_only_its_own_unfinished_table(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    c = make(uri)
    c.begin()
    c.add(write(uri, docs({"a": 1})))
    c._commit_window()  # a crash now leaves a "running" table with one window
    again = make(uri, meta=dataclasses.replace(META, run_id="r2"))
    resume = again.begin()
    assert resume.resumed and resume.rows_before == 1 and resume.base_version == lance.dataset(uri).version
    with pytest.raises(FileExistsError, match="already exists"):
        make(uri, meta=dataclasses.replace(META, job_key="other-job")).begin()
    again.finish()
    with pytest.raises(FileExistsError, match="already exists.*reembed"):
        make(uri).begin()  # finished: the same command no longer resumes it


def test_reembed_refuses_other_settings_naming_each(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    c = make(uri)
    c.begin()
    c.finish()
    other = dataclasses.replace(META, dims=(16,), precision="bfloat16")
    with pytest.raises(ValueError, match=r"dims: table has \(8,\), requested \(16,\); precision: .*--full"):
        make(uri, "reembed", other).begin()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make(table_uri(str(tmp_path), "nope"), "reembed").begin()


def test_staged_replacement_is_invisible_until_one_switch_and_resumes(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    c = make(uri)
    c.begin()
    c.add(write(uri, docs({"old": 2})))
    c.finish()
    main = lance.dataset(uri).version
    new_meta = dataclasses.replace(META, run_id="r2", dims=(4,))

    s = make(uri, "full", new_meta, commit_every_rows=1)
    assert s.begin().base_version is None and s.staged
    s.add(write(uri, docs({"x": 1}), staged=True))
    assert len(s.versions) == 1
    assert lance.dataset(uri).version == main and table(uri) == [("old", 0, "old-v1"), ("old", 1, "old-v1")]
    assert read_table_metadata(uri, {}).dims == (8,)  # readers still see the old table and its metadata
    pointer = tmp_path / "t.staging" / f"{META.job_key}.json"
    assert json.loads(pointer.read_text())["version"] == s.versions[-1]

    # The process dies here; the same command again continues from the staged version.
    again = make(uri, "full", dataclasses.replace(new_meta, run_id="r3"), commit_every_rows=1)
    resume = again.begin()
    assert resume.resumed and resume.staged and resume.base_version == s.versions[-1] and resume.rows_before == 1
    again.add(write(uri, docs({"y": 2}), staged=True))
    summary = again.finish()
    assert summary.version == main + 1  # one switch: data and metadata together
    assert table(uri) == [("x", 0, "x-v1"), ("y", 0, "y-v1"), ("y", 1, "y-v1")]
    meta = read_table_metadata(uri, {})
    assert meta.dims == (4,) and meta.run_id == "r3" and meta.state == "complete"
    assert not pointer.exists()
    assert table(uri, main) == [("old", 0, "old-v1"), ("old", 1, "old-v1")]  # the old version stays for rollback


def test_concurrent_replacements_in_one_fragment_both_land(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    c = make(uri)
    c.begin()
    names = [f"d{i}" for i in range(8)]
    c.add(write(uri, docs(dict.fromkeys(names, 2))))  # one fragment holds every document
    c.finish()
    errors: list[BaseException] = []

    def replace(ids: list[str], run: str) -> None:
        try:
            u = make(uri, "reembed", dataclasses.replace(META, run_id=run), commit_every_rows=1)
            u.begin()
            for i in ids:
                u.add(write(uri, docs({i: 3}, version=run, status="changed")))
            u.finish()
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=replace, args=(names[k::2], f"run{k}")) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = table(uri)
    assert Counter(i for i, _, _ in rows) == dict.fromkeys(names, 3)
    assert {h for _, _, h in rows} == {f"d{i}-run{i % 2}" for i in range(8)}
