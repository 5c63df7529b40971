"""The encode API's own rules (`model.encoder`), on model facts alone: no weights needed."""

from __future__ import annotations

import pytest

from model.encoder import EncoderInfo


def _info(matryoshka_dims: tuple[int, ...] | None, dim: int = 64) -> EncoderInfo:
    return EncoderInfo(family="test", name="m", revision="r", dim=dim, matryoshka_dims=matryoshka_dims, tasks=(),
                       default_task=None, query_task=None, max_length=32)


def test_matryoshka_dims_are_the_only_choices_and_an_error_lists_them():
    info = _info((8, 16, 32, 64))
    assert info.check_dims((32, 8, 32, 64)) == (32, 8, 64)  # repeats dropped, order kept
    with pytest.raises(ValueError, match=r"dim 12 is not available from m; valid dims: 8, 16, 32, 64$"):
        info.check_dims((8, 12))


def test_without_matryoshka_dims_any_prefix_is_a_choice():
    info = _info(None)
    assert info.check_dims((1, 7, 64)) == (1, 7, 64)
    for bad in (0, 65, -3):
        with pytest.raises(ValueError, match=rf"dim {bad} is not available from m; valid dims: 1\.\.64$"):
            info.check_dims((bad,))


def test_the_full_dim_is_always_a_choice():
    assert _info((8, 16)).check_dims((64,)) == (64,)
    assert _info(None).check_dims(()) == ()
