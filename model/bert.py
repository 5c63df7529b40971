"""BERT-family trunks natively: BERT, RoBERTa and XLM-RoBERTa (absolute positions, post-LN blocks).

Why not transformers' modeling code: importing it costs an encoder worker about 2 s of CPU at start-up
(2 of a 2-core machine's ~8 s before the first batch), and it has no padding-free path. Here the same
modules run packed (flash-attn varlen on GPU) or padded (SDPA) through `attention.py`, like jina-v3.

Read top to bottom: config -> embeddings -> attention -> block -> model -> checkpoint loading.
Checkpoint names are transformers' (`[bert.|roberta.]embeddings.word_embeddings.weight`, ...); the
loader fuses each layer's query/key/value into one [Q | K | V] projection, so a layer runs one GEMM
for them. Anything outside this shape (relative positions, other activations, MPNet, DistilBERT)
is not claimed: `native_config` returns None and the caller uses transformers instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionFn
from model.weights import read_safetensors

NATIVE_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
_ACTIVATIONS = {  # transformers' ACT2FN names we reproduce exactly
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """RoBERTa-style models number real tokens from padding_idx + 1 (transformers'
        `create_position_ids_from_input_ids`); BERT numbers them from 0."""
        return 0 if self.model_type == "bert" else self.pad_token_id + 1


def native_config(path: str | Path) -> BertConfig | None:
    """The config if this directory holds a trunk `BertModel` below reproduces exactly, else None."""
    raw = json.loads((Path(path) / "config.json").read_text())
    if (
        raw.get("model_type") not in NATIVE_MODEL_TYPES
        or raw.get("position_embedding_type", "absolute") != "absolute"
        or raw.get("hidden_act", "gelu") not in _ACTIVATIONS
        or raw.get("is_decoder", False)
        or raw.get("add_cross_attention", False)
    ):
        return None
    return BertConfig(
        model_type=raw["model_type"],
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        hidden_act=raw.get("hidden_act", "gelu"),
        layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
        max_position_embeddings=raw["max_position_embeddings"],
        type_vocab_size=raw.get("type_vocab_size", 2),
        pad_token_id=raw.get("pad_token_id", 0 if raw["model_type"] == "bert" else 1),
    )


def _table(rows: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialized: the checkpoint fills it. nn.Embedding's own normal_ init
    on the meta device pulls in torch's Python decompositions, ~1 s of every encoder actor's start."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Embeddings(nn.Module):
    """Word + absolute position + token type 0, then LayerNorm (single-segment inputs only)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = _table(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = _table(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = _table(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.position_offset = cfg.position_offset

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids + self.position_offset)
        return self.norm(x + self.token_type_embeddings.weight[0])


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # fused from query, key, value
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(dim=-3)  # (..., H, D)
        return self.out(attend(q, k, v).flatten(-2))


class Block(nn.Module):
    """Post-LN: x = LN1(x + attn(x)); x = LN2(x + fc2(act(fc1(x))))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, attend))
        return self.norm2(x + self.fc2(self.act(self.fc1(x))))


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        """Last hidden state for (T,) packed or (B, L) padded ids; positions start at 0 per sequence."""
        x = self.embeddings(input_ids, position_ids)
        for block in self.layers:
            x = block(x, attend)
        return x


# -- checkpoint loading --------------------------------------------------------------------------

_LAYER_RENAMES = {  # transformers' name inside encoder.layer.N -> ours inside layers.N
    "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "norm2",
}
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
# Heads sentence embeddings never use (pooler, masked-LM) and a non-parameter buffer some files carry.
_IGNORED = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")


def _our_name(key: str) -> str | None:
    """Checkpoint key -> parameter name; None for tensors embeddings never use. q/k/v keep theirs."""
    for prefix in ("bert.", "roberta."):
        key = key.removeprefix(prefix)
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(_IGNORED):
        return None
    if key.startswith("embeddings."):
        return key.replace("embeddings.LayerNorm", "embeddings.norm")
    if key.startswith("encoder.layer."):
        index, rest = key[len("encoder.layer."):].split(".", 1)
        module, leaf = rest.rsplit(".", 1)
        if module in _QKV:
            return f"layers.{index}.{module}.{leaf}"  # fused below
        if module in _LAYER_RENAMES:
            return f"layers.{index}.{_LAYER_RENAMES[module]}.{leaf}"
    raise KeyError(f"unexpected checkpoint key {key!r} for a BERT-family trunk")


def load_bert(path: str | Path, cfg: BertConfig, *, device: torch.device, dtype: torch.dtype) -> BertModel:
    """Build the model and copy every checkpoint tensor in by name; fail loudly on any mismatch."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in read_safetensors(path).items():
        name = _our_name(key)
        if name is not None:
            state[name] = tensor
    for i in range(cfg.num_hidden_layers):
        for leaf in ("weight", "bias"):
            parts = [state.pop(f"layers.{i}.{m}.{leaf}", None) for m in _QKV]
            if any(p is None for p in parts):
                raise KeyError(f"{path}: layer {i} lacks query/key/value {leaf}")
            state[f"layers.{i}.attention.qkv.{leaf}"] = torch.cat(parts)

    with torch.device("meta"):
        model = BertModel(cfg)
    params = dict(model.named_parameters())
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unexpected or missing:
        raise KeyError(f"{path}: checkpoint does not match {cfg.model_type}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()
