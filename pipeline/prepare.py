"""Prepare stage (CPU tasks): documents -> encoding units with token ids and chunk spans.

Runs as plain Ray tasks beside the encoder actors, so tokenization of block N+1 overlaps the
encoding of block N. Bad rows are not dropped: they leave this stage with `_reject_reason` set and
are reported by the writer. Text and title values from a binary column are decoded here as UTF-8, row by
row; one that is not UTF-8 is such a row (`INVALID_UTF8`). Units are:
- chunking none: one per document (truncated at the window, recorded in `_truncated`);
- naive chunking: one per chunk, each chunk text encoded on its own;
- late chunking: one per document, whole (no truncation), with the token spans of its chunks.
Every unit carries `_doc_chunks`, its document's chunk count in any mode, so a writer can tell when
all of a document's chunk rows have arrived.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model import TextTokenizer, chunk_spans, token_spans
from model.tokenization import CharSpan
from pipeline.config import ChunkingConfig, SourceConfig
from pipeline.dedup import DUPLICATE, duplicates
from pipeline.diff import UNCHANGED, LookupSpec, statuses
from pipeline.images import Fetch, fetcher, image_bytes
from pipeline.read import FILE_ROWS, SOURCE_FILE, SOURCE_ROW
from pipeline.storage import StorageConfig

# Internal columns (prefix "_") travel with the rows and are summed or dropped by the writer.
IDS = "_ids"  # list<int32> model input token ids of the unit
CHAR_SPANS = "_char_spans"  # list<int32> flat [s0, e0, s1, e1, ...] character spans into `text`
TOKEN_SPANS = "_token_spans"  # list<int32> flat token spans (late chunking only)
FIRST_CHUNK = "_first_chunk"  # int32 chunk index of the unit's first span
DOC_CHUNKS = "_doc_chunks"  # int32 chunks of the unit's document (0 if rejected): how many rows make it whole
SOURCE_ROWS = "_source_rows"  # stat: the footer row counts of the files a batch started (pipeline.read)
REJECT = "_reject_reason"  # null = accepted; otherwise why the row was not embedded
UNCHANGED_DOCS = "_unchanged_docs"  # stat: documents the table holds as they are (see `_Units.unchanged`)
STATUS = "_status"  # new | changed | unchanged against the table the run resumes or updates (pipeline.diff)
INVALID_UTF8 = "invalid utf-8"  # the reject reason of a binary text or title value that is not UTF-8
MODALITY = "modality"  # stored, in tables with an --image-column: "text" or "image", which a row's vectors embed
IMAGE = "_image"  # binary: an image unit's encoded image (pipeline.images), decoded by the encoder actor


@dataclass(frozen=True)
class PrepareSpec:
    """Everything the prepare stage needs; small and picklable."""

    source: SourceConfig
    chunking: ChunkingConfig
    model: str
    task: str | None
    window: int  # tokens per model window (model maximum or --max-length)
    prompt: str | None = None  # jina-v4's query | passage (its prefix depends on it as well as on the task)
    storage_options: tuple[tuple[str, str], ...] = ()
    revision: str | None = None  # the driver's content hash: workers need not hash the weights again
    image_storage: StorageConfig | None = None  # reads an --image-column's paths/URLs (the job's storage options)
    # The driver's tokenizer in Ray's object store: workers then import neither torch nor
    # transformers (seconds of CPU per worker, taken from the encoder beside them on small nodes).
    tokenizer_ref: object | None = None
    lookup: LookupSpec | None = None  # the table version to diff against (resume, reembed); None: all new
    ids_index: LookupSpec | None = None  # the run's (id, file, row) index (pipeline.dedup); None: ids unchecked


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


def content_hash(text: str, image: bytes | None = None) -> str:
    """What decides whether a document changed: its text, and its image's bytes when it has one."""
    h = hashlib.sha256(text.encode("utf-8"))
    if image is not None:
        h.update(b"\0image\0")
        h.update(image)
    return h.hexdigest()


def embedded_text(text: str, title: str | None) -> str:
    return f"{title} {text}" if title else text


def _decoded(value):
    """A text or title value as a string: a binary column's bytes decoded as UTF-8. Bytes that are not
    UTF-8 stay bytes, for `_reject_reason` to reject."""
    if isinstance(value, bytes):
        with contextlib.suppress(UnicodeDecodeError):
            return value.decode("utf-8")
    return value


def _reject_reason(doc_id, text, title=None) -> str | None:
    """Why a row (its values `_decoded`) is not embedded, or None."""
    if doc_id is None:
        return "missing id"
    if text is None:
        return "missing text"
    if isinstance(text, bytes) or isinstance(title, bytes):
        return INVALID_UTF8
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string"
    if not text.strip():
        return "empty text"
    return None


