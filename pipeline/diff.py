"""Which source documents a run must embed: a lookup join of the source against the table, by id.

Each prepare task looks its block's ids up in the table version the run started from (or resumes
from): `id IN (block ids) AND chunk = 0` over the `id` and `content_hash` columns, which Lance
answers from the BTREE index on `id` (`ensure_id_index`) plus a scan of the rows added since that
index was last updated. So the diff runs where the data is read, in parallel, and the driver never
holds ids or hashes: its memory does not grow with the corpus. A document is
* new: its id is not in the table;
* unchanged: same id and `content_hash`: no tokenization, no encoder work, nothing written;
* changed: same id, other hash: embedded, and its old chunks are replaced in the same commit.
Documents in the table but gone from the source are found the other way round (`missing_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import lance
import pyarrow.compute as pc

from pipeline.lance_commit import retry_io

if TYPE_CHECKING:
    import ray.data

NEW, CHANGED, UNCHANGED = "new", "changed", "unchanged"


@dataclass(frozen=True)
class LookupSpec:
    """The table version a run compares against; small and picklable."""

    uri: str
    version: int
    storage_options: tuple[tuple[str, str], ...] = ()
    # The run's id: workers cache opened datasets by spec, and a table dropped and made again (or a
    # run's staging dataset rewritten) starts its versions at 1 again.
    run_id: str = ""


_OPEN: dict[LookupSpec, lance.LanceDataset] = {}  # one per worker process: Ray reuses workers


def opened(spec: LookupSpec) -> lance.LanceDataset:
    """The dataset version `spec` names, opened once per worker process."""
    if spec not in _OPEN:
        _OPEN[spec] = lance.dataset(spec.uri, version=spec.version, storage_options=dict(spec.storage_options))
    return _OPEN[spec]


def previous_hashes(spec: LookupSpec, ids: list[str]) -> dict[str, str]:
    """id -> content_hash in the table version, for those of `ids` it holds."""
    if not ids:
        return {}
    found = opened(spec).to_table(columns=["id", "content_hash"],
                                 filter=pc.field("id").isin(ids) & (pc.field("chunk") == 0))
    return dict(zip(found["id"].to_pylist(), found["content_hash"].to_pylist(), strict=True))


def statuses(spec: LookupSpec | None, ids: list[str | None], hashes: list[str | None]) -> list[str | None]:
    """NEW / CHANGED / UNCHANGED per row (None where the row has no id or hash: it is rejected)."""
    if spec is None:
        return [NEW if i is not None and h is not None else None for i, h in zip(ids, hashes, strict=True)]
    before = previous_hashes(spec, sorted({i for i, h in zip(ids, hashes, strict=True) if i is not None and h is not None}))
    out: list[str | None] = []
    for i, h in zip(ids, hashes, strict=True):
        if i is None or h is None:
            out.append(None)
        elif i not in before:
            out.append(NEW)
        else:
            out.append(UNCHANGED if before[i] == h else CHANGED)
    return out


def has_id_index(uri: str, storage_options: dict[str, str]) -> bool:
    ds = lance.dataset(uri, storage_options=storage_options)
    return any(idx.field_names == ["id"] for idx in ds.describe_indices())


def ensure_id_index(uri: str, storage_options: dict[str, str]) -> None:
    """A BTREE index on `id` (created, or updated with the rows added since), for lookups and deletions.
    An I/O error on its commit is retried unless the index landed (`pipeline.commit.retry_io`)."""
    ds = lance.dataset(uri, storage_options=storage_options)
    if ds.count_rows() == 0:
        return
    if has_id_index(uri, storage_options):
        retry_io(ds.optimize.optimize_indices, lambda: False)  # an update twice is harmless
    else:
        retry_io(lambda: ds.create_scalar_index("id", "BTREE"), lambda: has_id_index(uri, storage_options))


def missing_ids(spec: LookupSpec, source_ids: ray.data.Dataset, *, partitions: int,
                where: str | None = None) -> ray.data.Dataset:
    """Ids of documents the table version holds (those matching the Lance SQL `where`, if given) but
    the source no longer does (column `id`).

    A hash join in Ray Data (`left_anti`) of the table's ids (first chunks only) against the source's
    ids: both sides are id columns only, shuffled across the cluster, so no process holds either set.
    """
    import ray.data

    table_filter = "chunk = 0" if where is None else f"chunk = 0 AND ({where})"
    table_ids = ray.data.read_lance(spec.uri, version=spec.version, columns=["id"],
                                    storage_options=dict(spec.storage_options),
                                    scanner_options={"filter": table_filter})
    return table_ids.join(source_ids, join_type="left_anti", num_partitions=partitions, on=("id",))
