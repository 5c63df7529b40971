"""Embed stage: a Ray actor that loads the encoder once, pinned to its GPU, and turns units into rows.

Input: prepared units (see `prepare.py`). Output: one row per chunk with a FixedSizeList column per
Matryoshka dim (truncated, then L2-normalized at that dim) and the internal stat columns the writer
sums. Rejected units pass through untouched so the writer can report them. The class is a plain
callable: `EmbedStage(spec)(table)` works without Ray, which is how it is unit-tested.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from model import load_encoder
from pipeline.diff import UNCHANGED
from pipeline.elastic import actor_call
from pipeline.prepare import CHAR_SPANS, DOC_CHUNKS, FIRST_CHUNK, IDS, REJECT, STATUS, TOKEN_SPANS
from pipeline.read import SOURCE_FILE, SOURCE_ROW

# Internal columns every output row of a unit carries on to the writer (not summed as stats).
PER_UNIT = (STATUS, DOC_CHUNKS, SOURCE_FILE, SOURCE_ROW)

log = logging.getLogger("embedlake")


@dataclass(frozen=True)
class EmbedSpec:
    model: str
    task: str | None
    dims: tuple[int, ...]  # output dims; the full dim when only that was asked for
    vector_dtype: str  # "float32" | "float16"
    precision: str  # compute precision, resolved per actor's device (model.loading.resolve_dtype)
    late: bool  # units carry token spans (late chunking)
    window: int
    overlap: int | None
    keep_columns: tuple[str, ...]
    max_batch_tokens: int | None = None
    cpu_threads: int | None = None
    storage_options: tuple[tuple[str, str], ...] = ()
    revision: str | None = None  # the driver's content hash: actors need not hash the weights again


def vector_column(dim: int) -> str:
    return f"vector_{dim}"


def _assigned_gpus() -> list[str]:
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # outside a Ray worker
        return []


def _node_id() -> str:
    try:
        import ray

        # Whole: ids that share a prefix exist (Ray's fake autoscaler numbers its nodes f...f00001, ...).
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:
        return "local"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None  # glibc only


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`) after each call.

    Every padded batch has its own shape, so a long-running CPU actor frees activations of ever new
    sizes, and glibc kept them in its arenas: over 20 calls of 4,096 sentences (bf16) the actor's
    private memory grew from 0.55 to 1.8 GB and was still growing. With the trim, and the per-shape
    kernel caches capped (`model.loading.bound_cpu_kernel_caches`), the level between calls stays
    flat at about 0.42 GB, at no measurable cost.
    """
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def warmup_batch(encoder, window: int, task: int | None) -> tuple[list[np.ndarray], list[int | None]]:
    """Full-window sequences filling one token budget: the largest forward the job will run."""
    n = min(window, encoder.max_length)
    rows = max(1, encoder.max_batch_tokens // n)
    return [np.full(n, 5, dtype=np.int64)] * rows, [task] * rows


class EmbedStage:
    def __init__(self, spec: EmbedSpec):
        self.spec = spec
        self.gpu_ids = _assigned_gpus()
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU; without CUDA the encoder runs on CPU.
        device = "cuda" if self.gpu_ids and torch.cuda.is_available() else "cpu"
        if self.gpu_ids and device == "cpu":  # a logical GPU without CUDA (a test cluster, a bad image)
            log.warning("encoder actor got GPU %s but torch sees no CUDA: encoding on CPU", ",".join(self.gpu_ids))
        if device == "cpu" and spec.cpu_threads:
            torch.set_num_threads(spec.cpu_threads)
        self.encoder = load_encoder(
            spec.model, device=device, dtype=spec.precision, max_batch_tokens=spec.max_batch_tokens, storage_options=dict(spec.storage_options),
            revision=spec.revision,
        )
        self.task_ids, _ = self.encoder.resolve_tasks(spec.task, 1)
        self.encoder.info.check_dims(spec.dims)
        self.model_identity = self.encoder.info.identity
        self.actor = f"node={_node_id()} pid={os.getpid()} gpus={','.join(self.gpu_ids) or 'none'} device={device}"
        self.actor += f" dtype={self.encoder.precision}"
        self._warm_up()

    def _warm_up(self) -> None:
        """One worst-case forward on GPU, so memory errors show at start rather than mid-job."""
        if self.encoder.device.type == "cuda":
            self.encoder.embed_ids(*warmup_batch(self.encoder, self.spec.window, self.task_ids[0]))

    def __call__(self, batch: pa.Table) -> pa.Table:
        started, t0 = time.time(), time.perf_counter()
        before = (self.encoder.stats.real_tokens, self.encoder.stats.computed_tokens)
        accepted = pc.is_null(batch[REJECT])
        if STATUS in batch.column_names:  # unchanged documents pass through to be counted, not embedded
            accepted = pc.and_(accepted, pc.fill_null(pc.not_equal(batch[STATUS], UNCHANGED), True))
        accepted = accepted.to_numpy(zero_copy_only=False)
        units = batch.filter(pa.array(accepted))
        vectors = self._embed(units)  # (rows, full dim) float32, one row per output chunk
        rows = self._rows(units, vectors)
        rejected = batch.filter(pa.array(~accepted))
        out = pa.concat_tables([rows, self._passthrough(rejected, rows.schema)]) if rejected.num_rows else rows

        stats = {
            "_tokens": self.encoder.stats.real_tokens - before[0],
            "_computed_tokens": self.encoder.stats.computed_tokens - before[1],
            "_embed_s": time.perf_counter() - t0,
        }
        for name in batch.column_names:  # carry upstream stats (sums) on the first output row
            numeric = pa.types.is_integer(batch[name].type) or pa.types.is_floating(batch[name].type)
            if name.startswith("_") and numeric and name not in (FIRST_CHUNK, *PER_UNIT):  # per-row, not stats
                stats[name] = pc.sum(batch[name]).as_py() or 0
        release_free_memory()
        n = out.num_rows
        for name, value in stats.items():
            col = np.zeros(n, dtype=np.float64 if isinstance(value, float) else np.int64)
            if n:
                col[0] = value
            out = out.append_column(name, pa.array(col))
        out = out.append_column("_actor", pa.array([self.actor] * n, pa.string()))
        # This call's span, once (first row): the report's count of busy actors over time (pipeline.elastic).
        call = [actor_call(self.actor, started, time.time())] + [None] * (n - 1) if n else []
        return out.append_column("_actor_call", pa.array(call, pa.string()))

    def _embed(self, units: pa.Table) -> torch.Tensor:
        if units.num_rows == 0:
            return torch.empty((0, self.encoder.dim))
        seqs = [np.asarray(x, dtype=np.int64) for x in units[IDS].to_pylist()]
        tasks = self.task_ids * len(seqs)
        if not self.spec.late:
            return self.encoder.embed_ids(seqs, tasks)
        spans = [np.asarray(s, dtype=np.int64).reshape(-1, 2) for s in units[TOKEN_SPANS].to_pylist()]
        per_doc = self.encoder.embed_id_spans(seqs, spans, tasks, window=self.spec.window, overlap=self.spec.overlap)
        return torch.cat(per_doc) if per_doc else torch.empty((0, self.encoder.dim))

    def _rows(self, units: pa.Table, vectors: torch.Tensor) -> pa.Table:
        """One row per chunk: spans expand documents (late chunking) or map 1:1 (other modes)."""
        char_spans = [np.asarray(s, dtype=np.int64).reshape(-1, 2) for s in units[CHAR_SPANS].to_pylist()]
        counts = np.array([len(s) for s in char_spans], dtype=np.int64)
        if counts.sum() != vectors.shape[0]:
            raise AssertionError("chunk count does not match vector count: this is a bug")
        take = pa.array(np.repeat(np.arange(units.num_rows), counts))
        texts = units["text"].to_pylist()
        first = units[FIRST_CHUNK].to_numpy()
        spans = np.concatenate(char_spans) if len(char_spans) else np.zeros((0, 2), np.int64)
        chunk = np.concatenate([first[i] + np.arange(c) for i, c in enumerate(counts)]) if len(counts) else spans[:, 0]
        chunk_text = [texts[u][s:e] for u, (s, e) in zip(np.repeat(np.arange(units.num_rows), counts), spans, strict=True)]
        cols: dict[str, pa.Array] = {
            "id": units["id"].take(take),
            "chunk": pa.array(chunk, pa.int32()),
            "start": pa.array(spans[:, 0], pa.int32()),
            "end": pa.array(spans[:, 1], pa.int32()),
            "text": pa.array(chunk_text, pa.string()),
        }
        np_dtype = np.float16 if self.spec.vector_dtype == "float16" else np.float32
        for d in self.spec.dims:
            v = self.encoder.finalize(vectors, d, normalize=True).astype(np_dtype)
            cols[vector_column(d)] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), d)
        cols["content_hash"] = units["content_hash"].take(take)
        cols["model"] = pa.array([self.model_identity] * len(chunk), pa.string())
        for c in self.spec.keep_columns:
            cols[c] = units[c].take(take)
        cols[REJECT] = pa.nulls(len(chunk), pa.string())
        for c in PER_UNIT:
            if c in units.column_names:
                cols[c] = units[c].take(take)
        return pa.table(cols)

    def _passthrough(self, rejected: pa.Table, schema: pa.Schema) -> pa.Table:
        """Rejected units as rows of the output schema: nulls everywhere but id, reason, `_doc_chunks` (0), kept columns."""
        cols = {}
        for f in schema:
            if f.name in ("id", "content_hash", REJECT, *PER_UNIT) or f.name in self.spec.keep_columns:
                cols[f.name] = rejected[f.name].cast(f.type)
            elif f.name == "chunk":
                cols[f.name] = pa.array(np.zeros(rejected.num_rows, np.int32))
            else:
                cols[f.name] = pa.nulls(rejected.num_rows, f.type)
        return pa.table(cols, schema=schema)
