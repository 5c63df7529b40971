"""The CUDA (packed, varlen) path on CPU: everything but the flash kernel, against the padded path.

`varlen_reference` stands in for flash_attn_varlen_func (SDPA per sequence); packing, per-sequence
positions, rotary on the packed layout, task runs over tokens and per-segment pooling are the
production code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_jina import sts_sentences

from model import load_encoder
from model.attention import varlen_reference
from model.jina_encoder import JinaV3Encoder
from model.loading import content_revision

PACKED_VS_PADDED_ATOL = 1e-5  # fp32, same math, different reduction order in attention


@pytest.fixture(scope="module")
def encoders(tiny_jina_dir):
    def make(impl):
        return JinaV3Encoder.from_dir(
            tiny_jina_dir, device=torch.device("cpu"), dtype=torch.float32, max_batch_tokens=4096,
            revision=content_revision(tiny_jina_dir), name="tiny", attention_impl=impl,
        )

    return make("padded"), make("varlen_reference")


def _texts():
    sents = sts_sentences("test")
    return sents[:20] + [" ".join(sents[:300])]  # mixed lengths, one long input


def test_defaults_pick_the_padded_path_on_cpu(tiny_jina_dir):
    enc = load_encoder(str(tiny_jina_dir), device="cpu")
    assert enc.attention_impl == "padded" and not enc.packed


@pytest.mark.parametrize("task", [None, "retrieval.passage", "text-matching"])
def test_packed_equals_padded(encoders, task):
    padded, packed = encoders
    assert packed.packed and not padded.packed
    np.testing.assert_allclose(packed.encode(_texts(), task=task), padded.encode(_texts(), task=task), atol=PACKED_VS_PADDED_ATOL)


def test_packed_mixed_tasks_equal_single_task_calls(encoders):
    _, packed = encoders
    texts = _texts()[:12]
    tasks = ["retrieval.query", "retrieval.passage", None, "separation"] * 3
    mixed = packed.encode(texts, task=tasks)
    for t in set(tasks):
        rows = [i for i, x in enumerate(tasks) if x == t]
        np.testing.assert_allclose(mixed[rows], packed.encode([texts[i] for i in rows], task=t), atol=PACKED_VS_PADDED_ATOL)


def test_packed_late_chunking_equals_padded(encoders):
    padded, packed = encoders
    text = " ".join(sts_sentences("test")[:120])
    spans = [[(0, 200), (200, 900), (900, len(text))]]
    a = packed.encode_spans([text], spans, task="retrieval.passage", window=512, overlap=64)[0]
    b = padded.encode_spans([text], spans, task="retrieval.passage", window=512, overlap=64)[0]
    np.testing.assert_allclose(a, b, atol=PACKED_VS_PADDED_ATOL)


def test_positions_restart_per_sequence_in_a_packed_batch(encoders):
    """A global position counter would change every sequence but the first."""
    _, packed = encoders
    texts = _texts()[:6]
    together = packed.encode(texts)
    alone = np.stack([packed.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=PACKED_VS_PADDED_ATOL)


def test_varlen_reference_matches_block_diagonal_attention():
    torch.manual_seed(0)
    lengths = [5, 1, 9]
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    got = varlen_reference(cu, 9)(q, k, v)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    mask = doc[:, None] == doc[None, :]  # block-diagonal: tokens attend within their sequence
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def _tokens_fed(enc, texts: list[str]) -> int:
    """Encode `texts` with fresh stats; return the token ids the model was fed, (T,) packed or (B, L) padded."""
    fed: list[int] = []
    hook = enc.model.embeddings.register_forward_pre_hook(lambda _module, args: fed.append(args[0].numel()))
    enc.stats.real_tokens = enc.stats.computed_tokens = 0
    try:
        enc.encode(texts)
    finally:
        hook.remove()
    return sum(fed)


def test_stats_count_the_tokens_the_model_computes(encoders):
    """The stats against the ids the model is actually fed: packed computes the real tokens and no
    more, padded computes rows x longest."""
    texts = _texts()
    for enc in encoders:
        fed = _tokens_fed(enc, texts)
        assert enc.stats.real_tokens == sum(len(ids) for ids in enc.tokenizer.encode(texts, [""] * len(texts)))
        assert enc.stats.computed_tokens == fed
    padded, packed = encoders
    assert packed.stats.computed_tokens == packed.stats.real_tokens < padded.stats.computed_tokens