@dataclass(frozen=True)
class _Doc:
    """An accepted document: its row in the input batch, its id and the text the model embeds."""

    row: int
    id: str
    text: str
    content_hash: str
    status: str | None = None  # pipeline.diff: new or changed (unchanged documents become no unit)
    image: bytes | None = None  # an image document's encoded image (text "" when it has no text)


class _Units:
    """Unit rows accumulated column by column; `table()` puts them back in input order."""

    TYPES = {
        "id": pa.string(),
        "text": pa.string(),
        "content_hash": pa.string(),
        IDS: pa.list_(pa.int32()),
        CHAR_SPANS: pa.list_(pa.int32()),
        TOKEN_SPANS: pa.list_(pa.int32()),
        FIRST_CHUNK: pa.int32(),
        DOC_CHUNKS: pa.int32(),
        REJECT: pa.string(),
        STATUS: pa.string(),
        "_docs": pa.int64(),  # 1 on a document's first unit: sums to the documents embedded
        "_truncated": pa.int64(),
        UNCHANGED_DOCS: pa.int64(),
    }

    IMAGE_TYPES = {MODALITY: pa.string(), IMAGE: pa.binary()}  # with an --image-column only

    def __init__(self, images: bool = False) -> None:
        self.types = {**self.TYPES, **(self.IMAGE_TYPES if images else {})}
        self.columns: dict[str, list] = {name: [] for name in self.types}
        self.rows: list[int] = []  # each unit's row in the input batch
        self._unchanged_at: int | None = None  # the row counting this batch's unchanged documents

    def add(self, doc: _Doc, ids: list[int], spans: Sequence[CharSpan], *, tspans: list[int] | None = None,
            first_chunk: int = 0, doc_chunks: int | None = None, truncated: int = 0) -> None:
        """One unit of `doc` covering its chunks `spans`; `doc_chunks` defaults to their count."""
        self._append(doc.row, {
            "id": doc.id, "text": doc.text, "content_hash": doc.content_hash, IDS: ids,
            CHAR_SPANS: [x for span in spans for x in span], TOKEN_SPANS: tspans or [],
            FIRST_CHUNK: first_chunk, DOC_CHUNKS: len(spans) if doc_chunks is None else doc_chunks, REJECT: None,
            STATUS: doc.status, "_docs": int(first_chunk == 0), "_truncated": truncated, UNCHANGED_DOCS: 0,
            MODALITY: "text", IMAGE: None,
        })

    def add_image(self, doc: _Doc, first_chunk: int) -> None:
        """The image row of `doc`, after its `first_chunk` text chunks (0 for an image document)."""
        self._append(doc.row, {
            "id": doc.id, "text": "", "content_hash": doc.content_hash, IDS: [], CHAR_SPANS: [0, 0], TOKEN_SPANS: [],
            FIRST_CHUNK: first_chunk, DOC_CHUNKS: first_chunk + 1, REJECT: None, STATUS: doc.status,
            "_docs": int(first_chunk == 0), "_truncated": 0, UNCHANGED_DOCS: 0, MODALITY: "image", IMAGE: doc.image,
        })

    def count_images(self, rows: set[int]) -> None:
        """Documents of these input rows have an image row too: their text units count it in `DOC_CHUNKS`."""
        for i, (row, modality) in enumerate(zip(self.rows, self.columns[MODALITY], strict=True)):
            if row in rows and modality == "text" and self.columns[REJECT][i] is None:
                self.columns[DOC_CHUNKS][i] += 1

    def unchanged(self, doc: _Doc) -> None:
        """A document the table already holds as it is: never tokenized or embedded, only counted. A
        batch's unchanged documents share ONE row (the first's, `UNCHANGED_DOCS` = how many), so the
        encoder's batches are made of documents to embed (measured: one row each cost a 10%-changed
        re-embed 40% of its encoder throughput, 13.6k against 22.7k tokens/s)."""
        if self._unchanged_at is not None:
            self.columns[UNCHANGED_DOCS][self._unchanged_at] += 1
            return
        self._unchanged_at = len(self.rows)
        self._append(doc.row, {
            "id": doc.id, "text": None, "content_hash": doc.content_hash, IDS: [], CHAR_SPANS: [], TOKEN_SPANS: [],
            FIRST_CHUNK: 0, DOC_CHUNKS: 0, REJECT: None, STATUS: UNCHANGED, "_docs": 0, "_truncated": 0,
            UNCHANGED_DOCS: 1, MODALITY: None, IMAGE: None,
        })

    def reject(self, row: int, doc_id, text, reason: str) -> None:
        text = text if isinstance(text, str) else None
        self._append(row, {
            "id": None if doc_id is None else str(doc_id), "text": text,
            "content_hash": None if text is None else content_hash(text), IDS: [], CHAR_SPANS: [], TOKEN_SPANS: [],
            FIRST_CHUNK: 0, DOC_CHUNKS: 0, REJECT: reason, STATUS: None, "_docs": 0, "_truncated": 0, UNCHANGED_DOCS: 0,
            MODALITY: None, IMAGE: None,
        })

    def _append(self, row: int, values: dict[str, object]) -> None:
        self.rows.append(row)
        for name, column in self.columns.items():
            column.append(values[name])

    def table(self, kept: dict[str, pa.ChunkedArray]) -> pa.Table:
        order = np.argsort(np.asarray(self.rows, dtype=np.int64), kind="stable")  # a document's units stay in order
        out = {name: pa.array(self.columns[name], t).take(order) for name, t in self.types.items()}
        rows = pa.array(np.asarray(self.rows, dtype=np.int64)[order])
        for name, col in kept.items():
            out[name] = col.take(rows)
        return pa.table(out)


