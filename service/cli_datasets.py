"""The dataset commands: `upload` (a folder, through the API), `dataset report` (what a dataset holds) and
`tags` (caption edits run here, through the storage code, into a new dataset version).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from service.cli_tags import add_job_arguments as add_tags_job_arguments
from service.cli_output import err, print_json
from service.client import Client


def add_parsers(sub: Any) -> None:
    """`upload`, `dataset report` and `tags`."""
    p = sub.add_parser("upload", help="send a dataset folder through the API; prints its dataset URI")
    p.add_argument("dir")
    p.add_argument("--name", help="dataset name (default: the folder's name)")
    p = sub.add_parser("dataset", help="dataset tools: `lathe dataset report URI`")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    p = dsub.add_parser("report", help="what a dataset holds: concepts, buckets, tags, uncaptioned images, duplicates")
    p.add_argument("uri")
    p.add_argument("--caption-extension", default=".caption", help="as dataset.caption_extension (default .caption)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--bucket", action="store_true", help="aspect-ratio buckets (dataset.enable_bucket)")
    p.add_argument("--subject", choices=["character", "style"], help="the guides' size figures to warn with")
    p.add_argument("--epochs", type=int, help="for the total image-steps")
    p.add_argument("--no-duplicates", action="store_true", help="skip the near-duplicate check (no image decoding)")
    p.add_argument("--top", type=int, default=15, help="tags shown per folder")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("tags", help="edit tags in caption files into a new dataset version (a caption job with "
                                    "no model; prints the job id), or here with --local")
    p.add_argument("src", help="the dataset (a folder URI); never changed")
    p.add_argument("dest", nargs="?", help="an empty location for the new version (default for a job: dataset/ "
                                           "under its output)")
    add_tags_job_arguments(p)
    p.add_argument("--caption-extension", default=".caption")
    p.add_argument("--replace", action="append", metavar="OLD=NEW", help="rename a tag (repeatable)")
    p.add_argument("--remove", action="append", metavar="TAG[,TAG]", help="remove tags everywhere")
    p.add_argument("--add", action="append", metavar="TAG[,TAG]", help="add tags to every caption")
    p.add_argument("--add-first", action="store_true", help="put the added tags first")
    p.add_argument("--min-count", type=int, metavar="N", help="drop tags found in fewer than N captions")
    p.add_argument("--dedupe", action="store_true", help="drop repeated tags within a caption")
    p.add_argument("--trigger", metavar="WORD", help="the trigger word as the first tag (keep_tokens = 1 keeps it)")
    p.add_argument("--remove-orphans", action="store_true", help="leave out caption files without an image")


def cmd_upload(args: argparse.Namespace, client: Client) -> int:
    name = args.name or os.path.basename(os.path.abspath(args.dir))
    grant = client.upload(args.dir, name)
    err(f"uploaded {args.dir} ({len(grant['files'])} files in the last batch)")
    print(grant["dataset_uri"])
    return 0


def cmd_dataset_report(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {"uri": args.uri, "caption_extension": args.caption_extension,
                            "resolution": args.resolution, "enable_bucket": args.bucket,
                            "duplicates": not args.no_duplicates}
    if args.subject:
        body["subject"] = args.subject
    if args.epochs:
        body["epochs"] = args.epochs
    report = client.dataset_report(body)
    if args.json:
        print_json(report)
        return 0
    print(f"{report['uri']}: {report['images']} images, {report['image_steps_per_epoch']} image-steps per epoch"
          + (f", {report['total_image_steps']} in total" if report.get("total_image_steps") else ""))
    for c in report["concepts"]:
        print(f"  {c['name']:<24} {c['images']:>5} images x {c['repeats']:>3} repeats  "
              f"{c['without_caption']} without caption")
    reso = "x".join(str(v) for v in report["resolution"])
    print(f"buckets at {reso}: " + ", ".join(f"{b['width']}x{b['height']} ({b['images']})" for b in report["buckets"]))
    for folder, tags in (report.get("tag_frequency") or {}).items():
        top = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:args.top]
        print(f"tags in {folder}: " + ", ".join(f"{t} ({n})" for t, n in top))
    for line in report["warnings"]:
        print(f"warning: {line}")
    return 0


def cmd_tags(args: argparse.Namespace) -> int:
    """Tag operations run here, against the source URI through the storage code; the result is a new
    dataset version at DEST (the source is never changed)."""
    from trainer.core.images import IMAGE_EXTENSIONS
    from trainer.core.dataset.tagops import TagOp, apply_ops, orphan_captions
    from trainer.core.dataset.versions import write_version
    from trainer.core.failures import JobFailure
    from trainer.core.storage import StorageError

    if not args.dest:
        err("error: lathe tags --local needs DEST, an empty location for the new version")
        return 2
    ops: list[TagOp] = []
    for pair in args.replace or []:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            err(f"error: --replace takes OLD=NEW, got {pair!r}")
            return 2
        ops.append(TagOp("replace", (old,), new=new))
    if args.remove:
        ops.append(TagOp("remove", tuple(t for arg in args.remove for t in arg.split(","))))
    if args.add:
        ops.append(TagOp("add", tuple(t for arg in args.add for t in arg.split(",")), first=args.add_first))
    if args.min_count:
        ops.append(TagOp("min_count", min_count=args.min_count))
    if args.dedupe:
        ops.append(TagOp("dedupe"))
    if args.trigger:
        ops.append(TagOp("trigger", (args.trigger,)))
    if not ops and not args.remove_orphans:
        err("error: no operation given (--add, --remove, --replace, --trigger, --min-count, --dedupe, "
             "--remove-orphans)")
        return 2

    def rewrite(captions: dict[str, str]) -> dict[str, str | None]:
        out: dict[str, str | None] = dict(apply_ops(captions, ops))
        if args.remove_orphans:
            for path in orphan_captions(names_seen, args.caption_extension, IMAGE_EXTENSIONS):
                out[path] = None
        return out

    from trainer.core.storage import open_store

    try:
        names_seen = [o.key for o in open_store(args.src.rstrip("/") + "/").list("")]
        result = write_version(args.src, args.dest, rewrite, caption_extension=args.caption_extension)
    except JobFailure as exc:
        err(f"error: {exc.message}")
        return 1
    except (StorageError, ValueError) as exc:
        err(f"error: {exc}")
        return 1
    err(f"wrote {args.dest}: {result.captions_written} caption files, {result.copied} other files copied"
         + (f", {len(result.removed)} orphan caption files left out" if result.removed else ""))
    print(args.dest)
    return 0
