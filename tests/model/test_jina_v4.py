"""jina-embeddings-v4 beyond parity: family detection and info, the strict loader, prompt rules, image input
errors and batching, the packed (varlen) path against the padded one, and late chunking under causal attention.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_jina_v4_parity import TEXTS, gradient_image, images
from tiny_jina import sts_sentences

from model import describe_model, detect_family, load_encoder
from model.jina_v4_encoder import JinaV4Encoder
from model.loading import content_revision

PACKED_VS_PADDED_ATOL = 1e-5  # fp32, same math, different reduction order in attention


@pytest.fixture(scope="module")
def encoders(tiny_jina_v4_dir):
    def make(impl, budget=4096):
        return JinaV4Encoder.from_dir(
            tiny_jina_v4_dir, device=torch.device("cpu"), dtype=torch.float32, max_batch_tokens=budget,
            revision=content_revision(tiny_jina_v4_dir), name="tiny-v4", attention_impl=impl,
        )

    return make("padded"), make("varlen_reference")


# -- family, info, loading ---------------------------------------------------------------------------


def test_family_and_info(tiny_jina_v4_dir):
    assert detect_family(tiny_jina_v4_dir) == "jina-v4"
    d = describe_model(str(tiny_jina_v4_dir))
    info = d.info
    assert (d.family, info.family, info.tasks) == ("jina-v4", "jina-v4", ("retrieval", "text-matching", "code"))
    assert (info.default_task, info.query_task, info.default_prompt, info.query_prompt) == (
        "retrieval", "retrieval", "passage", "query")
    assert info.prompts == ("query", "passage") and info.multi_vector_dim == 128
    assert info.modalities == ("text", "image") and info.matryoshka_dims == (4, 8, 16, 32, 64) and info.dim == 64
    assert info.max_length == 32768
    # the CPU stages' tokenizer gives the prefix of a (task, prompt) pair
    assert d.tokenizer.prefix("code", "passage") == "Passage: " and d.tokenizer.prefix("text-matching", "passage") == "Query: "
    with pytest.raises(ValueError, match="depends on the prompt"):  # a task-only caller must not embed unprompted
        d.tokenizer.prefix("retrieval")


def test_detected_without_architectures(tiny_jina_v4_dir, tmp_path):
    """config.json has no model_type (spec §7.2): the jina extras beside a Qwen2.5-VL text_config suffice."""
    cfg = json.loads((tiny_jina_v4_dir / "config.json").read_text())
    assert "model_type" not in cfg and "vocab_size" not in cfg
    del cfg["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert detect_family(tmp_path) == "jina-v4"


def test_checkpoint_is_sharded_with_a_straddling_layer(tiny_jina_v4_dir):
    weight_map = json.loads((tiny_jina_v4_dir / "model.safetensors.index.json").read_text())["weight_map"]
    layer1 = {f for k, f in weight_map.items() if k.startswith("model.layers.1.")}
    assert len(set(weight_map.values())) == 2 and len(layer1) == 2
    assert not any("lm_head" in k for k in weight_map)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loader_rejects_a_missing_tensor(tiny_jina_v4_dir, tmp_path):
    path = _copy(tiny_jina_v4_dir, tmp_path / "m")
    shard = path / "model-00002-of-00002.safetensors"
    sd = load_file(str(shard))
    del sd["model.norm.weight"]
    save_file(sd, str(shard))
    with pytest.raises(KeyError, match=r"model\.norm\.weight"):
        load_encoder(str(path), device="cpu", dtype=torch.float32)


def test_loader_rejects_an_unknown_adapter_task(tiny_jina_v4_dir, tmp_path):
    path = _copy(tiny_jina_v4_dir, tmp_path / "m")
    f = path / "adapters" / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd = {k.replace(".code.", ".poetry."): v for k, v in sd.items()}
    save_file(sd, str(f))
    with pytest.raises(KeyError, match="poetry"):
        load_encoder(str(path), device="cpu", dtype=torch.float32)


def test_loader_refuses_unsupported_peft_options(tiny_jina_v4_dir, tmp_path):
    path = _copy(tiny_jina_v4_dir, tmp_path / "m")
    cfg_file = path / "adapters" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["use_dora"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        load_encoder(str(path), device="cpu", dtype=torch.float32)


# -- tasks and prompts ---------------------------------------------------------------------------------


def test_defaults_are_retrieval_and_passage(encoders):
    padded, _ = encoders
    np.testing.assert_array_equal(padded.encode(TEXTS[:2]), padded.encode(TEXTS[:2], task="retrieval", prompt="passage"))


def test_bad_task_and_prompt_name_the_valid_ones(encoders):
    padded, _ = encoders
    with pytest.raises(ValueError, match="valid tasks: retrieval, text-matching, code"):
        padded.encode(["x"], task="retrieval.query")
    with pytest.raises(ValueError, match="valid prompts: query, passage"):
        padded.encode(["x"], prompt="document")
    with pytest.raises(ValueError, match="2 entries for 1 texts"):
        padded.encode(["x"], prompt=["query", "passage"])
    with pytest.raises(ValueError, match="dim 5 is not available"):
        padded.encode(["x"], dim=5)


def test_v3_rejects_a_prompt(tiny_jina_dir):
    enc = load_encoder(str(tiny_jina_dir), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="takes no prompt"):
        enc.encode(["x"], task="retrieval.query", prompt="query")
    with pytest.raises(ValueError, match="no multi-vector output"):
        enc.encode_multi(["x"])
    with pytest.raises(ValueError, match="does not embed images"):
        enc.encode_images([b"x"])


# -- images --------------------------------------------------------------------------------------------


def test_undecodable_images_raise_a_clear_error(encoders):
    padded, _ = encoders
    png = io.BytesIO()
    gradient_image(56, 56, 0).save(png, format="PNG")
    with pytest.raises(ValueError, match=r"image 1: cannot decode 12 bytes starting 6e6f7420"):
        padded.encode_images([png.getvalue(), b"not an image"])
    with pytest.raises(ValueError, match=r"image 0: cannot decode"):
        padded.encode_multi([png.getvalue()[:60]])  # truncated PNG
    with pytest.raises(TypeError, match="all texts or all images"):
        padded.encode_multi(["text", png.getvalue()])
    with pytest.raises(ValueError, match="images take no prompt"):
        padded.encode_multi([png.getvalue()], prompt="query")


def test_image_batches_follow_the_token_budget(tiny_jina_v4_dir, encoders):
    """Image batches are cut by tokens (vision tokens + prompt), not by image count: with a budget of 70 the
    65-token image runs alone and the other two share a batch, with the same vectors as one batch."""
    padded, _ = encoders
    small = JinaV4Encoder.from_dir(
        tiny_jina_v4_dir, device=torch.device("cpu"), dtype=torch.float32, max_batch_tokens=70,
        revision="r", name="tiny-v4", attention_impl="varlen_reference",
    )
    ims = images()  # 65, 23 and 33 tokens
    np.testing.assert_allclose(small.encode_images(ims), padded.encode_images(ims), atol=1e-5)
    assert small.stats.batches == 2 and small.stats.real_tokens == 65 + 23 + 33


def test_large_images_are_resized_within_the_pixel_bounds(encoders):
    padded, _ = encoders
    prepared = padded.images.prepare(gradient_image(1400, 1000, 0))  # 1.4 M pixels > 602,112
    t, h, w = prepared.grid_thw
    assert t == 1 and h * w * 14 * 14 <= 602112 and h % 2 == 0 and w % 2 == 0
    assert len(prepared) == 17 + h * w // 4


# -- packed (GPU layout) path on CPU ---------------------------------------------------------------


def test_packed_equals_padded_text(encoders):
    padded, packed = encoders
    assert packed.packed and not padded.packed
    tasks = ["retrieval", "code", "text-matching", "code"]
    np.testing.assert_allclose(packed.encode(TEXTS, task=tasks, prompt="query"),
                               padded.encode(TEXTS, task=tasks, prompt="query"), atol=PACKED_VS_PADDED_ATOL)
    for a, b in zip(packed.encode_multi(TEXTS, task=tasks), padded.encode_multi(TEXTS, task=tasks), strict=True):
        np.testing.assert_allclose(a, b, atol=PACKED_VS_PADDED_ATOL)
    assert packed.stats.computed_tokens == packed.stats.real_tokens


def test_packed_equals_padded_images(encoders):
    """The packed path also runs the vision tower's windows through our packed kernel in one call per block
    (`vision_attention.py`); the padded path leaves it to transformers' SDPA, window by window."""
    padded, packed = encoders
    assert packed.model.visual.config._attn_implementation == "embedlake_flash_varlen_reference"
    assert padded.model.visual.config._attn_implementation == "sdpa"
    tasks = ["code", "retrieval", "code"]
    np.testing.assert_allclose(packed.encode_images(images(), task=tasks), padded.encode_images(images(), task=tasks),
                               atol=PACKED_VS_PADDED_ATOL)
    for a, b in zip(packed.encode_multi(images()), padded.encode_multi(images()), strict=True):
        np.testing.assert_allclose(a, b, atol=PACKED_VS_PADDED_ATOL)


