"""Images -> jina-embeddings-v4 model inputs: decode, Qwen2-VL preprocessing, prompt ids, M-RoPE positions.

No model weights and no GPU: a CPU stage can prepare images the way `TextTokenizer` prepares text. Pixels
go through transformers' PIL image processor (`Qwen2VLImageProcessorPil`: smart resize to multiples of
28 inside the pixel bounds, bicubic, CLIP mean/std, 14-pixel patches, the frame doubled for the temporal
patch of 2) configured from preprocessor_config.json, so torchvision is not needed. The published code
resizes with the torchvision processor; the two differ by about one LSB where a resize happens (§7.2).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# §7: the fixed prompt every image is embedded in; <|image_pad|> expands to one token per merged patch.
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"

ImageInput = Any  # a PIL.Image.Image, or the encoded bytes of a PNG, JPEG, WebP, ... file
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # §7.2


@dataclass(frozen=True)
class PreparedImage:
    """One image as the model takes it; `len` is its token count (what token budgets count)."""

    ids: np.ndarray  # (N,) int64: the prompt with <|image_pad|> repeated once per vision token
    positions: np.ndarray  # (3, N) int64 M-RoPE positions (temporal, height, width)
    pixel_values: np.ndarray  # (patches, C * temporal_patch * patch * patch) float32
    grid_thw: tuple[int, int, int]  # patch grid before the 2x2 merge
    pool_span: tuple[int, int]  # [start, stop) of vision_start .. vision_end, inclusive of both (§7)

    def __len__(self) -> int:
        return len(self.ids)


def decode_image(item: ImageInput, index: int = 0):
    """A PIL image in RGB; bytes are decoded here, and bytes that are no image raise a ValueError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decode now: a truncated file fails here, not inside a batch
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"image {index}: cannot decode {len(data)} bytes starting {data[:8].hex()} "
                             f"as an image ({type(err).__name__}: {err})") from err
    raise TypeError(f"image {index}: expected a PIL image or encoded image bytes, got {type(item).__name__}")


def mrope_positions(n_before: int, grid: tuple[int, int, int], n_after: int) -> np.ndarray:
    """(3, n_before + t*h*w + n_after) positions for text, then one image grid, then text (§7.2).

    Text takes the same position on all three streams; the image's (t, h, w) grid (after merging) is
    offset by the text before it; the text after continues from the largest image position + 1.
    """
    t, h, w = grid
    text = np.broadcast_to(np.arange(n_before, dtype=np.int64), (3, n_before))
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    image = n_before + np.stack([tt.ravel(), hh.ravel(), ww.ravel()]).astype(np.int64)  # (3, t*h*w)
    start = int(image.max()) + 1 if image.size else n_before
    after = np.broadcast_to(start + np.arange(n_after, dtype=np.int64), (3, n_after))
    return np.concatenate([text, image, after], axis=1)


class ImagePreparer:
    """Image -> `PreparedImage`, from the model directory's preprocessor_config.json and prompt token ids.

    The pixel bounds come from preprocessor_config.json (`min_pixels`/`max_pixels`, or `size`); the
    published ones are 3136 and 602,112 (768 vision tokens).
    """

    def __init__(self, preprocessor: dict, prompt_ids: np.ndarray, *, image_token_id: int,
                 vision_start_token_id: int, vision_end_token_id: int):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        size = preprocessor.get("size") or {}
        self.min_pixels = preprocessor.get("min_pixels", size.get("shortest_edge"))
        self.max_pixels = preprocessor.get("max_pixels", size.get("longest_edge"))
        self.merge_size = preprocessor.get("merge_size", 2)
        self.processor = Qwen2VLImageProcessorPil(
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, patch_size=preprocessor.get("patch_size", 14),
            temporal_patch_size=preprocessor.get("temporal_patch_size", 2), merge_size=self.merge_size,
            image_mean=preprocessor.get("image_mean", CLIP_MEAN), image_std=preprocessor.get("image_std", CLIP_STD),
        )
        pads = np.flatnonzero(prompt_ids == image_token_id)
        if len(pads) != 1:
            raise ValueError(f"the image prompt must hold one <|image_pad|>, got {len(pads)}: this is a bug")
        self.before, self.after = prompt_ids[: pads[0]], prompt_ids[pads[0] + 1 :]
        self.image_token_id = image_token_id
        self.pool_start = _only(self.before, vision_start_token_id, "<|vision_start|> before <|image_pad|>")
        self.pool_stop_after = _only(self.after, vision_end_token_id, "<|vision_end|> after <|image_pad|>") + 1

    @classmethod
    def from_dir(cls, path: str | Path, prompt_ids: np.ndarray, **token_ids: int) -> ImagePreparer:
        preprocessor = json.loads((Path(path) / "preprocessor_config.json").read_text())
        return cls(preprocessor, prompt_ids, **token_ids)

    def vision_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // self.merge_size**2

    def prepare(self, item: ImageInput, index: int = 0) -> PreparedImage:
        image = decode_image(item, index)
        feats = self.processor(images=[image], return_tensors="np")
        grid = tuple(int(x) for x in feats["image_grid_thw"][0])
        n = self.vision_tokens(grid)  # type: ignore[arg-type]
        ids = np.concatenate([self.before, np.full(n, self.image_token_id, dtype=np.int64), self.after])
        merged = (grid[0], grid[1] // self.merge_size, grid[2] // self.merge_size)
        return PreparedImage(
            ids=ids.astype(np.int64),
            positions=mrope_positions(len(self.before), merged, len(self.after)),
            pixel_values=np.ascontiguousarray(feats["pixel_values"], dtype=np.float32),
            grid_thw=grid,  # type: ignore[arg-type]
            pool_span=(self.pool_start, len(self.before) + n + self.pool_stop_after),
        )

    def prepare_all(self, items: Sequence[ImageInput]) -> list[PreparedImage]:
        if isinstance(items, (bytes, str)) or not isinstance(items, Sequence):
            raise TypeError("images must be a sequence of PIL images or encoded image bytes")
        return [self.prepare(item, i) for i, item in enumerate(items)]


def _only(ids: np.ndarray, token: int, what: str) -> int:
    where = np.flatnonzero(ids == token)
    if len(where) != 1:
        raise ValueError(f"the image prompt must hold one {what}: this is a bug")
    return int(where[0])
