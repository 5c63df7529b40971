"""Tiny random sentence-transformers directories (BERT, RoBERTa, XLM-R, MPNet), written by transformers.

The trunk is built and saved by transformers itself (`save_pretrained`, safetensors), so its checkpoint
names and position conventions are the library's, not ours. The tokenizer is the tiny XLM-R-like one
of `tiny_jina` for every architecture: the tokenizer is not what these directories test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_jina import DEFAULT_VOCAB_SIZE, _special_tokens_map, _tokenizer_config, tokenizer_json

ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "mpnet")
_POOLING_FLAGS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def make_tiny_st(
    path: Path, model_type: str, *, pooling: str = "mean", normalize: bool = True, max_seq_length: int = 96, seed: int = 0
) -> Path:
    """Write a tiny random sentence-transformers directory at `path` (trunk at the top level)."""
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(
        model_type, vocab_size=DEFAULT_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        type_vocab_size=1 if model_type != "bert" else 2,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    with torch.no_grad():  # random LayerNorm affine too, so a skipped or swapped norm cannot pass
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    model.save_pretrained(path, safe_serialization=True)

    (path / "tokenizer.json").write_text(tokenizer_json(DEFAULT_VOCAB_SIZE), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config()), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(_special_tokens_map()), encoding="utf-8")

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (path / "1_Pooling").mkdir(exist_ok=True)
    flags = {flag: name == pooling for name, flag in _POOLING_FLAGS.items()}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}), encoding="utf-8")
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}), encoding="utf-8"
    )
    return path
