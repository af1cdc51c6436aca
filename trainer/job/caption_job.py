"""A `kind = "caption"` job: a new version of `dataset.uri` with one caption file per image.

Phases: preparing (fetch the tagger at `model.uri`) → captioning (tag the images, apply the tag
operations, write the version) → uploading (the report) → succeeded. The version goes to
`caption.output_uri`, or to `dataset/` under the job's output; the source is never changed. With no
model only the tag operations run. A folder that is not a WD14-format tagger fails with
`model_invalid`, an image that cannot be decoded with `dataset_invalid`, each naming the file.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING


from trainer.core.failures import JobFailure
from trainer.job.kind_outputs import publish_outputs
from trainer.job.publish import LocalOutput
from trainer.core.spec import TAGS_FILE, CaptionSpec
from trainer.core.status import OutputFile

if TYPE_CHECKING:
    from trainer.core.dataset.tagops import TagOp
    from trainer.job.train_job import Job
    from trainer.caption.tagger import TaggerOptions

DATASET_DIR = "dataset/"


def tagger_options(c: CaptionSpec) -> TaggerOptions:
    from trainer.caption.tagger import TaggerOptions

    return TaggerOptions(
        thresh=c.thresh, general_threshold=c.general_threshold, character_threshold=c.character_threshold,
        undesired_tags=tuple(c.undesired_tags), remove_underscore=c.remove_underscore,
        character_tags_first=c.character_tags_first, character_tag_expand=c.character_tag_expand,
        use_rating_tags=c.use_rating_tags, use_rating_tags_as_last_tag=c.use_rating_tags_as_last_tag,
        always_first_tags=tuple(c.always_first_tags), trigger_word=c.trigger_word, batch_size=c.batch_size)


def tag_ops(c: CaptionSpec) -> list[TagOp]:
    """The section's tag operations in their documented order; the trigger word last, so it ends first."""
    from trainer.core.dataset.tagops import TagOp

    ops = [TagOp("replace", (old,), new=new) for old, new in c.replace.items()]
    if c.remove:
        ops.append(TagOp("remove", tuple(c.remove)))
    if c.add:
        ops.append(TagOp("add", tuple(c.add), first=c.add_first))
    if c.min_count:
        ops.append(TagOp("min_count", min_count=c.min_count))
    if c.dedupe:
        ops.append(TagOp("dedupe"))
    if c.trigger_word and c.trigger_word.strip():
        ops.append(TagOp("trigger", (c.trigger_word,)))
    return ops


def load_captioner(folder: Path, c: CaptionSpec):
    """A folder with selected_tags.csv is a WD14-format tagger, one with config.json (and no CSV) a
    transformers sentence captioner; anything else fails as not-a-tagger, naming selected_tags.csv."""
    from trainer.caption.sentence_captioner import CONFIG_FILE, CaptionerOptions, SentenceCaptioner
    from trainer.caption.tagger import Tagger

    if not (folder / TAGS_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        return SentenceCaptioner.load(folder, CaptionerOptions(
            beam_search=c.beam_search, num_beams=c.num_beams, top_p=c.top_p, max_length=c.max_length,
            min_length=c.min_length, batch_size=c.batch_size, trigger_word=c.trigger_word))
    return Tagger.load(folder, tagger_options(c))


def run_caption(job: Job) -> list[OutputFile]:
    from trainer.caption.captioning import caption_dataset, local_model

    spec, ctx, c = job.spec, job.ctx, job.spec.caption
    resolve = ctx.jobdir.resolve_input
    assert c is not None and spec.dataset is not None  # checked with the spec
    own = c.output_uri is None
    dest_uri = c.output_uri or ctx.out.child(DATASET_DIR).root_uri
    if own:  # a previous attempt of this job may have written part of it
        ctx.out.delete_prefix(DATASET_DIR)
    options = tagger_options(c)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lathe-tagger-", dir=ctx.work_dir) as tmp:
        tagger = None
        if spec.model is not None:
            try:
                tagger = load_captioner(local_model(resolve(spec.model.uri), Path(tmp)), c)
            except JobFailure as exc:  # named by the user's URI, not the download folder
                message = exc.message.replace(f"{Path(tmp).name}/", spec.model.uri.rstrip("/") + "/")
                raise JobFailure(exc.reason, f"model.uri: {message}") from None
        job.timings["fetch_s"] = time.monotonic() - t0
        job.reporter.set_phase("captioning")
        t1 = time.monotonic()
        source = _source_folder(resolve(spec.dataset.uri), Path(tmp))
        result = caption_dataset(source, dest_uri, tagger=tagger, options=options,
                                 ops=tag_ops(c), remove_orphans=c.remove_orphans,
                                 caption_extension=c.caption_extension, append_tags=c.append_tags)
    job.timings["caption_s"] = time.monotonic() - t1

    job.reporter.set_phase("uploading")
    report = {"dataset_uri": dest_uri, "source_uri": spec.dataset.uri, "tagger": spec.model.uri if spec.model else None,
              "captions_written": result.captions_written, "files_copied": result.copied,
              "orphan_captions_removed": result.removed, "caption_extension": c.caption_extension}
    report_path = job.out_dir / "caption-report.json"
    report_path.write_text(json.dumps(report, indent=2))
    items = [LocalOutput(str(report_path), "caption-report.json", "report")]
    return publish_outputs(job, "caption", items, {"caption_report": report})


def _source_folder(uri: str, tmp: Path) -> str:
    """What the captioner reads: the dataset folder itself, or an archive's members extracted into
    `tmp` by the training fetch (same size limits and member checks); the version written from it is a
    folder either way."""
    from trainer.job.fetch import ARCHIVE_SUFFIXES, fetch_dataset

    if not uri.lower().endswith(ARCHIVE_SUFFIXES):
        return uri
    return fetch_dataset(uri, str(tmp / "dataset"))
