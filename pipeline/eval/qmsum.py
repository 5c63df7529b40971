"""QMSum late-chunking study: naive vs late vs long late chunking of meeting transcripts.

Documents are whole QMSum meeting transcripts ("Speaker: content" per turn, turns joined by "\\n"),
cut into chunks of N turns or N tokens. A chunk is relevant to a specific query when its turns
overlap one of the query's `relevant_text_span` turn ranges (inclusive bounds, 0-based turns).
Every query ranks the chunks of all loaded meetings; nDCG@10 / recall@10 / MRR@10 are chunk-level.

Methods, all with one encoder, queries embedded normally with the model's query task:
* naive: each chunk encoded on its own (truncated at the model maximum if longer);
* late: `encode_spans` over the whole transcript with the default window (the model maximum: 256
  tokens for MiniLM) and overlap (min(512, window // 4)). Transcripts run to ~10k tokens, so this
  already is long late chunking (spec §6.5), not the single-pass late chunking of spec §6.1;
* long late w/o: the same with explicit window / overlap settings.
Runs in-process (no Ray): `embedlake eval qmsum --model <dir> --limit 3`.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import Encoder, TextTokenizer, fixed_token_spans
from pipeline.eval.retrieval import score_run

CharSpan = tuple[int, int]
STUDY_METRICS = (("ndcg", 10), ("recall", 10), ("mrr", 10))


@dataclass(frozen=True)
class Meeting:
    name: str
    text: str
    turns: tuple[CharSpan, ...]  # character span of each turn in `text`
    queries: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]  # (query, inclusive turn ranges)


@dataclass(frozen=True)
class Chunk:
    start: int  # character span in the transcript
    end: int
    first_turn: int  # turns the span overlaps, inclusive
    last_turn: int


@dataclass(frozen=True)
class LateSetting:
    window: int | None  # tokens per window; None = the model maximum
    overlap: int | None  # None = the encoder default, min(512, window // 4)

    @property
    def label(self) -> str:
        if self.window is None and self.overlap is None:
            return "late"
        return f"long late w{self.window or 'max'}/o{self.overlap if self.overlap is not None else 'default'}"


@dataclass(frozen=True)
class StudyConfig:
    data: str  # QMSum jsonl split
    limit: int | None = 3  # meetings, in file order
    chunk_turns: int | None = None  # chunk = this many turns ...
    chunk_tokens: int | None = 128  # ... or this many tokens (exactly one is set)
    long_late: tuple[tuple[int, int], ...] = ((256, 128), (128, 32))  # explicit (window, overlap) runs

    def validate(self) -> None:
        if (self.chunk_turns is None) == (self.chunk_tokens is None):
            raise ValueError("set exactly one of chunk_turns and chunk_tokens")
        if (self.chunk_turns or self.chunk_tokens or 0) < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_turns or self.chunk_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        for window, overlap in self.long_late:
            if not 0 <= overlap < window:
                raise ValueError(f"long late setting needs 0 <= overlap < window, got window={window} overlap={overlap}")

    @property
    def chunking(self) -> str:
        return f"{self.chunk_turns} turns" if self.chunk_turns else f"{self.chunk_tokens} tokens"


# -- data -----------------------------------------------------------------------------------------


def parse_meeting(name: str, row: dict) -> Meeting:
    """One QMSum row -> transcript text with turn spans, and its specific queries."""
    lines = [f"{t['speaker']}: {t['content']}" for t in row["meeting_transcripts"]]
    turns, pos = [], 0
    for line in lines:
        turns.append((pos, pos + len(line)))
        pos += len(line) + 1  # the "\n" between turns
    queries = tuple(
        (q["query"], tuple((int(a), int(b)) for a, b in q["relevant_text_span"]))
        for q in row.get("specific_query_list", [])
    )
    return Meeting(name=name, text="\n".join(lines), turns=tuple(turns), queries=queries)


def load_meetings(path: str | Path, limit: int | None = None) -> list[Meeting]:
    meetings = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if limit is not None and len(meetings) >= limit:
                break
            if line.strip():
                meetings.append(parse_meeting(f"m{n}", json.loads(line)))
    return meetings


# -- chunks and relevance -------------------------------------------------------------------------


def span_turns(turns: Sequence[CharSpan], start: int, end: int) -> tuple[int, int]:
    """Inclusive range of the turns that overlap the character span [start, end)."""
    first = bisect.bisect_right([e for _, e in turns], start)  # first turn ending after `start`
    last = bisect.bisect_left([s for s, _ in turns], end) - 1  # last turn starting before `end`
    if first > last:
        raise ValueError(f"span {(start, end)} overlaps no turn")
    return first, last


def turn_chunks(meeting: Meeting, turns_per_chunk: int) -> list[Chunk]:
    """Groups of `turns_per_chunk` consecutive turns (the last group shorter)."""
    out = []
    for a in range(0, len(meeting.turns), turns_per_chunk):
        b = min(a + turns_per_chunk, len(meeting.turns)) - 1
        out.append(Chunk(meeting.turns[a][0], meeting.turns[b][1], a, b))
    return out


def token_chunks(meeting: Meeting, tokenizer: TextTokenizer, tokens_per_chunk: int) -> list[Chunk]:
    """Fixed-size token chunks of the transcript, each tagged with the turns it overlaps."""
    return [Chunk(s, e, *span_turns(meeting.turns, s, e)) for s, e in fixed_token_spans(tokenizer, meeting.text, tokens_per_chunk)]


def relevant_chunks(chunks: Sequence[Chunk], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the chunks whose turn range overlaps any inclusive turn range in `spans`."""
    return [i for i, c in enumerate(chunks) if any(c.first_turn <= b and a <= c.last_turn for a, b in spans)]


