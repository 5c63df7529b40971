"""`embedlake history` and `embedlake rollback` on a real table written by the committer (no Ray)."""

from __future__ import annotations

import json

import pytest
from committed import table, three_runs

from jobs.cli import main
from pipeline.sink import read_table_metadata, table_uri


@pytest.fixture
def db(tmp_path) -> str:
    three_runs(table_uri(str(tmp_path), "t"))
    return str(tmp_path)


def test_history_prints_one_line_per_run_oldest_first(db, capsys):
    assert main(["history", "--db", db, "--table", "t"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "kind", "state", "versions", "started", "ended", "rows", "added", "changed",
                              "deleted", "tagged"]
    assert [line.split()[:3] for line in lines] == [["r1", "create", "complete"], ["r2", "reembed", "complete"],
                                                    ["r3", "reembed", "complete"]]
    assert main(["history", "--db", db, "--table", "t", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["added"], r["changed"], r["deleted"]) for r in runs] == [
        ("r1", 3, 0, 0), ("r2", 0, 1, 0), ("r3", 0, 0, 1)]


def test_rollback_to_a_run_then_history_shows_it(db, capsys):
    uri = table_uri(db, "t")
    assert main(["history", "--db", db, "--table", "t", "--json"]) == 0
    r1, _, r3 = json.loads(capsys.readouterr().out)
    assert main(["rollback", "--db", db, "--table", "t", "--to", "r1"]) == 0
    assert capsys.readouterr().out == f"table t now reads as after r1 (version {r3['last_version'] + 1})\n"
    assert table(uri) == table(uri, r1["last_version"]) and read_table_metadata(uri, {}).written_at == "by r1"
    assert main(["history", "--db", db, "--table", "t"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[1:4] == ["rollback", "to", str(r1["last_version"])]


@pytest.mark.parametrize(("to", "message"), [
    ("nope", "unknown run id 'nope' in table t; known runs, newest first: r3, r2, r1"),
    ("999", "version 999 of table t does not exist (it has versions 1..10; an untagged version removed by "
            "cleanup_old_versions is gone)"),
])
def test_bad_targets_are_one_line_errors(db, capsys, to, message):
    assert main(["rollback", "--db", db, "--table", "t", "--to", to]) == 2
    assert capsys.readouterr().err == f"embedlake: error: {message}\n"


def test_a_missing_table_is_a_one_line_error(tmp_path, capsys):
    for argv in (["history"], ["rollback", "--to", "1"]):
        assert main([*argv, "--db", str(tmp_path), "--table", "t"]) == 2
        assert capsys.readouterr().err == f"embedlake: error: table {table_uri(str(tmp_path), 't')} does not exist\n"
