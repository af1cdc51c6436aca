"""Caption processing as sd-scripts does it per sample: prefix/suffix, caption dropout, wildcards,
shuffle with `keep_tokens`, tag dropout, secondary separator.

Pure and torch-free. Every random draw goes through the `random.Random` passed in, so a caption is
reproducible from (seed, epoch, position) and two ranks never share hidden global state.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """One subset's caption options (sd-scripts' names and defaults)."""

    shuffle: bool = False  # shuffle_caption
    separator: str = ","  # caption_separator
    keep_tokens: int = 0  # leading parts that stay in place when shuffling
    keep_tokens_separator: str | None = None  # "|||": parts before it stay fixed (wins over keep_tokens)
    secondary_separator: str | None = None  # replaced by `separator` after shuffling ("a;;;b" moves as one)
    enable_wildcard: bool = False  # "{a|b}" picks one; multi-line captions pick one line
    prefix: str | None = None  # caption_prefix
    suffix: str | None = None  # caption_suffix
    dropout_rate: float = 0.0  # caption_dropout_rate: whole caption → ""
    dropout_every_n_epochs: int = 0  # caption_dropout_every_n_epochs: "" on every N-th epoch
    tag_dropout_rate: float = 0.0  # caption_tag_dropout_rate: each shuffled part dropped with this rate

    @property
    def is_static(self) -> bool:
        """True when the caption never changes between epochs (text-encoder outputs can be cached)."""
        return not (self.shuffle or self.dropout_rate > 0 or self.dropout_every_n_epochs > 0
                    or self.tag_dropout_rate > 0 or self.enable_wildcard)


def process_caption(caption: str, opts: CaptionOptions, *, epoch: int, rng: random.Random) -> str:
    """The caption one sample trains with. `epoch` is 1-based, as sd-scripts counts it, so
    `dropout_every_n_epochs = 2` empties captions in epochs 2, 4, 6, …"""
    if opts.prefix:
        caption = opts.prefix + " " + caption
    if opts.suffix:
        caption = caption + " " + opts.suffix

    dropped = opts.dropout_rate > 0 and rng.random() < opts.dropout_rate
    dropped = dropped or (opts.dropout_every_n_epochs > 0 and epoch % opts.dropout_every_n_epochs == 0)
    if dropped:
        return ""

    if opts.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]  # sd-scripts trains on the first line only

    if opts.shuffle or opts.tag_dropout_rate > 0:
        caption = _shuffle_and_drop(caption, opts, rng)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.separator)
    return caption


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # "{{" / "}}" are literal braces: park them on markers that cannot occur in the text.
    open_mark, close_mark = "\x00<", ">\x00"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "<", close_mark + ">"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _shuffle_and_drop(caption: str, opts: CaptionOptions, rng: random.Random) -> str:
    sep = opts.separator
    fixed: list[str] = []
    fixed_suffix: list[str] = []
    if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(opts.keep_tokens_separator, 1)
        if opts.keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(opts.keep_tokens_separator, 1)
            fixed_suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
    else:
        # Like sd-scripts, empty parts (a trailing separator) are kept here and rejoined.
        tokens = [t.strip() for t in caption.strip().split(sep)]
        flex = tokens[:]
        if opts.keep_tokens > 0:
            fixed, flex = tokens[: opts.keep_tokens], tokens[opts.keep_tokens:]

    if opts.shuffle:
        rng.shuffle(flex)
    if opts.tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= opts.tag_dropout_rate]
    # sd-scripts always rejoins with ", ", whatever the separator was.
    return ", ".join(fixed + flex + fixed_suffix)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """sd-scripts' `ss_tag_frequency` entry for one folder: comma-split, stripped, lower-cased tags."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
