"""EmbedStage called directly (no Ray) on units from prepare_batch, with the real MiniLM model."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
from shared_data import minilm_dir, qmsum_transcripts, sts_sentences

from model import chunk_spans, load_encoder
from pipeline.config import ChunkingConfig, SourceConfig
from pipeline.embed import EmbedSpec, EmbedStage, vector_column
from pipeline.prepare import REJECT, PrepareSpec, content_hash, prepare_batch

STATS = ("_tokens", "_computed_tokens", "_embed_s", "_docs", "_truncated", "_prepare_s", "_source_rows")
BAD = [
    (None, "no id here", "missing id"),
    ("bad-null", None, "missing text"),
    ("bad-blank", " \t\n ", "empty text"),
]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(str(minilm_dir()), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def docs() -> pa.Table:
    """Good documents (one of them long) with the three kinds of bad rows spread among them."""
    sents = sts_sentences(30)
    good = [" ".join(sents[i : i + 3]) for i in range(0, 24, 3)] + [qmsum_transcripts(limit=1)[0][:3000]]
    ids = [f"doc-{i}" for i in range(len(good))]
    texts: list = list(good)
    for pos, (bad_id, bad_text, _) in zip((1, 4, 7), BAD, strict=True):
        ids.insert(pos, bad_id)
        texts.insert(pos, bad_text)
    return pa.table({"id": ids, "text": texts, "lang": [f"l{i}" for i in range(len(ids))]})


def _specs(chunking: ChunkingConfig, *, dims, dtype: str, window: int = 256):
    model = str(minilm_dir())
    source = SourceConfig(input="unused", keep_columns=("lang",))
    prep = PrepareSpec(source=source, chunking=chunking, model=model, task=None, window=window)
    embed = EmbedSpec(
        model=model,
        task=None,
        dims=dims,
        vector_dtype=dtype,
        precision="float32",
        late=chunking.late and chunking.mode != "none",
        window=window,
        overlap=chunking.overlap,
        keep_columns=("lang",),
    )
    return prep, embed


def _good(docs: pa.Table) -> list[tuple[str, str, str]]:
    rows = docs.to_pylist()
    return [
        (r["id"], r["text"], r["lang"])
        for r in rows
        if r["id"] is not None and r["text"] and r["text"].strip()
    ]


def _timed_call(embed: EmbedSpec, units: pa.Table) -> tuple[pa.Table, float]:
    stage = EmbedStage(embed)  # loads the model: not part of the call's `_embed_s`
    t0 = time.perf_counter()
    out = stage(units)
    return out, time.perf_counter() - t0


def _check_rejects_and_stats(out: pa.Table, docs: pa.Table, units: pa.Table, chunk_rows: int, wall: float):
    rejected = out.filter(out[REJECT].is_valid())
    assert sorted(
        zip(rejected["id"].to_pylist(), rejected[REJECT].to_pylist(), strict=True), key=str
    ) == sorted([(i, r) for i, _, r in BAD], key=str)
    assert rejected["lang"].to_pylist() == ["l1", "l4", "l7"]  # kept columns ride along for the report
    for c in out.column_names:
        if c.startswith("vector_"):
            assert rejected[c].null_count == rejected.num_rows
    assert out.num_rows == chunk_rows + len(BAD)
    for name in STATS:
        assert name in out.column_names, name
        col = out[name].to_numpy()
        assert (col[1:] == 0).all()  # batch totals sit on the first row only, so sums stay exact
    first = out.slice(0, 1).to_pylist()[0]
    assert first["_docs"] == len(_good(docs))
    assert first["_tokens"] == sum(len(x) for x in units["_ids"].to_pylist())
    assert first["_computed_tokens"] >= first["_tokens"] > 0
    assert 0 < first["_embed_s"] <= wall  # the call's own time, not the model load before it
    assert set(out["_actor"].to_pylist()) == {out["_actor"][0].as_py()}
    assert "device=cpu" in out["_actor"][0].as_py()


def test_no_chunking_float32_one_row_per_document(docs, minilm):
    window = 64  # the long document is truncated at the window, and that is counted
    prep, embed = _specs(ChunkingConfig(mode="none"), dims=(384, 64), dtype="float32", window=window)
    units = prepare_batch(docs, prep)
    out, wall = _timed_call(embed, units)
    _check_rejects_and_stats(out, docs, units, len(_good(docs)), wall)
    assert out.slice(0, 1)["_truncated"][0].as_py() == 1

    ok = out.filter(out[REJECT].is_null())
    good = _good(docs)
    assert ok["id"].to_pylist() == [i for i, _, _ in good]
    assert ok["chunk"].to_pylist() == [0] * len(good)
    assert ok["lang"].to_pylist() == [lang for _, _, lang in good]
    assert ok["content_hash"].to_pylist() == [content_hash(t) for _, t, _ in good]
    assert set(ok["model"].to_pylist()) == {minilm.info.identity}
    for d in (384, 64):
        col = ok[vector_column(d)]
        assert col.type == pa.list_(pa.float32(), d)
        got = np.stack(col.to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        # Stored text is the embedded (truncated) span; vectors equal encoding it.
        texts = ok["text"].to_pylist()
        want = minilm.encode(texts, dim=None if d == 384 else d)
        np.testing.assert_allclose((got * want).sum(1), 1.0, atol=1e-5)
    long_row = ok.filter(pa.compute.equal(ok["id"], good[-1][0])).to_pylist()[0]
    assert long_row["start"] == 0 and long_row["end"] < len(good[-1][1])
    assert long_row["text"] == good[-1][1][: long_row["end"]]
    short_row = ok.slice(0, 1).to_pylist()[0]
    assert short_row["end"] == len(good[0][1]) and short_row["text"] == good[0][1]


def test_naive_fixed_chunking_float16_one_row_per_chunk(docs, minilm):
    chunking = ChunkingConfig(mode="fixed", chunk_tokens=12, late=False)
    prep, embed = _specs(chunking, dims=(384, 32), dtype="float16")
    units = prepare_batch(docs, prep)
    out, wall = _timed_call(embed, units)

    good = _good(docs)
    spans = {i: chunk_spans(minilm.tokenizer, t, "fixed", chunk_tokens=12) for i, t, _ in good}
    _check_rejects_and_stats(out, docs, units, sum(len(s) for s in spans.values()), wall)
    ok = out.filter(out[REJECT].is_null())
    rows = ok.to_pylist()
    texts = {i: t for i, t, _ in good}
    assert [(r["id"], r["chunk"]) for r in rows] == [(i, c) for i, s in spans.items() for c in range(len(s))]
    for r in rows:
        assert (r["start"], r["end"]) == spans[r["id"]][r["chunk"]]
        assert r["text"] == texts[r["id"]][r["start"] : r["end"]]
        assert r["content_hash"] == content_hash(texts[r["id"]])  # of the document, not the chunk
    for d in (384, 32):
        col = ok[vector_column(d)]
        assert col.type == pa.list_(pa.float16(), d)
        got = np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32)
        want = minilm.encode([r["text"] for r in rows], dim=None if d == 384 else d)
        np.testing.assert_allclose(got, want, atol=2e-3)  # float16 storage


def test_late_chunking_matches_encode_spans(docs, minilm):
    chunking = ChunkingConfig(mode="sentences", chunk_sentences=1, late=True)
    prep, embed = _specs(chunking, dims=(384,), dtype="float32", window=128)
    units = prepare_batch(docs, prep)
    assert units.num_rows == docs.num_rows  # one unit per document, whole
    out = EmbedStage(embed)(units)
    ok = out.filter(out[REJECT].is_null())
    good = _good(docs)
    for doc_id, text, _ in good:
        rows = ok.filter(pa.compute.equal(ok["id"], doc_id)).to_pylist()
        assert [r["chunk"] for r in rows] == list(range(len(rows)))
        spans = [(r["start"], r["end"]) for r in rows]
        assert spans == chunk_spans(minilm.tokenizer, text, "sentences", chunk_sentences=1)
        want = minilm.encode_spans([text], [spans], window=128)[0]
        got = np.stack([r["vector_384"] for r in rows])
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert ok.num_rows > len(good)  # documents really were split


@pytest.mark.parametrize(
    "chunking",
    [ChunkingConfig(mode="none"), ChunkingConfig(mode="fixed", chunk_tokens=12, late=False),
     ChunkingConfig(mode="sentences", chunk_sentences=1, late=True)],
    ids=["none", "naive", "late"],
)
def test_every_chunk_row_carries_its_documents_chunk_count(docs, chunking):
    """`_doc_chunks` tells a committer when a document's chunks are all there; it is per row, never a stat."""
    prep, embed = _specs(chunking, dims=(384,), dtype="float32", window=128)
    out = EmbedStage(embed)(prepare_batch(docs, prep))
    assert out.schema.field("_doc_chunks").type == pa.int32()
    ok = out.filter(out[REJECT].is_null())
    rows = Counter(ok["id"].to_pylist())
    assert {(r["id"], r["_doc_chunks"]) for r in ok.select(["id", "_doc_chunks"]).to_pylist()} == set(rows.items())
    assert out.filter(out[REJECT].is_valid())["_doc_chunks"].to_pylist() == [0] * len(BAD)
    assert (max(rows.values()) > 1) == (chunking.mode != "none")


