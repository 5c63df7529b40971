"""Checkpoint tensors from a model directory: safetensors only (pickle checkpoints can run code)."""

from __future__ import annotations

from pathlib import Path

import torch


def safetensors_files(path: str | Path) -> list[Path]:
    """The `*.safetensors` files in `path`, sorted; a FileNotFoundError naming the rule if there are none."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickle checkpoints are not loaded)")
    return files


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in `path`, by checkpoint key."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        state.update(load_file(str(f)))
    return state