# -- the study ------------------------------------------------------------------------------------


def naive_vectors(encoder: Encoder, meetings: Sequence[Meeting], chunks: Sequence[Sequence[Chunk]], task: str | None) -> np.ndarray:
    texts = [m.text[c.start : c.end] for m, cs in zip(meetings, chunks, strict=True) for c in cs]
    return encoder.encode(texts, task=task)


def late_vectors(encoder: Encoder, meetings: Sequence[Meeting], chunks: Sequence[Sequence[Chunk]], task: str | None,
                 setting: LateSetting) -> np.ndarray:
    spans = [[(c.start, c.end) for c in cs] for cs in chunks]
    out = encoder.encode_spans([m.text for m in meetings], spans, task=task, window=setting.window, overlap=setting.overlap)
    return np.concatenate(out)


def rank_chunks(query_vectors: np.ndarray, chunk_vectors: np.ndarray, ids: Sequence[str], k: int) -> list[list[str]]:
    """Top-k chunk ids per query by cosine (vectors are normalized); ties by chunk order."""
    scores = query_vectors @ chunk_vectors.T  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order]


def run_study(encoder: Encoder, cfg: StudyConfig) -> dict:
    """Chunk-level retrieval metrics of naive, late and long late chunking on QMSum specific queries."""
    cfg.validate()
    meetings = load_meetings(cfg.data, cfg.limit)
    if not meetings:
        raise ValueError(f"{cfg.data}: no meetings")
    chunks = [turn_chunks(m, cfg.chunk_turns) if cfg.chunk_turns else token_chunks(m, encoder.tokenizer, cfg.chunk_tokens)
              for m in meetings]
    ids = [f"{m.name}#{i}" for m, cs in zip(meetings, chunks, strict=True) for i in range(len(cs))]
    queries, qrels = [], {}
    for m, cs in zip(meetings, chunks, strict=True):
        for n, (text, spans) in enumerate(m.queries):
            qid = f"{m.name}/q{n}"
            queries.append((qid, text))
            qrels[qid] = {f"{m.name}#{i}": 1 for i in relevant_chunks(cs, spans)}
    doc_task, query_task = encoder.info.default_task, encoder.info.query_task
    query_vectors = encoder.encode([t for _, t in queries], task=query_task)
    k = max(k for _, k in STUDY_METRICS)

    prefix = encoder.tokenizer.prefix(doc_task)
    doc_tokens = [len(d.ids) for d in encoder.tokenizer.encode_with_offsets([m.text for m in meetings], [prefix] * len(meetings))]
    chunk_texts = [m.text[c.start : c.end] for m, cs in zip(meetings, chunks, strict=True) for c in cs]
    chunk_tokens = [len(d.ids) for d in encoder.tokenizer.encode_with_offsets(chunk_texts, [prefix] * len(chunk_texts))]

    methods: list[tuple[str, LateSetting | None]] = [("naive", None), ("late", LateSetting(None, None))]
    methods += [(s.label, s) for s in (LateSetting(w, o) for w, o in cfg.long_late)]
    rows = []
    for label, setting in methods:
        t0 = time.perf_counter()
        if setting is None:
            vectors = naive_vectors(encoder, meetings, chunks, doc_task)
        else:
            vectors = late_vectors(encoder, meetings, chunks, doc_task, setting)
        seconds = time.perf_counter() - t0
        run = dict(zip([q for q, _ in queries], rank_chunks(query_vectors, vectors, ids, k), strict=True))
        window = None if setting is None else setting.window or encoder.max_length
        overlap = None if setting is None else (min(512, window // 4) if setting.overlap is None else setting.overlap)
        rows.append({"method": label, "window": window, "overlap": overlap, **score_run(run, qrels, metrics=STUDY_METRICS),
                     "seconds": round(seconds, 2)})
    return {
        "model": encoder.info.identity,
        "data": str(cfg.data),
        "meetings": len(meetings),
        "queries": len(queries),
        "chunks": len(ids),
        "chunking": cfg.chunking,
        "relevant_chunks_per_query": round(float(np.mean([len(r) for r in qrels.values()])), 1),
        "model_max_length": encoder.max_length,
        "transcript_tokens": {"mean": round(float(np.mean(doc_tokens))), "max": max(doc_tokens)},
        "transcripts_over_window": sum(n > encoder.max_length for n in doc_tokens),
        "naive_chunks_truncated": sum(n > encoder.max_length for n in chunk_tokens),
        "methods": rows,
    }


__all__ = [
    "Chunk",
    "LateSetting",
    "Meeting",
    "StudyConfig",
    "late_vectors",
    "load_meetings",
    "naive_vectors",
    "parse_meeting",
    "rank_chunks",
    "relevant_chunks",
    "run_study",
    "span_turns",
    "token_chunks",
    "turn_chunks",
]
