"""Independent reference encoder for jina-embeddings-v4 checkpoints in the published layout (spec §7).

Imports nothing from the project's ``model`` package. Built from:

* ``transformers``' own ``Qwen2_5_VLModel`` (vision tower + text decoder, eager attention, float32),
  configured by ``Qwen2_5_VLConfig(**config.json)``; the published keys are mapped onto it by hand
  (``model.*`` -> ``language_model.*``, ``visual.*`` as is) and loaded strictly;
* a wrapper module holding it as ``model`` beside ``multi_vector_projector`` (nn.Linear), so that the
  published adapter keys (``base_model.model.model.language_model...``, ``base_model.model.multi_vector_
  projector...``) are exactly PEFT's names for it;
* ``peft``: one stock LoRA adapter per task, built from ``adapters/adapter_config.json`` (r, lora_alpha,
  target_modules, exclude_modules) and filled with that task's A/B tensors; ``set_adapter(task)`` picks it;
* ``transformers``' ``Qwen2Tokenizer`` and ``Qwen2VLImageProcessorPil`` (the PIL image processor).

Encoding follows the published code (spec §7, §7.1): text -> ``"Query: "``/``"Passage: "`` + text
(text-matching always ``"Query: "``), right-padded batch, last (post-norm) hidden state, mean over the
attention mask; images -> the fixed chat prompt with ``<|image_pad|>`` expanded to t*h*w/4 tokens, the
model's own M-RoPE positions (``mm_token_type_ids``), mean over vision_start..vision_end. Single vectors:
truncate to ``dim``, L2-normalize. Multi vectors: projector on every attended token, L2 per token.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
PREFIXES = {"query": "Query", "passage": "Passage"}
TEXT_MAX_LENGTH = 32768


def read_config(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / "config.json").read_text(encoding="utf-8"))


def _main_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(ckpt_dir / shard)))
    assert set(sd) == set(index["weight_map"]), "index and shards disagree"
    return {k: v.float() for k, v in sd.items()}


class _Embedder(nn.Module):
    """What PEFT wraps: the published model's module names (``model``, ``multi_vector_projector``)."""

    def __init__(self, qwen: nn.Module, hidden: int, proj_dim: int):
        super().__init__()
        self.model = qwen
        self.multi_vector_projector = nn.Linear(hidden, proj_dim)


