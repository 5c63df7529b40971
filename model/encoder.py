"""The encoder interface every model family implements, and the encode API around it.

A family supplies one method, `_forward`: token-id sequences -> packed contextual token states.
Everything else is shared: task and dim validation, length-sorted token-budget batching, pooling
(mean over sequences, or over late-chunking spans: `late_chunking.py`), Matryoshka truncation and
normalization. Batches run one at a time, or several at once on CPU (`streams.py`).
jina-embeddings-v4 (`jina_v4_encoder.py`) adds prompts ("query"/"passage", chosen apart from the task),
multi-vector output and images beside `encode`/`encode_spans`; the methods here that other families
cannot serve say so (`encode_multi`, `encode_images`), and `EncoderInfo` tells callers beforehand.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model import late_chunking
from model.batching import batch_cost, token_budget_batches
from model.packing import pool_spans
from model.streams import CpuStreams
from model.tokenization import CharSpan, TextTokenizer, token_spans

TaskArg = str | None | Sequence[str | None]
PromptArg = str | None | Sequence[str | None]  # per text, like tasks; None: the model's default prompt

# Padded backends close a batch before its real/computed token ratio drops below this.
PADDED_MIN_FILL = 0.97


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
    # Prompts chosen apart from the task (jina-v4: "query" | "passage"); empty where the task carries its
    # instruction (jina-v3: "retrieval.query"), and a prompt argument is then an error.
    prompts: tuple[str, ...] = ()
    default_prompt: str | None = None  # what pipelines use for documents
    query_prompt: str | None = None  # what pipelines use for search queries
    multi_vector_dim: int | None = None  # per-token vectors (`encode_multi`) of this width, None: not offered
    modalities: tuple[str, ...] = ("text",)  # "image": `encode_images` and images in `encode_multi`

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.revision}"

    def check_dims(self, dims: Sequence[int]) -> tuple[int, ...]:
        """`dims` without repeats, in order, once each is known to be an output dim of this model.

        The one dim rule, for the driver's `--dims` and every encoder call alike: a Matryoshka dim when
        the model lists them, else any prefix 1..dim; the full dim always.
        """
        allowed = set(self.matryoshka_dims or range(1, self.dim + 1)) | {self.dim}
        for d in dims:
            if d not in allowed:
                valid = ", ".join(map(str, sorted(allowed))) if self.matryoshka_dims else f"1..{self.dim}"
                raise ValueError(f"dim {d} is not available from {self.name}; valid dims: {valid}")
        return tuple(dict.fromkeys(dims))


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
        # Streams only pay on CPU; elsewhere batches run one at a time whatever was asked.
        self.streams = CpuStreams(cpu_streams if device.type == "cpu" else min(cpu_streams, 1))
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

    @property
    def cpu_streams(self) -> int:
        return self.streams.count

    def encode(
        self,
        texts: Sequence[str],
        *,
        task: TaskArg = None,
        dim: int | None = None,
        normalize: bool = True,
        prompt: PromptArg = None,
    ) -> np.ndarray:
        """One vector per text: (n, dim or full) float32. Inputs over `max_length` tokens are truncated.

        `prompt` only for models that list prompts (`info.prompts`); elsewhere it must stay None.
        """
        texts = _as_list(texts)
        task_ids, prefixes = self.resolve_tasks(task, len(texts), prompt)
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
        prompt: PromptArg = None,
    ) -> list[np.ndarray]:
        """Late chunking: one vector per character span, pooled from whole-document token states.

        Documents longer than `window` tokens (default: the model maximum) use long late chunking:
        windows overlapping by `overlap` tokens (default: min(512, window // 4)), later windows'
        first `overlap` outputs dropped, spans pooled over the stitched sequence (spec §6.5).
        With a causal model (jina-v4) a span's tokens saw only the text before them, never after.
        """
        texts = _as_list(texts)
        if len(spans) != len(texts):
            raise ValueError(f"got {len(spans)} span lists for {len(texts)} texts")
        task_ids, prefixes = self.resolve_tasks(task, len(texts), prompt)
        self.check_dim(dim)
        docs = self.tokenizer.encode_with_offsets(texts, prefixes)
        tspans = [token_spans(doc, s) for doc, s in zip(docs, spans, strict=True)]
        vectors = self.embed_id_spans([d.ids for d in docs], tspans, task_ids, window=window, overlap=overlap)
        return [self.finalize(v, dim, normalize) for v in vectors]

    def encode_multi(self, items: Sequence, *, task: TaskArg = None, prompt: PromptArg = None) -> list[np.ndarray]:
        """Per-token vectors, one (tokens, info.multi_vector_dim) array per item: models with `multi_vector_dim`."""
        raise ValueError(f"{self.info.name} ({self.info.family}) gives no multi-vector output")

    def encode_images(
        self, images: Sequence, *, task: TaskArg = None, dim: int | None = None, normalize: bool = True
    ) -> np.ndarray:
        """One vector per image: models whose `info.modalities` include "image"."""
        raise ValueError(f"{self.info.name} ({self.info.family}) does not embed images")

    # -- validation -----------------------------------------------------------------------------
    def resolve_tasks(
        self, task: TaskArg, n: int, prompt: PromptArg = None
    ) -> tuple[list[int | None], list[str]]:
        """Task and prompt arguments -> (per-text task index or None, per-text instruction prefix).

        Prompts: a model listing none (jina-v3: its tasks carry their instruction) rejects any; otherwise
        None stands for `info.default_prompt`, and the tokenizer holds the prefix of each (task, prompt).
        """
        names = _per_text(task, n, "task")
        prompts = _per_text(prompt, n, "prompt")
        ids: list[int | None] = []
        for name in names:
            if name is None:
                ids.append(None)
            elif name in self.tasks:
                ids.append(self.tasks.index(name))
            else:
                valid = ", ".join(self.tasks) if self.tasks else "none (this model has no tasks)"
                raise ValueError(f"unknown task {name!r} for {self.info.name}; valid tasks: {valid}")
        if not self.info.prompts:
            if any(p is not None for p in prompts):
                raise ValueError(f"{self.info.name} takes no prompt: its tasks carry their instruction "
                                 f"(tasks: {', '.join(self.tasks) or 'none'})")
            return ids, [self.tokenizer.prefix(name) for name in names]
        chosen = [self.info.default_prompt if p is None else p for p in prompts]
        for p in chosen:
            if p not in self.info.prompts:
                raise ValueError(f"unknown prompt {p!r} for {self.info.name}; valid prompts: {', '.join(self.info.prompts)}")
        return ids, [self.tokenizer.prefix(name, p) for name, p in zip(names, chosen, strict=True)]

    def check_dim(self, dim: int | None) -> None:
        """None (the full dim) or a dim `EncoderInfo.check_dims` allows."""
        if dim is not None:
            self.info.check_dims((dim,))

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
        """Late chunking on token ids: for each document, (S, d) mean vectors of its token spans.

        Window and overlap as in `encode_spans`; the stitching is `late_chunking.embed_spans`.
        """
        window, overlap = late_chunking.window_and_overlap(window, overlap, self.max_length)
        return late_chunking.embed_spans(
            self._run, [np.asarray(s) for s in seqs], spans, list(tasks),
            window=window, overlap=overlap, group_tokens=self.max_batch_tokens,
        )

    # -- batching ---------------------------------------------------------------------------------
    def _run(
        self, seqs: Sequence, tasks: list[int | None], forward: Callable[[list, list[int | None]], torch.Tensor] | None = None
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Yield (indices, packed states, offsets) per token-budget batch, in completion order; equal
        tasks contiguous within a batch. `forward` (default `_forward`) takes the batch's inputs: token-id
        arrays, or anything else with a token count as its `len` (jina-v4's prepared images)."""
        lengths = [len(s) for s in seqs]
        batches = token_budget_batches(lengths, self.max_batch_tokens, padded=not self.packed, min_fill=PADDED_MIN_FILL)
        for batch in batches:
            batch.sort(key=lambda i: -1 if tasks[i] is None else tasks[i])  # stable: length order kept
        fn = forward or self._forward
        forwarded = self.streams.map(lambda batch: self._forward_batch(fn, seqs, tasks, batch), batches)
        for batch, states, seconds in forwarded:
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
        self, forward: Callable, seqs: Sequence, tasks: list[int | None], batch: list[int]
    ) -> tuple[list[int], torch.Tensor, float]:
        """Forward one batch, timed; safe to run on a stream thread."""
        with torch.inference_mode():  # grad mode is per thread: stream threads need it set too
            t0 = time.perf_counter()
            states = forward([seqs[i] for i in batch], [tasks[i] for i in batch])
            return batch, states, time.perf_counter() - t0


def _per_text(arg: str | None | Sequence[str | None], n: int, what: str) -> list[str | None]:
    """One value for every text, or a list of them (checked to have one per text)."""
    values = [arg] * n if arg is None or isinstance(arg, str) else list(arg)
    if len(values) != n:
        raise ValueError(f"{what} list has {len(values)} entries for {n} texts")
    return values


def _as_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    return list(texts)
