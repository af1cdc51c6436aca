"""WD14-format image taggers: an ONNX model plus its `selected_tags.csv`, as sd-scripts'
`finetune/tag_images_by_wd14_tagger.py` and the A1111 tagger extension run them.

The format: one NHWC float32 input (batch, S, S, 3), BGR pixel values 0–255, the image padded
with white to a square and resized to S; one output of per-tag probabilities, one column per row
of `selected_tags.csv` (`tag_id,name,category,count`; category 9 rating, 0 general, 4 character).

The options keep sd-scripts' names and meanings (general/character thresholds defaulting to
`thresh`, `undesired_tags`, `remove_underscore` for tags longer than 3 characters so that
emoticons such as `^_^` survive, `character_tags_first`, rating tags only when asked, first or
last, `always_first_tags`, `character_tag_expand`); Lathe's defaults replace `_` and put
character tags first, and a trigger word, when given, goes before everything.
Runs on onnxruntime: the CUDA provider when it is there, the CPU otherwise; images in batches.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.core.failures import JobFailure, Reason
from trainer.core.spec import TAGS_FILE

RATING, GENERAL, CHARACTER = "9", "0", "4"


@dataclass(frozen=True)
class TaggerOptions:
    thresh: float = 0.35
    general_threshold: float | None = None  # None: thresh
    character_threshold: float | None = None  # None: thresh
    undesired_tags: tuple[str, ...] = ()
    remove_underscore: bool = True
    character_tags_first: bool = True
    character_tag_expand: bool = False  # `name_(series)` → `name, series`
    use_rating_tags: bool = False  # the most likely rating tag first
    use_rating_tags_as_last_tag: bool = False
    always_first_tags: tuple[str, ...] = ()
    trigger_word: str | None = None
    caption_separator: str = ", "
    batch_size: int = 8

    def problems(self) -> list[tuple[str, str]]:
        """(option, message) for values out of range."""
        out = []
        for name in ("thresh", "general_threshold", "character_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                out.append((name, f"must be a probability between 0 and 1, got {value}"))
        if self.batch_size < 1:
            out.append(("batch_size", f"must be ≥ 1, got {self.batch_size}"))
        return out


@dataclass(frozen=True)
class Tag:
    name: str  # as written to captions (after remove_underscore / character_tag_expand)
    raw: str  # as in selected_tags.csv
    category: str


class Tagger:
    """A loaded WD14-format tagger. `Tagger.load(folder)` raises JobFailure(model_invalid) naming the
    file when the folder is not one."""

    def __init__(self, session, input_name: str, size: int, fixed_batch: int | None, tags: list[Tag]) -> None:
        self.session, self.input_name, self.size, self.fixed_batch, self.tags = (
            session, input_name, size, fixed_batch, tags)

    @classmethod
    def load(cls, folder: str | Path, options: TaggerOptions = TaggerOptions(), *,
             providers: Sequence[str] | None = None) -> Tagger:
        import onnxruntime as ort

        folder = Path(folder)
        csv_path = folder / TAGS_FILE
        if not csv_path.is_file():
            raise JobFailure(Reason.MODEL_INVALID, f"{folder.name}/{TAGS_FILE} not found: a WD14-format tagger is a "
                             "folder with an ONNX model and its selected_tags.csv")
        models = sorted(folder.glob("*.onnx"))
        if len(models) != 1:
            raise JobFailure(Reason.MODEL_INVALID, f"{folder.name}: expected one .onnx model next to {TAGS_FILE}, "
                             f"found {len(models)}" + (f" ({', '.join(m.name for m in models)})" if models else ""))
        tags = read_tags(csv_path, options)
        available = ort.get_available_providers()
        chosen = list(providers) if providers else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                                    if p in available]
        try:
            session = ort.InferenceSession(str(models[0]), providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise JobFailure(Reason.MODEL_INVALID, f"{folder.name}/{models[0].name}: not a loadable ONNX model "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        name = models[0].name
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise JobFailure(Reason.MODEL_INVALID, f"{folder.name}/{name}: a WD14 tagger takes one (batch, size, size, 3) "
                             f"image input, this model takes {[(i.name, i.shape) for i in inputs]}")
        batch, height, width, channels = inputs[0].shape
        if channels != 3 or not isinstance(height, int) or height != width or inputs[0].type != "tensor(float)":
            raise JobFailure(Reason.MODEL_INVALID, f"{folder.name}/{name}: input {inputs[0].name} is "
                             f"{inputs[0].type} {inputs[0].shape}; a WD14 tagger takes float32 (batch, S, S, 3) BGR "
                             "images (NHWC)")
        width_out = outputs[0].shape[-1] if outputs and outputs[0].shape else None
        if len(outputs) < 1 or len(outputs[0].shape) != 2 or (isinstance(width_out, int) and width_out != len(tags)):
            raise JobFailure(Reason.MODEL_INVALID, f"{folder.name}/{name}: output {outputs[0].name if outputs else '?'} "
                             f"is {outputs[0].shape if outputs else None}; expected (batch, {len(tags)}), one "
                             f"column per row of {TAGS_FILE}")
        fixed = batch if isinstance(batch, int) and batch > 0 else None
        return cls(session, inputs[0].name, height, fixed, tags)

    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(len(images), tags) probabilities, in batches of the model's fixed batch size if it has one."""
        arrays = [preprocess(im, self.size) for im in images]
        return self._run(arrays)

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        step = self.fixed_batch or len(arrays)
        out = []
        for start in range(0, len(arrays), max(step, 1)):
            chunk = arrays[start:start + step]
            batch = np.stack(chunk)
            if self.fixed_batch and len(chunk) < self.fixed_batch:  # pad a fixed-batch model's last batch
                batch = np.concatenate([batch, np.zeros((self.fixed_batch - len(chunk), *batch.shape[1:]),
                                                        np.float32)])
            probs = self.session.run(None, {self.input_name: batch})[0]
            if probs.shape[-1] != len(self.tags):
                raise JobFailure(Reason.MODEL_INVALID, f"the tagger returned {probs.shape[-1]} scores per image for "
                                 f"{len(self.tags)} rows of {TAGS_FILE}")
            out.append(probs[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.tags)), np.float32)

    def tag_images(self, images: Iterable[tuple[str, Image.Image]], options: TaggerOptions) -> Iterator[tuple[str, str]]:
        """(name, caption) per image, inferred `options.batch_size` images at a time."""
        batch: list[tuple[str, np.ndarray]] = []
        for name, image in images:
            batch.append((name, preprocess(image, self.size)))
            if len(batch) >= options.batch_size:
                yield from self._captions(batch, options)
                batch = []
        if batch:
            yield from self._captions(batch, options)

    def _captions(self, batch: list[tuple[str, np.ndarray]], options: TaggerOptions) -> Iterator[tuple[str, str]]:
        probs = self._run([a for _, a in batch])
        for (name, _), row in zip(batch, probs):
            yield name, options.caption_separator.join(select_tags(row, self.tags, options))


