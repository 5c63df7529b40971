"""Read stage: Parquet shards from a directory, glob or URL (local, s3://, any fsspec URL).

Bad files (issue #13). Every read task opens each of its files, which parses the footer and all row-group
metadata, and checks the schema (the job's columns, usable types) before it passes on a row. A file that
fails there (random bytes, a truncated file whose footer is gone, a missing column, a text column that
cannot hold text, no permission, a vanished object) is a `BadFile`: one line naming its URL and the cause.
Usable types: ids are strings or integers, text (and title) strings or binary. A binary value is decoded
as UTF-8 row by row in the prepare stage, and one that is not UTF-8 is a rejected row (issue #13, Rows);
a type no value of which could be text (integers, floats, lists) is refused whole, by pre-flight in the
first file before Ray starts.
With `--on-bad-file fail` it fails the job; with `skip` the task passes on nothing of it and records it
in a `SkippedFiles` actor, which the driver lists in the report. An actor rather than a column the
writer tallies: the prepare and embed stages would have to carry a row that is no document, and the
actor holds at most one small entry per skipped file, never more than the driver's own file list.

A file whose data breaks after some of its rows were passed on (a corrupt page) fails the job under
either policy: those rows are already on their way to the table, and skipping the rest would keep
part of a file silently. Nor is an unreachable store a bad file (every file would be skipped): it
fails the job, one line naming the URL and the cause.
"""

from __future__ import annotations

import contextlib
import functools
import glob as _glob
from collections.abc import Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.exceptions import UserCodeException

from pipeline.config import SourceConfig
from pipeline.storage import StorageConfig, url_path

_GLOB_CHARS = "*?["
# Provenance of every row, carried to the rejected-rows table and used to order duplicate ids.
SOURCE_FILE = "_file"  # string: the file's URL (or local path), as `list_files` lists it
SOURCE_ROW = "_row"  # int64: the row's position in that file, from 0
FILE_ROWS = "_file_rows"  # int64: the file's row count from its footer, on its first row (0 elsewhere)
BLOCK_BYTES = 64 << 20  # uncompressed bytes per read block: well under Ray Data's 128 MiB target


class InputError(ValueError, UserCodeException):
    """The input cannot be read: one line naming the URL and the cause.

    A `UserCodeException` too, which is what it is to Ray Data (raised by this datasource, not by Ray):
    Ray Data then logs its message alone instead of its internal frames and an invitation to report a
    Ray bug (`ray.data.exceptions.omit_traceback_stdout`).
    """


class BadFile(InputError):
    """An input file the job cannot read; skipped under `--on-bad-file skip`, else the job's one-line error."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"input file {url} {reason}; fix or remove it, or pass --on-bad-file skip to skip such files")
        self.url, self.reason = url, reason

    def __reduce__(self):  # a read task's exception travels to the driver pickled; args alone hold the message
        return type(self), (self.url, self.reason)


def cause(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def unreachable(err: BaseException) -> bool:
    """True when `err` says the store did not answer rather than that a file is bad: connection and
    timeout errors, and anything that is no OSError or ValueError (botocore's connection errors are neither)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return not isinstance(err, (OSError, ValueError, EOFError, NotImplementedError, pa.ArrowException))


def storage_failure(what: str, err: BaseException) -> InputError:
    """The one-line error for an input the store did not let us list or read."""
    return InputError(f"{what} could not be read from storage ({cause(err)}); check the endpoint, the "
                      "credentials and --storage-option")


def list_files(source: SourceConfig, storage: StorageConfig) -> list[str]:
    """Every Parquet file of the source, as full URLs (or local paths), sorted."""
    fs = storage.fsspec_filesystem(source.input)
    protocol = source.input.split("://", 1)[0] + "://" if "://" in source.input else ""
    path = url_path(source.input)
    try:
        if any(c in path for c in _GLOB_CHARS):
            found = fs.glob(path) if protocol else _glob.glob(path, recursive=True)
        elif fs.isdir(path):
            found = [f for f in fs.find(path) if f.endswith(".parquet")]
        elif fs.exists(path):
            found = [path]
        else:
            raise FileNotFoundError(f"input {source.input} does not exist; check --input")
    except FileNotFoundError:
        raise
    except Exception as err:  # the store's failure, whatever its client calls it (botocore's are no OSError)
        raise storage_failure(f"input {source.input}", err) from err
    files = sorted(protocol + f.removeprefix(protocol) if protocol else f for f in found)
    if not files:
        raise FileNotFoundError(f"input {source.input} matches no Parquet files (*.parquet); check --input")
    return files


def column_roles(source: SourceConfig) -> dict[str, str]:
    """The columns whose type the job relies on, each with the flag that names it."""
    roles = {source.id_column: "--id-column", source.text_column: "--text-column"}
    if source.title_column:
        roles[source.title_column] = "--title-column"
    if source.image_column:
        roles[source.image_column] = "--image-column"
    return roles


# Text and title column types: strings, or bytes the prepare stage decodes as UTF-8 row by row. An image column
# holds encoded images (binary) or where to read them (strings).
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)


