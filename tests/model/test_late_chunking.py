"""Late chunking: span arithmetic, equivalence with plain encoding, long documents, chunkers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shared_data import minilm_dir, qmsum_transcripts

from model import chunk_spans, fixed_token_spans, load_encoder, long_windows, sentence_spans, token_spans
from model.packing import pool_spans

ATOL_FP32 = 1e-5


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(str(minilm_dir()), device="cpu", dtype=torch.float32)


def test_one_token_document_pools_specials(minilm):
    doc = minilm.tokenizer.encode_with_offsets(["A"], [""])[0]
    assert len(doc.ids) == 3  # [CLS] a [SEP]
    assert token_spans(doc, [(0, 1)]).tolist() == [[0, 3]]


def test_first_span_takes_leading_specials_last_takes_trailing(minilm):
    text = "First sentence here. Second one follows. Third ends it."
    spans = sentence_spans(minilm.tokenizer, text, 1)
    assert [text[s:e] for s, e in spans] == ["First sentence here.", "Second one follows.", "Third ends it."]
    doc = minilm.tokenizer.encode_with_offsets([text], [""])[0]
    ts = token_spans(doc, spans)
    assert ts[0, 0] == 0 and ts[-1, 1] == len(doc.ids)
    assert (ts[1:, 0] == ts[:-1, 1]).all()  # tiling spans share out every token exactly once


def test_single_full_span_equals_encode(minilm):
    texts = ["A man is playing a guitar on the stage.", "Late chunking pools token vectors per span."]
    full = minilm.encode_spans(texts, [[(0, len(t))] for t in texts])
    np.testing.assert_allclose(np.concatenate(full), minilm.encode(texts), atol=ATOL_FP32)


def test_spans_inside_a_document_see_its_context(minilm):
    text = "Berlin is the capital of Germany. Its population is 3.8 million. The city is also a state."
    spans = sentence_spans(minilm.tokenizer, text, 1)
    late = minilm.encode_spans([text], [spans])[0]
    naive = minilm.encode([text[s:e] for s, e in spans])
    assert late.shape == naive.shape == (3, 384)
    assert not np.allclose(late, naive, atol=1e-3)  # context changed the vectors
    np.testing.assert_allclose(np.linalg.norm(late, axis=1), 1.0, atol=1e-6)


def test_long_late_chunking_below_the_window_is_the_single_pass(minilm):
    text = qmsum_transcripts(limit=1)[0][:600]
    spans = fixed_token_spans(minilm.tokenizer, text, 16)
    n = len(minilm.tokenizer.encode_with_offsets([text], [""])[0].ids)
    assert n < 256
    single = minilm.encode_spans([text], [spans])[0]
    windowed = minilm.encode_spans([text], [spans], window=n, overlap=32)[0]
    np.testing.assert_allclose(windowed, single, atol=ATOL_FP32)


def test_long_document_windows_are_stitched_exactly(minilm):
    text = qmsum_transcripts(limit=1)[0][:8000]
    doc = minilm.tokenizer.encode_with_offsets([text], [""])[0]
    spans = fixed_token_spans(minilm.tokenizer, text, 64)
    window, overlap = 256, 64
    got = minilm.encode_spans([text], [spans], window=window, overlap=overlap, normalize=False)[0]
    # Independent computation: run each window alone, drop its overlap, concatenate, pool.
    kept = []
    with torch.inference_mode():
        for w in long_windows(len(doc.ids), window, overlap):
            states = minilm._forward([doc.ids[w.start : w.stop]], [None])
            kept.append(states[w.keep_from :])
    stitched = torch.cat(kept)
    assert stitched.shape[0] == len(doc.ids)
    ts = torch.as_tensor(token_spans(doc, spans))
    expected = pool_spans(stitched, ts[:, 0], ts[:, 1]).numpy()
    assert got.shape == (len(spans), 384) and len(spans) > 20
    np.testing.assert_allclose(got, expected, atol=ATOL_FP32)


def test_every_span_of_a_long_document_gets_a_vector(minilm):
    texts = qmsum_transcripts(limit=2)
    spans = [fixed_token_spans(minilm.tokenizer, t, 128) for t in texts]
    out = minilm.encode_spans(texts, spans)
    for t, s, v in zip(texts, spans, out, strict=True):
        doc = minilm.tokenizer.encode_with_offsets([t], [""])[0]
        assert len(doc.ids) > 2000  # far beyond the 256-token window
        assert v.shape == (len(s), 384) and np.isfinite(v).all()
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
        ts = token_spans(doc, s)
        assert ts[0, 0] == 0 and ts[-1, 1] == len(doc.ids) and (ts[1:, 0] == ts[:-1, 1]).all()


def test_long_windows_tile_the_document():
    for n, w, o in [(10, 10, 2), (11, 10, 2), (1000, 256, 64), (257, 256, 255), (5000, 8192, 512)]:
        wins = long_windows(n, w, o)
        kept = [(x.start + x.keep_from, x.stop) for x in wins]
        assert kept[0][0] == 0 and kept[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(kept[:-1], kept[1:], strict=True))
        assert all(x.stop - x.start <= w for x in wins)
    with pytest.raises(ValueError, match="overlap"):
        long_windows(100, 10, 10)


def test_fixed_chunks_have_the_token_count(minilm):
    text = qmsum_transcripts(limit=1)[0][:3000]
    spans = fixed_token_spans(minilm.tokenizer, text, 50)
    counts = [len(minilm.tokenizer.content_offsets(text[s:e])[0]) for s, e in spans]
    assert all(abs(c - 50) <= 2 for c in counts[:-1]) and 0 < counts[-1] <= 52
    assert spans == sorted(spans) and all(a[1] <= b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))


def test_sentence_chunks_beyond_english(minilm):
    cjk = "今日は晴れです。明日は雨でしょう！本当ですか？はい。"
    spans = sentence_spans(minilm.tokenizer, cjk, 1)
    assert [cjk[s:e] for s, e in spans] == ["今日は晴れです。", "明日は雨でしょう！", "本当ですか？", "はい。"]
    mixed = "Pi is 3.14 exactly. Really? Yes! And a tail without end"
    spans = sentence_spans(minilm.tokenizer, mixed, 2)
    assert [mixed[s:e] for s, e in spans] == ["Pi is 3.14 exactly. Really?", "Yes! And a tail without end"]


def test_chunk_spans_modes(minilm):
    assert chunk_spans(minilm.tokenizer, "abc def", "none") == [(0, 7)]
    assert chunk_spans(minilm.tokenizer, "", "fixed", chunk_tokens=4) == [(0, 0)]
    with pytest.raises(ValueError, match="none, fixed, sentences"):
        chunk_spans(minilm.tokenizer, "x", "semantic")


def test_one_token_document_with_instruction_jina(tiny_jina_dir):
    """Reference rule (spec §6.3): the single span of document "A" is (0, n_instr + 3)."""
    enc = load_encoder(str(tiny_jina_dir), device="cpu")
    prefix = enc.tokenizer.prefix("retrieval.passage")
    n_instr = len(enc.tokenizer.encode_with_offsets([prefix], [""])[0].starts)  # instruction tokenized alone
    doc = enc.tokenizer.encode_with_offsets(["A"], [prefix])[0]
    assert len(doc.starts) == 1 and doc.content_start == 1 + n_instr
    assert token_spans(doc, [(0, 1)]).tolist() == [[0, n_instr + 3]]
    late = enc.encode_spans(["A"], [[(0, 1)]], task="retrieval.passage")[0]
    np.testing.assert_allclose(late, enc.encode(["A"], task="retrieval.passage"), atol=ATOL_FP32)


def test_chunks_never_split_a_lone_metaspace_token_from_its_word(tiny_jina_dir):
    """SentencePiece may emit '▁' alone with the next token's offsets; no cut may fall between them."""
    enc = load_encoder(str(tiny_jina_dir), device="cpu")
    text = "A man is playing the drums. Two dogs zigzag quietly. Xylophones vex qualmish jockeys."
    starts, ends = enc.tokenizer.content_offsets(text)
    shared = [i for i in range(1, len(starts)) if starts[i] < ends[i - 1]]
    assert shared, "fixture text should contain a lone '▁' token for this test to mean anything"
    for size in range(1, 8):
        spans = fixed_token_spans(enc.tokenizer, text, size)
        assert all(a[1] <= b[0] for a, b in zip(spans[:-1], spans[1:], strict=True)), (size, spans)
        doc = enc.tokenizer.encode_with_offsets([text], [""])[0]
        ts = token_spans(doc, spans)
        assert (ts[1:, 0] == ts[:-1, 1]).all() and ts[0, 0] == 0 and ts[-1, 1] == len(doc.ids)