def read_tags(path: Path, options: TaggerOptions) -> list[Tag]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise JobFailure(Reason.MODEL_INVALID, f"{path.parent.name}/{TAGS_FILE}: cannot be read ({exc})") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise JobFailure(Reason.MODEL_INVALID, f"{path.parent.name}/{TAGS_FILE}: the header must start with "
                         f"tag_id,name,category (found {rows[0][:3] if rows else 'an empty file'})")
    tags = []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) < 3:
            raise JobFailure(Reason.MODEL_INVALID, f"{path.parent.name}/{TAGS_FILE}: line {i} has {len(row)} columns")
        raw, category = row[1], row[2].strip()
        tags.append(Tag(name=_shown(raw, category, options), raw=raw, category=category))
    if not tags:
        raise JobFailure(Reason.MODEL_INVALID, f"{path.parent.name}/{TAGS_FILE} lists no tags")
    return tags


def _shown(raw: str, category: str, options: TaggerOptions) -> str:
    name = raw
    if options.character_tag_expand and category == CHARACTER and name.endswith(")") and "(" in name:
        head, _, series = name.rpartition("(")
        name = head.removesuffix("_") + options.caption_separator + series[:-1]
    if options.remove_underscore and len(name) > 3:
        name = name.replace("_", " ")
    return name


def select_tags(row: np.ndarray, tags: Sequence[Tag], options: TaggerOptions) -> list[str]:
    """The caption's tags from one image's probabilities: general ≥ general_threshold and character
    ≥ character_threshold in the CSV's order (character tags first when asked), the argmax rating
    when asked, then `always_first_tags` moved to the front and the trigger word before everything."""
    general_t = options.thresh if options.general_threshold is None else options.general_threshold
    character_t = options.thresh if options.character_threshold is None else options.character_threshold
    undesired = {t.strip() for t in options.undesired_tags if t.strip()}

    def wanted(tag: Tag) -> bool:
        return tag.name not in undesired and tag.raw not in undesired

    picked = [t for t, p in zip(tags, row) if wanted(t) and (
        (t.category == GENERAL and p >= general_t) or (t.category == CHARACTER and p >= character_t))]
    if options.character_tags_first:
        picked = [t for t in picked if t.category == CHARACTER] + [t for t in picked if t.category == GENERAL]
    out = [t.name for t in picked]
    if options.use_rating_tags or options.use_rating_tags_as_last_tag:
        ratings = [(p, t) for t, p in zip(tags, row) if t.category == RATING]
        if ratings:
            best = max(ratings, key=lambda pt: pt[0])[1]
            if wanted(best):
                out = [best.name] + out if options.use_rating_tags else out + [best.name]
    for tag in reversed(options.always_first_tags):
        if tag in out:
            out.remove(tag)
            out.insert(0, tag)
    if options.trigger_word and options.trigger_word.strip():
        trigger = options.trigger_word.strip()
        out = [trigger] + [t for t in out if t != trigger]
    return out


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """sd-scripts' preparation: RGB, padded with white to a square (centred), resized to `size`
    (area averaging when shrinking), BGR float32 0–255, (size, size, 3)."""
    rgb = image.convert("RGB")
    side = max(rgb.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    resample = Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS
    arr = np.asarray(canvas.resize((size, size), resample), dtype=np.float32)
    return np.ascontiguousarray(arr[:, :, ::-1])
