"""Self-checks of the test helpers: the tiny checkpoint (published layout) and the reference encoder.

These do not touch the project's ``model`` package; they make sure the yardstick the parity tests
use is itself right: key names/shapes per spec §2.3, an XLM-R-like tokenizer, and a reference that
agrees with a direct from-the-spec forward pass (RoPE half rotation with base 20000, post-LN blocks,
erf GELU, LoRA orientation, mean pooling, Matryoshka truncation before L2 normalization).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from reference import (
    MAX_LENGTH,
    load_tokenizer,
    raw_state_dict,
    read_config,
    reference_encode,
    reference_encode_ids,
    token_ids,
    with_instruction,
)
from tiny_jina import TASK_INSTRUCTIONS, TASKS, expected_key_count, sts_sentences

SELF_ATOL = 1e-5  # reference vs itself (batching / attention kernel) and vs the spec forward (fp64)
TASK_MIN_DIFF = 1e-2  # a LoRA adapter must visibly move the embeddings

TEXTS = [
    "A plane is taking off.",
    "A man is playing a large flute.",
    "Three men are playing chess.",
    "A woman is slicing an onion into rings on a cutting board while a cat watches.",
]


# --------------------------------------------------------------------------------------------------
# checkpoint layout
# --------------------------------------------------------------------------------------------------


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    v, d, f, n = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    a, r = len(cfg["lora_adaptations"]), cfg["lora_rank"]
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.parametrizations.weight.original"] = (out_f, in_f)
        shapes[f"{name}.parametrizations.weight.0.lora_A"] = (a, r, in_f)
        shapes[f"{name}.parametrizations.weight.0.lora_B"] = (a, out_f, r)
        shapes[f"{name}.bias"] = (out_f,)

    def emb(name: str, num: int) -> None:
        shapes[f"{name}.parametrizations.weight.original"] = (num, d)
        shapes[f"{name}.parametrizations.weight.0.lora_A"] = (a, num, r)
        shapes[f"{name}.parametrizations.weight.0.lora_B"] = (a, r, d)

    emb("roberta.embeddings.word_embeddings", v)
    emb("roberta.embeddings.token_type_embeddings", 1)
    shapes["roberta.emb_ln.weight"] = shapes["roberta.emb_ln.bias"] = (d,)
    for i in range(n):
        p = f"roberta.encoder.layers.{i}."
        lin(p + "mixer.Wqkv", 3 * d, d)
        lin(p + "mixer.out_proj", d, d)
        lin(p + "mlp.fc1", f, d)
        lin(p + "mlp.fc2", d, f)
        for ln in ("norm1", "norm2"):
            shapes[f"{p}{ln}.weight"] = shapes[f"{p}{ln}.bias"] = (d,)
    lin("roberta.pooler.dense", d, d)
    return shapes


def test_checkpoint_keys_and_shapes(tiny_jina_dir):
    cfg = read_config(tiny_jina_dir)
    from safetensors import safe_open

    with safe_open(str(tiny_jina_dir / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        dtypes = {fh.get_slice(k).get_dtype() for k in keys}
    want = _expected_shapes(cfg)
    assert len(keys) == expected_key_count(cfg["num_hidden_layers"]) == len(want)
    assert keys == set(want)
    assert dtypes == {"F32"}
    sd = raw_state_dict(tiny_jina_dir)
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
        if "lora_" in k:
            # every adapter of every module must be non-zero
            assert bool((sd[k].flatten(1).abs().amax(dim=1) > 0).all()), k


def test_config_fields(tiny_jina_dir):
    cfg = read_config(tiny_jina_dir)
    assert cfg["architectures"] == ["XLMRobertaModel"]
    assert cfg["model_type"] == "xlm-roberta"
    assert cfg["position_embedding_type"] == "rotary"
    assert cfg["rotary_emb_base"] == 20000.0
    assert cfg["lora_adaptations"] == list(TASKS)
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout_p"]) == (4, 1, 0.0)
    assert cfg["task_instructions"] == TASK_INSTRUCTIONS
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 0, 2)
    dims = cfg["matryoshka_dimensions"]
    assert dims == sorted(dims) and dims[-1] == cfg["hidden_size"] and len(dims) >= 3
    assert cfg["emb_pooler"] is None and cfg["truncate_dim"] is None
    assert cfg["torch_dtype"] == "bfloat16" and cfg["use_flash_attn"] is True
    assert cfg["hidden_act"] == "gelu" and cfg["layer_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 8194 and cfg["type_vocab_size"] == 1
    assert cfg["load_trained_adapters"] is True
    tcfg = json.loads((tiny_jina_dir / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "XLMRobertaTokenizer" and tcfg["model_max_length"] == MAX_LENGTH
    assert (tiny_jina_dir / "special_tokens_map.json").is_file()


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def test_tokenizer_is_xlmr_like(tiny_jina_dir):
    cfg = read_config(tiny_jina_dir)
    tok = load_tokenizer(tiny_jina_dir)
    v = tok.get_vocab_size(with_added_tokens=True)
    assert v == cfg["vocab_size"] and 1000 <= v <= 2000
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, v - 1]
    text = "A man is playing a large flute."
    enc = tok.encode(text)
    assert enc.ids[0] == 0 and enc.ids[-1] == 2 and 3 not in enc.ids
    assert enc.tokens[1].startswith("▁")
    assert enc.ids == token_ids(tiny_jina_dir, [text])[0]  # post-processor == manual <s> ... </s>
    start, end = enc.offsets[2]
    assert text[start:end] == "man"

    # the tokenizer's own truncation (which reserves room for the specials) == our manual one
    long = " ".join(sts_sentences("test")[:900])
    tok.enable_truncation(max_length=MAX_LENGTH)
    try:
        truncated = tok.encode(long).ids
    finally:
        tok.no_truncation()
    assert len(truncated) == MAX_LENGTH and truncated[-1] == 2
    assert truncated == token_ids(tiny_jina_dir, [long])[0]


def test_transformers_autotokenizer_agrees(tiny_jina_dir):
    """transformers v5 rebuilds XLMRobertaTokenizer from tokenizer.json's vocab only: ids must agree."""
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(str(tiny_jina_dir))
    assert at.model_max_length == MAX_LENGTH
    texts = [*TEXTS, "  odd   spacing\tand\nnewlines ", "Zürich café: 1½ naïve", ""]
    got = at(texts, return_offsets_mapping=True)
    want = token_ids(tiny_jina_dir, texts)
    assert got["input_ids"] == want
    tok = load_tokenizer(tiny_jina_dir)
    for i, t in enumerate(texts):
        assert [tuple(o) for o in got["offset_mapping"][i]] == tok.encode(t).offsets


