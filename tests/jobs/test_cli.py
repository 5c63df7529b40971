"""The command line: flags, YAML config (flags override it), dry run, embed + query end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import minilm_dir, sts_sentences

from jobs.cli import OPTION_FIELDS, add_job_arguments, build_config, build_parser, main, merge_options
from pipeline.config import EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.sink import read_table_metadata, table_uri

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"input": "in", "output": "out", "table": "t", "model": "m"}  # never opened: checks come first
REQUIRED_FLAGS = [arg for key, value in REQUIRED.items() for arg in (f"--{key}", value)]


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


@pytest.mark.parametrize(
    ("yaml_line", "want"),
    [
        ("storage-option: endpoint=http://h:9", {"endpoint": "http://h:9"}),
        ("storage_option: [a=1, b=x=y]", {"a": "1", "b": "x=y"}),
        ("storage-option: {allow_http: true, region: r}", {"allow_http": "True", "region": "r"}),
    ],
)
def test_storage_options_from_yaml(yaml_line, want, tmp_path):
    assert build_config(_opts(["embed", "--config", _write_yaml(tmp_path / "job.yaml", yaml_line + "\n")])).storage_options == want


def test_user_errors_are_clear(tmp_path, corpus):
    with pytest.raises(ValueError, match="missing required options: --output, --table"):
        _opts(["embed", "--input", str(corpus), "--model", "m"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("inptu: x\n")
    with pytest.raises(ValueError, match=r"unknown option 'inptu'; valid options: actors, .*input, ") as err:
        _opts(["embed", "--config", str(bad)])
    assert "tokens-per-second" in str(err.value)
    bad.write_text("- input\n")
    with pytest.raises(ValueError, match="expected a mapping of option names to values, got \\['input'\\]"):
        _opts(["embed", "--config", str(bad)])


def _write_yaml(path: Path, body: str) -> str:
    path.write_text("".join(f"{k}: {v}\n" for k, v in REQUIRED.items()) + body)
    return str(path)


def test_defaults_are_the_config_dataclasses(tmp_path):
    """Flags, a YAML file and Python give the same job: the dataclasses hold every default."""
    from_flags = build_config(_opts(["embed", *REQUIRED_FLAGS]))
    from_yaml = build_config(_opts(["embed", "--config", _write_yaml(tmp_path / "job.yaml", "")]))
    direct = JobConfig(source=SourceConfig(input="in"), encode=EncodeConfig(model="m"), sink=SinkConfig(db="out", table="t"))
    same_run = [dataclasses.replace(cfg, run_id="r") for cfg in (from_flags, from_yaml, direct)]
    assert same_run[0] == same_run[1] == same_run[2]


def test_help_shows_the_dataclass_defaults():
    embed = build_parser()._subparsers._group_actions[0].choices["embed"]
    shown = 0
    for action in embed._actions:
        if action.dest not in OPTION_FIELDS or not action.option_strings[0].startswith("--") or not action.help:
            continue
        _, f = OPTION_FIELDS[action.dest]
        stated = re.findall(r"\(default: ([^)]*)\)", action.help)
        if f.default not in (dataclasses.MISSING, None, ()) and not isinstance(f.default, bool):
            assert stated == [str(f.default)], (action.option_strings, action.help)
            shown += 1
        else:  # the default is decided later (model, cluster): the help may describe it, never state a number
            assert not any(re.fullmatch(r"[\d.]+", s) for s in stated), (action.option_strings, action.help)
    assert shown >= 10
    from model.loading import DEFAULT_MAX_BATCH_TOKENS  # the encoder's budget: stated there only

    assert not [n for n in DEFAULT_MAX_BATCH_TOKENS.values() if str(n) in embed.format_help()]


# (flag, what the user writes after the flag or after `key:` in YAML, the one message both get)
BAD_OPTIONS = [
    ("--max-batch-tokens", "0", "--max-batch-tokens must be >= 1, got 0"),  # was replaced by the default
    ("--max-batch-tokens", "-5", "--max-batch-tokens must be >= 1, got -5"),  # died in a Ray actor
    ("--max-batch-tokens", "lots", "--max-batch-tokens must be an integer, got 'lots'"),
    ("--actors", "0", "--actors must be >= 1, got 0"),
    ("--actors", "1.5", "--actors must be N, MIN..MAX or MIN.. (integers), got '1.5'"),
    ("--actors", "2..x", "--actors must be N, MIN..MAX or MIN.. (integers), got '2..x'"),
    ("--device", "tpu", "--device must be one of auto, gpu, cpu; got 'tpu'"),
    ("--cpus-per-actor", "0", "--cpus-per-actor must be > 0, got 0"),
    ("--cpus-per-actor", "one", "--cpus-per-actor must be a number, got 'one'"),
    ("--sort-window", "0", "--sort-window must be >= 1, got 0"),
    ("--chunk-tokens", "0", "--chunk-tokens must be >= 1, got 0"),
    ("--chunk-sentences", "-1", "--chunk-sentences must be >= 1, got -1"),
    ("--max-length", "4", "--max-length must be >= 8, got 4"),
    ("--overlap", "-1", "--overlap must be >= 0, got -1"),
    ("--commit-every-rows", "0", "--commit-every-rows must be >= 1, got 0"),
    ("--commit-every-s", "0", "--commit-every-s must be > 0, got 0"),
    ("--commit-every-s", "soon", "--commit-every-s must be a number, got 'soon'"),
    ("--dims", "0", "--dims must be >= 1, got 0"),
    ("--dims", "384,x", "--dims must be an integer, got 'x'"),
    ("--mode", "upsert", "--mode must be one of create, append, overwrite; got 'upsert'"),
    ("--chunking", "words", "--chunking must be one of none, fixed, sentences; got 'words'"),
    ("--vector-dtype", "float64", "--vector-dtype must be one of float32, float16; got 'float64'"),  # was accepted
    ("--precision", "fp16", "--precision must be one of auto, float32, bfloat16; got 'fp16'"),
]


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("flag", "text", "message"), BAD_OPTIONS)
def test_a_bad_option_gets_one_message_from_flags_and_yaml(flag, text, message, tmp_path, capsys):
    want = f"embedlake: error: {message}\n"
    assert _error(["embed", *REQUIRED_FLAGS, flag, text], capsys) == want
    for key in (flag[2:], flag[2:].replace("-", "_")):
        assert _error(["embed", "--config", _write_yaml(tmp_path / "job.yaml", f"{key}: {text}\n")], capsys) == want


@pytest.mark.parametrize(
    ("yaml_line", "message"),
    [  # YAML has types the command line has not: a quoted boolean, a number for a name
        ('late-chunking: "yes"', "--late-chunking must be true or false, got 'yes'"),
        ("index: 1", "--index must be true or false, got 1"),
        ('dry-run: "no"', "--dry-run must be true or false, got 'no'"),
        ("text-column: 5", "--text-column must be a string, got 5"),
        ("keep-columns: [lang, 7]", "--keep-columns must be a string, got 7"),
        ("dims: [384, 2.5]", "--dims must be an integer, got 2.5"),
        ("storage-option: 5", "--storage-option must be a mapping of strings to strings, got 5"),
        ("storage-option: [endpoint]", "storage option 'endpoint' is not of the form key=value"
                                       " (for example endpoint=http://127.0.0.1:9000 or allow_http=true)"),
    ],
)
def test_yaml_types_are_checked(yaml_line, message, tmp_path, capsys):
    argv = ["embed", "--config", _write_yaml(tmp_path / "job.yaml", yaml_line + "\n")]
    assert _error(argv, capsys) == f"embedlake: error: {message}\n"


def test_flags_and_yaml_read_the_same_values(tmp_path):
    flags = ["--dims", "256,64", "--keep-columns", "a, b", "--max-batch-tokens", "2048", "--cpus-per-actor", "0.5",
             "--commit-every-s", "5", "--commit-every-rows", "10", "--overlap", "0", "--index"]
    yaml_body = ("dims: [256, 64]\nkeep_columns: [a, b]\nmax-batch-tokens: 2048\ncpus-per-actor: 0.5\n"
                 "commit-every-s: 5\ncommit-every-rows: '10'\noverlap: 0\nindex: true\n")
    from_flags = build_config(_opts(["embed", *REQUIRED_FLAGS, *flags]))
    from_yaml = build_config(_opts(["embed", "--config", _write_yaml(tmp_path / "job.yaml", yaml_body)]))
    assert dataclasses.replace(from_flags, run_id="r") == dataclasses.replace(from_yaml, run_id="r")
    assert from_flags.encode.dims == (256, 64) and from_flags.source.keep_columns == ("a", "b")
    assert from_flags.sink.commit_every_s == 5.0 and from_flags.sink.commit_every_rows == 10 and from_flags.sink.index
    one_dim = build_config(_opts(["embed", "--config", _write_yaml(tmp_path / "one.yaml", "dims: 256\n")]))
    assert one_dim.encode.dims == (256,)


def test_the_module_entrypoint_checks_before_starting_ray():
    """`python -m jobs.embed` (the `ray job submit` entrypoint): -5 used to fail inside an encoder actor."""
    done = subprocess.run([sys.executable, "-m", "jobs.embed", *REQUIRED_FLAGS, "--max-batch-tokens", "-5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "embedlake: error: --max-batch-tokens must be >= 1, got -5\n"


def test_a_subcommand_reuses_the_job_options(tmp_path):
    """A subcommand built on add_job_arguments gets the same options and checks, and only its own extras."""
    parser = argparse.ArgumentParser(prog="reembed")
    add_job_arguments(parser)
    cfg = build_config(merge_options(parser.parse_args([*REQUIRED_FLAGS, "--chunking", "fixed"])))
    assert cfg.chunking.mode == "fixed" and cfg.sink.mode == "create"  # no --mode: the dataclass default
    with pytest.raises(ValueError, match="unknown option 'mode'"):
        merge_options(parser.parse_args(["--config", _write_yaml(tmp_path / "job.yaml", "mode: append\n")]))
    with pytest.raises(ValueError, match="--chunk-tokens must be >= 1, got 0"):
        build_config(merge_options(parser.parse_args([*REQUIRED_FLAGS, "--chunk-tokens", "0"])))


def test_dry_run_prints_the_plan(corpus, capsys):
    from model.loading import DEFAULT_MAX_BATCH_TOKENS

    assert main(["embed", "--input", str(corpus), "--output", "unused", "--table", "t", "--model", str(minilm_dir()),
                 "--text-column", "body", "--chunking", "sentences", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "documents 60" in out and out.count("part-") == 3 and "estimated duration" in out and "actor" in out
    assert "at precision auto" in out
    assert f"batches of {DEFAULT_MAX_BATCH_TOKENS['cpu']} tokens" in out  # the encoder's own default budget
    assert main(["embed", *REQUIRED_FLAGS, "--dry-run", "--tokens-per-second", "0"]) == 2
    assert capsys.readouterr().err == "embedlake: error: --tokens-per-second must be > 0, got 0\n"


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
