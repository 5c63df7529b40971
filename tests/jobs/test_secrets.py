"""A sentinel secret (issue #13, "Credentials and safety"): real jobs through the command line on the moto S3
endpoint (input and output on S3) whose credentials are a unique string, then a search for that string in
everything the jobs said or wrote.

moto accepts any credentials, so the sentinel is really used: as `AWS_SECRET_ACCESS_KEY` and
`AWS_SESSION_TOKEN` on the driver, and as `--storage-option secret_access_key=` / `session_token=`, which
the job hands to its Ray workers. Searched: the driver's log records (every logger, at DEBUG), every file
of the Ray session directory (the workers' and Ray's own logs), Ray's job and actor tables, the CLI's
stdout and stderr (dry run, runs, failing runs), the run report, the table metadata and transaction
properties of every version of the table and of `<table>_rejected`, that table's rows, and every object
under the output prefix (the Lance files, the reports, whatever the staging directory holds).
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from shared_data import minilm_dir, sts_sentences

from jobs.cli import main
from pipeline.storage import StorageConfig

SENTINEL = f"sentinel-{uuid.uuid4().hex}"


@pytest.fixture
def secret_s3(s3_env, monkeypatch):
    """The moto endpoint, with the driver's AWS secret and session token set to the sentinel."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"{SENTINEL}-env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", f"{SENTINEL}-env-token")
    return s3_env


def _corpus(url: str, storage: StorageConfig) -> None:
    """Two files with four rejected rows (missing id, duplicate id, empty text, invalid UTF-8) for `<table>_rejected`."""
    sents = sts_sentences(12)
    fs = storage.pyarrow_filesystem(url)
    pq.write_table(pa.table({"id": ["a", "b", None, "a", "c"], "text": sents[:4] + [" "]}),
                   f"{url.removeprefix('s3://')}/part-0.parquet", filesystem=fs)
    pq.write_table(pa.table({"id": ["d", "e", "f"], "text": pa.array([s.encode() for s in sents[5:7]] + [b"\xff"])}),
                   f"{url.removeprefix('s3://')}/part-1.parquet", filesystem=fs)


def _leaks(text: str | bytes) -> bool:
    return (SENTINEL.encode() if isinstance(text, bytes) else SENTINEL) in text


def _dataset_says(uri: str, storage: StorageConfig) -> list[str]:
    """The table metadata and transaction properties of every version of `uri`, and its latest rows."""
    ds = lance.dataset(uri, storage_options=storage.lance_options())
    said = [json.dumps(ds.to_table().to_pylist(), default=str)]
    for v in ds.versions():
        tx = ds.read_transaction(v["version"])
        said.append(json.dumps(tx.transaction_properties if tx else {}))
        said.append(json.dumps(lance.dataset(uri, version=v["version"], storage_options=storage.lance_options()).metadata))
    return said


def _ray_session_files() -> list[Path]:
    # Ray keeps no public handle on its session directory; this test reads it through the private node.
    node = ray._private.worker._global_node
    root = Path(node.get_session_dir_path())
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 256 << 20]


def test_a_sentinel_secret_appears_in_nothing_a_job_says_or_writes(secret_s3, ray_local, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    prefix = f"secrets-{uuid.uuid4().hex[:8]}"
    inp, db = secret_s3.url(prefix, "in"), secret_s3.url(prefix, "db")
    storage = StorageConfig(dict(secret_s3.storage_options))  # the test's own reads and writes
    fs = storage.fsspec_filesystem(db)
    _corpus(inp, storage)
    secrets = ["--storage-option", f"secret_access_key={SENTINEL}-option-secret",
               "--storage-option", f"session_token={SENTINEL}-option-token"]
    job = ["embed", "--input", inp, "--output", db, "--table", "docs", "--model", str(minilm_dir()), "--actors", "1",
           "--commit-every-rows", "2", *secrets]
    said: dict[str, str] = {}

    def cli(name: str, argv: list[str]) -> int:
        code = main(argv)
        out = capsys.readouterr()
        said[name] = out.out + out.err
        return code

    assert cli("dry run", [*job, "--dry-run"]) == 0
    assert cli("create", job) == 0
    assert "rejected 4" in said["create"] and "invalid utf-8" in said["create"]  # it really ran, rejects and all
    # Failing jobs: the table exists; a bucket that does not; a corrupt file found after the staged
    # replacement began, which leaves the staging directory behind.
    assert cli("create again", job) == 2 and "already exists" in said["create again"]
    missing = [a if a != db else f"s3://no-such-bucket-{prefix}/db" for a in job]
    assert cli("no bucket", missing) == 2 and "does not exist" in said["no bucket"]
    corrupt = f"{inp.removeprefix('s3://')}/part-2.parquet"
    fs.pipe_file(corrupt, b"not parquet" * 100)
    assert cli("overwrite, corrupt file", [*job, "--mode", "overwrite"]) == 2 and "part-2" in said["overwrite, corrupt file"]
    staged = {o: fs.cat(o) for o in fs.find(f"{db.removeprefix('s3://')}/docs.staging")}
    assert staged  # the pointer file (and the run's id index) are there to be searched
    fs.rm(corrupt)
    assert cli("overwrite", [*job, "--mode", "overwrite"]) == 0  # resumes the staged replacement

    objects = {o: fs.cat(o) for o in fs.find(db.removeprefix("s3://"))}
    reports = [o for o in objects if ".reports/" in o]
    table, rejected = f"{db}/docs.lance", f"{db}/docs_rejected.lance"
    assert len(reports) == 2 and lance.dataset(rejected, storage_options=storage.lance_options()).count_rows() == 4

    leaks = [f"stdout/stderr of {name}" for name, text in said.items() if _leaks(text)]
    leaks += [f"log record {r.name}: {r.getMessage()[:300]}" for r in caplog.records if _leaks(r.getMessage())]
    leaks += [f"table metadata, transaction or rows of {uri}" for uri in (table, rejected)
              for text in _dataset_says(uri, storage) if _leaks(text)]
    leaks += [f"object {o}" for o, body in {**staged, **objects}.items() if _leaks(body)]
    leaks += [f"Ray session file {p}" for p in _ray_session_files() if _leaks(p.read_bytes())]
    leaks += [f"Ray {what} table" for what, rows in (("job", ray._private.state.jobs()), ("actor", ray._private.state.actors()))
              if _leaks(json.dumps(rows, default=str))]
    assert not leaks, leaks
    assert caplog.records and _ray_session_files()  # the places searched were not empty
    # botocore logged the requests' session token at DEBUG: it was there, redacted (pipeline.storage).
    assert any(r.name == "botocore.auth" and "x-amz-security-token:***" in r.getMessage() for r in caplog.records)
