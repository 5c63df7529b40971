"""Parity of the project's jina-embeddings-v4 encoder with an independent reference (``reference_v4.py``:
transformers' ``Qwen2_5_VLModel`` + stock PEFT LoRA per task + the projector), on a tiny random checkpoint in
the published layout (``tiny_jina_v4.py``), float32 on CPU.

Contract under test::

    enc = model.load_encoder(path, device="cpu", dtype=torch.float32)
    enc.encode(texts, *, task=None | str | list, prompt=None | "query" | "passage" | list, dim=None | int)
    enc.encode_images(images, *, task=..., dim=...)              # PIL images or encoded bytes
    enc.encode_multi(texts | images, *, task=..., prompt=...)   # list of (tokens, 128) float32
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from reference_v4 import reference
from tiny_jina import sts_sentences
from tiny_jina_v4 import TASKS

PARITY_ATOL = 1e-4  # float32 encoder vs float32 reference, max abs difference per component
MIN_EFFECT = 1e-2  # what a check guards must move outputs by more than this, or the check proves nothing

TEXTS = [
    "A plane is taking off.",
    "Three men are playing chess.",
    "Hi",
    " ".join(sts_sentences("test")[:40]),  # a few hundred tokens: long enough for RoPE and causality to matter
]


def gradient_image(height: int, width: int, seed: int, mode: str = "RGB"):
    """A smooth image with some noise (sides multiples of 28 and within the pixel bounds: no resize, so exact)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def images() -> list:
    # 224 x 168: 16 x 12 patches, 4 x 3 windows of the tiny tower's 112-pixel window; 84 x 56: one window;
    # a grayscale one goes through the RGB conversion.
    return [gradient_image(168, 224, 0), gradient_image(56, 84, 1), gradient_image(112, 112, 2, mode="L")]


@pytest.fixture(scope="module")
def enc(tiny_jina_v4_dir):
    from model import load_encoder

    return load_encoder(str(tiny_jina_v4_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ref(tiny_jina_v4_dir):
    return reference(str(tiny_jina_v4_dir))


def test_tokenization_matches_transformers_qwen2_tokenizer(enc, ref):
    for prompt in ("query", "passage"):
        ids = enc.tokenizer.encode(TEXTS, enc.resolve_tasks("retrieval", len(TEXTS), prompt)[1])
        assert [list(s) for s in ids] == ref.text_ids(TEXTS, "retrieval", prompt)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("prompt", ["query", "passage"])
def test_text_single_vector_every_dim(enc, ref, task, prompt):
    for dim in [*enc.dims, None]:
        ours = enc.encode(TEXTS, task=task, prompt=prompt, dim=dim)
        assert ours.shape == (len(TEXTS), dim or enc.dim) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref.encode_text(TEXTS, task=task, prompt=prompt, dim=dim), atol=PARITY_ATOL)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_text_multi_vector(enc, ref, task):
    for prompt in ("query", "passage"):
        ours = enc.encode_multi(TEXTS, task=task, prompt=prompt)
        theirs = ref.encode_text_multi(TEXTS, task=task, prompt=prompt)
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == b.shape and a.shape[1] == 128 and a.dtype == np.float32
            np.testing.assert_allclose(a, b, atol=PARITY_ATOL)
            np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_tasks_and_prompts_change_the_output(enc):
    """Each adapter and each prefix matters (else the parity above would not tell them apart)."""
    vecs = {(t, p): enc.encode(TEXTS[:2], task=t, prompt=p) for t in TASKS for p in ("query", "passage")}
    assert np.abs(vecs["retrieval", "query"] - vecs["retrieval", "passage"]).max() > MIN_EFFECT
    assert np.abs(vecs["retrieval", "query"] - vecs["code", "query"]).max() > MIN_EFFECT
    assert np.abs(vecs["text-matching", "query"] - vecs["retrieval", "query"]).max() > MIN_EFFECT
    # text-matching always takes the "Query: " prefix (spec §7)
    np.testing.assert_array_equal(vecs["text-matching", "query"], vecs["text-matching", "passage"])


def test_mixed_tasks_and_prompts_equal_rows_alone(enc):
    texts = TEXTS * 2
    tasks = ["retrieval", "code", "text-matching", "code", "retrieval", "text-matching", "retrieval", "code"]
    prompts = ["query", "passage", "passage", "query", "passage", "query", None, "passage"]
    mixed = enc.encode(texts, task=tasks, prompt=prompts)
    multi = enc.encode_multi(texts, task=tasks, prompt=prompts)
    for i, (text, task, prompt) in enumerate(zip(texts, tasks, prompts, strict=True)):
        np.testing.assert_allclose(mixed[i], enc.encode([text], task=task, prompt=prompt)[0], atol=1e-5)
        np.testing.assert_allclose(multi[i], enc.encode_multi([text], task=task, prompt=prompt)[0], atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_images_single_vector_every_dim(enc, ref, task):
    for dim in [*enc.dims, None]:
        ours = enc.encode_images(images(), task=task, dim=dim)
        assert ours.shape == (3, dim or enc.dim)
        np.testing.assert_allclose(ours, ref.encode_images(images(), task=task, dim=dim), atol=PARITY_ATOL)


@pytest.mark.parametrize("task", TASKS)
def test_images_multi_vector(enc, ref, task):
    ours = enc.encode_multi(images(), task=task)
    theirs = ref.encode_images_multi(images(), task=task)
    assert [a.shape[0] for a in ours] == [17 + 48, 17 + 6, 17 + 16]  # prompt tokens + vision tokens
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=PARITY_ATOL)


def test_image_pixels_and_positions_matter(enc):
    """Vision features and M-RoPE grid positions move the vector (a flipped image keeps its pixel set)."""
    from PIL import ImageOps

    im = images()[0]
    a, b = enc.encode_images([im, ImageOps.mirror(im)], task="retrieval")
    assert np.abs(a - b).max() > MIN_EFFECT


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_encoded_image_bytes(enc, ref, fmt):
    from PIL import Image

    raw = []
    for im in images()[:2]:
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        raw.append(buf.getvalue())
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in raw]
    ours = enc.encode_images(raw, task="retrieval")
    np.testing.assert_allclose(ours, ref.encode_images(decoded, task="retrieval"), atol=PARITY_ATOL)
    if fmt == "PNG":  # lossless: the same vectors as the PIL images themselves
        np.testing.assert_allclose(ours, enc.encode_images(images()[:2], task="retrieval"), atol=1e-6)
    multi = enc.encode_multi(raw, task="code")
    for a, b in zip(multi, ref.encode_images_multi(decoded, task="code"), strict=True):
        np.testing.assert_allclose(a, b, atol=PARITY_ATOL)