def _type_problem(column: str, kind: pa.DataType, flag: str) -> str | None:
    """Why `column`'s type cannot serve as `flag`'s column, or None: every row would be rejected."""
    if flag == "--id-column":
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind):
            return None
        return f"has id column {column!r} of type {kind}; ids must be strings or integers: name another with {flag}"
    if any(is_type(kind) for is_type in _TEXT_TYPES):
        return None
    if flag == "--image-column":
        return (f"has image column {column!r} of type {kind}; images must be bytes (binary) or paths/URLs (string): "
                f"name another with {flag}")
    return (f"has {flag} column {column!r} of type {kind}, not a string, so every row would be rejected; "
            f"name a string column with {flag}")


def schema_problem(schema: pa.Schema, columns: list[str] | tuple[str, ...], roles: Mapping[str, str]) -> str | None:
    """What a file's schema lacks for the job (columns, usable types), or None."""
    missing = [c for c in columns if c not in schema.names]
    if missing:
        return f"lacks columns {missing}; it has {schema.names}"
    for column, flag in roles.items():
        if column in columns:
            problem = _type_problem(column, schema.field(column).type, flag)
            if problem:
                return problem
    return None


@contextlib.contextmanager
def opened(fs, url: str) -> Iterator[pq.ParquetFile]:
    """`url` as a ParquetFile, its footer and every row group's metadata parsed; a `BadFile` if it is none."""
    try:
        fh = fs.open(url_path(url), "rb")
    except Exception as err:
        raise _failure(url, err, "could not be opened") from err
    with fh:
        try:
            pf = pq.ParquetFile(fh)
        except Exception as err:
            raise _failure(url, err, "is not a readable Parquet file (corrupt or truncated?)") from err
        yield pf


def _failure(url: str, err: BaseException, what: str) -> InputError:
    return storage_failure(f"input file {url}", err) if unreachable(err) else BadFile(url, f"{what}: {cause(err)}")


