"""`embedlake bench`: what each row measures, checked on tiny inputs.

Speed is never asserted; what is checked is that each row measures what its name says: the GPU
section's MFU against a FLOP count written out here, and every comparison with sentence-transformers
at one precision on both sides.
"""

from __future__ import annotations

import math

import pytest
import torch
from shared_data import minilm_dir
from tiny_jina import make_tiny_jina

from jobs import bench
from jobs.bench import bench_gpu, bench_gpu_v4
from model.jina_v3 import JinaV3Config
from model.loading import BF16_CPU_FLAGS

PEAK_TFLOPS = 1e-6  # 1 MFLOP/s: even a slow CPU reads hundreds of percent, far above the 0.01 rounding

# Forward FLOPs per token of the tiny jina-v3 (make_tiny_jina's defaults: 2 layers, hidden d = 32,
# FFN f = 64, 4 heads of 8), counting a multiply-add as 2, at attention length L. Per layer:
#   Q, K, V projections   3 x 2 x 32 x 32      =  6,144
#   attention output      2 x 32 x 32          =  2,048
#   scores Q K^T          4 heads x 2 x L x 8  =     64 L
#   weights x V           4 heads x 2 x L x 8  =     64 L
#   FFN up and down       2 x (2 x 32 x 64)    =  8,192
# = 16,384 + 128 L; times 2 layers = 32,768 + 256 L. LoRA adapters, layer norms, softmax and
# embeddings are not counted (the performance spec's model FLOPs leave them out).
TINY_FLOPS_PER_TOKEN = {64: 32_768 + 256 * 64, 256: 32_768 + 256 * 256}  # 49,152 and 98,304


