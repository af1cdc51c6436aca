"""What each job kind needs (`kind`), and the `merge` section."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from msgspec import Meta

from trainer.core.spec.caption import caption_problems
from trainer.core.precision import Precision
from trainer.core.spec.common import Uri, _Base
from trainer.core.spec.grid import check_grid
from trainer.core.spec.problems import Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec

JobKind = Literal["train", "merge", "shrink", "caption", "grid"]
MAX_MERGE_RATIO = 10.0  # sd-scripts' merge takes any ratio, negative ones too; beyond ±10 is a typo


class MergeAdapterSpec(_Base):
    uri: Uri  # an adapter file (.safetensors), e.g. a finished job's output
    ratio: Annotated[float, Meta(ge=-MAX_MERGE_RATIO, le=MAX_MERGE_RATIO)] = 1.0


class MergeSpec(_Base):
    """kind = "merge": fold adapters into `model.uri`, giving a checkpoint in the base's own form."""

    adapters: Annotated[list[MergeAdapterSpec], Meta(min_length=1, max_length=16)]
    save_precision: Precision | None = None  # single-file output: None keeps the base's dtypes


def check_kind(spec: JobSpec) -> list[Problem]:
    """The sections each job kind needs; the training checks run only for kind "train"."""
    problems = []
    if spec.model is None and spec.kind != "caption":
        problems.append(Problem("model", f"is missing: required for kind \"{spec.kind}\" (model.uri, the base model)"))
    if spec.kind == "caption":
        problems += caption_problems(spec)
    elif spec.caption is not None:
        problems.append(Problem("caption", "only for kind \"caption\"; remove it or set kind = \"caption\""))
    if spec.kind in ("train", "caption"):
        if spec.dataset is None:
            problems.append(Problem("dataset", f"is missing: kind \"{spec.kind}\" needs dataset.uri (a folder "
                                    "of images)" + (", or set kind to \"merge\" or \"shrink\"" if spec.kind == "train" else "")))
    elif spec.dataset is not None:
        problems.append(Problem("dataset", f"a \"{spec.kind}\" job reads no dataset; remove this section"))
    if spec.kind == "merge" and spec.merge is None:
        problems.append(Problem("merge", "required for kind \"merge\": give merge.adapters = [{uri, ratio}, …]"))
    if spec.kind != "merge" and spec.merge is not None:
        problems.append(Problem("merge", "only for kind \"merge\"; remove it or set kind = \"merge\""))
    if spec.kind == "shrink" and spec.shrink.adapter is None:
        problems.append(Problem("shrink.adapter", "required for kind \"shrink\": the URI of the adapter file to reduce"))
    if spec.kind != "shrink" and spec.shrink.adapter is not None:
        problems.append(Problem("shrink.adapter", "only for kind \"shrink\" (a training job shrinks its own adapter)"))
    problems += check_grid(spec)
    if spec.kind == "shrink" and not spec.shrink.enabled:
        problems.append(Problem("shrink.enabled", "a \"shrink\" job with shrink.enabled = false would do nothing"))
    return problems
