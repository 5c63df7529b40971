"""Sentence-transformers directories of each supported architecture against sentence-transformers itself.

BERT, RoBERTa and XLM-R run on the native trunk (`model/bert.py`), MPNet through transformers; every
one must give sentence-transformers' vectors. The trunks are random and saved by transformers, so a
wrong position offset, a swapped LayerNorm or a mis-fused q/k/v shows up as a large cosine gap.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_jina import sts_sentences
from tiny_st import make_tiny_st

from model import load_encoder
from model.bert import _our_name, native_config
from model.loading import content_revision
from model.st_encoder import SentenceTransformerEncoder

COSINE_MIN = 0.99999  # fp32 parity, as for all-MiniLM-L6-v2
CASES = [("bert", "cls"), ("roberta", "max"), ("xlm-roberta", "mean"), ("mpnet", "mean")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{p}" for a, p in CASES])
def st_dir(request, tmp_path_factory):
    arch, pooling = request.param
    return arch, make_tiny_st(tmp_path_factory.mktemp(arch) / arch, arch, pooling=pooling)


def _texts() -> list[str]:
    sents = sts_sentences("test")
    return sents[:60] + [" ".join(sents[:80]), "  stripped  ", "x"]  # one over max_seq_length


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_matches_sentence_transformers(st_dir):
    from sentence_transformers import SentenceTransformer

    arch, path = st_dir
    enc = load_encoder(str(path), device="cpu", dtype="float32")
    assert enc.native == (arch != "mpnet")
    assert enc.max_length == 96
    texts = _texts()
    ref = SentenceTransformer(str(path), device="cpu").encode(texts, batch_size=16, show_progress_bar=False)
    got = enc.encode(texts)
    cos = _cosines(got, ref)
    assert cos.min() >= COSINE_MIN, (arch, int(cos.argmin()), float(cos.min()))
    assert np.abs(got - ref).max() < 1e-4


def test_packed_path_matches_padded(st_dir):
    """The GPU layout (packed tokens, per-sequence positions) with the CPU stand-in for flash-attn."""
    arch, path = st_dir
    if arch == "mpnet":
        with pytest.raises(ValueError, match="padded only"):
            _encoder(path, "varlen_reference")
        return
    padded, packed = _encoder(path, "padded"), _encoder(path, "varlen_reference")
    assert packed.packed and not padded.packed
    texts = _texts()
    np.testing.assert_allclose(packed.encode(texts), padded.encode(texts), atol=1e-5)
    assert packed.stats.computed_tokens == packed.stats.real_tokens  # no padding computed


def _encoder(path, impl) -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(path, device=torch.device("cpu"), dtype=torch.float32, max_batch_tokens=2048,
                                      revision=content_revision(path), name="tiny", attention_impl=impl)


def test_max_length_leaves_room_for_offset_positions(tmp_path):
    """RoBERTa-style tables start at padding_idx + 1: 130 positions hold 128 tokens, not 130."""
    path = make_tiny_st(tmp_path / "r", "xlm-roberta", max_seq_length=1000)
    enc = load_encoder(str(path), device="cpu", dtype="float32")
    assert enc.max_length == 128
    assert enc.encode(["word " * 500]).shape == (1, 32)  # the longest input fits the position table


def test_native_claims_only_what_it_reproduces(tmp_path):
    import json

    path = make_tiny_st(tmp_path / "b", "bert")
    cfg = json.loads((path / "config.json").read_text())
    assert native_config(path) is not None
    for change in ({"position_embedding_type": "relative_key"}, {"hidden_act": "silu"}, {"model_type": "distilbert"}):
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        assert native_config(path) is None, change
    with pytest.raises(KeyError, match="unexpected checkpoint key"):
        _our_name("encoder.layer.0.attention.self.distance_embedding.weight")
    assert _our_name("bert.encoder.layer.3.output.LayerNorm.gamma") == "layers.3.norm2.weight"
    assert _our_name("pooler.dense.weight") is None and _our_name("cls.predictions.bias") is None
