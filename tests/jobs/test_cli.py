"""The command line: flags, YAML config (flags override it), dry run, embed + query end to end."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import minilm_dir, sts_sentences

from jobs.cli import build_config, build_parser, main, merge_options
from pipeline.sink import read_table_metadata, table_uri


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sents = sts_sentences(60)
    for k in range(3):
        part = sents[k * 20 : (k + 1) * 20]
        pq.write_table(
            pa.table({"id": [f"s{k}-{i}" for i in range(20)], "body": part, "lang": ["en"] * 20}),
            root / f"part-{k}.parquet",
        )
    return root


def _opts(argv):
    return merge_options(build_parser().parse_args(argv))


def test_flags_override_the_config_file(tmp_path, corpus):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(f"input: {corpus}\nmodel: {minilm_dir()}\ntext-column: body\ndims: [384, 64]\nchunking: fixed\n")
    cfg = build_config(_opts(["embed", "--config", str(cfg_file), "--output", "db", "--table", "t", "--dims", "128",
                              "--storage-option", "region=us-east-1", "--no-late-chunking"]))
    assert cfg.encode.dims == (128,) and cfg.source.text_column == "body" and cfg.chunking.mode == "fixed"
    assert cfg.chunking.late is False and cfg.storage_options == {"region": "us-east-1"}
    assert cfg.sink.mode == "create"


def test_user_errors_are_clear(tmp_path, corpus):
    with pytest.raises(SystemExit, match="missing required options: --output, --table"):
        _opts(["embed", "--input", str(corpus), "--model", "m"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("inptu: x\n")
    with pytest.raises(SystemExit, match="unknown option 'inptu'"):
        _opts(["embed", "--config", str(bad)])
    with pytest.raises(SystemExit, match="--dims must be comma-separated integers"):
        build_config(_opts(["embed", "--input", "i", "--output", "o", "--table", "t", "--model", "m", "--dims", "a,b"]))


def test_dry_run_prints_the_plan(corpus, capsys):
    assert main(["embed", "--input", str(corpus), "--output", "unused", "--table", "t", "--model", str(minilm_dir()),
                 "--text-column", "body", "--chunking", "sentences", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "documents 60" in out and out.count("part-") == 3 and "estimated duration" in out and "actor" in out
    assert "at precision auto" in out


def test_embed_then_query(corpus, tmp_path, capsys, ray_local):
    db = str(tmp_path / "db")
    argv = ["embed", "--input", str(corpus), "--output", db, "--table", "docs", "--model", str(minilm_dir()),
            "--text-column", "body", "--keep-columns", "lang", "--dims", "384,32", "--actors", "1",
            "--precision", "bfloat16"]
    assert main(argv) == 0
    assert "chunks written 60" in capsys.readouterr().out
    meta = read_table_metadata(table_uri(db, "docs"), {})
    assert meta.precision == "bfloat16"  # the query below is embedded at the table's precision
    (report,) = [json.loads(f.read_text()) for f in (tmp_path / "db" / "docs.reports").glob("*.json")]
    assert [a for a in report["actors"] if "dtype=bfloat16" in a]
    target = sts_sentences(60)[7]
    assert main(["query", "--db", db, "--table", "docs", "--text", target, "-k", "2", "--column", "vector_384"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "s0-7 #0" in first
    assert main(argv) == 2  # create mode refuses an existing table
    assert "already exists" in capsys.readouterr().err
