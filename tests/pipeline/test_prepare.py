"""The prepare stage, column by column, for each chunking mode on a few documents with bad rows among them.

Expected units are composed here from the model's tokenizer and chunkers, so a change to how the stage
builds its rows shows as a difference in one named column of one row.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
from shared_data import minilm_dir, qmsum_transcripts, sts_sentences

from model import chunk_spans, describe_model, token_spans
from pipeline.config import ChunkingConfig, SourceConfig
from pipeline.prepare import PrepareSpec, content_hash, prepare_batch

WINDOW = 64  # below the long document's length, so chunking none truncates it
BAD = {1: (None, "no id here", "missing id"), 3: ("bad-null", None, "missing text"), 5: ("bad-blank", " \n", "empty text")}
MODES = {
    "none": ChunkingConfig(mode="none"),
    "naive": ChunkingConfig(mode="fixed", chunk_tokens=12, late=False),
    "late": ChunkingConfig(mode="sentences", chunk_sentences=1, late=True),
}
TYPES = {"_ids": pa.list_(pa.int32()), "_char_spans": pa.list_(pa.int32()), "_token_spans": pa.list_(pa.int32()),
         "_first_chunk": pa.int32(), "_doc_chunks": pa.int32(), "_docs": pa.int64(), "_truncated": pa.int64(),
         "_prepare_s": pa.float64()}


@pytest.fixture(scope="module")
def docs() -> pa.Table:
    """Short documents, one long one, a title on some, and the three kinds of bad rows."""
    sents = sts_sentences(12)
    good = [" ".join(sents[i : i + 3]) for i in range(0, 12, 3)] + [qmsum_transcripts(limit=1)[0][:1500]]
    rows = [(f"doc-{i}", text, f"title {i}" if i % 2 else None) for i, text in enumerate(good)]
    for pos, (doc_id, text, _) in BAD.items():
        rows.insert(pos, (doc_id, text, "a title"))
    ids, texts, titles = zip(*rows, strict=True)
    return pa.table({"id": ids, "text": texts, "title": titles, "lang": [f"l{i}" for i in range(len(rows))]})


@pytest.fixture(scope="module")
def tok():
    return describe_model(str(minilm_dir())).tokenizer.with_max_length(WINDOW)


def _unit(doc_id, text, lang, ids, spans, **extra) -> dict:
    row = {"id": doc_id, "text": text, "content_hash": content_hash(text), "_ids": [int(i) for i in ids],
           "_char_spans": [x for span in spans for x in span], "_token_spans": [], "_first_chunk": 0,
           "_doc_chunks": len(spans), "_reject_reason": None, "_status": "new", "_docs": 1, "_truncated": 0,
           "_unchanged_docs": 0,
           "lang": lang}
    return row | extra


def _expected(docs: pa.Table, mode: str, tok) -> list[dict]:
    ch = MODES[mode]
    out = []
    for pos, r in enumerate(docs.to_pylist()):
        if pos in BAD:
            text = r["text"]
            out.append({"id": r["id"], "text": text, "content_hash": None if text is None else content_hash(text), "_ids": [],
                        "_char_spans": [], "_token_spans": [], "_first_chunk": 0, "_doc_chunks": 0,
                        "_reject_reason": BAD[pos][2], "_status": None, "_docs": 0, "_truncated": 0,
                        "_unchanged_docs": 0,
                        "lang": r["lang"]})
            continue
        text = f"{r['title']} {r['text']}" if r["title"] else r["text"]
        whole = tok.encode_with_offsets([text], [""])[0]  # untruncated, with the content tokens' offsets
        if mode == "none":
            ids = tok.encode([text], [""])[0]
            kept = len(ids) - (len(whole.ids) - len(whole.ends))  # content tokens inside the window
            truncated = int(len(ids) < len(whole.ids))
            end = int(whole.ends[kept - 1]) if truncated else len(text)
            out.append(_unit(r["id"], text, r["lang"], ids, [(0, end)], _truncated=truncated))
            continue
        spans = chunk_spans(tok, text, ch.mode, chunk_tokens=ch.chunk_tokens, chunk_sentences=ch.chunk_sentences)
        if mode == "late":
            tspans = token_spans(whole, spans).ravel().tolist()
            out.append(_unit(r["id"], text, r["lang"], whole.ids, spans, _token_spans=tspans))
            continue
        for c, span in enumerate(spans):
            ids = tok.encode([text[span[0] : span[1]]], [""])[0]
            out.append(_unit(r["id"], text, r["lang"], ids, [span], _first_chunk=c, _doc_chunks=len(spans),
                             _docs=int(c == 0)))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_units_column_by_column(docs, tok, mode):
    source = SourceConfig(input="unused", title_column="title", keep_columns=("lang",))
    spec = PrepareSpec(source=source, chunking=MODES[mode], model=str(minilm_dir()), task=None, window=WINDOW)
    units = prepare_batch(docs, spec)
    for name, t in TYPES.items():
        assert units.schema.field(name).type == t, name
    seconds = units["_prepare_s"].to_pylist()
    assert seconds[0] > 0 and not any(seconds[1:])  # the batch's time sits on its first row only
    want = _expected(docs, mode, tok)
    got = units.drop_columns(["_prepare_s", "_source_rows"]).to_pylist()
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == w, {k: (g[k], w[k]) for k in w if g[k] != w[k]}
    if mode == "none":
        assert sum(r["_truncated"] for r in got) == 1  # the long document
    else:
        assert max(r["_doc_chunks"] for r in got) > 1  # documents really were split


def test_no_rows_no_units(tok):
    source = SourceConfig(input="unused", keep_columns=("lang",))
    empty = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string()), "lang": pa.array([], pa.string())})
    for ch in MODES.values():
        units = prepare_batch(empty, PrepareSpec(source=source, chunking=ch, model=str(minilm_dir()), task=None, window=WINDOW))
        assert units.num_rows == 0 and "lang" in units.column_names and "_doc_chunks" in units.column_names


def test_documents_the_table_holds_unchanged_are_not_tokenized(docs, tmp_path):
    """With a lookup, documents whose id and hash the table holds are not tokenized: the batch's
    unchanged documents become ONE `unchanged` row that counts them; one whose hash differs is
    `changed` and fully prepared."""
    import lance

    from pipeline.diff import LookupSpec

    source = SourceConfig(input="unused", title_column="title", keep_columns=("lang",))
    spec = PrepareSpec(source=source, chunking=MODES["late"], model=str(minilm_dir()), task=None, window=WINDOW)
    fresh = prepare_batch(docs, spec).filter(pa.compute.is_null(pa.compute.field("_reject_reason")))
    first = fresh.slice(0, 3).to_pylist()
    table = pa.table({"id": [first[0]["id"], first[1]["id"], first[1]["id"], first[2]["id"]],
                      "chunk": pa.array([0, 0, 1, 0], pa.int32()),
                      "content_hash": [first[0]["content_hash"], "an older hash", "an older hash", first[2]["content_hash"]]})
    uri = str(tmp_path / "t.lance")
    version = lance.write_dataset(table, uri).version
    units = prepare_batch(docs, dataclasses.replace(spec, lookup=LookupSpec(uri, version))).drop_columns(["_prepare_s", "_source_rows"])
    accepted = [r for r in units.to_pylist() if r["_reject_reason"] is None]
    (same,) = [r for r in accepted if r["_status"] == "unchanged"]
    assert same["id"] == first[0]["id"] and same["_unchanged_docs"] == 2  # first[0] and first[2], one row
    assert same["_ids"] == [] and same["text"] is None and same["_docs"] == 0
    assert first[2]["id"] not in {r["id"] for r in accepted}
    (changed,) = [r for r in accepted if r["id"] == first[1]["id"]]
    assert changed["_status"] == "changed" and changed["_ids"] == first[1]["_ids"] and changed["_docs"] == 1
    others = {r["_status"] for r in accepted if r["id"] not in (first[0]["id"], first[1]["id"])}
    assert others == {"new"} and sum(r["_docs"] for r in accepted) == len(fresh) - 2


def test_bytes_are_decoded_as_utf8_and_invalid_utf8_is_rejected(docs):
    """Binary (and large_string) text and title columns give the units their string columns give; a binary
    text or title value that is not UTF-8 is rejected as `invalid utf-8`."""
    source = SourceConfig(input="unused", title_column="title", keep_columns=("lang",))
    spec = PrepareSpec(source=source, chunking=MODES["none"], model=str(minilm_dir()), task=None, window=WINDOW)
    want = prepare_batch(docs, spec).drop_columns(["_prepare_s", "_source_rows"]).to_pylist()
    for kind in (pa.large_string(), pa.binary(), pa.large_binary()):
        cast = docs
        for name in ("text", "title"):
            cast = cast.set_column(cast.schema.get_field_index(name), name, cast[name].cast(kind))
        assert prepare_batch(cast, spec).drop_columns(["_prepare_s", "_source_rows"]).to_pylist() == want, kind

    bad = pa.table({"id": ["ok", "bad-text", "bad-title", "blank"],
                    "text": pa.array(["café au lait".encode(), b"\xff\xfe not utf-8", b"fine text", b"  "], pa.binary()),
                    "title": pa.array([None, None, b"\xc3(", None], pa.large_binary()), "lang": ["a", "b", "c", "d"]})
    units = prepare_batch(bad, spec)
    assert units["_reject_reason"].to_pylist() == [None, "invalid utf-8", "invalid utf-8", "empty text"]
    assert units["text"].to_pylist() == ["café au lait", None, "fine text", "  "]  # undecodable bytes are not kept
    assert units["id"].to_pylist() == ["ok", "bad-text", "bad-title", "blank"]


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (28, 56, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("mode", MODES)
def test_image_rows_text_rows_and_rows_with_both(mode, tok, tmp_path):
    """An image alone is an image document; text and image make text chunk rows then one image row, all counting
    in the document's `_doc_chunks`; a bad image rejects its row, text and all (issue #15)."""
    from pipeline.prepare import prepare_units

    png = _png(0)
    (tmp_path / "b.png").write_bytes(_png(1))
    text = " ".join(sts_sentences(3))
    batch = pa.table({
        "id": ["text-only", "image-only", "both", "bad-image", "neither", "blank-text-image"],
        "text": [text, None, text, text, None, "  "],
        "image": [None, png, png, b"GIF89a-nope", None, png],
    })
    paths = pa.table({"id": ["path", "missing"], "text": [None, None],
                      "image": [str(tmp_path / "b.png"), str(tmp_path / "missing.png")]})  # a string column
    source = SourceConfig(input="unused", image_column="image")
    units = [u for b in (batch, paths) for u in prepare_units(b, source=source, chunking=MODES[mode], tokenizer=tok,
                                                               task=None).to_pylist()]

    by_id: dict[str, list[dict]] = {}
    for u in units:
        by_id.setdefault(u["id"], []).append(u)
    text_chunks = sum(len(u["_char_spans"]) // 2 for u in by_id["text-only"])
    assert {u["modality"] for u in by_id["text-only"]} == {"text"}
    assert all(u["_doc_chunks"] == text_chunks for u in by_id["text-only"])
    assert by_id["text-only"][0]["content_hash"] == content_hash(text)

    for doc in ("image-only", "path", "blank-text-image"):
        (unit,) = by_id[doc]
        assert (unit["modality"], unit["_first_chunk"], unit["_doc_chunks"], unit["_docs"]) == ("image", 0, 1, 1)
        assert unit["_ids"] == [] and unit["text"] == "" and unit["_reject_reason"] is None
    assert by_id["path"][0]["_image"] == _png(1) and by_id["image-only"][0]["_image"] == png

    *texts, image = by_id["both"]
    assert [u["modality"] for u in texts] == ["text"] * len(texts) and image["modality"] == "image"
    assert sum(len(u["_char_spans"]) // 2 for u in texts) == text_chunks
    assert all(u["_doc_chunks"] == text_chunks + 1 for u in [*texts, image])
    assert image["_first_chunk"] == text_chunks and image["_docs"] == 0 and texts[0]["_docs"] == 1
    assert image["content_hash"] == content_hash(text, png) != content_hash(text)

    (bad,) = by_id["bad-image"]
    assert bad["_reject_reason"] == "undecodable image: not a PNG, JPEG or WebP file"
    (neither,) = by_id["neither"]
    assert neither["_reject_reason"] == "missing text and image"
    (missing,) = by_id["missing"]
    assert missing["_reject_reason"].startswith(f"unreadable image {tmp_path / 'missing.png'}: FileNotFoundError")