# -- late chunking -------------------------------------------------------------------------------------


def _doc() -> tuple[str, list[tuple[int, int]]]:
    sents = sts_sentences("test")[:12]
    text = " ".join(sents)
    cuts = np.cumsum([0] + [len(s) + 1 for s in sents[:-1]]).tolist() + [len(text)]
    return text, list(zip(cuts[:-1], cuts[1:], strict=True))


def test_late_chunking_one_span_equals_encode(encoders):
    padded, _ = encoders
    text, _ = _doc()
    whole = padded.encode_spans([text], [[(0, len(text))]], task="code", prompt="query")[0]
    np.testing.assert_allclose(whole, padded.encode([text], task="code", prompt="query"), atol=1e-5)


def test_late_chunking_is_causal(encoders):
    """A chunk's vector depends only on the text before it: cutting the document after chunk k leaves
    chunks 0..k unchanged, while later chunks do see earlier context (they differ from chunks embedded alone)."""
    padded, packed = encoders
    text, spans = _doc()
    full = packed.encode_spans([text], [spans], task="retrieval", prompt="passage")[0]
    np.testing.assert_allclose(full, padded.encode_spans([text], [spans], task="retrieval", prompt="passage")[0],
                               atol=PACKED_VS_PADDED_ATOL)
    k = 5
    head = text[: spans[k][1]]
    cut = padded.encode_spans([head], [spans[: k + 1]], task="retrieval", prompt="passage")[0]
    # span k itself may tokenize differently at the cut (its trailing space meets no next word): compare before it
    np.testing.assert_allclose(cut[:k], full[:k], atol=1e-5)
    alone = padded.encode([text[s:e] for s, e in spans[1:]], task="retrieval", prompt="passage")
    assert np.abs(alone - full[1:]).max() > 1e-2


