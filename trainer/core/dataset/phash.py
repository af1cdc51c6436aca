"""Perceptual image hashes for near-duplicate detection: a 64-bit difference hash (dHash).

dHash shrinks the image to 9x8 grey pixels and keeps one bit per horizontal neighbour pair (is
the left one brighter?). Re-encoding, resizing and small colour shifts change few bits; different
pictures differ in about half of them. Torch-free (Pillow only): the service hashes dataset images
for its report. JPEGs decode at reduced size (`draft`), so a large photo costs little to hash.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

HASH_BITS = 64
NEAR_DUPLICATE_BITS = 6  # at most this many differing bits: the same picture, re-encoded or resized


def dhash(data: bytes) -> int:
    """The 64-bit dHash of an encoded image. Raises ValueError when it cannot be decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("L", (64, 64))  # JPEG: decode at 1/2..1/8 scale
                grey = im.convert("L").resize((9, 8), Image.Resampling.BILINEAR, reducing_gap=2.0)
                px = grey.tobytes()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot decode the image: {exc}") from None
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (px[row * 9 + col] > px[row * 9 + col + 1])
    return bits


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_duplicate_groups(hashes: dict[str, int], max_bits: int = NEAR_DUPLICATE_BITS) -> list[list[str]]:
    """Groups (sorted, ≥ 2 paths each) of images whose hashes are within `max_bits` of another
    member's (single linkage). Pairwise: callers bound the number of hashes."""
    paths = sorted(hashes)
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    values = [hashes[p] for p in paths]
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            if (values[i] ^ values[j]).bit_count() <= max_bits:
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(root(i), []).append(p)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
