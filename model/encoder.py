"""The encoder interface every model family implements, and the batching around it.

A family supplies one method, `_forward`: token-id sequences -> packed contextual token states.
Everything else is shared: task and dim validation, length-sorted token-budget batching, pooling
(mean over sequences, or over late-chunking spans of stitched long-document windows), Matryoshka
truncation and normalization. jina-embeddings-v4 (multi-vector, images) will add methods beside
`encode`/`encode_spans` without changing them: nothing here assumes text-only single vectors
beyond those two methods.
"""

from __future__ import annotations

import functools
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from model.batching import batch_cost, token_budget_batches
from model.packing import pool_spans
from model.tokenization import CharSpan, TextTokenizer, long_windows, token_spans

TaskArg = str | None | Sequence[str | None]

# Padded backends close a batch before its real/computed token ratio drops below this.
PADDED_MIN_FILL = 0.97


@functools.cache
def per_thread_intra_op() -> bool:
    """True where `torch.set_num_threads` in a thread sets that thread's count only: ATen's OpenMP
    backend (an OpenMP ICV is per thread). CPU streams rely on it to leave the caller's threads alone."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


@dataclass(frozen=True)
class EncoderInfo:
    family: str  # "jina-v3" | "sentence-transformers"
    name: str
    revision: str  # content hash of config and weights (or the hub commit)
    dim: int
    matryoshka_dims: tuple[int, ...] | None  # None: any prefix 1..dim is allowed
    tasks: tuple[str, ...]
    default_task: str | None  # what pipelines use for documents when the user names none
    query_task: str | None  # what pipelines use for search queries
    max_length: int
    pooling: str = "mean"

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.revision}"


@dataclass
class EncodeStats:
    """Running totals, read by the pipeline for padding efficiency and tokens/s."""

    sequences: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0  # forward time summed over batches (concurrent CPU streams overlap)

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


class Encoder(ABC):
    def __init__(
        self,
        *,
        info: EncoderInfo,
        tokenizer: TextTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int,
        cpu_streams: int = 1,
    ):
        self.info = info
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        if cpu_streams < 1:
            raise ValueError(f"cpu_streams must be >= 1, got {cpu_streams}")
        if cpu_streams > 1 and device.type == "cpu" and not per_thread_intra_op():
            raise ValueError("cpu_streams > 1 needs torch's OpenMP parallel backend (per-thread thread counts)")
        self.cpu_streams = cpu_streams if device.type == "cpu" else 1
        self._stream_pool: ThreadPoolExecutor | None = None
        self.stats = EncodeStats()

    # -- what a family implements --------------------------------------------------------------
    @property
    @abstractmethod
    def packed(self) -> bool:
        """True when `_forward` computes no padding (the token budget then counts real tokens)."""

    @abstractmethod
    def _forward(self, seqs: Sequence[np.ndarray], tasks: Sequence[int | None]) -> torch.Tensor:
        """Contextual token states (T, d) float32 of `seqs` concatenated in order.

        Sequences come grouped so that equal tasks are contiguous; positions restart per sequence.
        """

    def _pool(self, states: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Sequence vectors from packed states; mean over every token the mask covers (spec §3.5)."""
        return pool_spans(states, offsets[:-1], offsets[1:])

    # -- public API ------------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return self.info.tasks

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def dims(self) -> tuple[int, ...]:
        return self.info.matryoshka_dims or (self.info.dim,)

    @property
    def precision(self) -> str:
        """The compute dtype by name ("float32", "bfloat16"), as `--precision` spells it."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def max_length(self) -> int:
        return self.info.max_length

    def encode(
        self, texts: Sequence[str], *, task: TaskArg = None, dim: int | None = None, normalize: bool = True
    ) -> np.ndarray:
        """One vector per text: (n, dim or full) float32. Inputs over `max_length` tokens are truncated."""
        texts = _as_list(texts)
        task_ids, prefixes = self.resolve_tasks(task, len(texts))
        self.check_dim(dim)
        seqs = self.tokenizer.encode(texts, prefixes)
        return self.finalize(self.embed_ids(seqs, task_ids), dim, normalize)

    def encode_spans(
        self,
        texts: Sequence[str],
        spans: Sequence[Sequence[CharSpan]],
        *,
        task: TaskArg = None,
        dim: int | None = None,
        normalize: bool = True,
        window: int | None = None,
        overlap: int | None = None,
    ) -> list[np.ndarray]:
        """Late chunking: one vector per character span, pooled from whole-document token states.

        Documents longer than `window` tokens (default: the model maximum) use long late chunking:
        windows overlapping by `overlap` tokens (default: min(512, window // 4)), later windows'
        first `overlap` outputs dropped, spans pooled over the stitched sequence (spec §6.5).
        """
        texts = _as_list(texts)
        if len(spans) != len(texts):
            raise ValueError(f"got {len(spans)} span lists for {len(texts)} texts")
        task_ids, prefixes = self.resolve_tasks(task, len(texts))
        self.check_dim(dim)
        docs = self.tokenizer.encode_with_offsets(texts, prefixes)
        tspans = [token_spans(doc, s) for doc, s in zip(docs, spans, strict=True)]
        vectors = self.embed_id_spans([d.ids for d in docs], tspans, task_ids, window=window, overlap=overlap)
        return [self.finalize(v, dim, normalize) for v in vectors]

    # -- validation -----------------------------------------------------------------------------
    def resolve_tasks(self, task: TaskArg, n: int) -> tuple[list[int | None], list[str]]:
        """Task argument -> (per-text task index or None, per-text instruction prefix)."""
        names = [task] * n if task is None or isinstance(task, str) else list(task)
        if len(names) != n:
            raise ValueError(f"task list has {len(names)} entries for {n} texts")
        ids: list[int | None] = []
        for name in names:
            if name is None:
                ids.append(None)
            elif name in self.tasks:
                ids.append(self.tasks.index(name))
            else:
                valid = ", ".join(self.tasks) if self.tasks else "none (this model has no tasks)"
                raise ValueError(f"unknown task {name!r} for {self.info.name}; valid tasks: {valid}")
        return ids, [self.tokenizer.prefix(name) for name in names]

    def check_dim(self, dim: int | None) -> None:
        if dim is None:
            return
        allowed = self.info.matryoshka_dims
        if allowed is not None and dim not in allowed:
            raise ValueError(f"dim {dim} is not a Matryoshka dimension of {self.info.name}; valid dims: {list(allowed)}")
        if allowed is None and not 1 <= dim <= self.dim:
            raise ValueError(f"dim {dim} is out of range for {self.info.name}; valid dims: 1..{self.dim}")

    @staticmethod
    def finalize(vectors: torch.Tensor | np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
        """Truncate to `dim`, then L2-normalize (normalization after truncation, spec §3.5)."""
        v = torch.as_tensor(vectors, dtype=torch.float32)
        if dim is not None:
            v = v[:, :dim]
        if normalize:
            v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return v.cpu().numpy()

    # -- token-level API (what pipeline stages call after tokenizing elsewhere) ------------------
    @torch.inference_mode()
    def embed_ids(self, seqs: Sequence[np.ndarray], tasks: Sequence[int | None]) -> torch.Tensor:
        """Full-dimension, unnormalized vectors (n, d) for token-id sequences, in input order."""
        out = torch.empty((len(seqs), self.dim), dtype=torch.float32)
        for batch, states, offsets in self._run([np.asarray(s) for s in seqs], list(tasks)):
            out[batch] = self._pool(states, offsets).cpu()
        return out

    @torch.inference_mode()
    def embed_id_spans(
        self,
        seqs: Sequence[np.ndarray],
        spans: Sequence[np.ndarray],
        tasks: Sequence[int | None],
        *,
        window: int | None = None,
        overlap: int | None = None,
    ) -> list[torch.Tensor]:
        """Late chunking on token ids: for each document, (S, d) mean vectors of its token spans."""
        window = window or self.max_length
        overlap = min(512, window // 4) if overlap is None else overlap
        if window > self.max_length:
            raise ValueError(f"window {window} exceeds the model maximum {self.max_length}")
        # One segment per window; a document's windows always run in the same group, so its
        # stitched states are complete when its spans are pooled.
        results: list[torch.Tensor | None] = [None] * len(seqs)
        for group in self._doc_groups([len(s) for s in seqs]):
            segs: list[tuple[int, np.ndarray, int]] = [  # (doc, window ids, keep_from), in doc order
                (doc, np.asarray(seqs[doc][w.start : w.stop]), w.keep_from)
                for doc in group
                for w in long_windows(len(seqs[doc]), window, overlap)
            ]
            kept: list[torch.Tensor | None] = [None] * len(segs)
            for batch, states, offsets in self._run([s[1] for s in segs], [tasks[s[0]] for s in segs]):
                for row, seg in enumerate(batch):
                    kept[seg] = states[offsets[row] + segs[seg][2] : offsets[row + 1]]
            for doc in group:
                stitched = torch.cat([t for s, t in zip(segs, kept, strict=True) if s[0] == doc])
                sp = torch.as_tensor(spans[doc], dtype=torch.int64, device=stitched.device).reshape(-1, 2)
                if len(sp) and (int(sp.min()) < 0 or int(sp[:, 1].max()) > stitched.shape[0]):
                    raise ValueError(f"document {doc}: span outside its {stitched.shape[0]} tokens")
                results[doc] = pool_spans(stitched, sp[:, 0], sp[:, 1]).cpu()
        return results  # type: ignore[return-value]

    # -- batching ---------------------------------------------------------------------------------
    def _doc_groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """Documents grouped (longest first) so that each group's tokens fit one budget, or one doc."""
        return token_budget_batches(lengths, max(self.max_batch_tokens, 1), padded=False)

    def _run(self, seqs: list[np.ndarray], tasks: list[int | None]):
        """Yield (indices, packed states, offsets) per token-budget batch, in completion order; equal
        tasks contiguous within a batch."""
        lengths = [len(s) for s in seqs]
        batches = token_budget_batches(lengths, self.max_batch_tokens, padded=not self.packed, min_fill=PADDED_MIN_FILL)
        for batch in batches:
            batch.sort(key=lambda i: -1 if tasks[i] is None else tasks[i])  # stable: length order kept
        for batch, states, seconds in self._forward_batches(seqs, tasks, batches):
            lens = [lengths[i] for i in batch]
            offsets = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), device=states.device)
            if states.shape[0] != offsets[-1]:
                raise AssertionError("forward returned a wrong number of token states: this is a bug")
            yield batch, states, offsets
            self.stats.seconds += seconds
            self.stats.sequences += len(batch)
            self.stats.real_tokens += sum(lens)
            self.stats.computed_tokens += batch_cost(lens, padded=not self.packed)
            self.stats.batches += 1

    def _forward_batch(
        self, seqs: list[np.ndarray], tasks: list[int | None], batch: list[int]
    ) -> tuple[list[int], torch.Tensor, float]:
        with torch.inference_mode():  # grad mode is per thread: stream threads need it set too
            t0 = time.perf_counter()
            states = self._forward([seqs[i] for i in batch], [tasks[i] for i in batch])
            return batch, states, time.perf_counter() - t0

    def _forward_batches(
        self, seqs: list[np.ndarray], tasks: list[int | None], batches: list[list[int]]
    ) -> Iterator[tuple[list[int], torch.Tensor, float]]:
        """Forward every batch. On CPU with `cpu_streams` > 1, that many batches run at once, each
        single-threaded, sharing the weights.

        Why: a forward split over 2 OpenMP threads waits at every op's barrier for the slower thread,
        so any other process on the node (a Ray worker, the driver) stalls both cores. On 2 cores, a
        process busy 15% of one core cost the 2-thread forward 17%; two streams matched it on a quiet
        machine and were 7% faster beside that load, and 20k-document pipeline jobs ran 15% faster
        (BENCHMARKS.md, machine D). A lone batch keeps the caller's threads.
        """
        if self.cpu_streams < 2 or len(batches) < 2:
            for batch in batches:
                yield self._forward_batch(seqs, tasks, batch)
            return
        if self._stream_pool is None:  # threads are per encoder and set to one intra-op thread each
            self._stream_pool = ThreadPoolExecutor(
                self.cpu_streams, thread_name_prefix="encoder-stream", initializer=torch.set_num_threads, initargs=(1,)
            )
        queued = iter(batches)
        running: set[Future] = {
            self._stream_pool.submit(self._forward_batch, seqs, tasks, batch)
            for batch in itertools.islice(queued, self.cpu_streams)
        }
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                nxt = next(queued, None)
                if nxt is not None:
                    running.add(self._stream_pool.submit(self._forward_batch, seqs, tasks, nxt))
                yield future.result()


def _as_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    return list(texts)
