"""Chunkers: text -> character spans aligned to token boundaries.

Spans are tight (first token's first character to last token's end), in order, non-overlapping,
and together cover every token of the text: nothing is dropped, unlike the reference sentence
chunker, which discards a one-token remainder (spec §6.2).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from model.tokenization import CharSpan, TextTokenizer

ChunkingMode = Literal["none", "fixed", "sentences"]

# Sentence terminators beyond English: ASCII, full-width and ideographic forms, and other scripts.
ASCII_TERMINATORS = frozenset(".!?")
WIDE_TERMINATORS = frozenset("。．｡！？‼⁇⁈⁉…؟۔।॥።፧።჻᙮")
_CLOSERS = "\"'”’»)]}）］｝」』】〕〉》"


def _group_spans(starts: np.ndarray, ends: np.ndarray, cuts: list[int]) -> list[CharSpan]:
    """Token groups [cuts[i], cuts[i+1]) -> character spans.

    A cut is only made where the next token starts at or after the previous one's end: SentencePiece
    emits a lone "▁" whose offsets repeat the next token's, and cutting between the two would make
    neighbouring spans share a character (and both tokens). Such a cut moves right to the next clean
    boundary.
    """
    clean = [0]
    for cut in cuts[1:-1]:
        while cut < len(starts) and starts[cut] < ends[cut - 1]:
            cut += 1
        if clean[-1] < cut < len(starts):
            clean.append(cut)
    clean.append(cuts[-1])
    return [(int(starts[a]), int(ends[b - 1])) for a, b in zip(clean[:-1], clean[1:], strict=True) if b > a]


def fixed_token_spans(tokenizer: TextTokenizer, text: str, chunk_tokens: int) -> list[CharSpan]:
    """Consecutive chunks of `chunk_tokens` tokens (the last one shorter)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    starts, ends = tokenizer.content_offsets(text)
    if len(starts) == 0:
        return [(0, len(text))]
    cuts = list(range(0, len(starts), chunk_tokens)) + [len(starts)]
    return _group_spans(starts, ends, cuts)


def _is_sentence_end(text: str, starts: np.ndarray, ends: np.ndarray, i: int) -> bool:
    piece = text[starts[i] : ends[i]].rstrip().rstrip(_CLOSERS)
    if not piece:
        return False
    last = piece[-1]
    if last in WIDE_TERMINATORS:
        return True  # scripts without spaces: the terminator alone closes the sentence
    if last not in ASCII_TERMINATORS:
        return False
    # ASCII punctuation ends a sentence only before a gap or at the end ("3.14", "e.g.x" do not).
    return i == len(starts) - 1 or ends[i] != starts[i + 1]


def sentence_spans(tokenizer: TextTokenizer, text: str, sentences_per_chunk: int) -> list[CharSpan]:
    """Chunks of `sentences_per_chunk` sentences; a trailing remainder is its own chunk."""
    if sentences_per_chunk < 1:
        raise ValueError(f"sentences_per_chunk must be >= 1, got {sentences_per_chunk}")
    starts, ends = tokenizer.content_offsets(text)
    if len(starts) == 0:
        return [(0, len(text))]
    cuts, seen = [0], 0
    for i in range(len(starts)):
        if _is_sentence_end(text, starts, ends, i):
            seen += 1
            if seen % sentences_per_chunk == 0 and i + 1 < len(starts):
                cuts.append(i + 1)
    cuts.append(len(starts))
    return _group_spans(starts, ends, cuts)


def chunk_spans(
    tokenizer: TextTokenizer, text: str, mode: ChunkingMode, *, chunk_tokens: int = 256, chunk_sentences: int = 5
) -> list[CharSpan]:
    if mode == "none":
        return [(0, len(text))]
    if mode == "fixed":
        return fixed_token_spans(tokenizer, text, chunk_tokens)
    if mode == "sentences":
        return sentence_spans(tokenizer, text, chunk_sentences)
    raise ValueError(f"unknown chunking mode {mode!r}; expected one of none, fixed, sentences")
