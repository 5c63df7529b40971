"""Text -> token ids, with instruction prefixes, offsets and the late-chunking span arithmetic.

Loads only `tokenizer.json` (HF `tokenizers`, no model weights), so CPU preprocessing stages can
tokenize without holding an encoder. Offsets are reported relative to the caller's text: the task
instruction that is prepended to it is not part of any span.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

CharSpan = tuple[int, int]


@dataclass(frozen=True)
class TokenizedText:
    """One model input: ids with special tokens, and where the text's own tokens lie."""

    ids: np.ndarray  # (N,) int64, <s> prefix-tokens text-tokens </s>
    starts: np.ndarray  # (C,) char start in the text of each content token (leading spaces skipped)
    ends: np.ndarray  # (C,) char end in the text of each content token
    content_start: int  # index in `ids` of the first content token (C tokens follow)

    @property
    def content_stop(self) -> int:
        return self.content_start + len(self.starts)


class TextTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        instructions: Mapping[str | tuple[str, str], str] | None = None,
        lowercase: bool = False,
    ):
        self.max_length = max_length
        self.instructions = dict(instructions or {})
        self.lowercase = lowercase
        self._full = Tokenizer.from_str(tokenizer.to_str())
        self._full.no_truncation()
        self._full.no_padding()
        self._truncating = Tokenizer.from_str(self._full.to_str())
        self._truncating.enable_truncation(max_length)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a fast tokenizer (tokenizer.json) is required for offsets")
        return cls(Tokenizer.from_file(str(path)), **kwargs)

    def with_max_length(self, max_length: int) -> TextTokenizer:
        """The same tokenizer truncating at `max_length` (a pipeline's window may be below the model's)."""
        return TextTokenizer(self._full, max_length=max_length, instructions=self.instructions, lowercase=self.lowercase)

    def token_id(self, token: str) -> int | None:
        return self._full.token_to_id(token)

    def prefix(self, task: str | None, prompt: str | None = None) -> str:
        """The text put before an input: per task (jina-v3), or per (task, prompt) (jina-v4).

        Where prefixes depend on the prompt, leaving it out is an error rather than no prefix: a caller
        that knows only tasks would otherwise embed every text unprompted, silently.
        """
        if not task:
            return ""
        if prompt is None and any(isinstance(k, tuple) for k in self.instructions):
            prompts = sorted({k[1] for k in self.instructions if isinstance(k, tuple)})
            raise ValueError(f"this model's prefix depends on the prompt as well as the task: pass prompt= "
                             f"one of {', '.join(prompts)}")
        return self.instructions.get((task, prompt) if prompt else task, "")

    def _prepare(self, text: str, prefix: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        return (prefix + text).lower() if self.lowercase else prefix + text

    def encode(self, texts: Sequence[str], prefixes: Sequence[str]) -> list[np.ndarray]:
        """Token ids with special tokens, truncated at `max_length` (the model maximum)."""
        encs = self._truncating.encode_batch([self._prepare(t, p) for t, p in zip(texts, prefixes, strict=True)])
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def encode_with_offsets(
        self, texts: Sequence[str], prefixes: Sequence[str], *, truncate: bool = False
    ) -> list[TokenizedText]:
        """Whole documents (no truncation by default: long late chunking windows them later)."""
        tok = self._truncating if truncate else self._full
        encs = tok.encode_batch([self._prepare(t, p) for t, p in zip(texts, prefixes, strict=True)])
        out = []
        for text, prefix, enc in zip(texts, prefixes, encs, strict=True):
            full = prefix + text
            offsets = enc.offsets  # each attribute access builds a new list: read it once
            content = [
                i for i, ((s, e), special) in enumerate(zip(offsets, enc.special_tokens_mask, strict=True))
                if not special and e > len(prefix)
            ]
            starts, ends = [], []
            for i in content:
                s, e = offsets[i]
                s = max(s, len(prefix))
                while s < e - 1 and full[s].isspace():  # Metaspace tokens may own the space before them
                    s += 1
                starts.append(s - len(prefix))
                ends.append(e - len(prefix))
            if content and content != list(range(content[0], content[0] + len(content))):
                raise AssertionError("content tokens are not contiguous: this is a bug")
            out.append(
                TokenizedText(
                    ids=np.asarray(enc.ids, dtype=np.int64),
                    starts=np.asarray(starts, dtype=np.int64),
                    ends=np.asarray(ends, dtype=np.int64),
                    content_start=content[0] if content else 1,
                )
            )
        return out

    def content_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Char (starts, ends) of the text's tokens; what chunkers align their spans to."""
        tt = self.encode_with_offsets([text], [""])[0]
        return tt.starts, tt.ends


def token_spans(doc: TokenizedText, spans: Sequence[CharSpan]) -> np.ndarray:
    """Character spans of the text -> [start, end) token spans in the model input (late chunking).

    A token belongs to the span that contains its first character, so spans that tile the text
    share out its tokens exactly. Following jina's late-chunking rules (spec §6.3): a span that
    begins at the first content token also pools `<s>` and the instruction tokens, and a span that
    ends at the last content token also pools `</s>`. A span that covers no token start gets the
    token under its first character, so every span yields a vector.
    """
    n = len(doc.ids)
    first, stop = doc.content_start, doc.content_stop
    starts = doc.starts.tolist()
    out = np.empty((len(spans), 2), dtype=np.int64)
    for row, (cs, ce) in enumerate(spans):
        if not 0 <= cs <= ce:
            raise ValueError(f"span {(cs, ce)} is not a valid character span")
        if not starts:  # empty text: only special/instruction tokens to pool
            out[row] = (0, n)
            continue
        ts = first + bisect.bisect_left(starts, cs)
        te = first + bisect.bisect_left(starts, ce)
        if te <= ts:
            ts = first + max(bisect.bisect_right(starts, cs) - 1, 0)
            te = ts + 1
        if ts == first:
            ts = 0
        if te == stop:
            te = n
        out[row] = (ts, te)
    return out


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the document
    stop: int  # one past its last token
    keep_from: int  # outputs before this offset (within the window) are overlap and dropped


def long_windows(n_tokens: int, window: int, overlap: int) -> list[Window]:
    """Long late chunking (spec §6.5): windows of `window` tokens overlapping by `overlap`.

    The first window keeps all its outputs; later windows drop their first `overlap` outputs, so the
    kept parts tile [0, n_tokens) exactly. A window that would keep nothing is not run.
    """
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must satisfy 0 <= overlap < window, got overlap={overlap}, window={window}")
    if n_tokens <= window:
        return [Window(0, n_tokens, 0)]
    out = []
    for start in range(0, n_tokens, window - overlap):
        keep = 0 if start == 0 else overlap
        if start + keep >= n_tokens:
            break
        out.append(Window(start, min(start + window, n_tokens), keep))
    return out
