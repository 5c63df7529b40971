"""Image column values: what is embedded, and the reason a row is rejected otherwise (issue #15)."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.images import decode_problem, image_bytes


def encoded(fmt: str, size=(56, 28)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def fetch(url: str) -> bytes:
    return fsspec.core.url_to_fs(url)[0].cat_file(url)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_bytes_are_images(fmt):
    data = encoded(fmt)
    assert decode_problem(data) is None
    assert image_bytes(data, fetch) == (data, None)


def test_a_path_or_url_is_read_through_fsspec(tmp_path):
    data = encoded("PNG")
    (tmp_path / "a.png").write_bytes(data)
    assert image_bytes(str(tmp_path / "a.png"), fetch) == (data, None)
    assert image_bytes(f"file://{tmp_path}/a.png", fetch) == (data, None)


@pytest.mark.parametrize(("value", "reason"), [
    (None, "missing image"),
    (b"", "empty image"),
    ("  ", "empty image path"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "undecodable image"),
    (b"not an image at all", "undecodable image: not a PNG, JPEG or WebP file"),
    (12, "image value is int, not bytes or a path"),
])
def test_bad_values_are_rejected_with_a_reason(value, reason):
    data, why = image_bytes(value, fetch)
    assert data is None and why.startswith(reason), why


def test_a_truncated_image_is_rejected_not_passed_on():
    data = encoded("PNG", size=(280, 280))
    assert decode_problem(data[: len(data) // 2]).startswith("undecodable image")
    assert decode_problem(encoded("JPEG", size=(280, 280))[:300]).startswith("undecodable image")


def test_other_formats_are_refused_by_name():
    assert decode_problem(encoded("GIF")) == "image format GIF is not one of PNG, JPEG, WEBP"


def test_a_missing_object_is_the_rows_reason_not_the_jobs_error(tmp_path):
    data, why = image_bytes(str(tmp_path / "nope.png"), fetch)
    assert data is None and why.startswith(f"unreadable image {tmp_path / 'nope.png'}: FileNotFoundError"), why


def test_an_image_column_that_cannot_hold_images_is_refused_whole_by_name():
    """Pre-flight and every read task check the column's type: a column of numbers is the wrong column."""
    import pyarrow as pa

    from pipeline.config import SourceConfig
    from pipeline.read import column_roles, schema_problem

    source = SourceConfig(input="unused", image_column="image")
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.int64())])
    assert schema_problem(schema, source.columns, column_roles(source)) == (
        "has image column 'image' of type int64; images must be bytes (binary) or paths/URLs (string): "
        "name another with --image-column")
    for usable in (pa.binary(), pa.large_binary(), pa.string()):
        assert schema_problem(schema.set(2, pa.field("image", usable)), source.columns, column_roles(source)) is None
    assert schema_problem(schema.remove(2), source.columns, column_roles(source)).startswith("lacks columns ['image']")
