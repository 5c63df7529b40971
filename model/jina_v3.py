"""jina-embeddings-v3, natively: XLM-RoBERTa-large trunk, RoPE, post-LN blocks, 5 task LoRA adapters.

Read top to bottom: config -> LoRA embedding (the LoRA linear, shared with jina-v4, is
`task_lora.TaskLinear`) -> rotary -> attention -> MLP -> block -> model -> checkpoint loading. Facts cite `shared/spec/jina-embeddings-v3.md` (§ numbers).

Parameter names equal the published checkpoint's once the `roberta.` prefix and the torch
parametrize wrapping are removed (§2.2), so loading is a copy by name with a key-count check.

Layouts: every module works on any leading shape. Packed (varlen) batches are (T, d) with
positions restarting per sequence; padded batches are (B, L, d). Only attention differs, and it
is passed in (see `attention.py`). Mixed-task batches are ordered so each task is a contiguous run
along dim 0 (tokens when packed, rows when padded); each LoRA layer then applies the merged weight
of that task to a slice, so a task switch costs nothing and one forward serves every task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionFn
from model.rotary import Rotary, rotate
from model.task_lora import TaskLinear, TaskRuns
from model.weights import read_safetensors


@dataclass(frozen=True)
class JinaV3Config:
    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5
    type_vocab_size: int = 1
    pad_token_id: int = 1
    rotary_emb_base: float = 20000.0  # §1: the shipped config value, not the code default 10000
    lora_adaptations: tuple[str, ...] = (
        "retrieval.query", "retrieval.passage", "separation", "classification", "text-matching",
    )
    lora_rank: int = 4
    lora_alpha: float = 1.0
    matryoshka_dimensions: tuple[int, ...] = (32, 64, 128, 256, 512, 768, 1024)
    task_instructions: dict[str, str] = field(default_factory=dict)
    max_length: int = 8192  # §3.4: tokenizer truncation in the reference encode

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank  # §2.2: alpha 1 / rank 4 = 0.25

    @classmethod
    def from_dir(cls, path: str | Path) -> JinaV3Config:
        raw = json.loads((Path(path) / "config.json").read_text())
        if raw.get("position_embedding_type", "rotary") != "rotary":
            raise ValueError(f"{path}: position_embedding_type must be 'rotary' for jina-embeddings-v3")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not the exact GELU of jina-v3")
        instructions = raw.get("task_instructions") or _DEFAULT_INSTRUCTIONS
        dims = raw.get("matryoshka_dimensions") or [raw["hidden_size"]]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            layer_norm_eps=raw.get("layer_norm_eps", 1e-5),
            type_vocab_size=raw.get("type_vocab_size", 1),
            pad_token_id=raw.get("pad_token_id", 1),
            rotary_emb_base=float(raw.get("rotary_emb_base", 20000.0)),
            lora_adaptations=tuple(raw.get("lora_adaptations", cls.lora_adaptations)),
            lora_rank=raw.get("lora_rank", 4),
            lora_alpha=float(raw.get("lora_alpha", 1.0)),
            matryoshka_dimensions=tuple(sorted(set(dims) | {raw["hidden_size"]})),
            task_instructions={t: instructions.get(t, "") for t in raw.get("lora_adaptations", [])},
        )


# §4.1 / §1: only the two retrieval tasks carry an instruction; note the trailing space.
_DEFAULT_INSTRUCTIONS = {
    "retrieval.query": "Represent the query for retrieving evidence documents: ",
    "retrieval.passage": "Represent the document for retrieval: ",
}


class TaskEmbedding(nn.Module):
    """nn.Embedding with stacked task LoRA: E_t = E + scaling * A[t] @ B[t] (§2.2: A/B swapped vs Linear).

    Only the looked-up rows of the delta are formed: E[ids] + scaling * A[t][ids] @ B[t] (§2.5).
    """

    def __init__(self, num_embeddings: int, dim: int, num_tasks: int, rank: int, scaling: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(num_tasks, num_embeddings, rank), requires_grad=False)
        self.lora_B = nn.Parameter(torch.empty(num_tasks, rank, dim), requires_grad=False)
        self.scaling = scaling

    def lookup(self, ids: torch.Tensor, task: int | None) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        if task is None:
            return rows
        delta = F.embedding(ids, self.lora_A[task]).float() @ self.lora_B[task].float()
        return (rows.float() + self.scaling * delta).to(rows.dtype)

    def forward(self, ids: torch.Tensor, runs: TaskRuns) -> torch.Tensor:
        if len(runs) == 1:
            return self.lookup(ids, runs[0][0])
        out = self.weight.new_empty(*ids.shape, self.weight.shape[1])
        for task, start, stop in runs:
            out[start:stop] = self.lookup(ids[start:stop], task)
        return out


class Embeddings(nn.Module):
    """Word + token-type embedding; no absolute positions (RoPE is applied in attention, §3.1)."""

    def __init__(self, cfg: JinaV3Config):
        super().__init__()
        n, r, s = len(cfg.lora_adaptations), cfg.lora_rank, cfg.lora_scaling
        self.word_embeddings = TaskEmbedding(cfg.vocab_size, cfg.hidden_size, n, r, s)
        self.token_type_embeddings = TaskEmbedding(cfg.type_vocab_size, cfg.hidden_size, n, r, s)

    def forward(self, input_ids: torch.Tensor, runs: TaskRuns) -> torch.Tensor:
        token_types = torch.zeros_like(input_ids)  # §3.1: token_type_ids are always 0
        return self.word_embeddings(input_ids, runs) + self.token_type_embeddings(token_types, runs)


class Attention(nn.Module):
    """Fused Wqkv laid out [Q | K | V], head-contiguous (§3.2); RoPE on Q and K only."""

    def __init__(self, cfg: JinaV3Config):
        super().__init__()
        n, r, s = len(cfg.lora_adaptations), cfg.lora_rank, cfg.lora_scaling
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.Wqkv = TaskLinear(cfg.hidden_size, 3 * cfg.hidden_size, n, r, s)
        self.out_proj = TaskLinear(cfg.hidden_size, cfg.hidden_size, n, r, s)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend: AttentionFn, runs: TaskRuns
    ) -> torch.Tensor:
        qkv = self.Wqkv(x, runs).unflatten(-1, (3, self.heads, self.head_dim))  # (..., 3, H, D)
        q, k, v = qkv.unbind(dim=-3)  # each (..., H, D)
        q, k = rotate(q, *rope), rotate(k, *rope)
        out = attend(q, k, v)  # (..., H, D)
        return self.out_proj(out.flatten(-2), runs)


class MLP(nn.Module):
    def __init__(self, cfg: JinaV3Config):
        super().__init__()
        n, r, s = len(cfg.lora_adaptations), cfg.lora_rank, cfg.lora_scaling
        self.fc1 = TaskLinear(cfg.hidden_size, cfg.intermediate_size, n, r, s)
        self.fc2 = TaskLinear(cfg.intermediate_size, cfg.hidden_size, n, r, s)

    def forward(self, x: torch.Tensor, runs: TaskRuns) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x, runs)), runs)  # exact (erf) GELU, §3.2


class Block(nn.Module):
    """Post-LN BERT block (§3.2): x = LN1(x + attn(x)); x = LN2(x + mlp(x))."""

    def __init__(self, cfg: JinaV3Config):
        super().__init__()
        self.mixer = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, rope, attend: AttentionFn, runs: TaskRuns) -> torch.Tensor:
        x = self.norm1(x + self.mixer(x, rope, attend, runs))
        return self.norm2(x + self.mlp(x, runs))


class TransformerStack(nn.Module):
    """The blocks, in order. The checkpoint calls it `encoder` (§2.3), and so does `JinaV3Model`; the class
    is named apart so that `Encoder` means one thing in this package (`model.encoder.Encoder`)."""

    def __init__(self, cfg: JinaV3Config):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))


class Pooler(nn.Module):
    """Present in the checkpoint (with LoRA) and loaded strictly, but embeddings never use it (§3.5)."""

    def __init__(self, cfg: JinaV3Config):
        super().__init__()
        n, r, s = len(cfg.lora_adaptations), cfg.lora_rank, cfg.lora_scaling
        self.dense = TaskLinear(cfg.hidden_size, cfg.hidden_size, n, r, s)


class JinaV3Model(nn.Module):
    def __init__(self, cfg: JinaV3Config):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = TransformerStack(cfg)
        self.pooler = Pooler(cfg)
        self.rotary = Rotary(cfg.head_dim, cfg.rotary_emb_base)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: AttentionFn, runs: TaskRuns
    ) -> torch.Tensor:
        """Last hidden state for (T,) packed or (B, L) padded ids; `runs` index dim 0 of that layout."""
        x = self.emb_ln(self.embeddings(input_ids, runs))  # (..., d)
        rope = self.rotary.cos_sin(position_ids, x.dtype)
        for block in self.encoder.layers:
            x = block(x, rope, attend, runs)
        return x


# -- checkpoint loading (§2) --------------------------------------------------------------------

# Published name suffix -> our parameter suffix. LoRA orientation differs for embeddings and
# linears (§2.2) but both are stored under the same names; the shapes below check it.
_RENAMES = (
    (".parametrizations.weight.original", ".weight"),
    (".parametrizations.weight.0.lora_A", ".lora_A"),
    (".parametrizations.weight.0.lora_B", ".lora_B"),
)


def checkpoint_name_to_param(key: str) -> str:
    if not key.startswith("roberta."):
        raise KeyError(f"unexpected checkpoint key {key!r}: jina-v3 keys start with 'roberta.'")
    name = key[len("roberta."):]
    for old, new in _RENAMES:
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def expected_key_count(cfg: JinaV3Config) -> int:
    return 6 + 2 + 20 * cfg.num_hidden_layers + 4  # §2.3: embeddings, emb_ln, layers, pooler


def load_jina_v3(path: str | Path, *, device: torch.device, dtype: torch.dtype) -> JinaV3Model:
    """Build the model and copy every checkpoint tensor in by name; fail loudly on any mismatch."""
    path = Path(path)
    cfg = JinaV3Config.from_dir(path)
    state = read_safetensors(path)
    if len(state) != expected_key_count(cfg):
        raise ValueError(f"{path}: {len(state)} checkpoint tensors, expected {expected_key_count(cfg)} (§2.3)")

    with torch.device("meta"):
        model = JinaV3Model(cfg)
    params = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = checkpoint_name_to_param(key)
        if name not in params:
            raise KeyError(f"{path}: checkpoint key {key!r} has no place in the model (as {name!r})")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
        loaded[name] = tensor
    missing = set(params) - set(loaded)
    if missing:
        raise KeyError(f"{path}: parameters missing from the checkpoint: {sorted(missing)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.items()}, strict=True, assign=True)
    model.rotary = Rotary(cfg.head_dim, cfg.rotary_emb_base)  # the non-persistent buffer, off meta
    return model.to(device).eval()


def flops_per_token(cfg: JinaV3Config, seq_len: int) -> float:
    """Forward FLOPs per token (performance spec §3.1): 24 d^2-equivalents per layer plus attention."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_hidden_layers * (8 * d * d + 4 * d * f + 4 * seq_len * d)

