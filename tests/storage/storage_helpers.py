"""Small builders shared by the storage tests: images, dataset trees, crafted archives."""

from __future__ import annotations

import io
import os
from pathlib import Path


def png_bytes(width: int = 16, height: int = 16, seed: int = 0) -> bytes:
    from PIL import Image

    im = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3) if seed < 0 else
                         bytes((seed * 7 + i) % 256 for i in range(width * height * 3)))
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def make_dataset(root: Path, images_per_concept: int = 3) -> dict[str, bytes]:
    """An sd-scripts style tree (`<repeats>_<concept>/` with images and .txt captions)."""
    files: dict[str, bytes] = {}
    for concept in ("10_cat", "2_dog toy"):
        for i in range(images_per_concept):
            files[f"{concept}/img{i}.png"] = png_bytes(12 + i, 10, seed=i)
            files[f"{concept}/img{i}.txt"] = f"{concept.split('_', 1)[1]}, photo {i}".encode()
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def read_tree(root: Path | str) -> dict[str, bytes]:
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
