"""Chunkers (`model.chunking`): fixed token counts, sentences in any script, modes, SentencePiece quirks."""

from __future__ import annotations

import pytest
from shared_data import qmsum_transcripts

from model import chunk_spans, fixed_token_spans, load_encoder, sentence_spans, token_spans


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
