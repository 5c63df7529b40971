"""Long late chunking (spec §6.5): windows forwarded, overlaps dropped, states stitched, spans pooled.

A document longer than the window is cut into windows overlapping by `overlap` tokens
(`tokenization.long_windows`); every window after the first drops its first `overlap` outputs, so the
kept states tile the document and stitch back into one (N, d) sequence whose token spans are
mean-pooled. A document within the window is one window: plain late chunking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.batching import token_budget_batches
from model.packing import pool_spans
from model.tokenization import long_windows

# The encoder's batched forward: (sequences, task per sequence) -> (indices into the sequences, packed
# states (T, d), offsets (B + 1,)) per batch, batches in any order.
BatchedForward = Callable[
    [list[np.ndarray], list[int | None]], Iterable[tuple[list[int], torch.Tensor, torch.Tensor]]
]


@dataclass(frozen=True)
class Segment:
    """One window of one document, and how many of its leading outputs the stitching drops."""

    doc: int
    ids: np.ndarray
    keep_from: int


def window_and_overlap(window: int | None, overlap: int | None, max_length: int) -> tuple[int, int]:
    """The window (default: the model maximum) and overlap (default: min(512, window // 4)) to use."""
    window = window or max_length
    if window > max_length:
        raise ValueError(f"window {window} exceeds the model maximum {max_length}")
    return window, min(512, window // 4) if overlap is None else overlap


def segments(seqs: Sequence[np.ndarray], docs: Sequence[int], window: int, overlap: int) -> list[Segment]:
    """The windows of `docs`, in document order."""
    return [
        Segment(doc, np.asarray(seqs[doc][w.start : w.stop]), w.keep_from)
        for doc in docs
        for w in long_windows(len(seqs[doc]), window, overlap)
    ]


def stitch(forward: BatchedForward, segs: Sequence[Segment], tasks: Sequence[int | None]) -> dict[int, torch.Tensor]:
    """Forward every segment; per document, its kept states (N, d) in token order."""
    kept: list[torch.Tensor] = [torch.empty(0)] * len(segs)
    for batch, states, offsets in forward([s.ids for s in segs], [tasks[s.doc] for s in segs]):
        for row, i in enumerate(batch):
            kept[i] = states[offsets[row] + segs[i].keep_from : offsets[row + 1]]
    parts: dict[int, list[torch.Tensor]] = {}
    for seg, states in zip(segs, kept, strict=True):
        parts.setdefault(seg.doc, []).append(states)
    return {doc: torch.cat(p) for doc, p in parts.items()}


def pool_doc_spans(states: torch.Tensor, spans: np.ndarray, doc: int) -> torch.Tensor:
    """(S, d) mean vectors of a document's token spans (S, 2) over its stitched states."""
    sp = torch.as_tensor(spans, dtype=torch.int64, device=states.device).reshape(-1, 2)
    if len(sp) and (int(sp.min()) < 0 or int(sp[:, 1].max()) > states.shape[0]):
        raise ValueError(f"document {doc}: span outside its {states.shape[0]} tokens")
    return pool_spans(states, sp[:, 0], sp[:, 1]).cpu()


def stitched_documents(
    forward: BatchedForward,
    seqs: Sequence[np.ndarray],
    tasks: Sequence[int | None],
    *,
    window: int,
    overlap: int,
    group_tokens: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(document index, its stitched (N, d) states) for every document, in completion order.

    Documents go in groups of about `group_tokens` tokens (longest first, or one document alone), so
    only one group's states are held for stitching; a document's windows all run in its group.
    """
    for group in token_budget_batches([len(s) for s in seqs], max(group_tokens, 1), padded=False):
        yield from stitch(forward, segments(seqs, group, window, overlap), tasks).items()


def embed_spans(
    forward: BatchedForward,
    seqs: Sequence[np.ndarray],
    spans: Sequence[np.ndarray],
    tasks: Sequence[int | None],
    *,
    window: int,
    overlap: int,
    group_tokens: int,
) -> list[torch.Tensor]:
    """For each document, (S, d) mean vectors of its token spans, in input order (`stitched_documents`)."""
    results: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for doc, states in stitched_documents(forward, seqs, tasks, window=window, overlap=overlap,
                                          group_tokens=group_tokens):
        results[doc] = pool_doc_spans(states, spans[doc], doc)
    return results
