"""jina-embeddings-v4: a Qwen2.5-VL-3B trunk, three task LoRA adapters, a multi-vector projector (spec §7).

Read top to bottom: config -> RMSNorm -> M-RoPE -> attention -> MLP -> decoder layer -> text decoder ->
model (decoder + vision tower + projector) -> checkpoint loading -> FLOPs. Facts cite
`shared/spec/jina-embeddings-v3.md` (§7, §7.1, §7.2).

Why the text decoder is native and the vision tower is transformers': text is nearly all of the work
(documents up to 32k tokens; an image is ~800 tokens), and on GPU it must run padding-free, packed
sequences through the same varlen kernels as jina-v3 (`attention.py`, causal here), with per-row task
LoRA merged per contiguous run (`task_lora.py`). transformers' Qwen2.5-VL text model takes padded
(B, L) batches with a 4-D mask and one adapter per call (PEFT), so it can do neither. The vision tower
(`Qwen2_5_VisionTransformerPretrainedModel`) already packs its images by `cu_seqlens`, carries no LoRA
(§7.1: vision modules are excluded), and its window/full-attention schedule is intricate: re-writing
it would add risk and no speed, so it is used as shipped and loaded strictly under our key names.

Parameter names equal the published checkpoint's (§7.2): `model.*` is the text decoder, `visual.*` the
vision tower, `multi_vector_projector.*` the projector, so loading is a copy by name. Adapter tensors
(`adapters/adapter_model.safetensors`, per task) are stacked into each `TaskLinear`'s `lora_A`/`lora_B`
in `task_names` order.

Layouts: packed (T, d) with positions (3, T), or padded (B, L, d) with positions (3, B, L); only attention
differs and it is passed in. Positions have three streams (temporal, height, width; M-RoPE): equal for
text, a (t, h, w) grid for image tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionFn
from model.rotary import MRotary, rotate
from model.task_lora import TaskLinear, TaskRuns
from model.weights import read_sharded_safetensors

TEXT_MAX_LENGTH = 32768  # §7: the published processor's text_max_length


@dataclass(frozen=True)
class JinaV4Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    task_names: tuple[str, ...]
    matryoshka_dims: tuple[int, ...]
    multi_vector_dim: int
    lora_rank: int
    lora_alpha: float
    vision: dict[str, Any]  # config.json's vision_config, as transformers' vision config takes it
    max_length: int = TEXT_MAX_LENGTH

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank  # §7.2: read from adapter_config.json (published 32/32)

    @property
    def spatial_merge_size(self) -> int:
        return int(self.vision.get("spatial_merge_size", 2))

    @classmethod
    def from_dir(cls, path: str | Path) -> JinaV4Config:
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        text = raw["text_config"]  # §7.2: vocab_size lives only here
        rope = text.get("rope_scaling") or raw.get("rope_scaling") or {}
        section = tuple(rope.get("mrope_section", ()))
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        if len(section) != 3 or 2 * sum(section) != head_dim:
            raise ValueError(f"{path}: mrope_section {list(section)} must be three sizes summing to head_dim/2 = {head_dim // 2}")
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {text['hidden_act']!r} is not the SiLU of Qwen2.5")
        adapter = read_adapter_config(path)
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"],
            intermediate_size=text["intermediate_size"],
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(text.get("rope_theta", 1e6)),
            mrope_section=section,  # type: ignore[arg-type]
            image_token_id=raw["image_token_id"],
            vision_start_token_id=raw["vision_start_token_id"],
            vision_end_token_id=raw["vision_end_token_id"],
            task_names=tuple(raw["task_names"]),
            matryoshka_dims=tuple(sorted(set(raw.get("matryoshka_dims") or []) | {text["hidden_size"]})),
            multi_vector_dim=raw.get("multi_vector_projector_dim", 128),
            lora_rank=adapter["r"],
            lora_alpha=float(adapter["lora_alpha"]),
            vision=dict(raw["vision_config"]),
        )


def read_adapter_config(path: Path) -> dict:
    """adapters/adapter_config.json, refusing PEFT options this implementation does not compute."""
    cfg = json.loads((path / "adapters" / "adapter_config.json").read_text())
    unsupported = {k: cfg.get(k) for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "lora_bias")
                   if cfg.get(k)}
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{path}/adapters: only plain LoRA (no bias, DoRA, rsLoRA or per-module rank) is supported; "
                         f"got peft_type={cfg.get('peft_type')!r}, bias={cfg.get('bias')!r}, {unsupported}")
    return cfg


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalize in fp32, cast back, then scale (the cast before the weight matters in bf16)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """GQA: H query heads, H_kv key/value heads (§7.1: 16 and 2); q/k/v with bias, o without (§7.2)."""

    def __init__(self, cfg: JinaV4Config):
        super().__init__()
        n, r, s, d, hd = len(cfg.task_names), cfg.lora_rank, cfg.lora_scaling, cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = TaskLinear(d, self.heads * hd, n, r, s)
        self.k_proj = TaskLinear(d, self.kv_heads * hd, n, r, s)
        self.v_proj = TaskLinear(d, self.kv_heads * hd, n, r, s)
        self.o_proj = TaskLinear(self.heads * hd, d, n, r, s, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend: AttentionFn, runs: TaskRuns):
        q = self.q_proj(x, runs).unflatten(-1, (self.heads, self.head_dim))  # (..., H, D)
        k = self.k_proj(x, runs).unflatten(-1, (self.kv_heads, self.head_dim))  # (..., H_kv, D)
        v = self.v_proj(x, runs).unflatten(-1, (self.kv_heads, self.head_dim))
        q, k = rotate(q, *rope), rotate(k, *rope)
        return self.o_proj(attend(q, k, v).flatten(-2), runs)  # causal, chosen by the caller


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: JinaV4Config):
        super().__init__()
        n, r, s, d, f = len(cfg.task_names), cfg.lora_rank, cfg.lora_scaling, cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = TaskLinear(d, f, n, r, s, bias=False)
        self.up_proj = TaskLinear(d, f, n, r, s, bias=False)
        self.down_proj = TaskLinear(f, d, n, r, s, bias=False)

    def forward(self, x: torch.Tensor, runs: TaskRuns) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, runs)) * self.up_proj(x, runs), runs)


class DecoderLayer(nn.Module):
    """Pre-norm: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, cfg: JinaV4Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, attend: AttentionFn, runs: TaskRuns) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attend, runs)
        return x + self.mlp(self.post_attention_layernorm(x), runs)


