"""jina-embeddings-v3 as an `Encoder`: tasks select LoRA adapters and instructions (spec §4).

On CUDA with flash-attn and a 16-bit dtype the batch is packed (no padding computed, rotary per
sequence via restarting positions); elsewhere it is padded and attention is SDPA with a key mask.
`attention="varlen_reference"` runs the packed path on CPU with an SDPA stand-in for the flash
kernel, which is how the packed path is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model import attention
from model.attention import AttentionImpl
from model.encoder import Encoder, EncoderInfo
from model.jina_v3 import JinaV3Config, JinaV3Model, load_jina_v3
from model.packing import pack, pad, task_runs, unpad
from model.tokenization import TextTokenizer


def describe_jina_v3(path: str | Path, *, revision: str, name: str) -> tuple[TextTokenizer, EncoderInfo]:
    """Tokenizer and model facts from the directory, without loading weights."""
    cfg = JinaV3Config.from_dir(path)
    tokenizer = TextTokenizer.from_file(
        Path(path) / "tokenizer.json", max_length=cfg.max_length, instructions=cfg.task_instructions
    )
    info = EncoderInfo(
        family="jina-v3",
        name=name,
        revision=revision,
        dim=cfg.hidden_size,
        matryoshka_dims=cfg.matryoshka_dimensions,
        tasks=cfg.lora_adaptations,
        default_task="retrieval.passage" if "retrieval.passage" in cfg.lora_adaptations else None,
        query_task="retrieval.query" if "retrieval.query" in cfg.lora_adaptations else None,
        max_length=cfg.max_length,
    )
    return tokenizer, info


class JinaV3Encoder(Encoder):
    def __init__(
        self,
        model: JinaV3Model,
        tokenizer: TextTokenizer,
        info: EncoderInfo,
        *,
        max_batch_tokens: int,
        attention_impl: AttentionImpl | None = None,
        cpu_streams: int = 1,
    ):
        param = next(model.parameters())
        super().__init__(
            info=info, tokenizer=tokenizer, device=param.device, dtype=param.dtype, max_batch_tokens=max_batch_tokens,
            cpu_streams=cpu_streams,
        )
        self.model = model
        self.attention_impl = attention_impl or attention.default_impl(param.device, param.dtype)
        self.pad_id = model.cfg.pad_token_id

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int,
        revision: str,
        name: str,
        attention_impl: AttentionImpl | None = None,
        cpu_streams: int = 1,
    ) -> JinaV3Encoder:
        tokenizer, info = describe_jina_v3(path, revision=revision, name=name)
        model = load_jina_v3(path, device=device, dtype=dtype)
        return cls(model, tokenizer, info, max_batch_tokens=max_batch_tokens, attention_impl=attention_impl,
                   cpu_streams=cpu_streams)

    @property
    def packed(self) -> bool:
        return self.attention_impl != "padded"

    def _forward(self, seqs: Sequence[np.ndarray], tasks: Sequence[int | None]) -> torch.Tensor:
        if self.packed:
            b = pack(seqs, self.device)
            kernel = attention.packed_kernel(self.attention_impl)
            runs = task_runs(tasks, b.lengths)  # runs over packed tokens
            hidden = self.model(b.input_ids, b.position_ids, kernel(b.cu_seqlens, b.max_seqlen), runs)
            return hidden.float()
        p = pad(seqs, self.pad_id, self.device)
        runs = task_runs(tasks)  # runs over batch rows
        hidden = self.model(p.input_ids, p.position_ids, attention.padded(p.attention_mask), runs)
        return unpad(hidden, p.attention_mask).float()