@ray.remote(num_cpus=0)
class SkippedFiles:
    """The files read tasks skipped under `--on-bad-file skip`, each with why (see the module docstring)."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}  # by file: a retried task, or the job's id pass, records it again

    def record(self, file: str, reason: str) -> None:
        self.files.setdefault(file, reason)

    def listed(self) -> list[dict[str, str]]:
        return [{"file": f, "reason": r} for f, r in sorted(self.files.items())]


def skip_recorder(source: SourceConfig) -> ray.actor.ActorHandle | None:
    """A `SkippedFiles` actor when the job skips bad files; None when a bad file fails it."""
    return SkippedFiles.remote() if source.on_bad_file == "skip" else None


def skipped_files(recorder: ray.actor.ActorHandle | None) -> list[dict[str, str]]:
    """What `recorder` holds, by file: [{"file": url, "reason": ...}]."""
    return [] if recorder is None else ray.get(recorder.listed.remote())


class ParquetShards(Datasource):
    """The job's Parquet files as read tasks, one or more whole files each, streamed row group by row
    group in blocks of at most BLOCK_BYTES.

    `ray.data.read_parquet` first samples files in remote tasks to estimate encoding ratios, which
    blocks the job before any actor starts (2.5 s of a 2-core job's start-up, measured); the files
    are already listed here and their row groups are natural blocks, so nothing needs estimating.
    `roles` (from `column_roles`) are checked for usable types; a bad file fails the read unless a
    `skipped` recorder (`skip_recorder`) takes it.
    """

    def __init__(self, files: list[str], columns: tuple[str, ...] | list[str], storage: StorageConfig, *,
                 roles: Mapping[str, str] | None = None, skipped: ray.actor.ActorHandle | None = None):
        self.files, self.columns, self.storage = files, list(columns), storage
        self.roles, self.skipped = dict(roles or {}), skipped

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        groups = [g for g in (self.files[k::max(1, parallelism)] for k in range(max(1, parallelism))) if g]
        return [
            ReadTask(functools.partial(_read_files, group, self.columns, self.storage, self.roles, self.skipped),
                     BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=group),
                     per_task_row_limit=per_task_row_limit)
            for group in groups
        ]


def _read_files(files: list[str], columns: list[str], storage: StorageConfig, roles: Mapping[str, str] | None = None,
                skipped: ray.actor.ActorHandle | None = None) -> Iterator[pa.Table]:
    """Each file's blocks (`_read_file`); a bad file fails the task, or is recorded in `skipped` and left out."""
    fs = storage.fsspec_filesystem(files[0])
    for f in files:
        try:
            yield from _read_file(fs, f, columns, roles or {})
        except BadFile as bad:  # raised before any of the file's rows left (see `_read_file`)
            if skipped is None:
                raise
            ray.get(skipped.record.remote(bad.url, bad.reason))


def _read_file(fs, url: str, columns: list[str], roles: Mapping[str, str]) -> Iterator[pa.Table]:
    """Stream a file's row groups in blocks of about BLOCK_BYTES (row groups can hold millions of rows).

    Raises `BadFile` only before its first row is passed on; a failure after that is an `InputError`.
    """
    with opened(fs, url) as pf:
        problem = schema_problem(pf.schema_arrow, columns, roles)
        if problem:
            raise BadFile(url, problem)
        passed = 0
        try:
            for g in range(pf.num_row_groups):
                meta = pf.metadata.row_group(g)
                rows = max(1, int(meta.num_rows * BLOCK_BYTES / max(meta.total_byte_size, 1)))
                for batch in pf.iter_batches(batch_size=rows, row_groups=[g], columns=columns):
                    n = batch.num_rows
                    footer = [pf.metadata.num_rows if passed == 0 else 0] + [0] * (n - 1)
                    yield pa.Table.from_batches([batch]).append_column(
                        SOURCE_FILE, pa.array([url] * n, pa.string())).append_column(
                        SOURCE_ROW, pa.array(range(passed, passed + n), pa.int64())).append_column(
                        FILE_ROWS, pa.array(footer, pa.int64()))
                    passed += n
        except Exception as err:
            if unreachable(err):
                raise storage_failure(f"input file {url}", err) from err
            if not passed:
                raise BadFile(url, f"is not a readable Parquet file (corrupt?): {cause(err)}") from err
            raise InputError(f"input file {url} broke after {passed} of its rows were read ({cause(err)}); a file "
                             "cannot be skipped once rows of it were passed on: fix or remove it") from err


def read_source(
    source: SourceConfig, storage: StorageConfig, files: list[str], *, num_cpus: float, concurrency: int | None = None,
    skipped: ray.actor.ActorHandle | None = None,
) -> ray.data.Dataset:
    """The source's id/text/title/kept columns of `files` (from `list_files`) as a Dataset, with each
    row's provenance (`SOURCE_FILE`, `SOURCE_ROW`, `FILE_ROWS`); bad files are recorded in `skipped`
    (from `skip_recorder`) when given, else fail it."""
    shards = ParquetShards(files, source.columns, storage, roles=column_roles(source), skipped=skipped)
    # One read task per file, its blocks as they come: Ray would otherwise split them into ~200
    # blocks to reach its default parallelism, each a task of its own downstream.
    return ray.data.read_datasource(shards, num_cpus=num_cpus, concurrency=concurrency, override_num_blocks=len(files))
