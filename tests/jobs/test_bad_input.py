"""Bad input through the command line (issue #13): one line, exit 2, nothing left behind.

Pre-flight failures run in a fresh process, which checks that Ray never started; bad files are found by
the read tasks of a real job on the session's local Ray.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import minilm_dir, sts_sentences

from jobs.cli import main

ROOT = Path(__file__).resolve().parents[2]

# Runs each argv through jobs.cli.main in this one process; reports exit code, stderr and whether Ray started.
_RUN_CASES = """
import contextlib, io, json, sys
import ray
from jobs.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out[name] = {"code": code, "err": err.getvalue(), "ray": ray.is_initialized()}
print(json.dumps(out))
"""


def _good(path: Path, k: int, n: int = 10) -> list[str]:
    texts = sts_sentences(40)[k * n : (k + 1) * n]
    pq.write_table(pa.table({"id": [f"g{k}-{i}" for i in range(n)], "text": texts}), path)
    return texts


def _corrupt(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4000))


def _truncated(path: Path) -> None:
    _good(path, 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _no_text(path: Path) -> None:
    pq.write_table(pa.table({"id": ["x"], "body": ["the text column is called body here"]}), path)


BAD = {"corrupt": _corrupt, "truncated": _truncated, "no_text": _no_text}
BAD_MESSAGE = {
    "corrupt": "is not a readable Parquet file (corrupt or truncated?): ArrowInvalid: Parquet magic bytes not found",
    "truncated": "is not a readable Parquet file (corrupt or truncated?): ArrowInvalid: Parquet magic bytes not found",
    "no_text": "lacks columns ['text']; it has ['id', 'body']",
}


def _job(inp, db) -> list[str]:
    return ["embed", "--input", str(inp), "--output", str(db), "--table", "docs", "--model", str(minilm_dir()),
            "--actors", "1"]


def test_preflight_failures_name_the_fix_before_ray_starts(tmp_path):
    cases = {}

    def case(name: str, make) -> None:
        inp = tmp_path / name / "in"
        inp.mkdir(parents=True)
        make(inp)
        cases[name] = _job(inp, tmp_path / name / "db")

    case("integer_text", lambda d: pq.write_table(pa.table({"id": ["a"], "text": [7]}), d / "p.parquet"))
    case("list_text", lambda d: pq.write_table(pa.table({"id": ["a"], "text": [["a", "list"]]}), d / "p.parquet"))
    case("empty_dir", lambda d: (d / "notes.txt").write_text("no parquet here"))
    case("zero_rows", lambda d: [pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                                                d / f"p{k}.parquet") for k in range(2)])
    case("first_file_corrupt", lambda d: _corrupt(d / "p.parquet"))
    cases["typo"] = _job(tmp_path / "typo" / "inptu", tmp_path / "typo" / "db")
    done = subprocess.run([sys.executable, "-c", _RUN_CASES, json.dumps(cases)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    want = {
        "integer_text": f"input file {tmp_path}/integer_text/in/p.parquet has --text-column column 'text' of type int64, "
                        "not a string, so every row would be rejected; name a string column with --text-column",
        "list_text": f"input file {tmp_path}/list_text/in/p.parquet has --text-column column 'text' of type "
                     "list<element: string>, not a string, so every row would be rejected; name a string column with "
                     "--text-column",
        "empty_dir": f"input {tmp_path}/empty_dir/in matches no Parquet files (*.parquet); check --input",
        "zero_rows": f"input {tmp_path}/zero_rows/in holds no rows: its 2 readable Parquet file(s) are empty; check --input",
        "first_file_corrupt": f"input file {tmp_path}/first_file_corrupt/in/p.parquet {BAD_MESSAGE['corrupt']}",
        "typo": f"input {tmp_path}/typo/inptu does not exist; check --input",
    }
    for name, message in want.items():
        got = results[name]
        assert got["code"] == 2, (name, got)
        assert got["err"].startswith(f"embedlake: error: {message}"), (name, got["err"])
        assert got["err"].count("\n") == 1, (name, got["err"])
        assert got["ray"] is False, name
        assert not (tmp_path / name / "db").exists(), name


def test_an_input_store_that_is_down_is_one_line(tmp_path, moto_s3, capsys):
    """Input on S3 (the moto server's bucket), the endpoint a closed loopback port: one line, exit 2."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = moto_s3.url("cli-outage")
    options = {**moto_s3.storage_options, "endpoint": f"http://127.0.0.1:{port}"}
    argv = [*_job(url, tmp_path / "db"), *[a for k, v in options.items() for a in ("--storage-option", f"{k}={v}")]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"embedlake: error: input {url} could not be read from storage (EndpointConnectionError: ")
    assert err.count("\n") == 1 and "127.0.0.1" in err and "testing" not in err  # the URL, never the secret
    assert not (tmp_path / "db").exists()


def test_dry_run_lists_every_problem(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": [7]}), inp / "p.parquet")
    (tmp_path / "taken").write_text("a file where the output's folder would go")
    argv = ["embed", "--input", str(inp), "--output", str(tmp_path / "taken" / "db"), "--table", "docs",
            "--model", str(tmp_path / "no-model"), "--dry-run"]
    assert main(argv) == 2
    out = capsys.readouterr().out.splitlines()
    problems = [line for line in out if line.startswith("  problem: ")]
    assert len(problems) == 3, out
    assert "of type int64, not a string" in problems[0]
    assert problems[1] == f"  problem: output {tmp_path}/taken/db cannot be created: {tmp_path}/taken is a file; choose another --output"
    assert "no-model" in problems[2]


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory) -> tuple[dict[str, Path], Path, list[str]]:
    """Per bad kind a corpus of two good files and that bad file (sorted last: the read task finds it, not
    pre-flight); and one corpus with all three bad files. Returns those, the mixed corpus and its good texts."""
    root = tmp_path_factory.mktemp("bad_input")
    corpora = {}
    for kind, make in BAD.items():
        corpora[kind] = root / kind
        corpora[kind].mkdir()
        _good(corpora[kind] / "a-0.parquet", 0)
        _good(corpora[kind] / "a-1.parquet", 1)
        make(corpora[kind] / f"b-{kind}.parquet")
    mixed = root / "mixed"
    mixed.mkdir()
    texts = _good(mixed / "a-0.parquet", 0) + _good(mixed / "a-1.parquet", 1)
    for kind, make in BAD.items():
        make(mixed / f"b-{kind}.parquet")
    return corpora, mixed, texts


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_file_fails_the_job_with_one_line_naming_it(kind, bad_corpora, tmp_path, capsys, ray_local):
    corpora, _, _ = bad_corpora
    bad = corpora[kind] / f"b-{kind}.parquet"
    assert main(_job(corpora[kind], tmp_path / "db")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("embedlake: error:")]
    assert len(err) == 1 and err[0].startswith(f"embedlake: error: input file {bad} {BAD_MESSAGE[kind]}")
    assert err[0].endswith("; fix or remove it, or pass --on-bad-file skip to skip such files")


def test_the_entrypoint_prints_no_traceback_for_a_bad_file(bad_corpora, tmp_path):
    """The whole stderr of `python -m jobs.embed` (Ray's own log lines included): no worker traceback."""
    corpora, _, _ = bad_corpora
    done = subprocess.run([sys.executable, "-m", "jobs.embed", *_job(corpora["truncated"], tmp_path / "db")[1:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "pipeline/read.py" not in done.stderr
    (ours,) = [line for line in done.stderr.splitlines() if line.startswith("embedlake: error:")]
    assert ours.startswith(f"embedlake: error: input file {corpora['truncated']}/b-truncated.parquet {BAD_MESSAGE['truncated']}")


def test_skip_embeds_the_good_files_whole_and_lists_the_bad_ones(bad_corpora, tmp_path, capsys, ray_local):
    """The usual sequence: the job fails naming a bad file; the same command with `skip` resumes and finishes."""
    import lancedb

    _, mixed, texts = bad_corpora
    assert main(_job(mixed, tmp_path / "db")) == 2
    assert main([*_job(mixed, tmp_path / "db"), "--on-bad-file", "skip"]) == 0
    out = capsys.readouterr().out
    assert "files skipped 3 (--on-bad-file skip):" in out
    rows = lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow()
    assert sorted(rows["text"].to_pylist()) == sorted(texts)  # every good document, once
    (report,) = [json.loads(f.read_text()) for f in (tmp_path / "db" / "docs.reports").glob("*.json")]
    assert report["documents_read"] == report["documents_embedded"] == len(texts)
    assert report["files_skipped_count"] == 3
    skipped = {Path(s["file"]).name: s["reason"] for s in report["files_skipped"]}
    assert sorted(skipped) == sorted(f"b-{kind}.parquet" for kind in BAD)
    assert all(skipped[f"b-{kind}.parquet"].startswith(message) for kind, message in BAD_MESSAGE.items())
    # ... and each skipped file is a row of <table>_rejected: the file, no id, no row, the reason.
    rejected = lancedb.connect(str(tmp_path / "db")).open_table("docs_rejected").to_arrow().to_pylist()
    files = {Path(r["file"]).name: r for r in rejected if r["row"] is None}
    assert sorted(files) == sorted(skipped) and all(r["id"] is None for r in files.values())
    assert all(files[f]["reason"] == f"skipped file: {skipped[f]}" for f in files)