# --------------------------------------------------------------------------------------------------
# reference encoder
# --------------------------------------------------------------------------------------------------


def _spec_forward(ckpt_dir, ids: list[int], task: str | None) -> torch.Tensor:
    """Unpooled forward straight from spec §2-§3 on the published keys, float64, one sequence."""
    cfg = read_config(ckpt_dir)
    sd = {k: v.to(torch.float64) for k, v in raw_state_dict(ckpt_dir).items()}
    t = None if task is None else cfg["lora_adaptations"].index(task)
    scale = cfg["lora_alpha"] / cfg["lora_rank"]
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = d // h
    eps = cfg["layer_norm_eps"]

    def weight(name: str, embedding: bool = False) -> torch.Tensor:
        w = sd[f"roberta.{name}.parametrizations.weight.original"]
        if t is None:
            return w
        a = sd[f"roberta.{name}.parametrizations.weight.0.lora_A"][t]
        b = sd[f"roberta.{name}.parametrizations.weight.0.lora_B"][t]
        return w + scale * (a @ b if embedding else b @ a)

    def ln(x, name):
        return torch.nn.functional.layer_norm(
            x, (d,), sd[f"roberta.{name}.weight"], sd[f"roberta.{name}.bias"], eps
        )

    def lin(x, name):
        return x @ weight(name).T + sd[f"roberta.{name}.bias"]

    idx = torch.tensor(ids)
    x = weight("embeddings.word_embeddings", True)[idx] + weight("embeddings.token_type_embeddings", True)[0]
    x = ln(x, "emb_ln")
    n = len(ids)
    inv_freq = cfg["rotary_emb_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (n, hd/2)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(z):  # (n, h, hd): dim j pairs with j + hd/2
        z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
        return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], dim=-1)

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        q, k, v = lin(x, p + "mixer.Wqkv").view(n, 3, h, hd).unbind(1)
        q, k = rope(q), rope(k)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), dim=-1)
        a = torch.einsum("hqk,khd->qhd", att, v).reshape(n, d)
        x = ln(x + lin(a, p + "mixer.out_proj"), p + "norm1")
        m = lin(torch.nn.functional.gelu(lin(x, p + "mlp.fc1")), p + "mlp.fc2")
        x = ln(x + m, p + "norm2")
    return x


