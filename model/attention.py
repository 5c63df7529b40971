"""Attention kernels for the two layouts. Models call these and never branch on the device.

- padded: torch SDPA with a key-padding mask (CPU path, and GPU without a varlen kernel); short
  bf16 sequences on CPU take two batched matmuls instead (`short_bf16_attention`)
- varlen: a FlashAttention varlen kernel on packed tokens (GPU, bf16/fp16): flash-attn's
  `flash_attn_varlen_func`, or where flash-attn is not installed torch's own
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.9, CUDA), which runs the same algorithm
- varlen_reference: a CPU stand-in for the varlen kernel (SDPA per sequence), so everything on the
  packed path except the kernel call itself runs and is tested without a GPU.

Every kernel takes `causal` (decoders such as jina-v4's Qwen2.5 trunk: a token attends to itself and
earlier tokens of its own sequence) and grouped-query attention: k and v may have fewer heads than q,
each shared by `H_q / H_kv` consecutive query heads.
"""

from __future__ import annotations

import functools
import inspect
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

    def attend(q, k, v, cu_seqlens, max_seqlen, causal=False):  # GQA is native (fewer k/v heads)
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, causal=causal)

    return VarlenKernel("flash-attn", attend)


def _torch_varlen_kernel() -> VarlenKernel | None:
    # Building flash-attn against a given torch takes hours; torch >= 2.9 ships the kernel itself.
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None

    # The signature moved between releases: 2.9 takes `is_causal`; later ones a `window_size` ((-1, 0) is
    # causal) and `enable_gqa`. Without `enable_gqa` k and v are expanded to q's heads.
    params = inspect.signature(varlen_attn).parameters
    windowed, gqa = "window_size" in params, "enable_gqa" in params

    def attend(q, k, v, cu_seqlens, max_seqlen, causal=False):  # scale 1/sqrt(D)
        kwargs: dict = {}
        if causal:
            kwargs = {"window_size": (-1, 0)} if windowed else {"is_causal": True}
        if k.shape[-2] != q.shape[-2]:
            if gqa:
                kwargs["enable_gqa"] = True
            else:
                k, v = expand_kv(k, q.shape[-2]), expand_kv(v, q.shape[-2])
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)

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


def packed_kernel(impl: AttentionImpl) -> Callable[..., AttentionFn]:
    """The packed-layout kernel factory for an impl ("varlen" or its CPU stand-in)."""
    if impl == "padded":
        raise ValueError("the padded impl has no packed kernel")
    return varlen if impl == "varlen" else varlen_reference


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., H_kv, D) -> (..., heads, D): each k/v head repeated for its group of query heads (GQA)."""
    return x if x.shape[-2] == heads else x.repeat_interleave(heads // x.shape[-2], dim=-2)


def padded(attention_mask: torch.Tensor, *, causal: bool = False) -> AttentionFn:
    """Attention over (B, L, H, D) with padded keys masked out.

    Causal attention needs no key mask: rows are right-padded, so a real token's earlier keys are all
    real, and padded positions' outputs are dropped by the caller.
    """
    key_mask = None if causal else attention_mask[:, None, None, :]  # (B, 1, 1, L), True = attend
    short_cpu = attention_mask.device.type == "cpu" and attention_mask.shape[1] <= SHORT_BF16_MAX_LEN
    # Length-sorted batches of short texts are often all one length: then nothing needs masking.
    short_mask = key_mask if short_cpu and not bool(attention_mask.all()) else None

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = expand_kv(k, q.shape[-2]), expand_kv(v, q.shape[-2])
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
        if short_cpu and q.dtype == torch.bfloat16 and not causal:
            out = short_bf16_attention(q, k, v, short_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=causal)
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


def varlen(cu_seqlens: torch.Tensor, max_seqlen: int, *, causal: bool = False) -> AttentionFn:
    """Varlen attention over packed (T, H, D): no padding is ever computed."""
    kernel = varlen_kernel()
    if kernel is None:
        raise RuntimeError("no varlen attention kernel: install embedlake[gpu] (flash-attn) or torch >= 2.9, "
                           "or use the padded path")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernel.attend(q, k, v, cu_seqlens, max_seqlen, causal)

    return attend


def varlen_reference(cu_seqlens: torch.Tensor, max_seqlen: int, *, causal: bool = False) -> AttentionFn:
    """Same contract as `varlen`, computed per sequence with SDPA (CPU stand-in for tests)."""
    bounds = cu_seqlens.tolist()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = expand_kv(k, q.shape[-2]), expand_kv(v, q.shape[-2])
        out = torch.empty_like(q)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, L_i, D)
            out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)[0].transpose(0, 1)
        return out

    return attend
