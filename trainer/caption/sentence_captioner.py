"""Sentence captioners: transformers image-to-text models (BLIP / BLIP-2 / GIT-style) loaded from a
folder with their processor, as sd-scripts' `finetune/make_captions.py` runs BLIP.

The options keep make_captions.py's names and meanings: `beam_search` with `num_beams`, otherwise
nucleus sampling with `top_p`; `min_length` / `max_length` of the generated text in tokens. A
trigger word, when given, goes first (`trigger, a photo of …`). Torch and transformers are
imported only when a folder is loaded; the CUDA device when there is one, the CPU otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from trainer.core.failures import JobFailure, Reason

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class CaptionerOptions:
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5
    batch_size: int = 8
    trigger_word: str | None = None
    caption_separator: str = ", "
    seed: int = 42


class SentenceCaptioner:
    def __init__(self, processor, model, device, options: CaptionerOptions) -> None:
        self.processor, self.model, self.device, self.options = processor, model, device, options

    @classmethod
    def load(cls, folder: str | Path, options: CaptionerOptions) -> SentenceCaptioner:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise JobFailure(Reason.MODEL_INVALID, f"{folder.name}/{CONFIG_FILE} not found: a sentence captioner is a "
                             "transformers image-to-text model folder (config.json, weights, processor files)")
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # transformers raises ValueError/OSError/KeyError for folders it cannot read
            raise JobFailure(Reason.MODEL_INVALID, f"{folder.name}: not a loadable image-to-text model "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(processor, model.to(device).eval(), device, options)

    def tag_images(self, images: Iterable[tuple[str, Image.Image]], _options=None) -> Iterator[tuple[str, str]]:
        """(name, caption) per image, `batch_size` images per generate call (the tagger's interface)."""
        batch: list[tuple[str, Image.Image]] = []
        for item in images:
            batch.append(item)
            if len(batch) >= self.options.batch_size:
                yield from self._captions(batch)
                batch = []
        if batch:
            yield from self._captions(batch)

    def _captions(self, batch: list[tuple[str, Image.Image]]) -> Iterator[tuple[str, str]]:
        import torch

        o = self.options
        inputs = self.processor(images=[im for _, im in batch], return_tensors="pt").to(self.device)
        sampling = {"num_beams": o.num_beams, "do_sample": False} if o.beam_search else {
            "do_sample": True, "top_p": o.top_p}
        torch.manual_seed(o.seed)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_length=o.max_length, min_length=o.min_length, **sampling)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        trigger = (o.trigger_word or "").strip()
        for (name, _), text in zip(batch, texts):
            text = " ".join(text.split())
            yield name, (f"{trigger}{o.caption_separator}{text}" if trigger and text else trigger or text)
