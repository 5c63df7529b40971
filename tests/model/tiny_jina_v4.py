"""Tiny random jina-embeddings-v4 checkpoints in the *published* on-disk layout (spec §7.1, §7.2).

``build(path)`` writes a directory that looks like ``jinaai/jina-embeddings-v4`` scaled down:

* ``config.json``: the published structure (no top-level ``model_type`` or ``vocab_size``; ``text_config``
  and ``vision_config``; ``architectures ["JinaEmbeddingsV4Model"]``; the jina extras ``task_names``,
  ``matryoshka_dims``, ``multi_vector_projector_dim``, ``single_vector_pool_strategy`` at the end), sizes
  scaled down: text hidden 64, 4 query heads and 2 KV heads (GQA), 3 layers, M-RoPE sections [2, 3, 3]
  (half of the head dim 16, as [16, 24, 24] is of 128); vision 2 blocks (block 1 full attention, block 0
  windowed), hidden 32. ``rope_theta`` is 10,000 rather than 1e6 so that the few rotary frequencies of a
  16-dim head turn visibly over short inputs (a wrong M-RoPE section then shows in the output).
* ``model-0000{1,2}-of-00002.safetensors`` + ``model.safetensors.index.json``: the published key names,
  layer 1 straddling the shards (its attention in shard 1, its MLP in shard 2), the projector in shard 2;
  stored **bfloat16** as published; no ``lm_head``.
* ``adapters/adapter_config.json`` + ``adapters/adapter_model.safetensors``: PEFT LoRA for the three
  tasks, r=4, lora_alpha=8 (scale 2, not 1, so a loader that assumes 1 fails), non-zero A and B, float32.
* ``tokenizer.json`` (+ ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``): a Qwen2-style
  byte-level BPE trained on the fly on STS sentences (``BPE_VOCAB`` ids), then the 22 Qwen added tokens
  at the same relative ids as 151643..151664; the config's token ids point at them.
* ``preprocessor_config.json``: Qwen2-VL image processor, min_pixels 3136, max_pixels 602112.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_jina import sts_sentences

TASKS = ("retrieval", "text-matching", "code")
BPE_VOCAB = 2000  # ids 0..1999; the added tokens follow, as 151643.. follow Qwen's 151643 BPE tokens
ADDED_TOKENS = (  # (content, special), Qwen order
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
TOKEN_ID = {content: BPE_VOCAB + i for i, (content, _) in enumerate(ADDED_TOKENS)}
VOCAB_SIZE = 2048  # embedding rows: the tokenizer's 2022 ids padded up, as 151936 pads 151665
LORA_RANK, LORA_ALPHA = 4, 8
MIN_PIXELS, MAX_PIXELS = 3136, 602112

TEXT = dict(hidden=64, heads=4, kv_heads=2, layers=3, intermediate=128, mrope_section=[2, 3, 3], rope_theta=10000.0)
VISION = dict(depth=2, hidden=32, heads=2, intermediate=64, fullatt=[1], window=112)
# The published shape (spec §7.1), for speed measurements (infra/gpu-check.sh): random weights measure the
# same as the real ones. The vocabulary stays small: it only sizes the embedding table.
PUBLISHED_TEXT = dict(hidden=2048, heads=16, kv_heads=2, layers=36, intermediate=11008, mrope_section=[16, 24, 24],
                      rope_theta=1000000.0)
PUBLISHED_VISION = dict(depth=32, hidden=1280, heads=16, intermediate=3420, fullatt=[7, 15, 23, 31], window=112)
PUBLISHED_LORA = (32, 32)

# Qwen2's pre-tokenizer split (the published tokenizer.json's Split regex).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_TOKENIZER_CACHE: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def tokenizer_json() -> str:
    """The (cached) ``tokenizer.json`` text: Qwen2's pipeline (NFC, regex split, byte-level BPE)."""
    if "text" in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE["text"]
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = sts_sentences("train") + sts_sentences("dev")
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    assert tok.get_vocab_size() == BPE_VOCAB, tok.get_vocab_size()
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [
        {"id": TOKEN_ID[content], "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for content, special in ADDED_TOKENS
    ]
    text = json.dumps(spec, ensure_ascii=False)
    check = Tokenizer.from_str(text)
    assert check.token_to_id("<|image_pad|>") == TOKEN_ID["<|image_pad|>"]
    assert check.get_vocab_size(with_added_tokens=True) == BPE_VOCAB + len(ADDED_TOKENS)
    _TOKENIZER_CACHE["text"] = text
    return text


def _write_tokenizer(path: Path) -> None:
    text = tokenizer_json()
    (path / "tokenizer.json").write_text(text, encoding="utf-8")
    model = json.loads(text)["model"]
    (path / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {
        str(TOKEN_ID[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                           "special": s}
        for c, s in ADDED_TOKENS
    }
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, s in ADDED_TOKENS[1:] if s], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def matryoshka_dims(hidden: int) -> list[int]:
    """The published dims are hidden/16 .. hidden (128 .. 2048); scaled the same way."""
    return [hidden // 16, hidden // 8, hidden // 4, hidden // 2, hidden]


def make_config(t: dict = TEXT, v: dict = VISION) -> dict:
    rope = {"mrope_section": t["mrope_section"], "rope_type": "default", "type": "default"}
    text_common = {
        "attention_dropout": 0.0, "bos_token_id": TOKEN_ID["<|endoftext|>"], "eos_token_id": TOKEN_ID["<|im_end|>"],
        "hidden_act": "silu", "hidden_size": t["hidden"], "initializer_range": 0.02,
        "intermediate_size": t["intermediate"], "max_position_embeddings": 128000, "max_window_layers": 70,
        "num_attention_heads": t["heads"], "num_hidden_layers": t["layers"], "num_key_value_heads": t["kv_heads"],
        "rms_norm_eps": 1e-06, "rope_scaling": rope, "rope_theta": t["rope_theta"],
    }
    return {
        "_name_or_path": "jinaai/jina-embeddings-v4",
        "architectures": ["JinaEmbeddingsV4Model"],
        "auto_map": {
            "AutoConfig": "configuration_jina_embeddings_v4.JinaEmbeddingsV4Config",
            "AutoModel": "modeling_jina_embeddings_v4.JinaEmbeddingsV4Model",
        },
        **text_common,
        "image_token_id": TOKEN_ID["<|image_pad|>"],
        "multi_vector_projector_dim": 128,
        "single_vector_pool_strategy": "mean",
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "text_config": {
            **text_common, "image_token_id": None, "model_type": "qwen2_5_vl_text", "sliding_window": None,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
            "vocab_size": VOCAB_SIZE,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.0",
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": TOKEN_ID["<|video_pad|>"],
        "vision_config": {
            "depth": v["depth"], "fullatt_block_indexes": v["fullatt"], "hidden_act": "silu",
            "hidden_size": v["hidden"], "in_channels": 3, "in_chans": 3, "initializer_range": 0.02,
            "intermediate_size": v["intermediate"], "model_type": "qwen2_5_vl", "num_heads": v["heads"],
            "out_hidden_size": t["hidden"], "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
            "temporal_patch_size": 2, "tokens_per_second": 2, "torch_dtype": "bfloat16", "window_size": v["window"],
        },
        "task_names": list(TASKS),
        "matryoshka_dims": matryoshka_dims(t["hidden"]),
        "_attn_implementation": "flash_attention_2",
        "truncate_dim": None,
        "vision_end_token_id": TOKEN_ID["<|vision_end|>"],
        "vision_start_token_id": TOKEN_ID["<|vision_start|>"],
        "vision_token_id": TOKEN_ID["<|vision_pad|>"],
    }


def preprocessor_config() -> dict:
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "max_pixels": MAX_PIXELS, "merge_size": 2,
        "min_pixels": MIN_PIXELS, "patch_size": 14, "processor_class": "JinaEmbeddingsV4Processor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2,
        "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS},
    }


def adapter_config() -> dict:
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "jinaai/jina-embeddings-v4",
        "bias": "none", "exclude_modules": ".*visual.*", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": "gaussian", "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": LORA_ALPHA, "lora_bias": False, "lora_dropout": 0.1, "modules_to_save": None,
        "peft_type": "LORA", "r": LORA_RANK, "rank_pattern": {}, "revision": None,
        "target_modules": "(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
                          "|.*(single_vector_projector|multi_vector_projector).*$)",
        "task_type": "FEATURE_EXTRACTION", "use_dora": False, "use_rslora": False,
    }


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).contiguous()


def main_state_dict(seed: int, t: dict = TEXT, v: dict = VISION, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Published main keys (spec §7.2), each tensor cast to `dtype` as made (the published shape would need
    15 GB in float32); ~1/sqrt(fan_in) keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    d, hd = t["hidden"], t["hidden"] // t["heads"]
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _randn(g, VOCAB_SIZE, d, std=0.5).to(dtype)}

    def linear(name: str, out_f: int, in_f: int, *, bias: bool, std: float | None = None) -> None:
        sd[f"{name}.weight"] = _randn(g, out_f, in_f, std=std or in_f**-0.5).to(dtype)
        if bias:
            sd[f"{name}.bias"] = _randn(g, out_f, std=0.1).to(dtype)

    def norm(name: str, size: int) -> None:
        sd[f"{name}.weight"] = (1.0 + _randn(g, size, std=0.1)).to(dtype)

    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm", d)
        # larger Q/K weights -> peaked attention, so position (M-RoPE) and causality errors show
        linear(p + "self_attn.q_proj", t["heads"] * hd, d, bias=True, std=3 * d**-0.5)
        linear(p + "self_attn.k_proj", t["kv_heads"] * hd, d, bias=True, std=3 * d**-0.5)
        linear(p + "self_attn.v_proj", t["kv_heads"] * hd, d, bias=True)
        linear(p + "self_attn.o_proj", d, t["heads"] * hd, bias=False)
        norm(p + "post_attention_layernorm", d)
        linear(p + "mlp.gate_proj", t["intermediate"], d, bias=False)
        linear(p + "mlp.up_proj", t["intermediate"], d, bias=False)
        linear(p + "mlp.down_proj", d, t["intermediate"], bias=False)
    norm("model.norm", d)

    vd, merged = v["hidden"], v["hidden"] * 4
    sd["visual.patch_embed.proj.weight"] = _randn(g, vd, 3, 2, 14, 14, std=(3 * 2 * 14 * 14) ** -0.5).to(dtype)
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        norm(p + "norm1", vd)
        norm(p + "norm2", vd)
        linear(p + "attn.qkv", 3 * vd, vd, bias=True, std=2 * vd**-0.5)
        linear(p + "attn.proj", vd, vd, bias=True)
        linear(p + "mlp.gate_proj", v["intermediate"], vd, bias=True)
        linear(p + "mlp.up_proj", v["intermediate"], vd, bias=True)
        linear(p + "mlp.down_proj", vd, v["intermediate"], bias=True)
    norm("visual.merger.ln_q", vd)
    linear("visual.merger.mlp.0", merged, merged, bias=True)
    linear("visual.merger.mlp.2", d, merged, bias=True)
    linear("multi_vector_projector", 128, d, bias=True)
    return sd


def adapter_state_dict(seed: int, t: dict = TEXT, rank: int = LORA_RANK) -> dict[str, torch.Tensor]:
    """Published adapter keys (spec §7.2): A (r, in), B (out, r) per task; no vision keys."""
    g = torch.Generator().manual_seed(seed + 1)
    d, hd = t["hidden"], t["hidden"] // t["heads"]
    shapes = {  # module -> (in, out)
        "self_attn.q_proj": (d, t["heads"] * hd), "self_attn.k_proj": (d, t["kv_heads"] * hd),
        "self_attn.v_proj": (d, t["kv_heads"] * hd), "self_attn.o_proj": (t["heads"] * hd, d),
        "mlp.gate_proj": (d, t["intermediate"]), "mlp.up_proj": (d, t["intermediate"]),
        "mlp.down_proj": (t["intermediate"], d),
    }
    modules = {f"base_model.model.model.language_model.layers.{i}.{m}": s
               for i in range(t["layers"]) for m, s in shapes.items()}
    modules["base_model.model.multi_vector_projector"] = (d, 128)
    sd = {}
    for name, (in_f, out_f) in modules.items():
        for task in TASKS:
            sd[f"{name}.lora_A.{task}.weight"] = _randn(g, rank, in_f, std=in_f**-0.5)
            sd[f"{name}.lora_B.{task}.weight"] = _randn(g, out_f, rank, std=0.15)
    return sd


def expected_main_keys(t: dict = TEXT, v: dict = VISION) -> int:
    return 1 + 12 * t["layers"] + 1 + 1 + 12 * v["depth"] + 5 + 2


def _shard_of(key: str) -> int:
    """Layer 1 straddles the shards (attention in 1, MLP in 2), as layer 19 does in the published one."""
    if key.startswith(("model.embed_tokens", "visual.", "model.layers.0.")):
        return 1
    if key.startswith("model.layers.1."):
        return 1 if ("self_attn" in key or "input_layernorm" in key) else 2
    return 2


def build(path: str | Path, *, seed: int = 0, published_shape: bool = False) -> Path:
    """Write a tiny random jina-embeddings-v4 checkpoint directory at ``path``; return ``path``.

    `published_shape`: the real model's layer sizes (36 x 2048 text, 32 x 1280 vision, r=32 adapters),
    random weights and the small vocabulary, for speed measurements (about 7 GB on disk).
    """
    path = Path(path)
    t, v = (PUBLISHED_TEXT, PUBLISHED_VISION) if published_shape else (TEXT, VISION)
    rank, alpha = PUBLISHED_LORA if published_shape else (LORA_RANK, LORA_ALPHA)
    (path / "adapters").mkdir(parents=True, exist_ok=True)
    _write_tokenizer(path)
    (path / "config.json").write_text(json.dumps(make_config(t, v), indent=2), encoding="utf-8")
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2), encoding="utf-8")

    sd = main_state_dict(seed, t, v)
    assert len(sd) == expected_main_keys(t, v), (len(sd), expected_main_keys(t, v))
    names = {1: "model-00001-of-00002.safetensors", 2: "model-00002-of-00002.safetensors"}
    shards: dict[int, dict[str, torch.Tensor]] = {1: {}, 2: {}}
    for key, tensor in sd.items():
        shards[_shard_of(key)][key] = tensor
    for i, shard in shards.items():
        save_file(shard, str(path / names[i]), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(x.numel() * x.element_size() for x in sd.values())},
        "weight_map": {k: names[i] for i, shard in shards.items() for k in sorted(shard)},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")

    acfg = {**adapter_config(), "r": rank, "lora_alpha": alpha}
    (path / "adapters" / "adapter_config.json").write_text(json.dumps(acfg, indent=2), encoding="utf-8")
    save_file(adapter_state_dict(seed, t, rank), str(path / "adapters" / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return path
