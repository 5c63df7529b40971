"""Independent reference encoder for jina-embeddings-v3 checkpoints in the published layout.

Built on the ``transformers`` port (``JinaEmbeddingsV3Model``), *not* on the project's ``model``
package. The published checkpoint (``roberta.*`` keys, fused ``Wqkv``, LoRA stored as torch
``parametrize`` tensors) is mapped onto the port's module names by hand, and the LoRA adapter of the
requested task is merged into the weights by hand (spec §2.2/§2.5):

* Linear    ``W_t = W + (alpha / r) * B[t] @ A[t]``   (A: (5, r, in),  B: (5, out, r))
* Embedding ``E_t = E + (alpha / r) * A[t] @ B[t]``   (A: (5, num, r), B: (5, r, dim))

Encoding follows the reference ``encode`` (spec §3.4/§3.5/§4.1): prepend
``task_instructions[task]`` (no prefix and base weights for ``task=None``), tokenize with
``<s> ... </s>`` truncating at 8192 tokens, right-pad with ``<pad>``, run the transformer in float32
with the attention mask, mean-pool the last hidden state over mask tokens in float32, keep the
first ``dim`` components (Matryoshka), then L2-normalize.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

MAX_LENGTH = 8192


# --------------------------------------------------------------------------------------------------
# Checkpoint reading
# --------------------------------------------------------------------------------------------------


def read_config(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / "config.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=8)
def _raw_state_dict(ckpt_file: str, _mtime: float) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.to(torch.float32) for k, v in load_file(ckpt_file).items()}


def raw_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    f = Path(ckpt_dir) / "model.safetensors"
    return _raw_state_dict(str(f.resolve()), f.stat().st_mtime)


def task_index(cfg: dict, task: str | None) -> int | None:
    if task is None:
        return None
    tasks = list(cfg["lora_adaptations"])
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; valid: {tasks}")
    return tasks.index(task)


def merged_weight(sd: dict[str, torch.Tensor], module: str, t: int | None, scaling: float) -> torch.Tensor:
    """Effective weight of a LoRA-wrapped module (``roberta.``-prefixed name) for adapter ``t``."""
    w = sd[f"{module}.parametrizations.weight.original"]
    if t is None:
        return w.clone()
    a = sd[f"{module}.parametrizations.weight.0.lora_A"][t]
    b = sd[f"{module}.parametrizations.weight.0.lora_B"][t]
    if module.endswith("_embeddings"):
        # Embedding: A (num, r), B (r, dim) -> delta (num, dim) = A @ B
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1], (module, a.shape, b.shape)
        delta = a @ b
    else:
        # Linear: A (r, in), B (out, r) -> delta (out, in) = B @ A
        assert a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0], (module, a.shape, b.shape)
        delta = b @ a
    return w + scaling * delta


def hf_state_dict(ckpt_dir: str | Path, task: str | None) -> dict[str, torch.Tensor]:
    """Published checkpoint -> ``JinaEmbeddingsV3Model`` state dict, LoRA of ``task`` merged."""
    cfg = read_config(ckpt_dir)
    sd = raw_state_dict(ckpt_dir)
    t = task_index(cfg, task)
    scaling = float(cfg["lora_alpha"]) / float(cfg["lora_rank"])
    hidden = int(cfg["hidden_size"])
    p = "roberta."

    def w(module: str) -> torch.Tensor:
        return merged_weight(sd, p + module, t, scaling)

    out: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": w("embeddings.word_embeddings"),
        "embeddings.token_type_embeddings.weight": w("embeddings.token_type_embeddings"),
        "embeddings.LayerNorm.weight": sd[p + "emb_ln.weight"].clone(),
        "embeddings.LayerNorm.bias": sd[p + "emb_ln.bias"].clone(),
        "pooler.dense.weight": w("pooler.dense"),
        "pooler.dense.bias": sd[p + "pooler.dense.bias"].clone(),
    }
    for i in range(int(cfg["num_hidden_layers"])):
        src, dst = f"encoder.layers.{i}.", f"layers.{i}."
        wqkv = w(src + "mixer.Wqkv")
        bqkv = sd[p + src + "mixer.Wqkv.bias"]
        assert wqkv.shape == (3 * hidden, hidden), wqkv.shape
        # rows are laid out [Q | K | V]
        for name, wpart, bpart in zip(
            ("q", "k", "v"), wqkv.chunk(3, dim=0), bqkv.chunk(3, dim=0), strict=True
        ):
            out[f"{dst}self_attn.{name}_proj.weight"] = wpart.clone()
            out[f"{dst}self_attn.{name}_proj.bias"] = bpart.clone()
        out[f"{dst}self_attn.o_proj.weight"] = w(src + "mixer.out_proj")
        out[f"{dst}self_attn.o_proj.bias"] = sd[p + src + "mixer.out_proj.bias"].clone()
        out[f"{dst}mlp.fc1.weight"] = w(src + "mlp.fc1")
        out[f"{dst}mlp.fc1.bias"] = sd[p + src + "mlp.fc1.bias"].clone()
        out[f"{dst}mlp.fc2.weight"] = w(src + "mlp.fc2")
        out[f"{dst}mlp.fc2.bias"] = sd[p + src + "mlp.fc2.bias"].clone()
        for ln_src, ln_dst in (("norm1", "post_attention_layernorm"), ("norm2", "post_mlp_layernorm")):
            out[f"{dst}{ln_dst}.weight"] = sd[p + src + ln_src + ".weight"].clone()
            out[f"{dst}{ln_dst}.bias"] = sd[p + src + ln_src + ".bias"].clone()
    return out


# --------------------------------------------------------------------------------------------------
# transformers model
# --------------------------------------------------------------------------------------------------


def hf_config(cfg: dict, attn_implementation: str = "sdpa"):
    from transformers.models.jina_embeddings_v3 import JinaEmbeddingsV3Config

    assert cfg.get("position_embedding_type", "rotary") == "rotary"
    hf_cfg = JinaEmbeddingsV3Config(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]),
        hidden_act=cfg["hidden_act"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        type_vocab_size=int(cfg["type_vocab_size"]),
        layer_norm_eps=float(cfg["layer_norm_eps"]),
        pad_token_id=int(cfg["pad_token_id"]),
        bos_token_id=int(cfg["bos_token_id"]),
        eos_token_id=int(cfg["eos_token_id"]),
        # published name `rotary_emb_base` -> HF `rope_parameters["rope_theta"]`
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rotary_emb_base"])},
    )
    hf_cfg._attn_implementation = attn_implementation
    return hf_cfg


@functools.lru_cache(maxsize=16)
def _hf_model(ckpt_dir: str, _mtime: float, task: str | None, attn_implementation: str):
    from transformers.models.jina_embeddings_v3 import JinaEmbeddingsV3Model

    cfg = read_config(ckpt_dir)
    model = JinaEmbeddingsV3Model(hf_config(cfg, attn_implementation), add_pooling_layer=True)
    model.load_state_dict(hf_state_dict(ckpt_dir, task), strict=True)
    model.to(torch.float32).eval()
    # the RoPE base must be the config's (20000), not a default
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    want = 1.0 / (float(cfg["rotary_emb_base"]) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    torch.testing.assert_close(model.rotary_emb.inv_freq.float(), want)
    assert model.config._attn_implementation == attn_implementation, model.config._attn_implementation
    return model


def hf_model(ckpt_dir: str | Path, task: str | None = None, attn_implementation: str = "sdpa"):
    """Cached ``JinaEmbeddingsV3Model`` (float32, eval) with the LoRA of ``task`` merged."""
    d = Path(ckpt_dir).resolve()
    return _hf_model(str(d), (d / "model.safetensors").stat().st_mtime, task, attn_implementation)


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, _mtime: float):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def load_tokenizer(ckpt_dir: str | Path):
    """A fresh-state ``tokenizers.Tokenizer`` for ``tokenizer.json`` (no truncation/padding set)."""
    f = (Path(ckpt_dir) / "tokenizer.json").resolve()
    tok = _tokenizer(str(f), f.stat().st_mtime)
    tok.no_truncation()
    tok.no_padding()
    return tok


def with_instruction(ckpt_dir: str | Path, texts: Sequence[str], task: str | None) -> list[str]:
    cfg = read_config(ckpt_dir)
    task_index(cfg, task)  # validates
    prefix = "" if task is None else cfg.get("task_instructions", {}).get(task, "") or ""
    return [prefix + t for t in texts]


def token_ids(
    ckpt_dir: str | Path, texts: Sequence[str], max_length: int | None = MAX_LENGTH
) -> list[list[int]]:
    """``<s> ... </s>`` ids of each text (no instruction added here), truncated to ``max_length``
    tokens *including* the two specials (the last id stays ``</s>``). ``None``: no truncation."""
    tok = load_tokenizer(ckpt_dir)
    cfg = read_config(ckpt_dir)
    bos, eos = int(cfg["bos_token_id"]), int(cfg["eos_token_id"])
    out = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        ids = list(enc.ids)
        if max_length is not None:
            ids = ids[: max_length - 2]
        out.append([bos, *ids, eos])
    return out


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def reference_encode_ids(
    ckpt_dir: str | Path,
    ids: Sequence[Sequence[int]],
    task: str | None = None,
    dim: int | None = None,
    *,
    normalize: bool = True,
    batch_size: int = 8,
    attn_implementation: str = "sdpa",
) -> np.ndarray:
    """Embeddings of already tokenized inputs (ids taken as given: no prefix, no truncation)."""
    cfg = read_config(ckpt_dir)
    task_index(cfg, task)
    full = int(cfg["hidden_size"])
    if dim is not None and dim not in cfg["matryoshka_dimensions"]:
        raise ValueError(f"dim {dim} not in matryoshka_dimensions {cfg['matryoshka_dimensions']}")
    model = hf_model(ckpt_dir, task, attn_implementation)
    pad = int(cfg["pad_token_id"])
    outs = []
    for s in range(0, len(ids), batch_size):
        chunk = [list(x) for x in ids[s : s + batch_size]]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, x in enumerate(chunk):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state.to(torch.float32)
        m = mask.to(torch.float32).unsqueeze(-1)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        outs.append(pooled)
    emb = torch.cat(outs, dim=0) if outs else torch.zeros((0, full))
    if dim is not None:
        emb = emb[:, :dim]
    if normalize:
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return emb.numpy().astype(np.float32)


def reference_encode(
    ckpt_dir: str | Path,
    texts: Sequence[str],
    task: str | None = None,
    dim: int | None = None,
    *,
    normalize: bool = True,
    max_length: int = MAX_LENGTH,
    batch_size: int = 8,
    attn_implementation: str = "sdpa",
) -> np.ndarray:
    """Reference embeddings, shape (len(texts), dim or hidden_size), float32."""
    ids = token_ids(ckpt_dir, with_instruction(ckpt_dir, texts, task), max_length=max_length)
    return reference_encode_ids(
        ckpt_dir,
        ids,
        task,
        dim,
        normalize=normalize,
        batch_size=batch_size,
        attn_implementation=attn_implementation,
    )
