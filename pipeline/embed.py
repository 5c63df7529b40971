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
from pipeline.prepare import (
    CHAR_SPANS,
    DOC_CHUNKS,
    FIRST_CHUNK,
    IDS,
    IMAGE,
    MODALITY,
    REJECT,
    STATUS,
    TOKEN_SPANS,
)
from pipeline.read import SOURCE_FILE, SOURCE_ROW
from pipeline.table_meta import MULTIVECTOR, MULTIVECTOR_DIM

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
    prompt: str | None = None  # jina-v4: applied by the prepare stage's prefix; here only checked
    multi_vector: bool = False  # also the per-token vectors (column MULTIVECTOR)
    images: bool = False  # units of modality "image" come (with their encoded bytes in IMAGE)


def vector_column(dim: int) -> str:
    return f"vector_{dim}"


def multivector_array(multi: list[torch.Tensor], dtype: type) -> pa.ListArray:
    """Per-row (tokens, 128) arrays as LanceDB's multivector layout, built from flat buffers (no Python lists)."""
    lengths = np.array([len(m) for m in multi], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = torch.cat(multi).numpy().astype(dtype).reshape(-1) if len(multi) else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat), MULTIVECTOR_DIM))


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
        self.task_ids, _ = self.encoder.resolve_tasks(spec.task, 1, spec.prompt)
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
        rows = self._embedded(units)
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

    def _embedded(self, units: pa.Table) -> pa.Table:
        """Rows of accepted units: text chunks, then (with an --image-column) image rows."""
        if not self.spec.images:
            return self._text_rows(units)
        is_image = pc.fill_null(pc.equal(units[MODALITY], "image"), False).to_numpy(zero_copy_only=False)
        return pa.concat_tables([self._text_rows(units.filter(pa.array(~is_image))),
                                 self._image_rows(units.filter(pa.array(is_image)))])

    def _embed_text(self, units: pa.Table) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(chunks, full dim) vectors, and with --multi-vector each chunk's (tokens, 128) vectors: one forward."""
        multi = self.spec.multi_vector
        if units.num_rows == 0:
            return torch.empty((0, self.encoder.dim)), [] if multi else None
        seqs = [np.asarray(x, dtype=np.int64) for x in units[IDS].to_pylist()]
        tasks = self.task_ids * len(seqs)
        if not self.spec.late:
            return self.encoder.embed_ids_with_multi(seqs, tasks) if multi else (self.encoder.embed_ids(seqs, tasks), None)
        spans = [np.asarray(s, dtype=np.int64).reshape(-1, 2) for s in units[TOKEN_SPANS].to_pylist()]
        window = {"window": self.spec.window, "overlap": self.spec.overlap}
        if multi:
            per_doc, per_doc_multi = self.encoder.embed_id_spans_with_multi(seqs, spans, tasks, **window)
            return torch.cat(per_doc), [m for doc in per_doc_multi for m in doc]
        per_doc = self.encoder.embed_id_spans(seqs, spans, tasks, **window)
        return torch.cat(per_doc), None

    def _text_rows(self, units: pa.Table) -> pa.Table:
        """One row per chunk: spans expand documents (late chunking) or map 1:1 (other modes)."""
        vectors, multi = self._embed_text(units)
        char_spans = [np.asarray(s, dtype=np.int64).reshape(-1, 2) for s in units[CHAR_SPANS].to_pylist()]
        counts = np.array([len(s) for s in char_spans], dtype=np.int64)
        if counts.sum() != vectors.shape[0]:
            raise AssertionError("chunk count does not match vector count: this is a bug")
        unit_of_chunk = np.repeat(np.arange(units.num_rows), counts)
        texts = units["text"].to_pylist()
        first = units[FIRST_CHUNK].to_numpy()
        spans = np.concatenate(char_spans) if len(char_spans) else np.zeros((0, 2), np.int64)
        chunk = np.concatenate([first[i] + np.arange(c) for i, c in enumerate(counts)]) if len(counts) else spans[:, 0]
        chunk_text = [texts[u][s:e] for u, (s, e) in zip(unit_of_chunk, spans, strict=True)]
        return self._table(units, unit_of_chunk, chunk, spans, chunk_text, vectors, multi, "text")

    def _image_rows(self, units: pa.Table) -> pa.Table:
        """One row per image unit; its bytes decoded and preprocessed here, on the actor's CPU (see pipeline.images)."""
        prepared = [self.encoder.images.prepare(data, i) for i, data in enumerate(units[IMAGE].to_pylist())]
        tasks = self.task_ids * len(prepared)
        multi = None
        if not prepared:
            vectors, multi = torch.empty((0, self.encoder.dim)), [] if self.spec.multi_vector else None
        elif self.spec.multi_vector:
            vectors, multi = self.encoder.embed_images_with_multi(prepared, tasks)
        else:
            vectors = self.encoder.embed_images(prepared, tasks)
        n = units.num_rows
        return self._table(units, np.arange(n), units[FIRST_CHUNK].to_numpy(), np.zeros((n, 2), np.int64), [""] * n,
                           vectors, multi, "image")

    def _table(self, units: pa.Table, unit_of_row: np.ndarray, chunk: np.ndarray, spans: np.ndarray, texts: list[str],
               vectors: torch.Tensor, multi: list[torch.Tensor] | None, modality: str) -> pa.Table:
        take = pa.array(unit_of_row, pa.int64())
        n = len(unit_of_row)
        cols: dict[str, pa.Array] = {
            "id": units["id"].take(take),
            "chunk": pa.array(chunk, pa.int32()),
            "start": pa.array(spans[:, 0], pa.int32()),
            "end": pa.array(spans[:, 1], pa.int32()),
            "text": pa.array(texts, pa.string()),
        }
        np_dtype = np.float16 if self.spec.vector_dtype == "float16" else np.float32
        for d in self.spec.dims:
            v = self.encoder.finalize(vectors, d, normalize=True).astype(np_dtype)
            cols[vector_column(d)] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), d)
        if multi is not None:
            cols[MULTIVECTOR] = multivector_array(multi, np_dtype)
        if self.spec.images:
            cols[MODALITY] = pa.array([modality] * n, pa.string())
        cols["content_hash"] = units["content_hash"].take(take)
        cols["model"] = pa.array([self.model_identity] * n, pa.string())
        for c in self.spec.keep_columns:
            cols[c] = units[c].take(take)
        cols[REJECT] = pa.nulls(n, pa.string())
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