def _spans(tok: TextTokenizer, text: str, ch: ChunkingConfig) -> list[CharSpan]:
    return chunk_spans(tok, text, ch.mode, chunk_tokens=ch.chunk_tokens, chunk_sentences=ch.chunk_sentences)


def _whole_units(docs: Sequence[_Doc], tok: TextTokenizer, prefix: str, ch: ChunkingConfig, units: _Units) -> None:
    """Chunking none: one unit per document, truncated at the window (recorded in `_truncated`)."""
    encoded = tok.encode([d.text for d in docs], [prefix] * len(docs))  # one batched call (parallel in Rust)
    for doc, ids in zip(docs, encoded, strict=True):
        end, truncated = len(doc.text), 0
        if len(ids) >= tok.max_length:  # maybe cut at the window: find where, for `end`
            untruncated = len(tok.encode_with_offsets([doc.text], [prefix])[0].ids)
            if untruncated > len(ids):
                truncated = 1
                end = int(tok.encode_with_offsets([doc.text], [prefix], truncate=True)[0].ends[-1])
        units.add(doc, ids.tolist(), [(0, end)], truncated=truncated)


def _naive_units(docs: Sequence[_Doc], tok: TextTokenizer, prefix: str, ch: ChunkingConfig, units: _Units) -> None:
    """Naive chunking: one unit per chunk, each chunk's text encoded on its own."""
    for doc in docs:
        spans = _spans(tok, doc.text, ch)
        chunk_ids = tok.encode([doc.text[s:e] for s, e in spans], [prefix] * len(spans))
        for c, (span, ids) in enumerate(zip(spans, chunk_ids, strict=True)):
            units.add(doc, ids.tolist(), [span], first_chunk=c, doc_chunks=len(spans))


def _late_units(docs: Sequence[_Doc], tok: TextTokenizer, prefix: str, ch: ChunkingConfig, units: _Units) -> None:
    """Late chunking: one unit per document, whole (long late chunking windows it), with its chunks' token spans."""
    for doc in docs:
        spans = _spans(tok, doc.text, ch)
        encoded = tok.encode_with_offsets([doc.text], [prefix])[0]
        units.add(doc, encoded.ids.tolist(), spans, tspans=token_spans(encoded, spans).ravel().tolist())


UnitBuilder = Callable[[Sequence[_Doc], TextTokenizer, str, ChunkingConfig, _Units], None]


def _units_for(ch: ChunkingConfig) -> UnitBuilder:
    """The unit builder of a chunking mode (the one dispatch on it)."""
    if ch.mode == "none":
        return _whole_units
    return _late_units if ch.late else _naive_units


def _image_document(doc_id, text, title, image, fetch: Fetch) -> tuple[str | None, str, bytes | None]:
    """(reject reason, embedded text, image bytes) of a row of a source with an --image-column.

    A row without an image follows the text rules. With one, the image must be readable and decode whole
    (else the row is rejected, text and all: a document is embedded whole or not at all); missing or blank
    text then makes it an image document.
    """
    if image is None or doc_id is None:
        reason = _reject_reason(doc_id, text, title)
        if reason is not None:
            return ("missing text and image" if reason == "missing text" else reason), "", None
        return None, embedded_text(text, title), None
    data, reason = image_bytes(image, fetch)
    if reason is not None:
        return reason, "", None
    if isinstance(text, bytes) or isinstance(title, bytes):
        return INVALID_UTF8, "", None
    if text is not None and not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string", "", None
    return None, embedded_text(text, title) if text and text.strip() else "", data


