"""`lathe tags`: tag operations over a dataset as a `kind = "caption"` job with no model, submitted
through the API (the service's tenancy, prefixes and attempts apply), or run here with `--local`
against the storage with the caller's own credentials."""

from __future__ import annotations

import argparse
from typing import Any

from service.cli_submit import add_job_options, kind_spec, replace_pairs, submit_and_print, tag_list


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the submitted form (`src`/`dest`/operations are the parser's own)."""
    p.add_argument("--local", action="store_true",
                   help="run here with your S3 credentials instead of submitting a job (DEST required)")
    add_job_options(p, gpus=0, gpus_help="GPUs for the job (tag operations need none)")


def tags_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The caption job (no model: the tag operations only) for `lathe tags SRC [DEST]`; with no DEST the
    version goes to `dataset/` under the job's output."""
    caption: dict[str, Any] = {
        "remove": tag_list(args.remove), "add": tag_list(args.add), "add_first": args.add_first,
        "replace": replace_pairs(args.replace), "min_count": args.min_count or 0,
        "dedupe": args.dedupe, "trigger_word": args.trigger, "remove_orphans": args.remove_orphans,
        "caption_extension": args.caption_extension,
    }
    if args.dest:
        caption["output_uri"] = args.dest
    return kind_spec("caption", args, dataset={"uri": args.src}, caption=caption)


def cmd_tags_job(args: argparse.Namespace, client) -> int:
    """Submits the job; prints its id (`--json`: the whole record)."""
    return submit_and_print(args, client, tags_spec(args))
