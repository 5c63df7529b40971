"""`embedlake bench`'s GPU section, run on CPU with a tiny jina-v3: its rows and MFU arithmetic.

Speed is never asserted; what is checked is that each row measures what its name says.
"""

from __future__ import annotations

import math

import pytest
from shared_data import minilm_dir
from tiny_jina import make_tiny_jina

from jobs.bench import bench_gpu
from model.jina_v3 import JinaV3Config, flops_per_token

PEAK_TFLOPS = 1e-4  # 100 MFLOP/s: a tiny model on CPU then reads thousands of percent, far above rounding


@pytest.fixture(scope="module")
def tiny_jina(tmp_path_factory):
    return make_tiny_jina(tmp_path_factory.mktemp("bench") / "jina-v3-tiny", seed=0)


def test_gpu_section_rows_whole_late_and_naive(tiny_jina, monkeypatch):
    monkeypatch.setenv("EMBEDLAKE_PEAK_TFLOPS", str(PEAK_TFLOPS))
    rows = bench_gpu(str(tiny_jina), repeats=2, device="cpu", lengths=(64, 256), chunk=64, tokens_per_call=2048)
    assert [(r["length"], r["way"]) for r in rows] == [(64, "whole"), (256, "whole"), (256, "late"), (256, "naive")]
    assert [r["vectors_per_input"] for r in rows] == [1, 1, 4, 4]
    cfg = JinaV3Config.from_dir(tiny_jina)
    for r in rows:
        assert len(r["tok_s"]["runs"]) == 2 and r["tok_s"]["median"] > 0
        assert r["attention"] == "sdpa, padded" and r["device"] == "cpu"
        # MFU counts FLOPs at the attention length the row computes: 64 for naive chunks, else the input
        attn_len = 64 if r["way"] == "naive" else r["length"]
        for rate, pct in zip(r["tok_s"]["runs"], r["mfu_pct"]["runs"], strict=True):
            expected = 100 * rate * flops_per_token(cfg, attn_len) / (PEAK_TFLOPS * 1e12)
            assert pct > 100 and math.isclose(pct, expected, rel_tol=1e-3)


def test_gpu_section_needs_a_jina_model(tiny_jina):
    assert bench_gpu(None, 1, device="cpu") == [{"skipped": "pass --gpu-model (a jina-embeddings-v3 directory)"}]
    with pytest.raises(ValueError, match="measures jina-embeddings-v3"):
        bench_gpu(str(minilm_dir()), 1, device="cpu", lengths=(64,))
