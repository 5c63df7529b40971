"""Late chunking (`model.late_chunking`): span arithmetic, equivalence with plain encoding, long documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shared_data import qmsum_transcripts

from model import fixed_token_spans, load_encoder, long_windows, sentence_spans, token_spans
from model.late_chunking import embed_spans, window_and_overlap
from model.packing import pool_spans

ATOL_FP32 = 1e-5


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

def _context_free_forward(seqs: list[np.ndarray], tasks: list[int | None]):
    """A batched forward whose state for a token is (its id, its task): with no context, stitched windows
    equal the whole document, so a misplaced or twice-kept overlap shows in the means. Batches of two
    come back last first, as streams may return them."""
    batches = [list(range(i, min(i + 2, len(seqs)))) for i in range(0, len(seqs), 2)]
    for batch in reversed(batches):
        states = torch.cat([torch.stack([torch.as_tensor(seqs[i], dtype=torch.float32),
                                         torch.full((len(seqs[i]),), float(tasks[i]))], dim=1) for i in batch])
        offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(seqs[i]) for i in batch])]))
        yield batch, states, offsets


def test_stitched_windows_pool_like_the_whole_document():
    lengths = [5, 40, 100, 7, 33]
    seqs = [np.arange(n, dtype=np.int64) + 1000 * d for d, n in enumerate(lengths)]
    spans = [np.array([*[(s, min(s + 6, n)) for s in range(0, n, 6)], (0, n)]) for n in lengths]
    tasks = [3, 1, 4, 1, 5]
    got = embed_spans(_context_free_forward, seqs, spans, tasks, window=16, overlap=4, group_tokens=50)
    for seq, sp, task, v in zip(seqs, spans, tasks, got, strict=True):
        want = [[seq[s:e].mean(), task] for s, e in sp]
        np.testing.assert_allclose(v.numpy(), want, rtol=0, atol=1e-4)


def test_a_span_outside_its_document_is_refused():
    seqs = [np.arange(10), np.arange(20)]
    with pytest.raises(ValueError, match="document 1: span outside its 20 tokens"):
        embed_spans(_context_free_forward, seqs, [np.array([[0, 10]]), np.array([[0, 21]])], [0, 0],
                    window=8, overlap=2, group_tokens=64)


def test_window_defaults_to_the_model_maximum_and_a_quarter_overlap():
    assert window_and_overlap(None, None, 8192) == (8192, 512)
    assert window_and_overlap(256, None, 8192) == (256, 64)
    assert window_and_overlap(256, 0, 8192) == (256, 0)
    with pytest.raises(ValueError, match="window 300 exceeds the model maximum 256"):
        window_and_overlap(300, None, 256)
