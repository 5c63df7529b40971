"""The one place where sequences change layout: a list of token-id arrays <-> padded or packed tensors.

Packed (varlen) layout, as flash-attn and TEI use it: all tokens of a batch concatenated to (T,),
`cu_seqlens` (B+1,) int32 prefix sums, positions restarting at 0 for every sequence. Everything is
built on the host from known lengths, so the GPU never syncs to discover them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64, restarting at 0 per sequence
    cu_seqlens: torch.Tensor  # (B+1,) int32
    max_seqlen: int
    lengths: tuple[int, ...]

    @property
    def offsets(self) -> np.ndarray:
        """Host copy of cu_seqlens: where each sequence starts in the packed token axis."""
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)


@dataclass(frozen=True)
class PaddedBatch:
    input_ids: torch.Tensor  # (B, L) int64, right-padded
    attention_mask: torch.Tensor  # (B, L) bool, True on real tokens
    position_ids: torch.Tensor  # (B, L) int64, 0..L-1 (right padding keeps real positions exact)
    lengths: tuple[int, ...]


def pack(seqs: Sequence[np.ndarray], device: torch.device | str = "cpu") -> PackedBatch:
    lengths = tuple(int(len(s)) for s in seqs)
    ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if seqs else np.zeros(0, np.int64)
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]) if seqs else ids
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return PackedBatch(
        input_ids=torch.from_numpy(ids).to(device),
        position_ids=torch.from_numpy(positions).to(device),
        cu_seqlens=torch.from_numpy(cu).to(device),
        max_seqlen=max(lengths, default=0),
        lengths=lengths,
    )


def pad(seqs: Sequence[np.ndarray], pad_id: int, device: torch.device | str = "cpu") -> PaddedBatch:
    lengths = tuple(int(len(s)) for s in seqs)
    width = max(lengths, default=0)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=bool)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = True
    positions = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()
    return PaddedBatch(
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=torch.from_numpy(mask).to(device),
        position_ids=torch.from_numpy(positions).to(device),
        lengths=lengths,
    )


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d) padded states -> (T, d) packed states, sequences in row order."""
    return hidden[attention_mask]


def task_runs(task_ids: Sequence[int | None], lengths: Sequence[int] | None = None) -> tuple[tuple[int | None, int, int], ...]:
    """Contiguous runs of equal task along the leading axis: ((task, start, stop), ...).

    With `lengths`, runs are measured in packed tokens instead of rows. Callers order sequences so
    that each task is contiguous; a run per task then lets every layer use plain slices.
    """
    runs: list[tuple[int | None, int, int]] = []
    pos = 0
    for i, t in enumerate(task_ids):
        n = lengths[i] if lengths is not None else 1
        if runs and runs[-1][0] == t:
            runs[-1] = (t, runs[-1][1], pos + n)
        else:
            runs.append((t, pos, pos + n))
        pos += n
    return tuple(runs)


def pool_spans(states: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Mean of states[s:e] for each span, over a packed (T, d) tensor; spans may overlap.

    A float64 prefix sum keeps the means exact to fp32 precision whatever the token count.
    """
    zero = states.new_zeros((1, states.shape[1]), dtype=torch.float64)
    cs = torch.cat([zero, torch.cumsum(states.to(torch.float64), dim=0)])  # (T+1, d)
    counts = (ends - starts).clamp(min=1).to(torch.float64).unsqueeze(1)
    return ((cs[ends] - cs[starts]) / counts).to(torch.float32)
