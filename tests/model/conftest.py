"""Fixtures for the model tests: the packaged MiniLM, a tiny random jina-embeddings-v3 checkpoint (v4: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shared_data import minilm_dir
from tiny_jina import make_tiny_jina

from model import load_encoder


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 on CPU in float32 (reference-exact), one per test module."""
    return load_encoder(str(minilm_dir()), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_jina_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random jina-embeddings-v3 checkpoint directory (hidden 32, 2 layers, 4 heads), seed 0."""
    return make_tiny_jina(tmp_path_factory.mktemp("tiny_jina") / "jina-embeddings-v3-tiny", seed=0)
