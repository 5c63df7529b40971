"""Our packed attention kernels as a transformers attention implementation, for the Qwen2.5-VL vision tower.

transformers' vision attention has two paths: with an implementation whose name contains "flash" it makes
one varlen call over all windows (or whole images) of a batch, given `cu_seqlens`; otherwise (SDPA, eager)
it loops over the windows in Python, one SDPA call each: about 1,300 calls for one 896 x 672 image (48
windows x 28 windowed blocks). Its "flash_attention_2" needs the flash-attn package. Registering our
kernels under a "flash" name gives the one-call path with whatever kernel `attention.py` runs (flash-attn,
torch's own varlen kernel, or the CPU stand-in), so images run padding-free like text without flash-attn.

The registry is transformers' process-wide `AttentionInterface`; the names are ours, so nothing of
transformers' own is replaced.
"""

from __future__ import annotations

import torch

from model import attention
from model.attention import AttentionImpl


def _attend(impl: AttentionImpl):
    kernel = attention.packed_kernel(impl)

    def forward(module, query, key, value, attention_mask, *, cu_seq_lens_q, max_length_q, is_causal=False, **kwargs):
        # transformers passes (1, H, T, D) and expects (1, T, H, D) back (its flash layout)
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (T, H, D)
        if max_length_q is None:  # not precomputed: one host sync, as transformers' own flash path does
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        out = kernel(cu_seq_lens_q.to(torch.int32), int(max_length_q), causal=bool(is_causal))(q, k, v)
        return out.unsqueeze(0), None

    return forward


def vision_attention_name(impl: AttentionImpl) -> str:
    """Register and return the transformers attention name that runs `impl`'s packed kernel."""
    from transformers import AttentionInterface

    if impl == "padded":
        return "sdpa"  # transformers' own, window by window
    name = f"embedlake_flash_{impl}"  # "flash" in the name selects transformers' one-call varlen path
    AttentionInterface.register(name, _attend(impl))  # idempotent: the same kernel under the same name
    return name
