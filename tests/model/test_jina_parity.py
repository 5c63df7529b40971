"""Parity of the project's jina-embeddings-v3 encoder with an independent reference.

The reference (``tests/model/reference.py``) is the ``transformers`` ``JinaEmbeddingsV3Model`` port
loaded from the published checkpoint layout with the task LoRA merged by hand. The checkpoint is a
tiny random one in the published layout (``tests/model/tiny_jina.py``), so every adapter, every
Matryoshka dimension, long inputs and the 8192-token truncation are cheap to exercise on CPU.

Contract under test::

    enc = model.load_encoder(path, device="cpu", dtype=torch.float32)
    enc.encode(texts, *, task=None | str | list[str], dim=None | int, normalize=True) -> np.ndarray
    enc.tasks, enc.dims, enc.dim, enc.max_length
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from reference import (
    MAX_LENGTH,
    read_config,
    reference_encode,
    reference_encode_ids,
    token_ids,
    with_instruction,
)
from tiny_jina import TASKS, sts_sentences

# --- tolerances -----------------------------------------------------------------------------------
PARITY_ATOL = 1e-4  # float32 encoder vs float32 reference, max abs difference per component
UNNORMALIZED_RTOL = 1e-4  # normalize=False: max abs difference relative to the vector's max |component|
BATCH_ATOL = 1e-5  # the encoder vs itself: a text alone vs the same text inside a padded batch
MIN_EFFECT = 1e-2  # a check is only meaningful if the thing it guards moves outputs by more than this

# --- inputs ---------------------------------------------------------------------------------------
LONG_MIN_TOKENS = 2000  # "long" input of the mixed-length batch
OVER_MAX_TOKENS = MAX_LENGTH + 500  # input that must be truncated to 8192

SHORT_TEXTS = [
    "A plane is taking off.",
    "A man is playing a large flute.",
    "Three men are playing chess.",
    "A woman is slicing an onion into rings on a cutting board while her cat watches from the chair.",
    "Hi",
]


def _long_text(ckpt_dir, min_tokens: int, split: str = "test") -> str:
    """Real STS sentences joined until the text is just over ``min_tokens`` tokens (with specials)."""
    sents = sts_sentences(split)
    n = 64
    while True:
        text = " ".join(sents[:n])
        if len(token_ids(ckpt_dir, [text], max_length=None)[0]) > min_tokens:
            return text
        if n >= len(sents):
            raise AssertionError(f"not enough STS text for {min_tokens} tokens")
        n = min(len(sents), int(n * 1.5))


@pytest.fixture(scope="module")
def cfg(tiny_jina_dir) -> dict:
    return read_config(tiny_jina_dir)


@pytest.fixture(scope="module")
def enc(tiny_jina_dir):
    from model import load_encoder

    return load_encoder(str(tiny_jina_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def long_text(tiny_jina_dir) -> str:
    text = _long_text(tiny_jina_dir, LONG_MIN_TOKENS)
    n = len(token_ids(tiny_jina_dir, [text])[0])
    assert LONG_MIN_TOKENS < n < MAX_LENGTH, n
    return text


@pytest.fixture(scope="module")
def over_max_text(tiny_jina_dir) -> str:
    text = _long_text(tiny_jina_dir, OVER_MAX_TOKENS, split="train")
    assert len(token_ids(tiny_jina_dir, [text], max_length=None)[0]) > OVER_MAX_TOKENS
    return text


def _assert_parity(got: np.ndarray, want: np.ndarray, atol: float = PARITY_ATOL) -> None:
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == np.float32, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if got.size else 0.0
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol:g}"


# --------------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------------


def test_metadata(enc, cfg):
    assert tuple(enc.tasks) == tuple(cfg["lora_adaptations"]) == TASKS
    assert tuple(enc.dims) == tuple(cfg["matryoshka_dimensions"])
    assert enc.dim == cfg["hidden_size"]
    assert enc.max_length == MAX_LENGTH


# --------------------------------------------------------------------------------------------------
# parity with the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", [None, *TASKS])
def test_parity_per_task(enc, tiny_jina_dir, cfg, task):
    got = enc.encode(SHORT_TEXTS, task=task)
    want = reference_encode(tiny_jina_dir, SHORT_TEXTS, task=task)
    assert got.shape == (len(SHORT_TEXTS), cfg["hidden_size"])
    _assert_parity(got, want)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("task", [None, "retrieval.query", "classification"])
def test_parity_matryoshka_dims(enc, tiny_jina_dir, cfg, task):
    texts = SHORT_TEXTS[:3]
    for dim in cfg["matryoshka_dimensions"]:
        got = enc.encode(texts, task=task, dim=dim)
        assert got.shape == (len(texts), dim)
        _assert_parity(got, reference_encode(tiny_jina_dir, texts, task=task, dim=dim))
        # normalization happens after truncation
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # full dim given explicitly == default
    _assert_parity(enc.encode(texts, task=task, dim=enc.dim), enc.encode(texts, task=task), atol=BATCH_ATOL)


@pytest.mark.parametrize("task", [None, "text-matching"])
def test_parity_unnormalized(enc, tiny_jina_dir, cfg, task):
    texts = SHORT_TEXTS[:3]
    for dim in (None, cfg["matryoshka_dimensions"][1]):
        got = enc.encode(texts, task=task, dim=dim, normalize=False)
        want = reference_encode(tiny_jina_dir, texts, task=task, dim=dim, normalize=False)
        scale = float(np.abs(want).max())
        assert np.abs(np.linalg.norm(want, axis=1) - 1.0).max() > MIN_EFFECT  # really unnormalized
        _assert_parity(got, want, atol=UNNORMALIZED_RTOL * max(1.0, scale))


@pytest.mark.parametrize("task", [None, "retrieval.passage", "separation"])
def test_parity_mixed_lengths_with_long_input(enc, tiny_jina_dir, long_text, task):
    texts = [SHORT_TEXTS[0], long_text, SHORT_TEXTS[3], SHORT_TEXTS[4], " ".join(sts_sentences("dev")[:30])]
    n_long = len(token_ids(tiny_jina_dir, with_instruction(tiny_jina_dir, [long_text], task))[0])
    assert n_long > LONG_MIN_TOKENS
    got = enc.encode(texts, task=task)
    _assert_parity(got, reference_encode(tiny_jina_dir, texts, task=task))
    dim = enc.dims[1]
    _assert_parity(
        enc.encode(texts, task=task, dim=dim), reference_encode(tiny_jina_dir, texts, task=task, dim=dim)
    )


def test_parity_mixed_task_batch(enc, tiny_jina_dir, long_text):
    texts = [SHORT_TEXTS[0], SHORT_TEXTS[1], long_text, SHORT_TEXTS[3], SHORT_TEXTS[0], SHORT_TEXTS[2], "Hi"]
    tasks = [
        "retrieval.query",
        "retrieval.passage",
        "retrieval.passage",
        "separation",
        "classification",
        "text-matching",
        "retrieval.query",
    ]
    got = enc.encode(texts, task=tasks)
    want = np.concatenate(
        [reference_encode(tiny_jina_dir, [t], task=k) for t, k in zip(texts, tasks, strict=True)]
    )
    _assert_parity(got, want)
    # == single-task calls of the encoder itself
    single = np.concatenate([enc.encode([t], task=k) for t, k in zip(texts, tasks, strict=True)])
    _assert_parity(got, single, atol=BATCH_ATOL)
    # same text, different task -> different vector (rows 0 and 4)
    assert np.abs(got[0] - got[4]).max() > MIN_EFFECT
    # with a Matryoshka dim
    dim = enc.dims[0]
    got_d = enc.encode(texts, task=tasks, dim=dim)
    want_d = np.concatenate(
        [reference_encode(tiny_jina_dir, [t], task=k, dim=dim) for t, k in zip(texts, tasks, strict=True)]
    )
    _assert_parity(got_d, want_d)


def test_mixed_task_list_with_one_task_equals_single_task(enc):
    texts = SHORT_TEXTS[:4]
    for task in TASKS:
        _assert_parity(
            enc.encode(texts, task=[task] * len(texts)), enc.encode(texts, task=task), atol=BATCH_ATOL
        )


# --------------------------------------------------------------------------------------------------
# batching, truncation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", [None, "retrieval.query"])
def test_alone_equals_in_batch(enc, long_text, task):
    batch = [SHORT_TEXTS[3], long_text, SHORT_TEXTS[0], "Hi", SHORT_TEXTS[1]]
    together = enc.encode(batch, task=task)
    for i, text in enumerate(batch):
        alone = enc.encode([text], task=task)
        assert alone.shape == (1, enc.dim)
        _assert_parity(alone[0], together[i], atol=BATCH_ATOL)
    # order of the batch does not matter either
    _assert_parity(enc.encode(batch[::-1], task=task)[::-1], together, atol=BATCH_ATOL)


def test_input_over_8192_tokens_is_truncated(enc, tiny_jina_dir, over_max_text):
    task = "retrieval.passage"  # the instruction prefix counts towards the 8192 tokens
    prefixed = with_instruction(tiny_jina_dir, [over_max_text], task)
    full_ids = token_ids(tiny_jina_dir, prefixed, max_length=None)[0]
    assert len(full_ids) > OVER_MAX_TOKENS
    # the first 8190 content tokens, framed by <s> ... </s>
    cut_ids = [full_ids[0], *full_ids[1 : MAX_LENGTH - 1], full_ids[-1]]
    assert len(cut_ids) == MAX_LENGTH and cut_ids[0] == 0 and cut_ids[-1] == 2
    want = reference_encode_ids(tiny_jina_dir, [cut_ids], task=task)
    untruncated = reference_encode_ids(tiny_jina_dir, [full_ids], task=task)
    assert np.abs(want - untruncated).max() > MIN_EFFECT / 10  # the check can tell the difference

    got = enc.encode([over_max_text], task=task)
    _assert_parity(got, want)
    # also inside a padded batch next to short inputs
    got_batch = enc.encode([SHORT_TEXTS[0], over_max_text, "Hi"], task=task)
    _assert_parity(got_batch[1:2], want)
    _assert_parity(got_batch[[0, 2]], reference_encode(tiny_jina_dir, [SHORT_TEXTS[0], "Hi"], task=task))


# --------------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------------


def _names_all(message: str, choices) -> bool:
    return all(re.search(rf"(?<![\w.-]){re.escape(str(c))}(?![\w-])", message) for c in choices)


@pytest.mark.parametrize("bad", ["retrieval", "Retrieval.Query", "text_matching", "", "query"])
def test_unknown_task_raises(enc, bad):
    with pytest.raises(ValueError) as excinfo:
        enc.encode(["x"], task=bad)
    assert _names_all(str(excinfo.value), TASKS), str(excinfo.value)
    with pytest.raises(ValueError) as excinfo:
        enc.encode(["x", "y"], task=["separation", bad])
    assert _names_all(str(excinfo.value), TASKS), str(excinfo.value)


def test_task_list_length_mismatch_raises(enc):
    with pytest.raises(ValueError):
        enc.encode(["x", "y", "z"], task=["separation", "classification"])


@pytest.mark.parametrize("bad", [0, 5, 31, 33, 64, -8])
def test_invalid_dim_raises(enc, cfg, bad):
    with pytest.raises(ValueError) as excinfo:
        enc.encode(["x"], dim=bad)
    assert _names_all(str(excinfo.value), cfg["matryoshka_dimensions"]), str(excinfo.value)
    with pytest.raises(ValueError):
        enc.encode(["x"], task="retrieval.query", dim=bad)