@pytest.fixture(scope="module")
def tiny_jina(tmp_path_factory):
    return make_tiny_jina(tmp_path_factory.mktemp("bench") / "jina-v3-tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_jina_v4_dir(tmp_path_factory):
    from tiny_jina_v4 import build

    return build(tmp_path_factory.mktemp("bench") / "jina-v4-tiny", seed=0)


def test_gpu_section_rows_whole_late_and_naive(tiny_jina, monkeypatch):
    cfg = JinaV3Config.from_dir(tiny_jina)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (2, 32, 64, 4)
    monkeypatch.setenv("EMBEDLAKE_PEAK_TFLOPS", str(PEAK_TFLOPS))
    rows = bench_gpu(str(tiny_jina), repeats=2, device="cpu", lengths=(64, 256), chunk=64, tokens_per_call=2048)
    assert [(r["length"], r["way"]) for r in rows] == [(64, "whole"), (256, "whole"), (256, "late"), (256, "naive")]
    assert [r["vectors_per_input"] for r in rows] == [1, 1, 4, 4]
    for r in rows:
        assert len(r["tok_s"]["runs"]) == 2 and r["tok_s"]["median"] > 0
        assert r["attention"] == "sdpa, padded" and r["device"] == "cpu"
        # MFU counts FLOPs at the attention length the row computes: 64 for naive chunks, else the input
        flops = TINY_FLOPS_PER_TOKEN[64 if r["way"] == "naive" else r["length"]]
        for rate, pct in zip(r["tok_s"]["runs"], r["mfu_pct"]["runs"], strict=True):
            assert math.isclose(pct, 100 * rate * flops / (PEAK_TFLOPS * 1e12), rel_tol=1e-3, abs_tol=0.006)


def test_gpu_section_needs_a_jina_model(tiny_jina):
    assert bench_gpu(None, 1, device="cpu") == [{"skipped": "pass --gpu-model (a jina-embeddings-v3 directory)"}]
    with pytest.raises(ValueError, match="measures jina-embeddings-v3"):
        bench_gpu(str(minilm_dir()), 1, device="cpu", lengths=(64,))


# Forward FLOPs of the tiny jina-v4 (tiny_jina_v4.py: 3 layers, d = 64, FFN f = 128, 4 query heads and 2
# key/value heads of 16), multiply-add = 2, causal attention at length L. Per layer and token:
#   q and o projections   2 x (2 x 64 x 64)     = 16,384
#   k and v projections   2 x (2 x 64 x 32)     =  8,192   (GQA: 2 heads x 16)
#   SwiGLU gate, up, down 3 x (2 x 64 x 128)    = 49,152
#   scores + weights x V  2 x (2 x L x 64) / 2  =    128 L (causal: half the pairs)
# = 73,728 + 128 L; times 3 layers = 221,184 + 384 L.
# Vision tower for a 112 x 112 image: 8 x 8 = 64 patches (d = 32, f = 64, 2 blocks), 16 merged tokens; the
# 112-pixel window covers the whole image, so both blocks attend over all 64 patches:
#   per patch and block: qkv 6 x 32^2 + proj 2 x 32^2 + SwiGLU 6 x 32 x 64 = 20,480 -> x 64 x 2 = 2,621,440
#   attention 4 x 32 x 64^2 per block                                      -> x 2     = 1,048,576
#   patch embedding 2 x (3 x 2 x 14 x 14) x 32 per patch                   -> x 64    = 4,816,896
#   merger 2 x 128^2 + 2 x 128 x 64 per merged token                       -> x 16    =   786,432
# = 9,273,344; plus the text decoder over the image's 17 + 16 = 33 tokens: 33 x (221,184 + 384 x 33).
TINY_V4_TEXT_FLOPS = {64: 221_184 + 384 * 64, 256: 221_184 + 384 * 256}
TINY_V4_IMAGE_FLOPS = 9_273_344 + 33 * (221_184 + 384 * 33)


def test_gpu_section_v4_rows_text_and_images(tiny_jina_v4_dir, monkeypatch):
    monkeypatch.setenv("EMBEDLAKE_PEAK_TFLOPS", str(PEAK_TFLOPS))
    rows = bench_gpu_v4(str(tiny_jina_v4_dir), repeats=2, device="cpu", lengths=(64, 256), image_size=(112, 112),
                        tokens_per_call=1024, images_per_call=4)
    assert [(r["input"], r["length"]) for r in rows] == [("text", 64), ("text", 256), ("image 112x112", 33)]
    for r in rows:
        assert r["model"] == "jina-v4" and r["attention"] == "sdpa, padded, causal" and r["device"] == "cpu"
        per_unit = TINY_V4_IMAGE_FLOPS if r["input"].startswith("image") else TINY_V4_TEXT_FLOPS[r["length"]]
        units = r["images_s"]["runs"] if "images_s" in r else r["tok_s"]["runs"]
        for rate, pct in zip(units, r["mfu_pct"]["runs"], strict=True):
            assert math.isclose(pct, 100 * rate * per_unit / (PEAK_TFLOPS * 1e12), rel_tol=1e-3, abs_tol=0.006)
    assert bench_gpu_v4(None, 1, device="cpu") == [{"skipped": "pass --gpu-v4-model (a jina-embeddings-v4 directory)"}]
    with pytest.raises(ValueError, match="measure jina-embeddings-v4"):
        bench_gpu_v4(str(minilm_dir()), 1, device="cpu")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ("fpu sse4_2 avx avx2 fma", "AVX2"),
        ("avx2 avx512f avx512bw avx512_vnni", "AVX2+AVX-512"),
        ("avx2 avx512f avx512_bf16", "AVX2+AVX-512+AVX512-BF16"),
        ("avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8", "AVX2+AVX-512+AVX512-BF16+AMX-BF16"),
        ("neon asimd", "none"),
    ],
)
def test_rows_name_the_cpu_instruction_sets(monkeypatch, flags, named):
    monkeypatch.setattr(bench, "_cpuinfo", lambda: f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    assert bench.cpu_instruction_sets() == named
    assert bench.machine_description().startswith("Test CPU, ") and bench.machine_description().endswith(named)


def test_every_native_bf16_flag_is_named():
    """The flags that make `auto` pick bf16 (model.loading) must show in the rows, or a bf16 row
    would not say why it ran."""
    assert set(BF16_CPU_FLAGS) <= {flag for flag, _ in bench.CPU_INSTRUCTION_SETS}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_sentence_transformers_reference_computes_at_the_asked_precision(precision):
    st = bench.load_st(str(minilm_dir()), precision, "torch")
    assert {p.dtype for p in st.parameters()} == {getattr(torch, precision)}


def test_encoder_section_compares_at_one_precision_and_says_what_it_skipped(monkeypatch):
    loaded, load_st = [], bench.load_st

    def spy(model, precision, backend):
        st = load_st(model, precision, backend)
        loaded.append((precision, backend, next(st.parameters()).dtype))
        return st

    monkeypatch.setattr(bench, "load_st", spy)
    monkeypatch.setattr(bench, "length_mixes", lambda n: {"short": ["A man plays a guitar.", "Two dogs run."][:n]})
    rows = bench.bench_encoder(str(minilm_dir()), 2, 2)

    isa, native, onnx_reason = bench.cpu_instruction_sets(), bench.cpu_precisions(), bench.onnx_missing()
    measured = [r for r in rows if "skipped" not in r]
    skipped = {(r["precision"], r["st_backend"]): r["skipped"] for r in rows if "skipped" in r}
    expected_pairs = {(p, b) for p, backends in bench.ST_BACKENDS.items() for b in backends}
    assert {(r["precision"], r["st_backend"]) for r in measured} | set(skipped) == expected_pairs
    for r in measured:
        assert r["mix"] == "short" and r["isa"] == isa and r["texts"] == 2
        assert len(r["embedlake_tok_s"]["runs"]) == len(r["st_tok_s"]["runs"]) == len(r["vs_st"]["runs"]) == 2
        for ratio, ours, theirs in zip(*(r[k]["runs"] for k in ("vs_st", "embedlake_tok_s", "st_tok_s")), strict=True):
            assert math.isclose(ratio, ours / theirs, rel_tol=1e-3, abs_tol=0.006)  # rates are rounded to 0.01
    # sentence-transformers ran at the precision its rows name, loaded once per configuration
    assert sorted((p, b) for p, b, _ in loaded) == sorted((r["precision"], r["st_backend"]) for r in measured)
    assert all(dtype == getattr(torch, p) for p, b, dtype in loaded if b == "torch")
    # bf16 is measured exactly where the CPU multiplies it natively; otherwise the row says why not
    assert ("bfloat16", "torch") in skipped or "bfloat16" in native
    assert ("bfloat16", "torch") not in skipped or "no native bf16" in skipped[("bfloat16", "torch")]
    assert (("float32", "onnx") in skipped) == (onnx_reason is not None)
    if onnx_reason is not None:
        assert skipped[("float32", "onnx")] == onnx_reason and "optimum-onnx" in onnx_reason


def test_markdown_shows_skipped_rows_with_their_reason():
    rows = [{"mix": "short", "precision": "float32", "vs_st": bench.summarize([1.5, 1.25])},
            {"precision": "float32", "st_backend": "onnx", "skipped": "why not"}]
    md = bench.to_markdown({"revision": "r", "date": "d", "machine": "m", "sections": {"encoder": rows}})
    assert "| mix | precision | vs_st | st_backend | skipped |" in md
    assert "| short | float32 | 1.38 (1.25..1.5) |  |  |" in md
    assert "|  | float32 |  | onnx | why not |" in md
