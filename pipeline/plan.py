"""--dry-run: list the input, sample documents, and estimate tokens, chunks, output size and time.

Starts no encoders: only Parquet footers are read in full; a sample of documents is tokenized and
chunked with the model's tokenizer to extrapolate.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model import chunk_spans, describe_model
from model.loading import DEFAULT_MAX_BATCH_TOKENS
from pipeline.config import JobConfig, check_value
from pipeline.prepare import embedded_text
from pipeline.read import list_files
from pipeline.run import resolve
from pipeline.storage import url_path

SAMPLE_DOCS = 256
# Per-actor tokens/s when none is configured: measured here for MiniLM on 2 CPU cores
# (docs/BENCHMARKS.md); GPU figure from the performance spec's H100 estimate for jina-v3 (§3.2).
DEFAULT_TOKENS_PER_S = {"cpu": 3_000.0, "gpu": 250_000.0}


def _local_cluster() -> dict:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    import torch

    return {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}


def plan_job(cfg: JobConfig, *, tokens_per_second: float | None = None) -> dict:
    check_value("--tokens-per-second", tokens_per_second, float | None, above=0)
    job = resolve(cfg, cluster=_local_cluster())
    files = list_files(cfg.source, job.storage)
    fs = job.storage.fsspec_filesystem(files[0])
    rows_per_file, sample = [], []
    for f in files:
        with fs.open(url_path(f), "rb") as fh:
            pf = pq.ParquetFile(fh)
            rows_per_file.append(pf.metadata.num_rows)
            if len(sample) < SAMPLE_DOCS and pf.metadata.num_rows:
                batch = next(pf.iter_batches(batch_size=SAMPLE_DOCS - len(sample), columns=cfg.source.columns))
                sample.extend(pa.Table.from_batches([batch]).to_pylist())
    tok = describe_model(cfg.encode.model, revision=job.info.revision).tokenizer
    prefix = tok.prefix(job.task)
    tokens, chunks, chars = [], [], []
    for row in sample:
        text = row.get(cfg.source.text_column)
        if not isinstance(text, str) or not text.strip():
            continue
        text = embedded_text(text, row.get(cfg.source.title_column) if cfg.source.title_column else None)
        n = len(tok.encode_with_offsets([text], [prefix])[0].ids)
        spans = chunk_spans(tok, text, cfg.chunking.mode, chunk_tokens=cfg.chunking.chunk_tokens,
                            chunk_sentences=cfg.chunking.chunk_sentences)
        late = cfg.chunking.late and cfg.chunking.mode != "none"
        tokens.append(n if late else min(n, job.window) if cfg.chunking.mode == "none" else n + len(spans) * (len(tok.encode([""], [prefix])[0])))
        chunks.append(len(spans))
        chars.append(sum(e - s for s, e in spans))
    docs = sum(rows_per_file)
    mean_tokens = float(np.mean(tokens)) if tokens else 0.0
    mean_chunks = float(np.mean(chunks)) if chunks else 1.0
    est_tokens = mean_tokens * docs
    est_chunks = mean_chunks * docs
    device = "gpu" if job.gpus_per_actor else "cpu"
    tps = tokens_per_second or DEFAULT_TOKENS_PER_S[device]
    budget = cfg.encode.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS["cuda" if device == "gpu" else "cpu"]
    vec_bytes = sum(job.dims) * (2 if cfg.encode.vector_dtype == "float16" else 4)
    text_bytes = (float(np.mean(chars)) / max(mean_chunks, 1)) if chars else 0.0
    return {
        "input": cfg.source.input,
        "files": files,
        "rows_per_file": rows_per_file,
        "documents": docs,
        "sampled_documents": len(tokens),
        "mean_tokens_per_document": round(mean_tokens, 1),
        "mean_chunks_per_document": round(mean_chunks, 2),
        "estimated_tokens": int(est_tokens),
        "estimated_chunks": int(est_chunks),
        "model": job.info.identity,
        "task": job.task,
        "dims": list(job.dims),
        "window": job.window,
        "actors": job.actors,
        "device": device,
        "precision": cfg.encode.precision,
        "estimated_batches": int(np.ceil(est_tokens / budget)) if est_tokens else 0,
        "max_batch_tokens": budget,
        "estimated_output_bytes": int(est_chunks * (vec_bytes + text_bytes + 140)),
        "tokens_per_second_per_actor": tps,
        "tokens_per_second_source": "configured" if tokens_per_second else f"default for {device}",
        "estimated_seconds": round(est_tokens / (tps * job.actors), 1) if est_tokens else 0.0,
        "output": {"db": cfg.sink.db, "table": cfg.sink.table, "mode": cfg.sink.mode},
    }


def format_plan(plan: dict) -> str:
    lines = [f"dry run: {plan['input']} -> {plan['output']['db']} table {plan['output']['table']} ({plan['output']['mode']})"]
    lines += [f"  {f}  {n} rows" for f, n in zip(plan["files"], plan["rows_per_file"], strict=True)]
    lines += [
        f"  documents {plan['documents']} (sampled {plan['sampled_documents']}): {plan['mean_tokens_per_document']} tokens"
        f" and {plan['mean_chunks_per_document']} chunks per document",
        f"  estimated tokens {plan['estimated_tokens']}  chunks {plan['estimated_chunks']}"
        f"  output ~{plan['estimated_output_bytes'] / 1e6:.1f} MB",
        f"  model {plan['model']}  task {plan['task']}  dims {plan['dims']}  window {plan['window']}",
        f"  plan: {plan['actors']} {plan['device']} actor(s) at precision {plan['precision']},"
        f" ~{plan['estimated_batches']} batches of"
        f" {plan['max_batch_tokens']} tokens",
        f"  estimated duration {plan['estimated_seconds']} s at {plan['tokens_per_second_per_actor']:.0f} tokens/s"
        f" per actor ({plan['tokens_per_second_source']})",
    ]
    return "\n".join(lines)
