"""embedlake encoder library: pure PyTorch, no Ray. `load_encoder` is the entry point.

Tokenization and chunking are imported eagerly and need no torch: the pipeline's CPU preprocessing
workers use only them, and importing torch there would cost each worker a second or more of CPU.
Everything that needs torch is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from model.chunking import chunk_spans, fixed_token_spans, sentence_spans
from model.tokenization import TextTokenizer, long_windows, token_spans

if TYPE_CHECKING:
    from model.encoder import Encoder, EncoderInfo, EncodeStats
    from model.loading import (
        PRECISIONS,
        ModelDescription,
        describe_model,
        detect_family,
        load_encoder,
        resolve_dtype,
    )

_LAZY = {  # name -> module that defines it (imports torch)
    "Encoder": "model.encoder",
    "EncoderInfo": "model.encoder",
    "EncodeStats": "model.encoder",
    "PRECISIONS": "model.loading",
    "ModelDescription": "model.loading",
    "describe_model": "model.loading",
    "detect_family": "model.loading",
    "load_encoder": "model.loading",
    "resolve_dtype": "model.loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = [
    "PRECISIONS",
    "EncodeStats",
    "Encoder",
    "EncoderInfo",
    "ModelDescription",
    "TextTokenizer",
    "chunk_spans",
    "describe_model",
    "detect_family",
    "fixed_token_spans",
    "load_encoder",
    "long_windows",
    "resolve_dtype",
    "sentence_spans",
    "token_spans",
]