def test_warmup_batch_is_one_full_budget_of_full_windows(tiny_jina_model):
    import torch

    from model import load_encoder
    from pipeline.embed import warmup_batch

    enc = load_encoder(str(tiny_jina_model), device="cpu", dtype=torch.float32, max_batch_tokens=1024)
    seqs, tasks = warmup_batch(enc, 128, 1)
    assert len(seqs) == len(tasks) == 8 and all(len(s) == 128 for s in seqs)
    assert enc.embed_ids(seqs, tasks).shape == (8, enc.dim)  # the call the GPU actor makes at start


def test_each_window_gets_its_own_tokenizer_in_one_process(docs):
    """Workers cache tokenizers per process; a cache keyed without the window would truncate wrongly."""
    longest = {}
    for window in (64, 128, 64):
        prep, _ = _specs(ChunkingConfig(mode="none"), dims=(384,), dtype="float32", window=window)
        longest[window] = max(len(ids) for ids in prepare_batch(docs, prep)["_ids"].to_pylist())
    assert longest == {64: 64, 128: 128}


def test_freed_memory_goes_back_to_the_os_on_glibc():
    import platform

    from pipeline.embed import _libc, release_free_memory

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _libc() is not None  # otherwise long CPU jobs grow without bound (see release_free_memory)
    release_free_memory()