class TextDecoder(nn.Module):
    """The Qwen2.5 language model without its LM head (none is stored: §7.2)."""

    def __init__(self, cfg: JinaV4Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # no LoRA on embeddings (§7.1)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build_vision_tower(cfg: JinaV4Config, attn_implementation: str) -> nn.Module:
    """transformers' Qwen2.5-VL vision tower from config.json's vision_config (whose `model_type`
    "qwen2_5_vl" is the published spelling of transformers' "qwen2_5_vl_vision").

    It is built with SDPA and switched to `attn_implementation` afterwards: transformers checks a name
    containing "flash" at construction by importing flash-attn or a hub kernel, neither of which our
    registered kernels (`vision_attention.py`) are; its attention modules read the name at call time.
    """
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    raw = {k: v for k, v in cfg.vision.items() if k not in ("model_type", "torch_dtype")}
    vc = Qwen2_5_VLVisionConfig(**raw)
    vc._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel(vc)
    tower.config._attn_implementation = attn_implementation
    return tower


class JinaV4Model(nn.Module):
    def __init__(self, cfg: JinaV4Config, *, vision_attention: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.model = TextDecoder(cfg)  # the checkpoint's name (§7.2)
        self.visual = build_vision_tower(cfg, vision_attention)
        n = len(cfg.task_names)
        self.multi_vector_projector = TaskLinear(cfg.hidden_size, cfg.multi_vector_dim, n, cfg.lora_rank, cfg.lora_scaling)
        self.rotary = MRotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(patches, C*T*P*P) pixels of several images -> (patches / merge^2, d) `<|image_pad|>` embeddings."""
        out = self.visual(pixel_values.to(self.visual.patch_embed.proj.weight.dtype), grid_thw=grid_thw)
        return out.pooler_output  # after the patch merger, images in order

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: AttentionFn, runs: TaskRuns) -> torch.Tensor:
        """Final (post-RMSNorm) hidden states for input embeddings (T, d) or (B, L, d), positions (3, ...)."""
        rope = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, attend, runs)
        return self.model.norm(x)

    def project(self, states: torch.Tensor, runs: TaskRuns) -> torch.Tensor:
        """Multi-vector projection (§7.1): Linear d -> 128 with bias and task LoRA, per token."""
        return self.multi_vector_projector(states, runs)


# -- checkpoint loading (§7.2) ---------------------------------------------------------------------

# base_model.model.model.language_model.layers.{i}.{module}.lora_{A|B}.{task}.weight
# base_model.model.multi_vector_projector.lora_{A|B}.{task}.weight
_ADAPTER_KEY = re.compile(
    r"base_model\.model\.(?:model\.language_model\.(?P<layer>layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)"
    r"|(?P<proj>multi_vector_projector))\.lora_(?P<ab>[AB])\.(?P<task>[\w-]+)\.weight"
)


def adapter_param(key: str, tasks: tuple[str, ...]) -> tuple[str, int]:
    """Adapter key -> (our stacked parameter name, task index)."""
    m = _ADAPTER_KEY.fullmatch(key)
    if m is None:
        raise KeyError(f"unexpected adapter key {key!r} (spec §7.2 names)")
    if m["task"] not in tasks:
        raise KeyError(f"adapter key {key!r} names task {m['task']!r}, not one of {list(tasks)}")
    module = f"model.{m['layer']}" if m["layer"] else m["proj"]
    return f"{module}.lora_{m['ab']}", tasks.index(m["task"])


def read_adapters(path: Path, cfg: JinaV4Config) -> dict[str, torch.Tensor]:
    """adapters/adapter_model.safetensors -> stacked (tasks, ...) tensors by our parameter name."""
    from safetensors.torch import load_file

    per_task: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in load_file(str(path / "adapters" / "adapter_model.safetensors")).items():
        name, task = adapter_param(key, cfg.task_names)
        per_task.setdefault(name, {})[task] = tensor
    stacked = {}
    for name, tensors in per_task.items():
        if sorted(tensors) != list(range(len(cfg.task_names))):
            raise KeyError(f"{path}/adapters: {name} lacks tasks {set(range(len(cfg.task_names))) - set(tensors)}")
        stacked[name] = torch.stack([tensors[t] for t in range(len(cfg.task_names))])
    return stacked


def load_jina_v4(
    path: str | Path, *, device: torch.device, dtype: torch.dtype, vision_attention: str = "sdpa"
) -> JinaV4Model:
    """Build the model and copy every checkpoint and adapter tensor in by name; fail loudly on any mismatch."""
    path = Path(path)
    cfg = JinaV4Config.from_dir(path)
    state = read_sharded_safetensors(path)
    state.update(read_adapters(path, cfg))

    with torch.device("meta"):
        model = JinaV4Model(cfg, vision_attention=vision_attention)
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        if key not in params:
            raise KeyError(f"{path}: checkpoint tensor {key!r} has no place in the model")
        if tuple(tensor.shape) != tuple(params[key].shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(params[key].shape)}")
    missing = set(params) - set(state)
    if missing:
        raise KeyError(f"{path}: parameters missing from the checkpoint and adapters: {sorted(missing)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies) were built on meta: build them again for real.
    model.rotary = MRotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    rotary = type(model.visual.rotary_pos_emb)
    model.visual.rotary_pos_emb = rotary(model.visual.config)
    return model.to(device).eval()


def flops_per_token(cfg: JinaV4Config, seq_len: int) -> float:
    """Text forward FLOPs per token (performance spec §3.1 style; multiply-add = 2), per layer:
    q and o projections 2·2·d², k and v 2·2·d·d_kv (GQA, d_kv = H_kv·D), SwiGLU 3·2·d·f, attention
    scores and values 2·2·L·d, halved because causal attention computes half the score matrix on
    average. LoRA is merged (no extra FLOPs); norms, RoPE and the projector are ignored."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    d_kv = cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * (4 * d * d + 4 * d * d_kv + 6 * d * f + 2 * seq_len * d)


def vision_flops(cfg: JinaV4Config, grid_thw: tuple[int, int, int]) -> float:
    """Vision tower forward FLOPs for one image of `grid_thw` patches, in the same style: per patch and
    block qkv 6·d², proj 2·d², SwiGLU 6·d·f; attention 4·d per (query, key) pair, over the whole image
    in the full-attention blocks and within each window elsewhere (windows of `window_size` pixels tile
    the merged grid from the top left, the last row and column of windows cut short); the patch
    embedding 2·(3·T·P·P)·d per patch; the merger's two linears per merged token. Norms, RoPE, GELU and
    biases are ignored."""
    v = cfg.vision
    d, f, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
    patch, temporal, merge = v.get("patch_size", 14), v.get("temporal_patch_size", 2), cfg.spatial_merge_size
    t, h, w = grid_thw
    patches, merged = t * h * w, t * h * w // merge**2
    side = v.get("window_size", 112) // (patch * merge)  # window side in merged tokens

    def cuts(n: int) -> list[int]:
        return [side] * (n // side) + ([n % side] if n % side else [])

    window_pairs = t * sum((rh * rw * merge**2) ** 2 for rh in cuts(h // merge) for rw in cuts(w // merge))
    full_blocks = len(v.get("fullatt_block_indexes", ()))
    attention = 4 * d * (full_blocks * patches**2 + (depth - full_blocks) * window_pairs)
    dense = depth * patches * (8 * d * d + 6 * d * f)
    embed = 2 * patches * 3 * temporal * patch * patch * d
    merger = merged * (2 * (merge**2 * d) ** 2 + 2 * merge**2 * d * v["out_hidden_size"])
    return float(attention + dense + embed + merger)