class ReferenceV4:
    def __init__(self, ckpt_dir: str | Path):
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2Tokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.dir = Path(ckpt_dir)
        raw = read_config(self.dir)
        self.raw = raw
        config = Qwen2_5_VLConfig(**raw)
        config._attn_implementation = "eager"
        config.text_config._attn_implementation = "eager"
        config.vision_config._attn_implementation = "eager"
        torch.manual_seed(0)
        qwen = Qwen2_5_VLModel(config)
        hidden = config.text_config.hidden_size
        # float32 throughout: transformers 5 builds the modules in the config's torch_dtype (bfloat16 here)
        embedder = _Embedder(qwen, hidden, raw["multi_vector_projector_dim"]).float()

        main = _main_state_dict(self.dir)
        mapped = {}
        for key, tensor in main.items():
            if key.startswith("model."):
                mapped["model.language_model." + key[len("model."):]] = tensor
            else:  # visual.* and multi_vector_projector.*
                mapped[("model." if key.startswith("visual.") else "") + key] = tensor
        embedder.load_state_dict(mapped, strict=True)

        acfg = json.loads((self.dir / "adapters" / "adapter_config.json").read_text())
        adapters = {k: v.float() for k, v in load_file(str(self.dir / "adapters" / "adapter_model.safetensors")).items()}
        self.tasks = tuple(raw["task_names"])
        lora = LoraConfig(r=acfg["r"], lora_alpha=acfg["lora_alpha"], lora_dropout=acfg["lora_dropout"],
                          target_modules=acfg["target_modules"], exclude_modules=acfg["exclude_modules"],
                          bias="none")
        peft_model = None
        for task in self.tasks:
            # stock PEFT names: ...lora_A.weight; the published file holds ...lora_A.<task>.weight
            sd = {k.replace(f".{task}.weight", ".weight"): v for k, v in adapters.items() if f".{task}.weight" in k}
            if peft_model is None:
                peft_model = get_peft_model(embedder, lora, adapter_name=task)
            else:
                peft_model.add_adapter(task, lora)
            result = set_peft_model_state_dict(peft_model, sd, adapter_name=task)
            assert not result.unexpected_keys, result.unexpected_keys[:5]
            missing = [k for k in result.missing_keys if "lora_" in k and f".{task}." in k]
            assert not missing, missing[:5]
        self.peft = peft_model.eval()
        assert {p.dtype for p in self.peft.parameters()} == {torch.float32}
        self.embedder = embedder
        self.config = config
        self.tokenizer = Qwen2Tokenizer.from_pretrained(str(self.dir))
        pre = json.loads((self.dir / "preprocessor_config.json").read_text())
        self.image_processor = Qwen2VLImageProcessorPil(
            min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], patch_size=pre["patch_size"],
            temporal_patch_size=pre["temporal_patch_size"], merge_size=pre["merge_size"],
            image_mean=pre["image_mean"], image_std=pre["image_std"],
        )

    # -- forward ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _hidden(self, task: str, **inputs) -> torch.Tensor:
        self.peft.set_adapter(task)
        out = self.embedder.model(**inputs, use_cache=False)
        return out.last_hidden_state  # (B, L, d), after the final RMSNorm

    @torch.no_grad()
    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedder.multi_vector_projector(hidden)  # LoRA of the active adapter applied by PEFT

    # -- text ---------------------------------------------------------------------------------------
    def text_inputs(self, texts: Sequence[str], task: str, prompt: str) -> dict[str, torch.Tensor]:
        prefix = PREFIXES["query"] if task == "text-matching" else PREFIXES[prompt]
        return self.tokenizer([f"{prefix}: {t}" for t in texts], padding="longest", truncation=True,
                              max_length=TEXT_MAX_LENGTH, return_tensors="pt")

    def text_ids(self, texts: Sequence[str], task: str, prompt: str) -> list[list[int]]:
        batch = self.text_inputs(texts, task, prompt)
        return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]

    def encode_text(self, texts: Sequence[str], *, task: str, prompt: str, dim: int | None = None) -> np.ndarray:
        batch = self.text_inputs(texts, task, prompt)
        hidden = self._hidden(task, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return _finalize(pooled, dim)

    def encode_text_multi(self, texts: Sequence[str], *, task: str, prompt: str) -> list[np.ndarray]:
        batch = self.text_inputs(texts, task, prompt)
        hidden = self._hidden(task, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        vecs = torch.nn.functional.normalize(self._project(hidden), dim=-1)
        return [v[m.bool()].numpy() for v, m in zip(vecs, batch["attention_mask"], strict=True)]

    # -- images -------------------------------------------------------------------------------------
    def image_inputs(self, images: Sequence) -> dict[str, torch.Tensor]:
        from PIL import Image

        pil = [im.convert("RGB") if isinstance(im, Image.Image) else im for im in images]
        feats = self.image_processor(images=pil, return_tensors="pt")
        grid = feats["image_grid_thw"]
        texts = [IMAGE_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * (int(g.prod()) // 4), 1) for g in grid]
        batch = self.tokenizer(texts, padding="longest", return_tensors="pt")
        mm = (batch["input_ids"] == self.config.image_token_id).int()
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=feats["pixel_values"], image_grid_thw=grid, mm_token_type_ids=mm)

    def _image_hidden(self, images: Sequence, task: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = self.image_inputs(images)
        return self._hidden(task, **inputs), inputs

    def encode_images(self, images: Sequence, *, task: str, dim: int | None = None) -> np.ndarray:
        hidden, inputs = self._image_hidden(images, task)
        ids = inputs["input_ids"]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        start = (ids == self.config.vision_start_token_id).int().argmax(1, keepdim=True)
        end = (ids == self.config.vision_end_token_id).int().argmax(1, keepdim=True)
        span = ((pos >= start) & (pos <= end)).unsqueeze(-1).float()
        return _finalize((hidden * span).sum(1) / span.sum(1), dim)

    def encode_images_multi(self, images: Sequence, *, task: str) -> list[np.ndarray]:
        hidden, inputs = self._image_hidden(images, task)
        vecs = torch.nn.functional.normalize(self._project(hidden), dim=-1)
        return [v[m.bool()].numpy() for v, m in zip(vecs, inputs["attention_mask"], strict=True)]


def _finalize(pooled: torch.Tensor, dim: int | None) -> np.ndarray:
    if dim is not None:
        pooled = pooled[:, :dim]
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@functools.cache
def reference(ckpt_dir: str) -> ReferenceV4:
    return ReferenceV4(ckpt_dir)
