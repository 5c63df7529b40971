"""Image column values -> the encoded bytes an image encoder decodes, or why a row's image cannot be embedded.

A value is the image itself (binary: PNG, JPEG or WebP bytes) or where to find it (a string: a local path or
an fsspec URL, read with the job's storage options). Both are checked here, in the CPU prepare tasks, by
decoding the image whole: a missing object, a truncated file or bytes of another format then become a
rejected row with its reason, as bad text does, instead of an exception in a GPU actor that would fail the
job. Rows carry the encoded bytes on (a few hundred KB), never decoded pixels: a 768-token image is ~14 MB of
float32 patches, too much to move between processes for work the actor's own CPUs do in milliseconds.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from pipeline.storage import StorageConfig

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what the issue promises; GIF, BMP, TIFF ... are refused by name


def decode_problem(data: bytes) -> str | None:
    """None when `data` decodes whole as a PNG, JPEG or WebP image; else why not, in a few words."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                return f"image format {img.format} is not one of {', '.join(IMAGE_FORMATS)}"
            img.load()  # decodes every pixel: a truncated file fails here, not at open
    except UnidentifiedImageError:
        return "undecodable image: not a PNG, JPEG or WebP file"
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for corrupt data
        return f"undecodable image: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


Fetch = Callable[[str], bytes]


def fetcher(storage: StorageConfig | None) -> Fetch:
    """Reads an image path or URL with the job's storage options (one filesystem per scheme and worker)."""
    storage = storage or StorageConfig()
    filesystems: dict[str, object] = {}

    def fetch(url: str) -> bytes:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in filesystems:
            filesystems[scheme] = storage.fsspec_filesystem(url)
        return filesystems[scheme].cat_file(url)

    return fetch


def image_bytes(value: object, fetch: Fetch) -> tuple[bytes | None, str | None]:
    """(encoded bytes, None) for a usable image value, (None, reason) otherwise.

    `fetch(url)` reads a string value's object (`fetcher`: fsspec with the job's
    storage options); its failure is the row's reason, not the job's.
    """
    if value is None:
        return None, "missing image"
    if isinstance(value, str):
        if not value.strip():
            return None, "empty image path"
        try:
            value = fetch(value)
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            return None, f"unreadable image {value}: {type(err).__name__}: {first}"
    if not isinstance(value, bytes):
        return None, f"image value is {type(value).__name__}, not bytes or a path"
    if not value:
        return None, "empty image"
    problem = decode_problem(value)
    return (None, problem) if problem else (value, None)
