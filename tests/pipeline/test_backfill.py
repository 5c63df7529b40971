"""Backfills over Hive partitions: partition columns carried, a partition's rows follow its source
exactly and idempotently, two backfills of different partitions at once both land, never doubled."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import minilm_dir, sts_sentences

from pipeline.config import EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.partitions import select
from pipeline.run import run_job
from pipeline.sink import table_uri

ROOT = Path(__file__).resolve().parents[2]
DAYS = ("2026-11-01", "2026-11-02", "2026-11-03")
S = sts_sentences(60)


def write_day(root: Path, day: str, docs: dict[str, str]) -> None:
    folder = root / f"dt={day}" / "region=eu"
    folder.mkdir(parents=True, exist_ok=True)
    ids = sorted(docs)
    pq.write_table(pa.table({"id": ids, "text": [docs[i] for i in ids]}), folder / "part-0.parquet")


def corpus(root: Path) -> dict[str, dict[str, str]]:
    days = {day: {f"{day}-{k}": S[n * 20 + k] for k in range(8)} for n, day in enumerate(DAYS)}
    for day, docs in days.items():
        write_day(root, day, docs)
    return days


def job(src: str, db: str) -> JobConfig:
    return JobConfig(source=SourceConfig(input=src), encode=EncodeConfig(model=str(minilm_dir()), actors=1,
                     precision="float32"), sink=SinkConfig(db=db, table="docs", commit_every_rows=4),
                     run_id=uuid.uuid4().hex[:12])


def rows(db: str) -> list[tuple]:
    t = lance.dataset(table_uri(db, "docs")).to_table()
    return sorted(zip(t["id"].to_pylist(), t["chunk"].to_pylist(), t["content_hash"].to_pylist(),
                      t["dt"].to_pylist(), t["region"].to_pylist(), strict=True))


def test_select_lists_and_filters_partitions():
    files = [f"s3://b/in/dt={d}/region={r}/part-0.parquet" for d in DAYS for r in ("eu", "us")]
    assert sorted(select("s3://b/in/", files, "dt=2026-11-02").values) == files[2:4]
    picked = select("s3://b/in", files, "dt >= '2026-11-02' and region = 'us'")
    assert sorted(picked.values) == [files[3], files[5]] and picked.keys == ("dt", "region")
    assert picked.predicate == "dt >= '2026-11-02' and region = 'us'"
    listed = select("s3://b/in", files, "dt=2026-11-01/region=us, dt=2026-11-03")
    assert sorted(listed.values) == [files[1], files[4], files[5]]
    assert listed.predicate == "(dt = '2026-11-01' AND region = 'us') OR (dt = '2026-11-03')"
    with pytest.raises(ValueError, match=r"names keys \['day'\]"):
        select("s3://b/in", files, "day=2026-11-01")
    with pytest.raises(ValueError, match="selects no files.*dt=2026-11-01/region=eu"):
        select("s3://b/in", files, "dt=2025-01-01")
    with pytest.raises(ValueError, match="not a filter over the partition columns"):
        select("s3://b/in", files, "day > 3")
    with pytest.raises(ValueError, match="not under key=value partition directories"):
        select("s3://b/in", ["s3://b/in/flat/part-0.parquet"], "dt=2026-11-01")


def test_backfill_carries_partitions_and_is_idempotent_per_partition(ray_up, tmp_path):
    src, db = tmp_path / "in", str(tmp_path / "db")
    days = corpus(src)
    first = run_job(job(str(src), db), mode="backfill", partitions="dt=2026-11-01")
    assert first["documents_new"] == 8
    assert {(r[3], r[4]) for r in rows(db)} == {("2026-11-01", "eu")}

    again = run_job(job(str(src), db), mode="backfill", partitions="dt=2026-11-01")
    assert again["documents_embedded"] == 0 and again["documents_unchanged"] == 8 and again["commits"] == 0
    before = rows(db)

    run_job(job(str(src), db), mode="backfill", partitions="dt >= '2026-11-02'")
    assert Counter(r[3] for r in rows(db)) == dict.fromkeys(DAYS, 8)

    # The first day's source changes: one document edited, one gone. Only that partition moves.
    others = [r for r in rows(db) if r[3] != DAYS[0]]
    day = dict(days[DAYS[0]])
    edited, gone = sorted(day)[:2]
    day[edited] = S[59]
    del day[gone]
    write_day(src, DAYS[0], day)
    report = run_job(job(str(src), db), mode="backfill", partitions="dt=2026-11-01")
    assert (report["documents_changed"], report["documents_deleted"], report["documents_unchanged"]) == (1, 1, 6)
    now = rows(db)
    assert {r[0] for r in now if r[3] == DAYS[0]} == set(day)
    assert [r for r in now if r[3] != DAYS[0]] == others
    assert [r for r in before if r[0] not in (edited, gone)] == [r for r in now if r[3] == DAYS[0] and r[0] != edited]


@pytest.mark.slow
def test_two_backfills_of_different_partitions_at_once_both_land(ray_up, tmp_path):
    src, db = tmp_path / "in", str(tmp_path / "db")
    corpus(src)
    run_job(job(str(src), db), mode="backfill", partitions="dt=2026-11-01")  # the table exists

    def backfill(partition: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "jobs.backfill", "--input", str(src), "--output", db, "--table", "docs",
               "--model", str(minilm_dir()), "--precision", "float32", "--actors", "1",
               "--commit-every-rows", "2", "--partitions", partition]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("RAY_ADDRESS", None)
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [backfill(f"dt={DAYS[1]}"), backfill(f"dt={DAYS[2]}")]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    got = rows(db)
    assert Counter(r[3] for r in got) == dict.fromkeys(DAYS, 8)
    assert len({(r[0], r[1]) for r in got}) == len(got)  # no (id, chunk) twice
