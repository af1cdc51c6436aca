"""`python -m trainer tiny-dataset OUT [--images N] [--size WxH] [--seed S]`: a generated dataset in
sd-scripts folder layout, for tests, demos and benchmarks.

`OUT/<repeats>_<concept>/` folders of coloured shapes on gradient backgrounds, mixed aspect ratios
around 64 px (64×64, 80×48, 48×80, 72×56, 56×72), `.txt` captions that name the concept, colour
and background (so a model can learn them), and a few images without a caption file so that the
concept-name fallback is exercised. Mostly PNG with some JPEG. Same arguments ⇒ same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONCEPTS: tuple[tuple[str, int], ...] = (("circle", 2), ("square", 1), ("triangle", 1))
MIXED_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (80, 48), (48, 80), (72, 56), (56, 72))
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
CAPTION_EXTENSION = ".txt"


@dataclass
class TinyDataset:
    root: Path
    images: list[str] = field(default_factory=list)  # relative POSIX paths
    captions: dict[str, str] = field(default_factory=dict)  # image → caption written (missing: no file)

    @property
    def image_steps_per_epoch(self) -> int:
        return sum(int(p.split("_", 1)[0]) for p in self.images)


def make_tiny_dataset(
    out_dir: str | Path,
    *,
    images: int = 12,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    concepts: Sequence[tuple[str, int]] = DEFAULT_CONCEPTS,
    missing_caption_every: int = 5,
) -> TinyDataset:
    """Write `images` images spread round-robin over `concepts` ((name, repeats) pairs) into
    `out_dir/<repeats>_<name>/`. Every `missing_caption_every`-th image gets no caption file
    (0: all captioned). `size` (w, h) makes every image that size; otherwise sizes cycle
    through MIXED_SIZES."""
    from PIL import Image, ImageDraw

    if images < 1:
        raise ValueError("images must be ≥ 1")
    if not concepts:
        raise ValueError("concepts must name at least one (name, repeats) pair")
    if size is not None and (size[0] < 8 or size[1] < 8):
        raise ValueError(f"size {size[0]}x{size[1]} is too small: at least 8x8")
    root = Path(out_dir)
    rng = random.Random(seed)
    result = TinyDataset(root)
    colour_names, bg_names = list(COLOURS), list(BACKGROUNDS)
    for i in range(images):
        name, repeats = concepts[i % len(concepts)]
        if repeats < 1 or "/" in name or not name.strip():
            raise ValueError(f"concept {name!r} with {repeats} repeats: need a folder-safe name and repeats ≥ 1")
        n = i // len(concepts)  # index within the concept
        w, h = size or MIXED_SIZES[i % len(MIXED_SIZES)]
        colour = colour_names[(n + i % len(concepts)) % len(colour_names)]
        bg = bg_names[n % len(bg_names)]
        img = _gradient(Image, (w, h), BACKGROUNDS[bg])
        _draw_shape(ImageDraw.Draw(img), name, (w, h), COLOURS[colour], rng)

        folder = root / f"{repeats}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        ext = ".jpg" if i % 6 == 5 else ".png"
        stem = f"{name.replace(' ', '_')}_{n:04d}"
        img.save(folder / f"{stem}{ext}", **({"quality": 95} if ext == ".jpg" else {}))
        rel = f"{folder.name}/{stem}{ext}"
        result.images.append(rel)
        if missing_caption_every and i % missing_caption_every == missing_caption_every - 1:
            continue
        caption = f"{name}, {colour} {_shape_of(name)}, {bg} background"
        (folder / f"{stem}{CAPTION_EXTENSION}").write_text(caption + "\n", encoding="utf-8")
        result.captions[rel] = caption
    return result


def _shape_of(name: str) -> str:
    for shape in ("circle", "square", "triangle", "stripes"):
        if shape in name:
            return shape
    return "square"


def _gradient(image_mod, size: tuple[int, int], base: tuple[int, int, int]):
    """A vertical gradient around `base`: gives the VAE/UNet some low-frequency structure to learn."""
    w, h = size
    column = image_mod.new("RGB", (1, h))
    column.putdata([tuple(max(0, min(255, int(c + 60 * (y / max(1, h - 1) - 0.5)))) for c in base) for y in range(h)])
    return column.resize((w, h), image_mod.Resampling.NEAREST)


def _draw_shape(draw, name: str, size: tuple[int, int], colour: tuple[int, int, int], rng: random.Random) -> None:
    w, h = size
    side = int(min(w, h) * rng.uniform(0.45, 0.65))
    cx = w // 2 + rng.randint(-w // 10, w // 10)
    cy = h // 2 + rng.randint(-h // 10, h // 10)
    box = (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
    shape = _shape_of(name)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    elif shape == "stripes":
        step = max(2, min(w, h) // 8)
        for x in range(0, w, 2 * step):
            draw.rectangle((x, 0, x + step - 1, h), fill=colour)
    else:
        draw.rectangle(box, fill=colour)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects WxH such as 512x512, got {text!r}") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"--size {text}: width and height must be ≥ 8")
    return w, h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer tiny-dataset",
                                     description="Write a tiny generated dataset in sd-scripts folder layout.")
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--images", type=int, default=12, help="number of images (default 12)")
    parser.add_argument("--size", type=_parse_size, default=None,
                        help="WxH for every image (default: mixed sizes around 64 px)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.images < 1:
        parser.error("--images must be ≥ 1")
    result = make_tiny_dataset(args.out, images=args.images, size=args.size, seed=args.seed)
    print(json.dumps({"root": str(result.root), "images": len(result.images),
                      "captioned": len(result.captions), "image_steps_per_epoch": result.image_steps_per_epoch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
