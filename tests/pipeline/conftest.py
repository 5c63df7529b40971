"""Fixtures for the pipeline tests: small real corpora as Parquet shards, a tiny jina-v3 checkpoint.

Everything is real: shards are Parquet files, jobs run on a real local Ray, tables are real LanceDB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from shared_data import qmsum_transcripts
from tiny_jina import make_tiny_jina


@pytest.fixture(scope="module")
def ray_up(ray_local, moto_s3):
    """`ray_local` for module-scoped fixtures: brought back if a cluster test shut it down.

    (The autouse re-init in tests/conftest.py runs per test, i.e. after module fixtures.)
    """
    if not ray_local.is_initialized():
        ray_local.init(
            address="local",  # never join another process's cluster on this machine
            num_cpus=4,
            include_dashboard=False,
            ignore_reinit_error=True,
            runtime_env={"env_vars": moto_s3.env},
        )
    return ray_local


@contextlib.contextmanager
def _spread_over_actors() -> Iterator[None]:
    """Ray Data settings under which every actor of a small job's pool gets work.

    Ray Data gives a bundle to the least busy actor and, on a tie, to the one that finished last,
    and it starts pool actors asynchronously: on a small input the first actor up can take every
    bundle. So: wait for the whole pool before dispatching, one bundle in flight per actor, and
    emit blocks in order (blocks prepared early wait for the slowest earlier one, then go out
    together). With bundles that take an actor ~0.3 s (8 `passages`), calls overlap.
    """
    ctx = ray.data.DataContext.get_current()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ctx, "wait_for_min_actors_s", 120)
        mp.setattr(ctx, "max_tasks_in_flight_per_actor", 1)
        mp.setattr(ctx.execution_options, "preserve_order", True)
        yield


@pytest.fixture(scope="session")
def spread_over_actors() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """`with spread_over_actors(): run_job(...)`; see `_spread_over_actors`."""
    return _spread_over_actors


@pytest.fixture(scope="session")
def passages() -> Callable[..., list[str]]:
    """passages(n, size=900): n real meeting-transcript passages (~200 MiniLM tokens each)."""

    def make(n: int, size: int = 900) -> list[str]:
        text = "\n".join(qmsum_transcripts(limit=3))
        assert len(text) >= n * size
        return [text[i * size : (i + 1) * size] for i in range(n)]

    return make


@pytest.fixture(scope="session")
def tiny_jina_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random jina-embeddings-v3 checkpoint (hidden 32, 2 layers), seed 0."""
    return make_tiny_jina(tmp_path_factory.mktemp("tiny_jina") / "jina-embeddings-v3-tiny", seed=0)


def _shard_tables(
    texts: Sequence[str | None],
    *,
    shards: int,
    ids: Sequence[str | None] | None = None,
    extra: dict[str, Sequence] | None = None,
) -> list[pa.Table]:
    """Documents split contiguously into `shards` tables with columns id, text, lang, n (+ `extra`)."""
    ids = list(ids) if ids is not None else [f"doc-{i:04d}" for i in range(len(texts))]
    columns = {
        "id": pa.array(ids, pa.string()),
        "text": pa.array(list(texts), pa.string()),
        "lang": pa.array(["en" if i % 2 else "xx" for i in range(len(texts))], pa.string()),
        "n": pa.array(list(range(len(texts))), pa.int64()),
    }
    for name, values in (extra or {}).items():
        columns[name] = pa.array(list(values))
    table = pa.table(columns)
    per = -(-table.num_rows // shards)
    return [table.slice(k * per, per) for k in range(shards)]


@pytest.fixture(scope="session")
def make_shards() -> Callable[..., list[pa.Table]]:
    """make_shards(texts, shards=K, ids=None, extra=None) -> K tables (see `_shard_tables`)."""
    return _shard_tables


@pytest.fixture(scope="session")
def write_shards() -> Callable[..., list[pa.Table]]:
    """write_shards(dir_or_url, tables, filesystem=None): one Parquet file per table, part-K.parquet."""

    def write(root: str | Path, tables: list[pa.Table], filesystem=None) -> list[pa.Table]:
        root = str(root)
        if filesystem is None:
            Path(root).mkdir(parents=True, exist_ok=True)
        for k, t in enumerate(tables):
            path = f"{root.removeprefix('s3://')}/part-{k}.parquet"
            pq.write_table(t, path, filesystem=filesystem)
        return tables

    return write
