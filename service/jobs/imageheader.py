"""Image sizes from the first bytes of a file (PIL parses headers only; nothing is decoded).

The preflight reads each dataset image with a ranged GET of its first bytes. A JPEG with a large
EXIF or ICC block may keep its size marker further in; then the read grows, up to the whole file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError

# A ranged read of `length` bytes from offset 0 of one object.
ReadPrefix = Callable[[int], bytes]


class UnreadableImage(ValueError):
    """Not an image PIL can parse (or truncated); the message says what PIL found."""


def image_size(read_prefix: ReadPrefix, total_size: int, first_bytes: int = 64 * 1024,
               max_bytes: int = 16 * 1024 * 1024) -> tuple[int, int]:
    """(width, height) of the image whose first bytes `read_prefix(n)` returns."""
    length = min(first_bytes, total_size) if total_size > 0 else first_bytes
    while True:
        data = read_prefix(length)
        try:
            return _size_of(data)
        except UnreadableImage:
            whole = len(data) >= total_size or len(data) < length
            if whole or length >= max_bytes:
                raise
            length = min(length * 8, max_bytes, total_size)


def _size_of(data: bytes) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: the caller checks pixel limits
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        except Image.DecompressionBombError as exc:
            raise UnreadableImage(str(exc)) from None
        except UnidentifiedImageError:
            # PIL's message quotes the in-memory buffer's repr (an address), which tells the user nothing.
            raise UnreadableImage("not a PNG, JPEG, WebP or BMP image, or its header is damaged") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"image header gives size {width}x{height}")
    return width, height
