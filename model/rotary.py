"""Rotary position embeddings (rotate-half, GPT-NeoX layout), shared by jina-v3 and jina-v4.

jina-v3 rotates every head dim by one position stream (spec §3.3); jina-v4's M-RoPE takes each frequency's
angle from one of three streams (temporal, height, width) by `section` (§7.1). Angles are computed in
fp32 and cast once, so bf16 runs rotate by the same angles as fp32 ones.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by angles given as cos, sin (..., D): dim j pairs with dim j + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Rotary(nn.Module):
    """One position stream: positions (...) -> cos, sin (..., 1, D), broadcasting over heads."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.to(torch.float32)[..., None] * self.inv_freq  # (..., D/2)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.angles(positions)
        angles = torch.cat([angles, angles], dim=-1)[..., None, :]  # (..., 1, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class MRotary(Rotary):
    """Multimodal RoPE: positions (3, ...); frequency i takes its angle from stream 0, 1 or 2 by `section`
    ([16, 24, 24] of the 64 frequencies in jina-v4)."""

    def __init__(self, head_dim: int, base: float, section: tuple[int, int, int]):
        super().__init__(head_dim, base)
        self.section = list(section)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        parts = super().angles(positions).split(self.section, dim=-1)  # each (3, ..., section_i)
        return torch.cat([part[stream] for stream, part in enumerate(parts)], dim=-1)  # (..., D/2)