def test_long_late_chunking_windows(encoders):
    """A document over the window is embedded in overlapping windows; spans stay finite and unit-norm, and a
    window covering the whole document gives the plain result."""
    padded, packed = encoders
    text, spans = _doc()
    n = len(packed.tokenizer.encode([text], ["Passage: "])[0])
    windowed = packed.encode_spans([text], [spans], window=n // 3, overlap=n // 12)[0]
    assert windowed.shape == (len(spans), 64) and np.isfinite(windowed).all()
    np.testing.assert_allclose(np.linalg.norm(windowed, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(packed.encode_spans([text], [spans], window=n)[0],
                               padded.encode_spans([text], [spans])[0], atol=PACKED_VS_PADDED_ATOL)


# -- model references ------------------------------------------------------------------------------------


def test_s3_and_hub_references_load_the_same_model(tiny_jina_v4_dir, encoders, s3_env, tmp_path, monkeypatch):
    """s3:// (copied once, adapters/ included) and an offline hub id give the local directory's vectors."""
    import huggingface_hub.constants as c
    import s3fs

    padded, _ = encoders
    expected = padded.encode(TEXTS[:2], task="code")
    monkeypatch.setenv("EMBEDLAKE_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint_url, key="testing", secret="testing")
    remote = f"{s3_env.bucket}/models/jina-v4"
    fs.put(str(tiny_jina_v4_dir) + "/", remote, recursive=True)
    opts = {"endpoint_url": s3_env.endpoint_url, "key": "testing", "secret": "testing"}
    enc = load_encoder(f"s3://{remote}", device="cpu", dtype=torch.float32, storage_options=opts)
    np.testing.assert_allclose(enc.encode(TEXTS[:2], task="code"), expected, atol=1e-6)

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--jinaai--jina-embeddings-v4"
    shutil.copytree(tiny_jina_v4_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    enc = load_encoder("jinaai/jina-embeddings-v4", device="cpu", dtype=torch.float32)
    assert enc.info.name == "jinaai/jina-embeddings-v4" and enc.info.revision == commit[:12]
    np.testing.assert_allclose(enc.encode(TEXTS[:2], task="code"), expected, atol=1e-6)


# -- both outputs from one forward pass (what the pipeline's --multi-vector runs) -----------------------------


def test_single_and_multi_from_one_forward_equal_the_separate_calls(encoders):
    _, packed = encoders
    seqs = packed.tokenizer.encode(TEXTS, ["Passage: "] * len(TEXTS))
    tasks = [0, 1, 2, 0]
    pooled, multi = packed.embed_ids_with_multi(seqs, tasks)
    torch.testing.assert_close(pooled, packed.embed_ids(seqs, tasks), atol=1e-6, rtol=0)
    for got, want in zip(multi, packed.embed_ids_multi(seqs, tasks), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    prepared = packed.images.prepare_all(images())
    pooled, multi = packed.embed_images_with_multi(prepared, [1, 0, 2])
    torch.testing.assert_close(pooled, packed.embed_images(prepared, [1, 0, 2]), atol=1e-6, rtol=0)
    for got, want, image in zip(multi, packed.embed_images_multi(prepared, [1, 0, 2]), prepared, strict=True):
        assert got.shape == (len(image), 128)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_late_chunking_with_multi_gives_each_span_its_tokens(encoders):
    """Span means as `embed_id_spans`; each span's token vectors are the whole document's, sliced (causal: the
    same states), also when long late chunking windows the document."""
    _, packed = encoders
    text, spans = _doc()
    doc = packed.tokenizer.encode_with_offsets([text], ["Passage: "])[0]
    from model.tokenization import token_spans

    tspans = token_spans(doc, spans)
    pooled, multi = packed.embed_id_spans_with_multi([doc.ids], [tspans], [2])
    torch.testing.assert_close(pooled[0], packed.embed_id_spans([doc.ids], [tspans], [2])[0], atol=1e-6, rtol=0)
    (whole,) = packed.embed_ids_multi([doc.ids], [2])
    assert [len(m) for m in multi[0]] == [e - s for s, e in tspans.tolist()]
    torch.testing.assert_close(torch.cat(multi[0]), whole, atol=1e-5, rtol=0)  # the spans tile the document

    n = len(doc.ids)
    pooled_w, multi_w = packed.embed_id_spans_with_multi([doc.ids], [tspans], [2], window=n // 3, overlap=n // 12)
    torch.testing.assert_close(pooled_w[0], packed.embed_id_spans([doc.ids], [tspans], [2], window=n // 3,
                                                                  overlap=n // 12)[0], atol=1e-6, rtol=0)
    assert [len(m) for m in multi_w[0]] == [e - s for s, e in tspans.tolist()]
    torch.testing.assert_close(torch.cat(multi_w[0])[: n // 3], whole[: n // 3], atol=1e-5, rtol=0)  # first window
