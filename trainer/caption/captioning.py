"""Tag every image of a dataset with a WD14-format tagger into a new dataset version: the images
and other files copied as they are, one caption file per image (the source is never changed).

`python -m trainer tag MODEL SRC DEST [options]` runs it; MODEL is a local folder or an s3:// prefix
holding the .onnx model and its selected_tags.csv (downloaded to a temporary folder, no hub).
"""

from __future__ import annotations

import argparse
import io
import posixpath
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from trainer.core.dataset.tagops import TagOp, add_tags, apply_ops, join_tags, orphan_captions, split_tags
from trainer.core.dataset.versions import VersionResult, check_destination, write_version
from trainer.core.failures import JobFailure, Reason
from trainer.core.images import IMAGE_EXTENSIONS
from trainer.core.storage import Store, open_store
from trainer.caption.tagger import Tagger, TaggerOptions

if TYPE_CHECKING:
    from trainer.caption.sentence_captioner import SentenceCaptioner


def tag_dataset(tagger: Tagger, options: TaggerOptions, src_uri: str, dest_uri: str, *,
                caption_extension: str = ".txt", append_tags: bool = False,
                opener: Callable[[str], Store] = open_store) -> VersionResult:
    """Writes the tagged copy of `src_uri` to `dest_uri`. An image's existing caption is replaced
    (sd-scripts' default) or, with `append_tags`, kept with the new tags added after it."""
    return caption_dataset(src_uri, dest_uri, tagger=tagger, options=options, caption_extension=caption_extension,
                           append_tags=append_tags, opener=opener)


def caption_dataset(src_uri: str, dest_uri: str, *, tagger: Tagger | SentenceCaptioner | None = None,
                    options: TaggerOptions = TaggerOptions(), ops: Sequence[TagOp] = (),
                    remove_orphans: bool = False, caption_extension: str = ".txt", append_tags: bool = False,
                    opener: Callable[[str], Store] = open_store) -> VersionResult:
    """The new version of `src_uri` at `dest_uri`: every image tagged by `tagger` (when given), then
    the tag operations `ops` applied to every caption file, caption files without an image left out
    with `remove_orphans`. Fails with dataset_invalid naming the file when an image cannot be decoded."""
    problems = options.problems()
    if problems:
        raise JobFailure(Reason.SPEC_INVALID, "; ".join(f"{name}: {message}" for name, message in problems))
    check_destination(src_uri, dest_uri)
    src = opener(src_uri.rstrip("/") + "/")
    names = [o.key for o in src.list("")]
    images = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
                    and not any(p.startswith(".") or p == "__MACOSX" for p in n.split("/")))
    if not images:
        raise JobFailure(Reason.DATASET_INVALID, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {src_uri}")

    def decoded() -> Iterator[tuple[str, Image.Image]]:
        for name in images:
            try:
                with Image.open(io.BytesIO(src.get_bytes(name))) as im:
                    im.load()
                    yield name, im.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise JobFailure(Reason.DATASET_INVALID, f"{name}: cannot decode the image ({exc}); re-export it "
                                 "as PNG or JPEG or remove it") from None

    new = {} if tagger is None else {posixpath.splitext(name)[0] + caption_extension: caption
                                     for name, caption in tagger.tag_images(decoded(), options)}
    orphans = orphan_captions(names, caption_extension, IMAGE_EXTENSIONS) if remove_orphans else []

    def rewrite(existing: dict[str, str]) -> dict[str, str | None]:
        merged = dict(existing)
        for path, caption in new.items():
            old = split_tags(existing.get(path, "").split("\n")[0]) if append_tags else []
            merged[path] = join_tags(add_tags(old, split_tags(caption))) if old else caption
        edited = apply_ops(merged, ops) if ops else merged
        out: dict[str, str | None] = {p: t for p, t in edited.items() if p in new or t != existing.get(p)}
        out.update({p: None for p in orphans})
        return out

    return write_version(src_uri, dest_uri, rewrite, caption_extension=caption_extension, opener=opener)


def local_model(uri: str, workdir: Path, opener: Callable[[str], Store] = open_store) -> Path:
    """A local folder holding the tagger at `uri` (downloaded when it is an s3:// prefix)."""
    if not uri.startswith("s3://"):
        return Path(uri)
    store = opener(uri.rstrip("/") + "/")
    for info in store.list(""):  # a tagger's two files, or a transformers folder (config, weights, processor)
        if not info.key.endswith("/"):
            store.download_file(info.key, workdir / info.key)
    return workdir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer tag", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="folder or s3:// prefix with model.onnx and selected_tags.csv")
    p.add_argument("src", help="the dataset (folder URI); never changed")
    p.add_argument("dest", help="an empty location for the tagged version")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--thresh", type=float, default=0.35)
    p.add_argument("--general-threshold", type=float)
    p.add_argument("--character-threshold", type=float)
    p.add_argument("--undesired-tags", default="", help="comma-separated")
    p.add_argument("--keep-underscore", action="store_true", help="keep '_' in tags (sd-scripts' default)")
    p.add_argument("--general-first", action="store_true", help="keep the CSV order instead of character tags first")
    p.add_argument("--character-tag-expand", action="store_true")
    p.add_argument("--use-rating-tags", action="store_true")
    p.add_argument("--use-rating-tags-as-last-tag", action="store_true")
    p.add_argument("--always-first-tags", default="", help="comma-separated")
    p.add_argument("--trigger", help="trigger word / class token as the first tag")
    p.add_argument("--append-tags", action="store_true", help="keep existing captions and add the new tags")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    options = TaggerOptions(
        thresh=args.thresh, general_threshold=args.general_threshold, character_threshold=args.character_threshold,
        undesired_tags=split(args.undesired_tags), remove_underscore=not args.keep_underscore,
        character_tags_first=not args.general_first, character_tag_expand=args.character_tag_expand,
        use_rating_tags=args.use_rating_tags, use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag,
        always_first_tags=split(args.always_first_tags), trigger_word=args.trigger, batch_size=args.batch_size)
    try:
        with tempfile.TemporaryDirectory(prefix="lathe-tagger-") as tmp:
            tagger = Tagger.load(local_model(args.model, Path(tmp)), options)
            result = tag_dataset(tagger, options, args.src, args.dest, caption_extension=args.caption_extension,
                                 append_tags=args.append_tags)
    except JobFailure as exc:
        print(f"error: {exc.reason.value}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {args.dest}: {result.captions_written} caption files, {result.copied} other files copied",
          file=sys.stderr)
    return 0
