"""Prepare stage (CPU tasks): documents -> encoding units with token ids and chunk spans.

Runs as plain Ray tasks beside the encoder actors, so tokenization of block N+1 overlaps the
encoding of block N. Bad rows are not dropped: they leave this stage with `_reject_reason` set and
are reported by the writer. Units are:
- chunking none: one per document (truncated at the window, recorded in `_truncated`);
- naive chunking: one per chunk, each chunk text encoded on its own;
- late chunking: one per document, whole (no truncation), with the token spans of its chunks.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from model import TextTokenizer, chunk_spans, token_spans
from pipeline.config import ChunkingConfig, SourceConfig
from pipeline.diff import UNCHANGED, LookupSpec, statuses

# Internal columns (prefix "_") travel with the rows and are summed or dropped by the writer.
IDS = "_ids"  # list<int32> model input token ids of the unit
CHAR_SPANS = "_char_spans"  # list<int32> flat [s0, e0, s1, e1, ...] character spans into `text`
TOKEN_SPANS = "_token_spans"  # list<int32> flat token spans (late chunking only)
FIRST_CHUNK = "_first_chunk"  # int32 chunk index of the unit's first span
REJECT = "_reject_reason"  # null = accepted; otherwise why the row was not embedded
STATUS = "_status"  # new | changed | unchanged against the table the run resumes or updates (null: new)
DOC_CHUNKS = "_doc_chunks"  # int32 chunks of the row's document: the committer keeps documents whole


@dataclass(frozen=True)
class PrepareSpec:
    """Everything the prepare stage needs; small and picklable."""

    source: SourceConfig
    chunking: ChunkingConfig
    model: str
    task: str | None
    window: int  # tokens per model window (model maximum or --max-length)
    storage_options: tuple[tuple[str, str], ...] = ()
    revision: str | None = None  # the driver's content hash: workers need not hash the weights again
    # The driver's tokenizer in Ray's object store: workers then import neither torch nor
    # transformers (seconds of CPU per worker, taken from the encoder beside them on small nodes).
    tokenizer_ref: object | None = None
    lookup: LookupSpec | None = None  # the table version to diff against (resume, reembed); None: all new


_TOKENIZERS: dict[object, TextTokenizer] = {}  # one per worker process: Ray reuses workers across tasks


def _tokenizer(spec: PrepareSpec) -> TextTokenizer:
    source = spec.tokenizer_ref.hex() if spec.tokenizer_ref is not None else (spec.model, spec.storage_options)
    key = (source, spec.window)
    if key not in _TOKENIZERS:
        if spec.tokenizer_ref is not None:
            import ray

            tok = ray.get(spec.tokenizer_ref)
        else:  # called without Ray (tests, tools): describe the model here
            from model.loading import describe_model

            tok = describe_model(spec.model, storage_options=dict(spec.storage_options), revision=spec.revision).tokenizer
        _TOKENIZERS[key] = tok.with_max_length(spec.window)
    return _TOKENIZERS[key]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embedded_text(text: str, title: str | None) -> str:
    return f"{title} {text}" if title else text


def _reject_reason(doc_id, text) -> str | None:
    if doc_id is None:
        return "missing id"
    if text is None:
        return "missing text"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string"
    if not text.strip():
        return "empty text"
    return None


def prepare_batch(batch: pa.Table, spec: PrepareSpec) -> pa.Table:
    t0 = time.perf_counter()
    src, ch = spec.source, spec.chunking
    tok = _tokenizer(spec)
    prefix = tok.prefix(spec.task)
    ids_col = batch.column(src.id_column).to_pylist()
    texts = batch.column(src.text_column).to_pylist()
    titles = batch.column(src.title_column).to_pylist() if src.title_column else [None] * len(texts)
    kept = {c: batch.column(c) for c in src.keep_columns}

    rows: dict[str, list] = {k: [] for k in ("id", "text", "content_hash", IDS, CHAR_SPANS, TOKEN_SPANS,
                                             FIRST_CHUNK, REJECT, "_docs", "_truncated", "_source_row",
                                             STATUS, DOC_CHUNKS)}
    reasons = [_reject_reason(d, t) for d, t in zip(ids_col, texts, strict=True)]
    hashes = [content_hash(embedded_text(t, ti)) if r is None else None
              for t, ti, r in zip(texts, titles, reasons, strict=True)]
    status = statuses(spec.lookup, [None if d is None else str(d) for d in ids_col], hashes)
    doc_chunks = 0

    def emit(i, doc_id, text, ids, char_spans, tspans, first_chunk, reject, docs, truncated):
        rows["id"].append(None if doc_id is None else str(doc_id))
        rows["text"].append(text)
        rows["content_hash"].append(hashes[i] if hashes[i] is not None else content_hash(text) if text is not None else None)
        rows[STATUS].append(status[i])
        rows[DOC_CHUNKS].append(doc_chunks)
        rows[IDS].append(ids)
        rows[CHAR_SPANS].append(char_spans)
        rows[TOKEN_SPANS].append(tspans)
        rows[FIRST_CHUNK].append(first_chunk)
        rows[REJECT].append(reject)
        rows["_docs"].append(docs)
        rows["_truncated"].append(truncated)
        rows["_source_row"].append(i)

    whole: dict[int, list[int]] = {}
    if ch.mode == "none":  # one batched tokenizer call (parallel in Rust) instead of one per document
        ok = [i for i, r in enumerate(reasons) if r is None and status[i] != UNCHANGED]
        encoded = tok.encode([embedded_text(texts[i], titles[i]) for i in ok], [prefix] * len(ok))
        whole = {i: ids.tolist() for i, ids in zip(ok, encoded, strict=True)}

    for i, (doc_id, raw, title) in enumerate(zip(ids_col, texts, titles, strict=True)):
        doc_chunks = 0
        if reasons[i] is not None:
            emit(i, doc_id, raw if isinstance(raw, str) else None, [], [], [], 0, reasons[i], 0, 0)
            continue
        if status[i] == UNCHANGED:  # already in the table as it is: counted by the writer, not embedded
            emit(i, doc_id, None, [], [], [], 0, None, 0, 0)
            continue
        text = embedded_text(raw, title)
        if ch.mode == "none":
            doc_chunks = 1
            end, truncated = len(text), 0
            if len(whole[i]) >= tok.max_length:  # maybe cut at the window: find where, for `end`
                untruncated = len(tok.encode_with_offsets([text], [prefix])[0].ids)
                if untruncated > len(whole[i]):
                    truncated = 1
                    end = int(tok.encode_with_offsets([text], [prefix], truncate=True)[0].ends[-1])
            emit(i, doc_id, text, whole[i], [0, end], [], 0, None, 1, truncated)
            continue
        spans = chunk_spans(tok, text, ch.mode, chunk_tokens=ch.chunk_tokens, chunk_sentences=ch.chunk_sentences)
        doc_chunks = len(spans)
        if ch.late:
            doc = tok.encode_with_offsets([text], [prefix])[0]  # whole: long late chunking windows it
            tspans = token_spans(doc, spans)
            emit(i, doc_id, text, doc.ids.tolist(), np.ravel(spans).tolist(), tspans.ravel().tolist(), 0, None, 1, 0)
            continue
        chunk_ids = tok.encode([text[s:e] for s, e in spans], [prefix] * len(spans))
        for c, ((s, e), ids) in enumerate(zip(spans, chunk_ids, strict=True)):
            emit(i, doc_id, text, ids.tolist(), [s, e], [], c, None, int(c == 0), 0)

    n = len(rows["id"])
    source_rows = pa.array(rows.pop("_source_row"), pa.int64())
    out = {
        "id": pa.array(rows["id"], pa.string()),
        "text": pa.array(rows["text"], pa.string()),
        "content_hash": pa.array(rows["content_hash"], pa.string()),
        IDS: pa.array(rows[IDS], pa.list_(pa.int32())),
        CHAR_SPANS: pa.array(rows[CHAR_SPANS], pa.list_(pa.int32())),
        TOKEN_SPANS: pa.array(rows[TOKEN_SPANS], pa.list_(pa.int32())),
        FIRST_CHUNK: pa.array(rows[FIRST_CHUNK], pa.int32()),
        REJECT: pa.array(rows[REJECT], pa.string()),
        "_docs": pa.array(rows["_docs"], pa.int64()),
        "_truncated": pa.array(rows["_truncated"], pa.int64()),
        STATUS: pa.array(rows[STATUS], pa.string()),
        DOC_CHUNKS: pa.array(rows[DOC_CHUNKS], pa.int32()),
    }
    for name, col in kept.items():
        out[name] = col.take(source_rows) if n else col.slice(0, 0)
    seconds = np.zeros(n)
    if n:
        seconds[0] = time.perf_counter() - t0
    out["_prepare_s"] = pa.array(seconds, pa.float64())
    return pa.table(out)
