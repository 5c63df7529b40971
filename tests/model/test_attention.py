"""The padded attention kernel: SDPA, and the matmul form it uses for short bf16 rows on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import SHORT_BF16_MAX_LEN, padded, short_bf16_attention


def _inputs(batch: int, length: int, dtype: torch.dtype, *, pad: bool):
    """(B, L, H, D) q, k, v and a key mask where row i has its last i % 4 positions padded."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(batch, length, 4, 16, generator=gen).to(dtype) for _ in range(3))
    real = torch.full((batch,), length)
    if pad:
        real -= torch.arange(batch) % 4
    mask = torch.arange(length)[None, :] < real[:, None]
    return q, k, v, mask


def _fp32_reference(q, k, v, mask):
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2)


@pytest.mark.parametrize("pad", [True, False])
def test_short_bf16_rows_match_fp32_attention_as_closely_as_sdpa(pad):
    q, k, v, mask = _inputs(6, 12, torch.bfloat16, pad=pad)
    ref = _fp32_reference(q, k, v, mask)
    got = padded(mask)(q, k, v).float()
    sdpa = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask[:, None, None, :]
    ).transpose(1, 2).float()
    err, sdpa_err = (got - ref).abs().max().item(), (sdpa - ref).abs().max().item()
    # bf16 keeps 8 bits: outputs of magnitude ~1 carry ~4e-3 rounding; a wrong mask or scale is O(1).
    assert err < 2e-2 and err < 3 * sdpa_err + 1e-3, (err, sdpa_err)


def test_padded_keys_get_no_weight_on_the_short_path():
    q, k, v, mask = _inputs(4, 8, torch.bfloat16, pad=True)
    out = padded(mask)(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[~mask], v2[~mask] = 100.0, 100.0  # garbage in padded positions must not leak into any output
    torch.testing.assert_close(padded(mask)(q, k2, v2), out, atol=0, rtol=0)


def test_padded_dispatches_short_bf16_rows_to_matmuls_and_everything_else_to_sdpa():
    short = _inputs(3, SHORT_BF16_MAX_LEN, torch.bfloat16, pad=True)
    q, k, v, mask = short
    matmul = short_bf16_attention(*(x.transpose(1, 2) for x in (q, k, v)), mask[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(padded(mask)(q, k, v), matmul, atol=0, rtol=0)

    for q, k, v, mask in (_inputs(3, SHORT_BF16_MAX_LEN + 1, torch.bfloat16, pad=True), _inputs(3, 12, torch.float32, pad=True)):
        sdpa = F.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask[:, None, None, :]
        ).transpose(1, 2)
        torch.testing.assert_close(padded(mask)(q, k, v), sdpa, atol=0, rtol=0)
