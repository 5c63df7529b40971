"""Fixtures for the jina-embeddings-v3 model tests (tiny random checkpoint in the published layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_jina import make_tiny_jina


@pytest.fixture(scope="session")
def tiny_jina_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random jina-embeddings-v3 checkpoint directory (hidden 32, 2 layers, 4 heads), seed 0."""
    return make_tiny_jina(tmp_path_factory.mktemp("tiny_jina") / "jina-embeddings-v3-tiny", seed=0)
