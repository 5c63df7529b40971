"""Attention kernels for the two layouts. Models call these and never branch on the device.

- padded: torch SDPA with a key-padding mask (CPU path, and GPU without a varlen kernel); short
  bf16 sequences on CPU take two batched matmuls instead (`short_bf16_attention`)
- varlen: a FlashAttention varlen kernel on packed tokens (GPU, bf16/fp16): flash-attn's
  `flash_attn_varlen_func`, or where flash-attn is not installed torch's own
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.9, CUDA), which runs the same algorithm
- varlen_reference: a CPU stand-in for the varlen kernel (SDPA per sequence), so everything on the
  packed path except the kernel call itself runs and is tested without a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# q, k, v -> out; shapes (..., H, D) in the layout's leading dims.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
AttentionImpl = Literal["padded", "varlen", "varlen_reference"]

# Up to this padded length, bf16 attention on CPU runs as two batched matmuls with an fp32 softmax.
# SDPA's CPU flash kernel pays per (row, head) block; at L <= 64 that was 20% of MiniLM's forward on
# sentences (torch.profiler), and the matmul form made the whole encoder 7-10% faster (BENCHMARKS.md,
# machine D). Its cosine to fp32 equals SDPA's. Longer rows, fp32 and CUDA keep SDPA.
SHORT_BF16_MAX_LEN = 64


@dataclass(frozen=True)
class VarlenKernel:
    """A packed-layout attention kernel: (q, k, v, cu_seqlens, max_seqlen) -> out, all (T, H, D)."""

    source: str  # "flash-attn" or "torch": which library computes it, for reports
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _flash_attn_kernel() -> VarlenKernel | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def attend(q, k, v, cu_seqlens, max_seqlen):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, causal=False)

    return VarlenKernel("flash-attn", attend)


def _torch_varlen_kernel() -> VarlenKernel | None:
    # Building flash-attn against a given torch takes hours; torch >= 2.9 ships the kernel itself.
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None

    def attend(q, k, v, cu_seqlens, max_seqlen):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)  # non-causal, 1/sqrt(D)

    return VarlenKernel("torch", attend)


@functools.cache
def varlen_kernel() -> VarlenKernel | None:
    """flash-attn's varlen kernel, else torch's built-in one, else None (both run on CUDA only)."""
    return _flash_attn_kernel() or _torch_varlen_kernel()


def default_impl(device: torch.device, dtype: torch.dtype) -> AttentionImpl:
    """varlen where a varlen kernel runs (CUDA, 16-bit), padded SDPA everywhere else."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "padded"  # checked first: importing torch's varlen module pulls in torch._dynamo (~1 s)
    return "varlen" if varlen_kernel() is not None else "padded"


def kernel_name(impl: AttentionImpl) -> str:
    """What computes attention under an impl, for reports and benchmark rows."""
    if impl == "varlen":
        kernel = varlen_kernel()
        return f"{kernel.source} varlen" if kernel else "varlen (no kernel installed)"
    return {"padded": "sdpa, padded", "varlen_reference": "sdpa per sequence (reference)"}[impl]


def packed_kernel(impl: AttentionImpl) -> Callable[[torch.Tensor, int], AttentionFn]:
    """The packed-layout kernel factory for an impl ("varlen" or its CPU stand-in)."""
    if impl == "padded":
        raise ValueError("the padded impl has no packed kernel")
    return varlen if impl == "varlen" else varlen_reference


def padded(attention_mask: torch.Tensor) -> AttentionFn:
    """Bidirectional attention over (B, L, H, D) with padded keys masked out."""
    key_mask = attention_mask[:, None, None, :]  # (B, 1, 1, L), True = attend
    short_cpu = attention_mask.device.type == "cpu" and attention_mask.shape[1] <= SHORT_BF16_MAX_LEN
    # Length-sorted batches of short texts are often all one length: then nothing needs masking.
    short_mask = key_mask if short_cpu and not bool(attention_mask.all()) else None

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
        if short_cpu and q.dtype == torch.bfloat16:
            out = short_bf16_attention(q, k, v, short_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return out.transpose(1, 2)  # (B, L, H, D)

    return attend


def short_bf16_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over (B, H, L, D): bf16 matmuls, scores scaled and normalized in fp32."""
    scores = (q @ k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    if key_mask is not None:
        scores.masked_fill_(~key_mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


def varlen(cu_seqlens: torch.Tensor, max_seqlen: int) -> AttentionFn:
    """Varlen attention over packed (T, H, D): no padding is ever computed."""
    kernel = varlen_kernel()
    if kernel is None:
        raise RuntimeError("no varlen attention kernel: install embedlake[gpu] (flash-attn) or torch >= 2.9, "
                           "or use the padded path")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernel.attend(q, k, v, cu_seqlens, max_seqlen)

    return attend


def varlen_reference(cu_seqlens: torch.Tensor, max_seqlen: int) -> AttentionFn:
    """Same contract as `varlen`, computed per sequence with SDPA (CPU stand-in for tests)."""
    bounds = cu_seqlens.tolist()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, L_i, D)
            out[s:e] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
        return out

    return attend
