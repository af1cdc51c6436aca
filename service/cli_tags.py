"""`lathe tags`: tag operations over a dataset as a `kind = "caption"` job with no model, submitted
through the API (the service's tenancy, prefixes and attempts apply), or run here with `--local`
against the storage with the caller's own credentials."""

from __future__ import annotations

import argparse
from typing import Any


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the submitted form (`src`/`dest`/operations are the parser's own)."""
    p.add_argument("--local", action="store_true",
                   help="run here with your S3 credentials instead of submitting a job (DEST required)")
    p.add_argument("--name")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the job (tag operations need none)")
    p.add_argument("--webhook")
    p.add_argument("--json", action="store_true")


def tags_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The caption job (no model: the tag operations only) for `lathe tags SRC [DEST]`; with no DEST the
    version goes to `dataset/` under the job's output."""
    split = lambda values: [t.strip() for v in values or [] for t in v.split(",") if t.strip()]  # noqa: E731
    replace = {}
    for pair in args.replace or []:
        old, _, new = pair.partition("=")
        replace[old] = new  # an empty side is named by the spec check
    caption: dict[str, Any] = {
        "remove": split(args.remove), "add": split(args.add), "add_first": args.add_first, "replace": replace,
        "min_count": args.min_count or 0,
        "dedupe": args.dedupe, "trigger_word": args.trigger, "remove_orphans": args.remove_orphans,
        "caption_extension": args.caption_extension,
    }
    if args.dest:
        caption["output_uri"] = args.dest
    spec: dict[str, Any] = {"version": 1, "kind": "caption", "dataset": {"uri": args.src}, "caption": caption,
                            "resources": {"gpus": args.gpus}}
    if args.name:
        spec["name"] = args.name
    return spec


def cmd_tags_job(args: argparse.Namespace, client) -> int:
    """Submits the job; prints its id (`--json`: the whole record)."""
    import json

    job = client.submit(tags_spec(args), webhook_url=args.webhook)
    print(json.dumps(job, indent=2) if args.json else job["id"])
    return 0
