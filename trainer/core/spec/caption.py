"""kind = "caption": the `caption` section (tagger options and tag operations) and its checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from msgspec import Meta

from trainer.core.spec.common import Fraction, NonNegInt, ShortText, Text, Uri, _Base
from trainer.core.spec.problems import Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec

TAGS_FILE = "selected_tags.csv"  # a WD14-format tagger folder: this list next to one .onnx model


class CaptionSpec(_Base):
    """kind = "caption": a new version of `dataset.uri` (a folder) with one caption file per image,
    tagged by the WD14-format tagger at `model.uri` (its .onnx and selected_tags.csv) and/or edited
    by the tag operations; with no `model` only the tag operations run. The tagger options keep
    `python -m trainer tag`'s (sd-scripts') names and meanings."""

    thresh: Fraction = 0.35
    general_threshold: Fraction | None = None  # None: thresh
    character_threshold: Fraction | None = None  # None: thresh
    undesired_tags: Annotated[list[Text], Meta(max_length=1000)] = []
    remove_underscore: bool = True
    character_tags_first: bool = True
    character_tag_expand: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    always_first_tags: Annotated[list[Text], Meta(max_length=100)] = []
    trigger_word: Text | None = None  # the first tag of every caption (what keep_tokens = 1 keeps)
    append_tags: bool = False  # keep an image's existing caption and add the new tags after it
    caption_extension: ShortText = ".txt"
    batch_size: Annotated[int, Meta(ge=1, le=1024)] = 8
    # Sentence captioners (a transformers image-to-text folder as model.uri), make_captions.py's options:
    beam_search: bool = False  # beam search with num_beams; otherwise nucleus sampling with top_p
    num_beams: Annotated[int, Meta(ge=1, le=64)] = 1
    top_p: Fraction = 0.9
    max_length: Annotated[int, Meta(ge=1, le=512)] = 75  # tokens
    min_length: Annotated[int, Meta(ge=0, le=512)] = 5
    # Tag operations, applied after tagging in this order: replace, remove, add, min_count, dedupe, trigger.
    replace: Annotated[dict[Text, Text], Meta(max_length=1000)] = {}  # old tag → new tag
    remove: Annotated[list[Text], Meta(max_length=1000)] = []
    add: Annotated[list[Text], Meta(max_length=1000)] = []
    add_first: bool = False
    min_count: NonNegInt = 0  # drop tags found in fewer captions than this
    dedupe: bool = False
    remove_orphans: bool = False  # leave out caption files without an image
    output_uri: Uri | None = None  # where the new version goes (empty); None: <job output>/dataset/


def caption_problems(spec: JobSpec) -> list[Problem]:
    c = spec.caption
    if c is None:
        return [Problem("caption", "required for kind \"caption\": the tagger options and/or tag operations "
                        "(an empty section tags with the defaults)")]
    problems = []
    if spec.model is None and not (c.replace or c.remove or c.add or c.min_count or c.dedupe or c.trigger_word
                                   or c.remove_orphans):
        problems.append(Problem("caption", "no tagger (model.uri) and no tag operation: the job would copy the "
                                "dataset unchanged; give model.uri or an operation (remove, add, replace, …)"))
    for old, new in c.replace.items():
        if not old.strip() or not new.strip():
            problems.append(Problem("caption.replace", f"{old!r} → {new!r}: both tags must be non-empty"))
    if c.min_length > c.max_length:
        problems.append(Problem("caption.min_length", f"{c.min_length} is above caption.max_length {c.max_length}"))
    if not c.caption_extension.startswith("."):
        problems.append(Problem("caption.caption_extension", f"must start with '.', got {c.caption_extension!r}"))
    return problems
