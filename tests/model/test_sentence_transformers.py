"""The packaged all-MiniLM-L6-v2 through `load_encoder` against sentence-transformers itself."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from shared_data import minilm_dir, sts_pairs, sts_sentences

COSINE_MIN = 0.99999  # fp32 parity with the reference implementation
PUBLISHED_STS_SPEARMAN = 0.8203247  # MTEB STSBenchmark test, all-MiniLM-L6-v2 (cosine)


def test_declared_settings(minilm):
    assert minilm.info.family == "sentence-transformers"
    assert minilm.dim == 384 and minilm.max_length == 256 and minilm.info.pooling == "mean"
    assert minilm.tasks == ()


def test_parity_with_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    texts = sts_sentences(400)
    texts += ["word " * 400, "  padded with spaces  ", "Ünïcödé and 日本語 text."]  # truncation, strip, unicode
    ours = minilm.encode(texts)
    ref = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, batch_size=32, normalize_embeddings=True)
    cos = (ours * ref).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 384)
    assert cos.min() >= COSINE_MIN, f"worst row {int(cos.argmin())}: cosine {cos.min()}"


def test_sts_benchmark_spearman_matches_published(minilm):
    left, right, gold = sts_pairs("test")
    a, b = minilm.encode(left), minilm.encode(right)
    rho = spearmanr((a * b).sum(axis=1), gold).statistic
    assert abs(rho - PUBLISHED_STS_SPEARMAN) <= 1e-3, rho


def test_dims_and_tasks_are_validated(minilm):
    v = minilm.encode(["a sentence"], dim=64)
    assert v.shape == (1, 64) and np.isclose(np.linalg.norm(v), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="1..384"):
        minilm.encode(["x"], dim=385)
    with pytest.raises(ValueError, match="valid tasks: none"):
        minilm.encode(["x"], task="retrieval.query")


def test_unnormalized_output_and_batch_invariance(minilm):
    texts = sts_sentences(50)
    raw = minilm.encode(texts, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    alone = np.stack([minilm.encode([t])[0] for t in texts[:5]])
    np.testing.assert_allclose(alone, minilm.encode(texts)[:5], atol=1e-5)
