"""Image rules the preflight, the dataset report and the trainer share: which files are images, the
largest image accepted, and an image's size from its header (PIL parses the header only; nothing is
decoded, so a decompression bomb costs nothing to refuse).

PIL is imported on first use: importing this module stays cheap for the spec checks.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import IO

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # sd-scripts' list; matched case-insensitively
# 8192² — well above any training resolution, well below what would exhaust memory when decoded.
MAX_IMAGE_PIXELS = 8192 * 8192

# A ranged read of `length` bytes from offset 0 of one object.
ReadPrefix = Callable[[int], bytes]


class UnreadableImage(ValueError):
    """Not an image PIL can parse (or truncated); the message says what PIL found."""


class NotAnImage(UnreadableImage):
    """PIL recognises no image format in the first bytes (as opposed to a known format cut short)."""


class ImageTooLarge(UnreadableImage):
    """PIL's own bomb guard fired before the size could be read: far beyond any pixel limit."""


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def header_size(source: str | bytes | IO[bytes]) -> tuple[int, int]:
    """(width, height) from the header of a file path, bytes or an open binary file.

    Raises UnreadableImage (ImageTooLarge past PIL's bomb guard); FileNotFoundError passes through."""
    from PIL import Image, UnidentifiedImageError

    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller checks the pixel limit
        try:
            with Image.open(fp) as im:  # reads the header; pixels are decoded only by load()
                width, height = im.size
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(str(exc)) from None
        except UnidentifiedImageError:
            # PIL's message quotes the file's path or an in-memory buffer's repr, which tells the user nothing.
            raise NotAnImage("not a PNG, JPEG, WebP or BMP image, or its header is damaged") from None
        except FileNotFoundError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"image header gives size {width}x{height}")
    return width, height


def image_size(read_prefix: ReadPrefix, total_size: int, first_bytes: int = 64 * 1024,
               max_bytes: int = 16 * 1024 * 1024) -> tuple[int, int]:
    """(width, height) of the image whose first bytes `read_prefix(n)` returns (a ranged GET).

    A JPEG with a large EXIF or ICC block may keep its size marker further in; then the read grows,
    up to the whole file or `max_bytes`."""
    length = min(first_bytes, total_size) if total_size > 0 else first_bytes
    while True:
        data = read_prefix(length)
        try:
            return header_size(data)
        except ImageTooLarge:
            raise
        except UnreadableImage:
            whole = len(data) >= total_size or len(data) < length
            if whole or length >= max_bytes:
                raise
            length = min(length * 8, max_bytes, total_size)