@pytest.mark.parametrize("task", [None, *TASKS])
def test_reference_matches_spec_forward(tiny_jina_dir, task):
    cfg = read_config(tiny_jina_dir)
    texts = TEXTS[:2]
    ids = token_ids(tiny_jina_dir, with_instruction(tiny_jina_dir, texts, task))
    ref = reference_encode(tiny_jina_dir, texts, task=task)
    for i, x in enumerate(ids):
        pooled = _spec_forward(tiny_jina_dir, x, task).mean(dim=0)
        want = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        np.testing.assert_allclose(ref[i], want, rtol=0, atol=SELF_ATOL)
        for dim in cfg["matryoshka_dimensions"][:-1]:
            want_d = torch.nn.functional.normalize(pooled[:dim], dim=-1).numpy()
            got_d = reference_encode_ids(tiny_jina_dir, [x], task=task, dim=dim)[0]
            np.testing.assert_allclose(got_d, want_d, rtol=0, atol=SELF_ATOL)


def test_reference_alone_equals_in_padded_batch(tiny_jina_dir):
    long = " ".join(sts_sentences("dev")[:40])
    batch = [TEXTS[3], long, TEXTS[0], "Hi"]
    for task in (None, "retrieval.query", "text-matching"):
        together = reference_encode(tiny_jina_dir, batch, task=task)
        for i, t in enumerate(batch):
            alone = reference_encode(tiny_jina_dir, [t], task=task)[0]
            np.testing.assert_allclose(together[i], alone, rtol=0, atol=SELF_ATOL)
    # the attention kernel does not matter either
    eager = reference_encode(tiny_jina_dir, batch, task="separation", attn_implementation="eager")
    sdpa = reference_encode(tiny_jina_dir, batch, task="separation", attn_implementation="sdpa")
    np.testing.assert_allclose(eager, sdpa, rtol=0, atol=SELF_ATOL)


def test_reference_tasks_differ_and_outputs_are_sane(tiny_jina_dir):
    cfg = read_config(tiny_jina_dir)
    outs = {task: reference_encode(tiny_jina_dir, TEXTS, task=task) for task in [None, *TASKS]}
    for task, e in outs.items():
        assert e.dtype == np.float32 and e.shape == (len(TEXTS), cfg["hidden_size"])
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        # different texts get clearly different vectors
        assert np.abs(e[0] - e[1]).max() > TASK_MIN_DIFF, task
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(outs[a] - outs[b]).max() > TASK_MIN_DIFF, (a, b)
    # the LoRA alone (same ids: no prefix difference) changes the output too
    ids = token_ids(tiny_jina_dir, TEXTS)
    for task in ("separation", "classification", "text-matching"):
        diff = np.abs(
            reference_encode_ids(tiny_jina_dir, ids, task) - reference_encode_ids(tiny_jina_dir, ids)
        ).max()
        assert diff > TASK_MIN_DIFF, task
    # retrieval tasks get their instruction prepended
    q = with_instruction(tiny_jina_dir, ["x"], "retrieval.query")[0]
    assert q == TASK_INSTRUCTIONS["retrieval.query"] + "x"
    with pytest.raises(ValueError, match=re.escape("text-matching")):
        reference_encode(tiny_jina_dir, ["x"], task="nope")
    with pytest.raises(ValueError):
        reference_encode(tiny_jina_dir, ["x"], dim=5)


def test_reference_truncation_matters(tiny_jina_dir):
    """A >8192-token input is cut to 8192 ids, and the cut changes the embedding measurably."""
    sents = sts_sentences("test")
    long = " ".join(sents[:800])
    full = token_ids(tiny_jina_dir, [long], max_length=None)[0]
    assert len(full) > MAX_LENGTH + 200
    cut = token_ids(tiny_jina_dir, [long])[0]
    assert len(cut) == MAX_LENGTH and cut[:-1] == full[: MAX_LENGTH - 1] and cut[-1] == 2
    e_cut = reference_encode(tiny_jina_dir, [long])
    np.testing.assert_allclose(e_cut, reference_encode_ids(tiny_jina_dir, [cut]), rtol=0, atol=SELF_ATOL)
    e_full = reference_encode_ids(tiny_jina_dir, [full])
    assert np.abs(e_cut - e_full).max() > 1e-3
