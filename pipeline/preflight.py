"""Pre-flight: everything a job can check before Ray starts (issue #13), so a typo costs no cluster start-up.

In order: the input lists Parquet files; the first file has the job's columns with usable types (every
read task checks each of its own files again, `pipeline.read`); the files hold rows (footers only, read up
to the first file that has some: one footer on a normal corpus); the output is reachable; the model is
described and supports the task and dims. Nothing is created, so a failed check leaves nothing behind.

`preflight` raises the first problem (one line, naming the fix); `find_problems` lists them all for the
dry run. Under `--on-bad-file skip` a bad first file is passed over for the next one, as the job would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from model import ModelDescription, describe_model
from pipeline.config import JobConfig, SinkConfig, SourceConfig
from pipeline.read import (
    BadFile,
    column_roles,
    list_files,
    opened,
    schema_problem,
    storage_failure,
    unreachable,
)
from pipeline.sink import table_uri
from pipeline.storage import StorageConfig, url_path

# What `resolve` is given to check the model: its task, dims and window do not depend on the cluster.
PLACEHOLDER_CLUSTER = {"CPU": 1}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)  # what jobs.cli prints as one line


@dataclass(frozen=True)
class Checked:
    """What pre-flight found, for the job to use rather than find again."""

    files: list[str]
    schema: pa.Schema  # of the first good file
    model: ModelDescription


def preflight(cfg: JobConfig) -> Checked:
    """Check input, output and model; raise the first problem as one line."""
    storage = StorageConfig.from_env(cfg.storage_options)
    files, schema = check_input(cfg.source, storage)
    check_output(cfg.sink, storage)
    return Checked(files, schema, check_model(cfg, storage))


def find_problems(cfg: JobConfig) -> tuple[Checked | None, list[str]]:
    """Every check `preflight` makes, each run whatever the others found: (what they found, the problems)."""
    storage = StorageConfig.from_env(cfg.storage_options)
    problems: list[str] = []
    found = _noting(problems, check_input, cfg.source, storage)
    _noting(problems, check_output, cfg.sink, storage)
    model = _noting(problems, check_model, cfg, storage)
    if problems:
        return None, problems
    return Checked(found[0], found[1], model), []


def _noting(problems: list[str], check: Callable[..., Any], *args: Any) -> Any:
    try:
        return check(*args)
    except USER_ERRORS as err:
        problems.append(str(err))
        return None


def check_input(source: SourceConfig, storage: StorageConfig) -> tuple[list[str], pa.Schema]:
    """The input's files and the first good file's schema; fails on a bad schema or an input without rows."""
    files = list_files(source, storage)
    fs = storage.fsspec_filesystem(files[0])
    roles = column_roles(source)
    schema, skipped = None, []
    for url in files:
        try:
            with opened(fs, url) as pf:
                problem = schema_problem(pf.schema_arrow, source.columns, roles)
                if problem and source.on_bad_file == "fail":
                    raise ValueError(f"input file {url} {problem}")
                if problem:
                    raise BadFile(url, problem)
                schema = schema or pf.schema_arrow
                if pf.metadata.num_rows:
                    return files, schema
        except BadFile as bad:
            if source.on_bad_file == "fail":
                raise
            skipped.append(bad)
    if schema is None:
        raise ValueError(f"no file of input {source.input} is readable ({len(files)} tried); the first: {skipped[0]}")
    raise ValueError(f"input {source.input} holds no rows: its {len(files) - len(skipped)} readable Parquet file(s) "
                     "are empty; check --input")


def check_output(sink: SinkConfig, storage: StorageConfig) -> None:
    """The output database can be written: a local path's nearest existing folder is writable, an S3
    bucket exists and answers. Other schemes are left to the first commit."""
    table_uri(sink.db, sink.table)  # the table name
    scheme = sink.db.split("://", 1)[0].lower() if "://" in sink.db else ""
    if scheme in ("", "file"):
        path = Path(url_path(sink.db)).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(f"output {sink.db} cannot be created: {existing} is a file; choose another --output")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"output {sink.db} cannot be created: {existing} is not writable; choose another --output")
    elif scheme in ("s3", "s3a"):
        bucket = url_path(sink.db).split("/", 1)[0]
        if not storage.fsspec_filesystem(sink.db).exists(bucket):
            raise ValueError(f"output {sink.db}: bucket {bucket!r} does not exist or does not answer; create it, or "
                             "check --output, the endpoint and --storage-option")


def check_model(cfg: JobConfig, storage: StorageConfig) -> ModelDescription:
    """The model described (tokenizer and facts, no weights loaded) and its task and dims checked."""
    from pipeline.run import resolve  # pipeline.run calls preflight

    ref = cfg.encode.model
    try:
        described = describe_model(ref, storage_options=storage.fsspec_options(ref))
    except Exception as err:  # a store that does not answer; anything else is raised as it is
        if unreachable(err):
            raise storage_failure(f"model {ref}", err) from err
        raise
    resolve(cfg, cluster=PLACEHOLDER_CLUSTER, described=described)  # task and dims: checked there, once
    return described
