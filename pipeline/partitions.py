"""Hive partitions of a corpus (`dt=2026-11-01/part-0.parquet`, any number of levels): which files a
backfill reads, the partition values each row carries into the table, and the same selection as a
Lance SQL predicate over the table's partition columns.

`--partitions` is either a list of partition paths (`dt=2026-11-01,dt=2026-11-02`, or
`region=eu/dt=2026-11-01` for several levels: a path selects every partition below it) or a filter
expression over the partition columns (`dt >= '2026-01-01' and dt < '2026-02-01'`), evaluated with
polars' SQL expressions on the listed partitions. Partition values are strings, as Hive writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from pipeline.read import SOURCE_FILE

_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=([^/]*)$")
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^,/='\" <>!()]*(/[A-Za-z_][A-Za-z0-9_]*=[^,/='\" <>!()]*)*$")


@dataclass(frozen=True)
class Partitions:
    """The partition keys of a corpus and each selected file's values for them."""

    keys: tuple[str, ...]
    values: dict[str, tuple[str, ...]]  # file -> one value per key
    predicate: str  # Lance SQL over the table's partition columns: the rows this backfill replaces


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def partition_values(root: str, file: str) -> dict[str, str]:
    """The `key=value` directories between `root` and `file`, in order."""
    rel = file.removeprefix(root.rstrip("/") + "/")
    out: dict[str, str] = {}
    for segment in rel.split("/")[:-1]:
        match = _SEGMENT.match(segment)
        if match is None:
            raise ValueError(f"input file {file} is not under key=value partition directories of {root} "
                             f"(found {segment!r}); backfill needs a Hive-partitioned input")
        out[match.group(1)] = match.group(2)
    return out


def select(root: str, files: list[str], selection: str) -> Partitions:
    """The files of the partitions `selection` names (see the module docstring); clear errors otherwise."""
    found = {f: partition_values(root, f) for f in files}
    keys = tuple(next(iter(found.values()), {}))
    if not keys:
        raise ValueError(f"input {root} has no key=value partition directories; backfill needs a Hive-partitioned input")
    for f, vals in found.items():
        if tuple(vals) != keys:
            raise ValueError(f"input file {f} has partition keys {list(vals)}, others have {list(keys)}")
    rows = {f: tuple(v[k] for k in keys) for f, v in found.items()}
    paths = [p.strip() for p in selection.split(",")]
    if all(_PATH.match(p) for p in paths):
        wanted = [dict(s.split("=", 1) for s in p.split("/")) for p in paths]
        unknown = sorted({k for w in wanted for k in w} - set(keys))
        if unknown:
            raise ValueError(f"--partitions names keys {unknown}; the input's partition keys are {list(keys)}")
        chosen = {f: v for f, v in rows.items() if any(all(found[f][k] == x for k, x in w.items()) for w in wanted)}
        predicate = " OR ".join("(" + " AND ".join(f"{k} = {_quote(x)}" for k, x in w.items()) + ")" for w in wanted)
    else:  # the table side takes the same expression: a partition in range but gone from the source empties
        chosen, predicate = _filtered(rows, keys, selection), selection
    if not chosen:
        raise ValueError(f"--partitions {selection!r} selects no files of {root} (partitions there: "
                         f"{sorted({'/'.join(f'{k}={x}' for k, x in zip(keys, v, strict=True)) for v in rows.values()})[:10]})")
    return Partitions(keys, chosen, predicate)


def _filtered(rows: dict[str, tuple[str, ...]], keys: tuple[str, ...], expression: str) -> dict[str, tuple[str, ...]]:
    import polars as pl

    files = list(rows)
    frame = pl.DataFrame({k: [rows[f][i] for f in files] for i, k in enumerate(keys)}).with_row_index("_file")
    try:
        kept = frame.filter(pl.sql_expr(expression))["_file"].to_list()
    except Exception as e:  # polars raises its own error types for syntax and unknown columns
        raise ValueError(f"--partitions {expression!r} is not a filter over the partition columns {list(keys)}: "
                         f"{str(e).splitlines()[0]}") from None
    return {files[i]: rows[files[i]] for i in kept}


def with_partition_columns(batch: pa.Table, partitions: Partitions) -> pa.Table:
    """Ray `map_batches` function: each row's partition values as string columns (from its `_file`)."""
    files = batch[SOURCE_FILE].to_pylist()
    for i, key in enumerate(partitions.keys):
        batch = batch.append_column(key, pa.array([partitions.values[f][i] for f in files], pa.string()))
    return batch