def prepare_units(batch: pa.Table, *, source: SourceConfig, chunking: ChunkingConfig, tokenizer: TextTokenizer,
                  task: str | None, lookup: LookupSpec | None = None, ids_index: LookupSpec | None = None,
                  fetch: Fetch | None = None, prompt: str | None = None) -> pa.Table:
    """Documents -> units, one row per unit in input order, kept and provenance columns along; no timing column.

    `tokenizer` truncates at the job's window. The dry-run estimate (`pipeline.plan`) calls this too,
    so its token counts are the stage's own. With `lookup`, documents the table holds unchanged cost
    only their hash; with `ids_index` (`pipeline.dedup`), later occurrences of an id are rejected.
    With an `--image-column`, `fetch` reads its paths/URLs, and a document's image is a unit after its text's.
    """
    ids = batch.column(source.id_column).to_pylist()
    texts = batch.column(source.text_column).to_pylist()
    titles = batch.column(source.title_column).to_pylist() if source.title_column else [None] * len(texts)
    images = batch.column(source.image_column).to_pylist() if source.image_column else None
    fetch = fetch or fetcher(None)
    units, docs = _Units(images=images is not None), []
    for row, (doc_id, raw_text, raw_title) in enumerate(zip(ids, texts, titles, strict=True)):
        text, title = _decoded(raw_text), _decoded(raw_title)
        if images is not None:
            reason, embedded, image = _image_document(doc_id, text, title, images[row], fetch)
        else:
            reason, image = _reject_reason(doc_id, text, title), None
            embedded = None if reason else embedded_text(text, title)
        if reason is not None:
            units.reject(row, doc_id, text, reason)
            continue
        docs.append(_Doc(row, str(doc_id), embedded, content_hash(embedded, image), image=image))
    if ids_index is not None:
        rows = [d.row for d in docs]
        files, positions = batch[SOURCE_FILE].take(rows).to_pylist(), batch[SOURCE_ROW].take(rows).to_pylist()
        repeated = duplicates(ids_index, [d.id for d in docs], files, positions)
        for d in (d for d, dup in zip(docs, repeated, strict=True) if dup):
            units.reject(d.row, d.id, d.text, DUPLICATE)
        docs = [d for d, dup in zip(docs, repeated, strict=True) if not dup]
    found = statuses(lookup, [d.id for d in docs], [d.content_hash for d in docs])
    docs = [dataclasses.replace(d, status=st) for d, st in zip(docs, found, strict=True)]
    for d in docs:
        if d.status == UNCHANGED:
            units.unchanged(d)
    todo = [d for d in docs if d.status != UNCHANGED]
    prefix = tokenizer.prefix(task, prompt) if prompt else tokenizer.prefix(task)
    _units_for(chunking)([d for d in todo if d.text], tokenizer, prefix, chunking, units)
    if images is not None:
        chunks: Counter[int] = Counter()  # text chunks per input row: the image row's chunk number
        for r, m, spans in zip(units.rows, units.columns[MODALITY], units.columns[CHAR_SPANS], strict=True):
            chunks[r] += len(spans) // 2 if m == "text" else 0
        for d in (d for d in todo if d.image is not None):
            units.add_image(d, first_chunk=chunks[d.row])
        units.count_images({d.row for d in todo if d.image is not None and d.text})
    carried = [*source.keep_columns, *(c for c in (SOURCE_FILE, SOURCE_ROW) if c in batch.column_names)]
    return units.table({c: batch.column(c) for c in carried})


def prepare_batch(batch: pa.Table, spec: PrepareSpec) -> pa.Table:
    """The stage: `prepare_units` with the worker's tokenizer, and its time on the first row (`_prepare_s`)."""
    t0 = time.perf_counter()
    out = prepare_units(batch, source=spec.source, chunking=spec.chunking, tokenizer=_tokenizer(spec), task=spec.task,
                        lookup=spec.lookup, ids_index=spec.ids_index, fetch=fetcher(spec.image_storage), prompt=spec.prompt)
    seconds, source_rows = np.zeros(out.num_rows), np.zeros(out.num_rows, np.int64)
    if out.num_rows:
        seconds[0] = time.perf_counter() - t0
        # The files' footer row counts travel as a stat: the run reconciles what it read against them.
        source_rows[0] = pc.sum(batch[FILE_ROWS]).as_py() or 0 if FILE_ROWS in batch.column_names else 0
    out = out.append_column("_prepare_s", pa.array(seconds, pa.float64()))
    return out.append_column(SOURCE_ROWS, pa.array(source_rows, pa.int64()))
