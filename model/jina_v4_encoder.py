"""jina-embeddings-v4 as an `Encoder`: texts and images, single vectors and multi-vectors (spec §7).

Tasks (`retrieval`, `text-matching`, `code`) select LoRA adapters; prompts (`query`, `passage`) select the
text prefix "Query: " / "Passage: ", except that text-matching always uses "Query: " (§7, §7.2). A task
of None means the default task ("retrieval"): the published model always runs with an adapter.

Single vector: mean of the final hidden states over the text's tokens (prefix included), or over an
image's vision_start..vision_end, then Matryoshka truncation and L2 normalization. Multi-vector: the
projector (with the task's LoRA) on every token of the input (prefix and chat-template tokens kept),
L2-normalized per token; float32 (tokens, 128) arrays, one per input.

The trunk is causal. On CUDA with a 16-bit dtype, batches are packed (no padding computed) and run
through the varlen kernel with causal=True, and the vision tower's window and full attention through
the same kernel (bidirectional); elsewhere they are right-padded and SDPA runs causal (no key
mask is needed: a real token's earlier keys are all real). `attention="varlen_reference"` runs the
packed path on CPU with an SDPA stand-in, which is how the packed path is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model import attention, late_chunking
from model.attention import AttentionImpl
from model.encoder import Encoder, EncoderInfo, PromptArg, TaskArg
from model.images import IMAGE_PROMPT, ImageInput, ImagePreparer, PreparedImage
from model.jina_v4 import JinaV4Config, JinaV4Model, load_jina_v4
from model.packing import pack, pad, pool_spans, task_runs, unpad
from model.tokenization import TextTokenizer
from model.vision_attention import vision_attention_name

PROMPTS = ("query", "passage")
PROMPT_PREFIX = {"query": "Query: ", "passage": "Passage: "}  # §7: f"{Query|Passage}: {text}"
ALWAYS_QUERY_TASKS = ("text-matching",)  # §7.2: the documented rule, whatever the prompt


def prompt_prefixes(tasks: Sequence[str]) -> dict[tuple[str, str], str]:
    """(task, prompt) -> the text put before the input."""
    return {(t, p): PROMPT_PREFIX["query" if t in ALWAYS_QUERY_TASKS else p] for t in tasks for p in PROMPTS}


def describe_jina_v4(path: str | Path, *, revision: str, name: str) -> tuple[TextTokenizer, EncoderInfo]:
    """Tokenizer and model facts from the directory, without loading weights."""
    cfg = JinaV4Config.from_dir(path)
    tokenizer = TextTokenizer.from_file(
        Path(path) / "tokenizer.json", max_length=cfg.max_length, instructions=prompt_prefixes(cfg.task_names)
    )
    info = EncoderInfo(
        family="jina-v4",
        name=name,
        revision=revision,
        dim=cfg.hidden_size,
        matryoshka_dims=cfg.matryoshka_dims,
        tasks=cfg.task_names,
        default_task="retrieval" if "retrieval" in cfg.task_names else cfg.task_names[0],
        query_task="retrieval" if "retrieval" in cfg.task_names else cfg.task_names[0],
        max_length=cfg.max_length,
        prompts=PROMPTS,
        default_prompt="passage",
        query_prompt="query",
        multi_vector_dim=cfg.multi_vector_dim,
        modalities=("text", "image"),
    )
    return tokenizer, info


def image_preparer(path: str | Path, tokenizer: TextTokenizer, cfg: JinaV4Config) -> ImagePreparer:
    """What turns images into model inputs (CPU only, no weights): for the encoder and for CPU stages."""
    prompt_ids = tokenizer.encode([IMAGE_PROMPT], [""])[0]
    return ImagePreparer.from_dir(
        path, prompt_ids, image_token_id=cfg.image_token_id, vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id,
    )


class JinaV4Encoder(Encoder):
    def __init__(
        self,
        model: JinaV4Model,
        tokenizer: TextTokenizer,
        info: EncoderInfo,
        images: ImagePreparer,
        *,
        max_batch_tokens: int,
        attention_impl: AttentionImpl | None = None,
        cpu_streams: int = 1,
    ):
        param = next(model.model.parameters())
        super().__init__(
            info=info, tokenizer=tokenizer, device=param.device, dtype=param.dtype, max_batch_tokens=max_batch_tokens,
            cpu_streams=cpu_streams,
        )
        self.model = model
        self.images = images
        self.attention_impl = attention_impl or attention.default_impl(param.device, param.dtype)
        self.pad_id = tokenizer.token_id("<|endoftext|>") or 0  # §7.2: pad is <|endoftext|>, right padding

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
    ) -> JinaV4Encoder:
        tokenizer, info = describe_jina_v4(path, revision=revision, name=name)
        cfg = JinaV4Config.from_dir(path)
        impl = attention_impl or attention.default_impl(device, dtype)
        # the vision tower's attention runs the same packed kernel as the decoder (`vision_attention.py`)
        model = load_jina_v4(path, device=device, dtype=dtype, vision_attention=vision_attention_name(impl))
        return cls(model, tokenizer, info, image_preparer(path, tokenizer, cfg), max_batch_tokens=max_batch_tokens,
                   attention_impl=impl, cpu_streams=cpu_streams)

    @property
    def packed(self) -> bool:
        return self.attention_impl != "padded"

    def resolve_tasks(self, task: TaskArg, n: int, prompt: PromptArg = None) -> tuple[list[int | None], list[str]]:
        """As `Encoder.resolve_tasks`, with None meaning the default task (the model always runs an adapter)."""
        if task is None:
            task = self.info.default_task
        elif not isinstance(task, str):
            task = [self.info.default_task if t is None else t for t in task]
        return super().resolve_tasks(task, n, prompt)

    # -- public API beyond Encoder ---------------------------------------------------------------------
    def encode_multi(
        self, items: Sequence[str] | Sequence[ImageInput], *, task: TaskArg = None, prompt: PromptArg = None
    ) -> list[np.ndarray]:
        """Per-token vectors: one float32 (tokens, 128) array per text or per image, L2-normalized per token.

        Items are all texts (prompted like `encode`) or all images (PIL or encoded bytes; no prompt).
        """
        if isinstance(items, (str, bytes)):
            raise TypeError("encode_multi takes a sequence of texts or images, not a single one")
        items = list(items)
        if all(isinstance(x, str) for x in items):
            task_ids, prefixes = self.resolve_tasks(task, len(items), prompt)
            return [v.numpy() for v in self.embed_ids_multi(self.tokenizer.encode(items, prefixes), task_ids)]
        if any(isinstance(x, str) for x in items):
            raise TypeError("encode_multi takes all texts or all images, not a mix")
        if prompt is not None:
            raise ValueError("images take no prompt: they are embedded in the fixed image prompt (spec §7)")
        task_ids, _ = self.resolve_tasks(task, len(items))
        return [v.numpy() for v in self.embed_images_multi(self.images.prepare_all(items), task_ids)]

    def encode_images(
        self, images: Sequence[ImageInput], *, task: TaskArg = None, dim: int | None = None, normalize: bool = True
    ) -> np.ndarray:
        """One vector per image (PIL or encoded bytes), in the text vectors' space: (n, dim or full) float32.

        Undecodable bytes raise a ValueError naming the image's index before anything runs.
        """
        prepared = self.images.prepare_all(images)
        task_ids, _ = self.resolve_tasks(task, len(prepared))
        self.check_dim(dim)
        return self.finalize(self.embed_images(prepared, task_ids), dim, normalize)

    # -- token-level API -------------------------------------------------------------------------------
    # Each call is one forward pass; `_outputs` takes from its states the pooled vectors, the per-token ones,
    # or both (what a pipeline storing both needs: half the compute of two calls).
    @torch.inference_mode()
    def embed_ids_multi(self, seqs: Sequence[np.ndarray], tasks: Sequence[int | None]) -> list[torch.Tensor]:
        """Normalized (N_i, 128) float32 per-token vectors of token-id sequences, in input order."""
        return self._outputs(self._run_ids(seqs, tasks), tasks, len(seqs), pool=False)[1]

    @torch.inference_mode()
    def embed_ids_with_multi(
        self, seqs: Sequence[np.ndarray], tasks: Sequence[int | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`embed_ids` and `embed_ids_multi` of the same sequences from one forward pass."""
        return self._outputs(self._run_ids(seqs, tasks), tasks, len(seqs))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[PreparedImage], tasks: Sequence[int | None]) -> torch.Tensor:
        """Full-dimension, unnormalized vectors (n, d): the mean over vision_start..vision_end of each image.

        Batches are bounded by the token budget (vision tokens plus the ~20 prompt tokens per image).
        """
        return self._outputs(self._run_images(images, tasks), tasks, len(images), multi=False,
                             spans=[im.pool_span for im in images])[0]

    @torch.inference_mode()
    def embed_images_multi(self, images: Sequence[PreparedImage], tasks: Sequence[int | None]) -> list[torch.Tensor]:
        """Normalized (N_i, 128) float32 per-token vectors of every token of each image's prompt."""
        return self._outputs(self._run_images(images, tasks), tasks, len(images), pool=False)[1]

    @torch.inference_mode()
    def embed_images_with_multi(
        self, images: Sequence[PreparedImage], tasks: Sequence[int | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`embed_images` and `embed_images_multi` of the same images from one forward pass."""
        return self._outputs(self._run_images(images, tasks), tasks, len(images), spans=[im.pool_span for im in images])

    def _run_ids(self, seqs: Sequence[np.ndarray], tasks: Sequence[int | None]):
        return self._run([np.asarray(s) for s in seqs], list(tasks))

    def _run_images(self, images: Sequence[PreparedImage], tasks: Sequence[int | None]):
        return self._run(list(images), list(tasks), self._forward_images)

    def _outputs(self, batches, tasks: Sequence[int | None], n: int, *, pool: bool = True, multi: bool = True,
                 spans: Sequence[tuple[int, int]] | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        """From `_run`'s batches: (n, d) unnormalized means (over each input, or over its `spans`) if `pool`, and
        each input's normalized (N_i, 128) per-token vectors if `multi`; in input order."""
        pooled = torch.empty((n, self.dim), dtype=torch.float32) if pool else None
        vectors: list[torch.Tensor] | None = [torch.empty(0)] * n if multi else None
        for batch, states, offsets in batches:
            if pooled is not None and spans is None:
                pooled[batch] = self._pool(states, offsets).cpu()
            elif pooled is not None:
                sp = torch.tensor([spans[i] for i in batch], device=states.device)
                pooled[batch] = pool_spans(states, offsets[:-1] + sp[:, 0], offsets[:-1] + sp[:, 1]).cpu()
            if vectors is not None:
                vecs = self._project(states, [tasks[i] for i in batch], (offsets[1:] - offsets[:-1]).tolist())
                bounds = offsets.tolist()
                for row, i in enumerate(batch):
                    vectors[i] = vecs[bounds[row] : bounds[row + 1]].cpu()
        return pooled, vectors

    def _project(self, states: torch.Tensor, tasks: Sequence[int | None], lengths: Sequence[int]) -> torch.Tensor:
        """Normalized (T, 128) float32 per-token vectors of packed states of sequences of `lengths`."""
        vecs = self.model.project(states.to(self.dtype), task_runs(list(tasks), list(lengths))).float()
        return vecs / vecs.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    @torch.inference_mode()
    def embed_id_spans_with_multi(
        self,
        seqs: Sequence[np.ndarray],
        spans: Sequence[np.ndarray],
        tasks: Sequence[int | None],
        *,
        window: int | None = None,
        overlap: int | None = None,
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Late chunking with both outputs: per document, `embed_id_spans`'s (S, d) span means, and for each span
        the per-token vectors of its tokens (the same stitched states: a long document's windows as there)."""
        window, overlap = late_chunking.window_and_overlap(window, overlap, self.max_length)
        pooled: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        multi: list[list[torch.Tensor]] = [[] for _ in seqs]
        for doc, states in late_chunking.stitched_documents(self._run, [np.asarray(s) for s in seqs], list(tasks),
                                                            window=window, overlap=overlap,
                                                            group_tokens=self.max_batch_tokens):
            pooled[doc] = late_chunking.pool_doc_spans(states, spans[doc], doc)
            vecs = self._project(states, [tasks[doc]], [states.shape[0]]).cpu()
            multi[doc] = [vecs[s:e] for s, e in np.asarray(spans[doc]).reshape(-1, 2).tolist()]
        return pooled, multi

    # -- forward ---------------------------------------------------------------------------------------
    def _forward(self, seqs: Sequence[np.ndarray], tasks: Sequence[int | None]) -> torch.Tensor:
        positions = [np.broadcast_to(np.arange(len(s), dtype=np.int64), (3, len(s))) for s in seqs]
        return self._decode(seqs, positions, tasks)

    def _forward_images(self, images: Sequence[PreparedImage], tasks: Sequence[int | None]) -> torch.Tensor:
        pixels = torch.from_numpy(np.concatenate([im.pixel_values for im in images])).to(self.device)
        grid = torch.tensor([im.grid_thw for im in images], device=self.device)
        features = self.model.image_features(pixels, grid)  # (vision tokens of all images, d), in order
        return self._decode([im.ids for im in images], [im.positions for im in images], tasks, features)

    def _decode(
        self,
        seqs: Sequence[np.ndarray],
        positions: Sequence[np.ndarray],
        tasks: Sequence[int | None],
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed (T, d) float32 final states; image features replace the <|image_pad|> embeddings."""
        if self.packed:
            b = pack(seqs, self.device)
            pos = torch.from_numpy(np.concatenate(positions, axis=1)).to(self.device)  # (3, T)
            x = self._embed(b.input_ids, image_features)
            attend = attention.packed_kernel(self.attention_impl)(b.cu_seqlens, b.max_seqlen, causal=True)
            return self.model(x, pos, attend, task_runs(tasks, b.lengths)).float()
        p = pad(seqs, self.pad_id, self.device)
        pos = np.zeros((3, *p.input_ids.shape), dtype=np.int64)  # (3, B, L); padding positions unused
        for row, q in enumerate(positions):
            pos[:, row, : q.shape[1]] = q
        x = self._embed(p.input_ids, image_features)
        attend = attention.padded(p.attention_mask, causal=True)
        hidden = self.model(x, torch.from_numpy(pos).to(self.device), attend, task_runs(tasks))
        return unpad(hidden, p.attention_mask).float()

    def _embed(self, ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        x = self.model.embed(ids)
        if image_features is None:
            return x
        slots = ids == self.model.cfg.image_token_id
        if int(slots.sum()) != image_features.shape[0]:
            raise AssertionError("image tokens and vision features differ in number: this is a bug")
        x[slots] = image_features.to(x.dtype)
        return x

