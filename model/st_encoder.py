"""Sentence-transformers model directories (BERT, XLM-R, MPNet, ...).

BERT, RoBERTa and XLM-R trunks run natively (`bert.py`: padding-free on GPU with flash-attn, no
transformers import); other architectures (MPNet, DistilBERT, ...) run through transformers AutoModel.

Follows what the directory declares: modules.json (Transformer -> Pooling -> optional Normalize),
1_Pooling/config.json (pooling mode), sentence_bert_config.json (max_seq_length, do_lower_case),
config_sentence_transformers.json prompts (exposed as tasks: instruction prefixes, no adapters).
Modules it cannot reproduce exactly (Dense, custom code) are refused with a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model import attention
from model.attention import AttentionImpl
from model.bert import load_bert, native_config
from model.encoder import Encoder, EncoderInfo
from model.packing import pack, pad, pool_spans, unpad
from model.tokenization import TextTokenizer
from model.weights import safetensors_files

_POOLING_MODES = {  # 1_Pooling/config.json flag -> our name, in sentence-transformers' concat order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SUPPORTED_POOLING = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")
# Architectures whose positions start at padding_idx + 1, so the position table holds 2 fewer tokens.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")


def read_modules(path: Path) -> tuple[Path, list[str], bool]:
    """(transformer dir, pooling modes, normalize) from modules.json; refuses unknown modules."""
    modules = json.loads((path / "modules.json").read_text())
    transformer_dir, modes, normalize = None, ["mean"], False
    for m in modules:
        kind = m.get("type", "").rsplit(".", 1)[-1]
        where = path / m.get("path", "")
        if kind == "Transformer":
            transformer_dir = where
        elif kind == "Pooling":
            cfg = json.loads((where / "config.json").read_text())
            modes = [name for flag, name in _POOLING_MODES.items() if cfg.get(flag)]
            bad = [x for x in modes if x not in SUPPORTED_POOLING]
            if bad or not modes:
                raise ValueError(f"{path}: pooling {bad or modes} is not supported; supported: {SUPPORTED_POOLING}")
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(
                f"{path}: sentence-transformers module {m.get('type')!r} is not supported "
                "(supported: Transformer, Pooling, Normalize)"
            )
    if transformer_dir is None:
        raise ValueError(f"{path}: modules.json declares no Transformer module")
    return transformer_dir, modes, normalize


def describe_sentence_transformer(path: str | Path, *, revision: str, name: str) -> tuple[TextTokenizer, EncoderInfo]:
    """Tokenizer and model facts from the directory, without loading weights."""
    path = Path(path)
    tdir, modes, _ = read_modules(path)
    sbert = _read_json(tdir / "sentence_bert_config.json") or _read_json(path / "sentence_bert_config.json")
    config = _read_json(tdir / "config.json")
    if "hidden_size" not in config or "max_position_embeddings" not in config:  # e.g. DistilBERT's `dim`
        from transformers import AutoConfig

        auto = AutoConfig.from_pretrained(tdir, trust_remote_code=False)
        config = {"hidden_size": auto.hidden_size, "max_position_embeddings": getattr(auto, "max_position_embeddings", 512),
                  **config}
    positions = config["max_position_embeddings"]
    if config.get("model_type") in _OFFSET_POSITIONS:
        positions -= config.get("pad_token_id", 1) + 1
    max_length = min(sbert.get("max_seq_length") or positions, positions)
    prompts = _read_json(path / "config_sentence_transformers.json").get("prompts") or {}
    prompts = {k: v for k, v in prompts.items() if v is not None}
    tokenizer = TextTokenizer.from_file(
        tdir / "tokenizer.json", max_length=max_length, instructions=prompts, lowercase=sbert.get("do_lower_case", False)
    )
    info = EncoderInfo(
        family="sentence-transformers",
        name=name,
        revision=revision,
        dim=config["hidden_size"] * len(modes),
        matryoshka_dims=None,
        tasks=tuple(prompts),
        default_task=_first_present(prompts, ("document", "passage", "retrieval.passage")),
        query_task=_first_present(prompts, ("query", "retrieval.query")),
        max_length=max_length,
        pooling="+".join(modes),
    )
    return tokenizer, info


class SentenceTransformerEncoder(Encoder):
    def __init__(
        self,
        path: str | Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int,
        revision: str,
        name: str,
        attention_impl: AttentionImpl | None = None,
        cpu_streams: int = 1,
    ):
        path = Path(path)
        tdir, self.pooling_modes, self.declares_normalize = read_modules(path)
        tokenizer, info = describe_sentence_transformer(path, revision=revision, name=name)
        native = native_config(tdir)
        self.model: torch.nn.Module
        if native is not None:
            self.model = load_bert(tdir, native, device=device, dtype=dtype)
            self.pad_id = native.pad_token_id
            self.attention_impl = attention_impl or attention.default_impl(device, dtype)
        else:
            if attention_impl not in (None, "padded"):
                raise ValueError(f"{path}: only BERT, RoBERTa and XLM-R trunks run packed; this one is padded only")
            self.model = _load_transformers(tdir, device, dtype)
            self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
            self.attention_impl = "padded"
        self.native = native is not None
        super().__init__(
            info=info, tokenizer=tokenizer, device=device, dtype=dtype, max_batch_tokens=max_batch_tokens, cpu_streams=cpu_streams
        )

    @property
    def packed(self) -> bool:
        return self.attention_impl != "padded"

    def encode(self, texts, **kwargs) -> np.ndarray:
        # sentence-transformers strips inputs before tokenizing; do the same so vectors match.
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        return super().encode([t.strip() if isinstance(t, str) else t for t in texts], **kwargs)

    def _forward(self, seqs: Sequence[np.ndarray], tasks: Sequence[int | None]) -> torch.Tensor:
        if self.packed:
            b = pack(seqs, self.device)
            kernel = attention.packed_kernel(self.attention_impl)
            return self.model(b.input_ids, b.position_ids, kernel(b.cu_seqlens, b.max_seqlen)).float()
        p = pad(seqs, self.pad_id, self.device)
        if self.native:
            hidden = self.model(p.input_ids, p.position_ids, attention.padded(p.attention_mask))
        else:
            hidden = self.model(input_ids=p.input_ids, attention_mask=p.attention_mask.long()).last_hidden_state
        return unpad(hidden, p.attention_mask).float()

    def _pool(self, states: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        starts, ends = offsets[:-1], offsets[1:]
        parts = []
        for mode in self.pooling_modes:
            if mode == "mean":
                parts.append(pool_spans(states, starts, ends))
            elif mode == "mean_sqrt_len":
                n = (ends - starts).to(torch.float32).unsqueeze(1)
                parts.append(pool_spans(states, starts, ends) * n / n.sqrt())
            elif mode == "cls":
                parts.append(states[starts])
            elif mode == "lasttoken":
                parts.append(states[ends - 1])
            elif mode == "max":
                parts.append(torch.segment_reduce(states, "max", lengths=ends - starts, axis=0))
        return torch.cat(parts, dim=1)


def _load_transformers(tdir: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Architectures bert.py does not reproduce, through transformers (safetensors only, no remote code)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    safetensors_files(tdir)  # refused here, in model.weights' words, rather than in transformers' own
    hf_logging.disable_progress_bar()  # one bar per actor and load is noise in job logs
    # transformers picks SDPA where the architecture has it and eager attention elsewhere (MPNet).
    model = AutoModel.from_pretrained(tdir, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    return model.to(device).eval()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _first_present(prompts: dict, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in prompts), None)
