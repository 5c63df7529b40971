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


def read_sharded_safetensors(path: str | Path, index: str = "model.safetensors.index.json") -> dict[str, torch.Tensor]:
    """Every tensor the index lists, read from its shard; the shards must hold exactly the index's keys.

    The index is the source of truth for a sharded checkpoint (jina-v4's layer 19 straddles two shards).
    """
    import json

    from safetensors.torch import load_file

    path = Path(path)
    index_file = path / index
    if not index_file.is_file():
        raise FileNotFoundError(f"{path}: no {index} (a sharded safetensors checkpoint is expected)")
    weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        for key, tensor in load_file(str(path / shard)).items():
            if weight_map.get(key) != shard:
                raise ValueError(f"{path / shard}: tensor {key!r} is not listed for this shard in {index}")
            state[key] = tensor
    missing = set(weight_map) - set(state)
    if missing:
        raise KeyError(f"{path}: {index} lists tensors no shard holds: {sorted(missing)[:5]}")
    return state
