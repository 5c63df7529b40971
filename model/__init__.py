"""embedlake encoder library: pure PyTorch, no Ray. `load_encoder` is the entry point."""

from model.chunking import chunk_spans, fixed_token_spans, sentence_spans
from model.encoder import Encoder, EncoderInfo, EncodeStats
from model.loading import (
    PRECISIONS,
    ModelDescription,
    describe_model,
    detect_family,
    load_encoder,
    resolve_dtype,
)
from model.tokenization import TextTokenizer, long_windows, token_spans

__all__ = [
    "PRECISIONS",
    "EncodeStats",
    "Encoder",
    "EncoderInfo",
    "TextTokenizer",
    "chunk_spans",
    "ModelDescription",
    "describe_model",
    "detect_family",
    "fixed_token_spans",
    "load_encoder",
    "long_windows",
    "resolve_dtype",
    "sentence_spans",
    "token_spans",
]
