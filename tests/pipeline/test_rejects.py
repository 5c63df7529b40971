"""Every bad row gets a recorded answer: exact counts in the report, `<table>_rejected` and the data table.

Real Ray and LanceDB, MiniLM. Duplicate ids are rejected after their first occurrence in (file, row)
order, within one file and across files. One file stores its text as bytes (a binary column): they are
decoded as UTF-8 row by row, and a value that is not UTF-8 is rejected. A document longer than the model
window is embedded truncated (chunking none) and counted.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
from shared_data import minilm_dir, qmsum_transcripts, sts_sentences

from pipeline.config import EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.run import run_job
from pipeline.sink import table_uri

S = sts_sentences(12)
LONG = qmsum_transcripts(limit=1)[0][:4000]  # ~900 tokens: over MiniLM's window, so embedded truncated
FILES = {  # file -> [(id, text)]; reasons for the bad ones below; part-2's text column is binary
    "part-0.parquet": [("a", S[0]), ("b", S[1]), (None, S[2]), ("a", S[3]), ("c", "   "), ("d", S[4])],
    "part-1.parquet": [("b", S[5]), ("e", None), ("f", S[6]), ("f", S[7]), ("g", ""), ("h", S[8])],
    "part-2.parquet": [("i", S[9].encode()), ("j", b"caf\xe9 in latin-1"), ("k", LONG.encode()), ("d", S[10].encode()),
                       ("l", f"{S[11]} (naïve café)".encode())],
}
REJECTED = {  # (file, row) -> (id, reason)
    ("part-0.parquet", 2): (None, "missing id"),
    ("part-0.parquet", 3): ("a", "duplicate_id"),
    ("part-0.parquet", 4): ("c", "empty text"),
    ("part-1.parquet", 0): ("b", "duplicate_id"),
    ("part-1.parquet", 1): ("e", "missing text"),
    ("part-1.parquet", 3): ("f", "duplicate_id"),
    ("part-1.parquet", 4): ("g", "empty text"),
    ("part-2.parquet", 1): ("j", "invalid utf-8"),
    ("part-2.parquet", 3): ("d", "duplicate_id"),
}
EMBEDDED = {"a": S[0], "b": S[1], "d": S[4], "f": S[6], "h": S[8],  # first occurrences only
            "i": S[9], "k": LONG, "l": f"{S[11]} (naïve café)"}


def write(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in FILES.items():
        kind = pa.binary() if isinstance(rows[0][1], bytes) else pa.string()
        pq.write_table(pa.table({"id": pa.array([i for i, _ in rows], pa.string()),
                                 "text": pa.array([t for _, t in rows], kind)}), root / name)
    return str(root)


def job(src: str, db: str) -> JobConfig:
    return JobConfig(source=SourceConfig(input=src),
                     encode=EncodeConfig(model=str(minilm_dir()), actors=1, precision="float32"),
                     sink=SinkConfig(db=db, table="docs", commit_every_rows=3), run_id=uuid.uuid4().hex[:12])


def rejected_rows(db: str) -> dict[tuple[str, int], tuple[str | None, str, str]]:
    t = lance.dataset(f"{db}/docs_rejected.lance").to_table().to_pylist()
    return {(Path(r["file"]).name, r["row"]): (r["id"], r["reason"], r["run_id"]) for r in t}


def test_bad_rows_and_duplicate_ids_are_counted_recorded_and_reconciled(ray_up, tmp_path):
    src, db = write(tmp_path / "in"), str(tmp_path / "db")
    cfg = job(src, db)
    report = run_job(cfg)

    data = lance.dataset(table_uri(db, "docs")).to_table()
    embedded = dict(zip(data["id"].to_pylist(), data["text"].to_pylist(), strict=True))
    assert embedded.keys() == EMBEDDED.keys()
    assert {i: t for i, t in embedded.items() if i != "k"} == {i: t for i, t in EMBEDDED.items() if i != "k"}
    assert LONG.startswith(embedded["k"]) and len(embedded["k"]) < len(LONG)  # the chunk is the window's text
    assert report["documents_read"] == sum(len(r) for r in FILES.values()) == 17
    assert report["documents_embedded"] == len(EMBEDDED) and report["documents_rejected"] == len(REJECTED)
    assert report["documents_read"] == report["documents_embedded"] + report["documents_rejected"]
    assert report["rejected_by_reason"] == {"missing id": 1, "duplicate_id": 4, "empty text": 2, "missing text": 1,
                                            "invalid utf-8": 1}
    assert report["documents_truncated"] == 1  # LONG, and only it
    assert {(r["id"], r["reason"]) for r in report["rejected_sample"]} == set(REJECTED.values())
    assert report["rejected_table"] == "docs_rejected"
    got = rejected_rows(db)
    assert {k: v[:2] for k, v in got.items()} == REJECTED
    assert {v[2] for v in got.values()} == {cfg.run_id}

    # The same corpus again: nothing to embed, the same rejections, and the rejected table keeps one
    # row per (file, row): a re-run replaces its rows instead of adding them again.
    again = run_job(job(src, db), mode="reembed")
    assert again["documents_embedded"] == 0 and again["documents_unchanged"] == len(EMBEDDED)
    assert again["documents_rejected"] == len(REJECTED)
    after = rejected_rows(db)
    assert {k: v[:2] for k, v in after.items()} == REJECTED
    assert not (tmp_path / "db" / "docs.staging").exists() or not any((tmp_path / "db" / "docs.staging").iterdir())
