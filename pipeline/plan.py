"""--dry-run: list the input, sample documents, and estimate tokens, chunks, output size and time.

Starts no encoders: only Parquet footers are read in full; a sample of documents goes through the
prepare stage's own code (`prepare_units`: tokenize, chunk, reject) and its counts are extrapolated.
First come the job's pre-flight checks (`pipeline.preflight`), all of them: a plan with `problems`
lists every one and estimates nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.loading import DEFAULT_MAX_BATCH_TOKENS, ModelDescription
from pipeline.config import JobConfig, check_value
from pipeline.images import fetcher
from pipeline.preflight import find_problems
from pipeline.prepare import CHAR_SPANS, IDS, IMAGE, prepare_units
from pipeline.read import BadFile, column_roles, opened, schema_problem
from pipeline.run import resolve
from pipeline.table_meta import MULTIVECTOR, MULTIVECTOR_DIM

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


def image_token_counter(model: ModelDescription) -> Callable[[bytes], int]:
    """An image's tokens as the encoder will see them (vision tokens and its prompt's), from the model's own
    image preprocessing: CPU only, no weights."""
    from model.jina_v4 import JinaV4Config
    from model.jina_v4_encoder import image_preparer

    preparer = image_preparer(model.path, model.tokenizer, JinaV4Config.from_dir(model.path))
    return lambda data: len(preparer.prepare(data))


def _sample_units(units: pa.Table, image_tokens: Callable[[bytes], int] | None = None) -> dict[str, int]:
    """Documents, tokens, chunks and chunk characters of prepared units (rejected units count nothing)."""
    spans = pc.list_flatten(units[CHAR_SPANS]).to_numpy().reshape(-1, 2)
    images = units[IMAGE].drop_null().to_pylist() if IMAGE in units.column_names and image_tokens else []
    return {
        "documents": int(pc.sum(units["_docs"]).as_py() or 0),
        "tokens": int(pc.sum(pc.list_value_length(units[IDS])).as_py() or 0) + sum(map(image_tokens, images)),
        "chunks": len(spans),
        "chars": int((spans[:, 1] - spans[:, 0]).sum()),
    }


def plan_job(cfg: JobConfig, *, tokens_per_second: float | None = None) -> dict:
    check_value("--tokens-per-second", tokens_per_second, float | None, above=0)
    checked, problems = find_problems(cfg)
    if checked is None:
        return {"input": cfg.source.input, "output": {"db": cfg.sink.db, "table": cfg.sink.table,
                                                      "mode": cfg.sink.mode}, "problems": problems}
    job = resolve(cfg, cluster=_local_cluster(), described=checked.model)
    files = checked.files
    image_tokens = image_token_counter(checked.model) if cfg.source.image_column else None
    fs = job.storage.fsspec_filesystem(files[0])
    # The sample goes through the prepare stage's own code, so its tokens and chunks are the job's.
    tok = job.tokenizer.with_max_length(job.window)
    rows_per_file, sampled, skipped = [], Counter(), []
    for f in files:
        try:
            with opened(fs, f) as pf:
                problem = schema_problem(pf.schema_arrow, cfg.source.columns, column_roles(cfg.source))
                if problem:
                    raise BadFile(f, problem)
                rows_per_file.append(pf.metadata.num_rows)
                if sampled["rows"] < SAMPLE_DOCS and pf.metadata.num_rows:
                    batch = next(pf.iter_batches(batch_size=SAMPLE_DOCS - sampled["rows"], columns=cfg.source.columns))
                    units = prepare_units(pa.Table.from_batches([batch]), source=cfg.source, chunking=cfg.chunking,
                                          tokenizer=tok, task=job.task, prompt=job.prompt, fetch=fetcher(job.storage))
                    sampled.update(_sample_units(units, image_tokens), rows=batch.num_rows)
        except BadFile as bad:  # the job would fail on it, or skip it
            rows_per_file.append(0)
            if cfg.source.on_bad_file == "fail":
                problems.append(str(bad))
            else:
                skipped.append({"file": bad.url, "reason": bad.reason})
    docs = sum(rows_per_file)
    # Per sampled row, rejected rows included: a corpus sampled whole is estimated exactly.
    est_tokens = sampled["tokens"] * docs / sampled["rows"] if sampled["rows"] else 0.0
    est_chunks = sampled["chunks"] * docs / sampled["rows"] if sampled["rows"] else 0.0
    mean_tokens = sampled["tokens"] / sampled["documents"] if sampled["documents"] else 0.0
    mean_chunks = sampled["chunks"] / sampled["documents"] if sampled["documents"] else 1.0
    device = "gpu" if job.gpus_per_actor else "cpu"
    tps = tokens_per_second or DEFAULT_TOKENS_PER_S[device]
    budget = cfg.encode.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS["cuda" if device == "gpu" else "cpu"]
    value_bytes = 2 if cfg.encode.vector_dtype == "float16" else 4
    vec_bytes = sum(job.dims) * value_bytes
    # One 128-d vector per token of every chunk (a chunk's span, prefix tokens on the first): tokens x 128 x bytes.
    multi_bytes = int(est_tokens * MULTIVECTOR_DIM * value_bytes) if cfg.encode.multi_vector else 0
    text_bytes = sampled["chars"] / sampled["chunks"] if sampled["chunks"] else 0.0
    return {
        "input": cfg.source.input,
        "files": files,
        "rows_per_file": rows_per_file,
        "documents": docs,
        "sampled_documents": sampled["documents"],
        "mean_tokens_per_document": round(mean_tokens, 1),
        "mean_chunks_per_document": round(mean_chunks, 2),
        "estimated_tokens": int(est_tokens),
        "estimated_chunks": int(est_chunks),
        "model": job.info.identity,
        "task": job.task,
        "dims": list(job.dims),
        "window": job.window,
        "actors": job.actors,
        "min_actors": job.min_actors,
        "device": device,
        "precision": cfg.encode.precision,
        "estimated_batches": int(np.ceil(est_tokens / budget)) if est_tokens else 0,
        "max_batch_tokens": budget,
        "estimated_output_bytes": int(est_chunks * (vec_bytes + text_bytes + 140)) + multi_bytes,
        "estimated_vector_bytes": int(est_chunks * vec_bytes),
        "estimated_multivector_bytes": multi_bytes,
        "tokens_per_second_per_actor": tps,
        "tokens_per_second_source": "configured" if tokens_per_second else f"default for {device}",
        "estimated_seconds": round(est_tokens / (tps * job.actors), 1) if est_tokens else 0.0,
        "output": {"db": cfg.sink.db, "table": cfg.sink.table, "mode": cfg.sink.mode},
        "files_skipped": skipped,
        "problems": problems,
    }


def _pool(plan: dict) -> str:
    return str(plan["actors"]) if plan["min_actors"] == plan["actors"] else f"{plan['min_actors']}..{plan['actors']}"


def format_plan(plan: dict) -> str:
    lines = [f"dry run: {plan['input']} -> {plan['output']['db']} table {plan['output']['table']} ({plan['output']['mode']})"]
    lines += [f"  problem: {p}" for p in plan["problems"]]
    if "files" not in plan:  # pre-flight failed: nothing to estimate
        return "\n".join(lines)
    lines += [f"  {f}  {n} rows" for f, n in zip(plan["files"], plan["rows_per_file"], strict=True)]
    lines += [f"  skipped: {s['file']}: {s['reason']}" for s in plan["files_skipped"]]
    lines += [
        f"  documents {plan['documents']} (sampled {plan['sampled_documents']}): {plan['mean_tokens_per_document']} tokens"
        f" and {plan['mean_chunks_per_document']} chunks per document",
        f"  estimated tokens {plan['estimated_tokens']}  chunks {plan['estimated_chunks']}"
        f"  output ~{plan['estimated_output_bytes'] / 1e6:.1f} MB",
        *([f"  of which {MULTIVECTOR} ~{plan['estimated_multivector_bytes'] / 1e6:.1f} MB (128 x tokens x bytes per"
            f" chunk): {plan['estimated_multivector_bytes'] / max(plan['estimated_vector_bytes'], 1):.0f}x the"
            f" single vectors"] if plan["estimated_multivector_bytes"] else []),
        f"  model {plan['model']}  task {plan['task']}  dims {plan['dims']}  window {plan['window']}",
        f"  plan: {_pool(plan)} {plan['device']} actor(s) at precision {plan['precision']},"
        f" ~{plan['estimated_batches']} batches of"
        f" {plan['max_batch_tokens']} tokens",
        f"  estimated duration {plan['estimated_seconds']} s at {plan['tokens_per_second_per_actor']:.0f} tokens/s"
        f" per actor ({plan['tokens_per_second_source']})",
    ]
    return "\n".join(lines)
