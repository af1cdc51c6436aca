"""The commands that submit a job: `submit` (a spec file), `merge`, `caption`, `grid`, `shrink` (specs built
from the arguments) and `rerun`. Each prints the new job's id.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from trainer.core.shrink_choice import SHRINK_METHODS
from trainer.core.precision import SAVE_PRECISIONS
from service.cli_output import err, print_json, print_validation
from service.client import Client, read_spec_file


def add_parsers(sub: Any) -> None:
    """`submit`, `merge`, `caption`, `grid`, `shrink` and `rerun`, in this order in `lathe --help`."""
    for add in (_add_submit, _add_merge, _add_caption, _add_grid, _add_shrink, _add_rerun):
        add(sub)


def add_job_options(p: argparse.ArgumentParser, *, gpus: int, gpus_help: str = "GPUs for the job (0: CPU)",
                    name: bool = True) -> None:
    """The options every command that builds a job spec from its arguments shares."""
    if name:
        p.add_argument("--name")
    p.add_argument("--gpus", type=int, default=gpus, help=gpus_help)
    p.add_argument("--webhook")
    p.add_argument("--json", action="store_true")


def kind_spec(kind: str, args: argparse.Namespace, **sections: Any) -> dict[str, Any]:
    """A version-1 spec of `kind` with `sections`, the job's GPUs and (when given) its name."""
    spec: dict[str, Any] = {"version": 1, "kind": kind, **sections, "resources": {"gpus": args.gpus}}
    if getattr(args, "name", None):
        spec["name"] = args.name
    return spec


def submit_and_print(args: argparse.Namespace, client: Client, spec: dict[str, Any]) -> int:
    """Submits `spec`; prints the job's id (`--json`: the whole record)."""
    job = client.submit(spec, webhook_url=args.webhook)
    print_json(job) if args.json else print(job["id"])
    return 0


def tag_list(values: list[str] | None) -> list[str]:
    """Repeatable `TAG[,TAG]` options as one list of tags."""
    return [t.strip() for v in values or [] for t in v.split(",") if t.strip()]


def replace_pairs(values: list[str] | None) -> dict[str, str]:
    """Repeatable `OLD=NEW` options; an empty side is named by the spec check."""
    return dict(pair.partition("=")[::2] for pair in values or [])


def _add_submit(sub: Any) -> None:
    """`lathe submit SPEC`."""
    p = sub.add_parser("submit", help="submit SPEC.(json|toml); prints the job id")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="print the whole job record")
    p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    p.add_argument("--webhook", help="URL called on terminal states (Standard Webhooks signature)")
    p.add_argument("--validate", action="store_true", help="only validate and preflight; launch nothing")


def _add_merge(sub: Any) -> None:
    """`lathe merge ADAPTER[:RATIO]… --model URI`."""
    p = sub.add_parser("merge", help="merge adapters into a base model (a merge job); prints the job id")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[:RATIO]",
                   help="adapter URI or finished job id, ratio in -10…10 (default 1)")
    p.add_argument("--model", required=True, help="base model URI (single file or diffusers folder)")
    p.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--output-name", help="name of the merged checkpoint (default: last)")
    p.add_argument("--save-precision", choices=SAVE_PRECISIONS)
    add_job_options(p, gpus=1)


def _add_caption(sub: Any) -> None:
    """`lathe caption DATASET` (the tagger options of `python -m trainer tag`)."""
    p = sub.add_parser("caption", help="tag a dataset's images into a new dataset version (a caption job); "
                                       "prints the job id")
    p.add_argument("dataset", help="the dataset (folder URI); never changed")
    p.add_argument("--model", help="WD14-format tagger folder URI (.onnx + selected_tags.csv) or transformers "
                                   "image-to-text folder; none: tag operations only")
    p.add_argument("--output-uri", help="an empty location for the new version (default: the job's output "
                                        "dataset/)")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--thresh", type=float, default=0.35)
    p.add_argument("--general-threshold", type=float)
    p.add_argument("--character-threshold", type=float)
    p.add_argument("--undesired-tags", action="append", metavar="TAG[,TAG]")
    p.add_argument("--keep-underscore", action="store_true", help="keep '_' in tags")
    p.add_argument("--general-first", action="store_true", help="the CSV order instead of character tags first")
    p.add_argument("--character-tag-expand", action="store_true")
    p.add_argument("--use-rating-tags", action="store_true")
    p.add_argument("--always-first-tags", action="append", metavar="TAG[,TAG]")
    p.add_argument("--trigger", metavar="WORD", help="trigger word / class token as the first tag")
    p.add_argument("--append-tags", action="store_true", help="keep existing captions and add the new tags")
    p.add_argument("--beam-search", action="store_true", help="sentence captioners: beam search (else top-p sampling)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-length", type=int, default=75, help="sentence captioners: tokens")
    p.add_argument("--min-length", type=int, default=5)
    p.add_argument("--replace", action="append", metavar="OLD=NEW")
    p.add_argument("--remove", action="append", metavar="TAG[,TAG]")
    p.add_argument("--add", action="append", metavar="TAG[,TAG]")
    p.add_argument("--min-count", type=int, metavar="N")
    p.add_argument("--dedupe", action="store_true")
    p.add_argument("--remove-orphans", action="store_true")
    add_job_options(p, gpus=0)


def _add_grid(sub: Any) -> None:
    """`lathe grid ADAPTER… --model URI --prompt …`."""
    p = sub.add_parser("grid", help="render prompts over saves × weights × seeds (a grid job); prints the job id")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="finished job id (all its saves), adapter URI or local .safetensors file (uploaded first)")
    p.add_argument("--model", required=True, help="base model URI")
    p.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt line in the sample.prompts syntax (--n --w --h --d --l --s); repeat for more")
    p.add_argument("-x", default="saves", choices=["saves", "weight", "seed"], help="the columns (default saves)")
    p.add_argument("-y", default="weight", choices=["saves", "weight", "seed"], help="the rows (default weight)")
    p.add_argument("--weights", help="comma-separated, e.g. 0.7,0.9,1.1,1.3,1.5 (default 1)")
    p.add_argument("--seeds", help="comma-separated seeds (needed when seed is an axis)")
    p.add_argument("--sampler", default="ddim")
    add_job_options(p, gpus=1)


def _add_shrink(sub: Any) -> None:
    """`lathe shrink ADAPTER --model URI` (the rank rules of the spec's `shrink` section)."""
    p = sub.add_parser("shrink", help="reduce an adapter's rank (a shrink job); prints the job id")
    p.add_argument("adapter", help="adapter URI, local .safetensors file (uploaded first) or finished job id")
    p.add_argument("--model", required=True, help="the base model it was trained on (URI)")
    p.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--rank", type=int, help="fixed rank (--new_rank)")
    p.add_argument("--method", choices=SHRINK_METHODS,
                   help="--dynamic_method (_legacy: the off-by-one form of sd-scripts before its PR #2194)")
    p.add_argument("--param", type=float, help="--dynamic_param")
    p.add_argument("--recipe", help="resize_lora recipe (the default when no rank/method: fro_ckpt=1,thr=-3.55)")
    p.add_argument("--max-rank", type=int, dest="max_rank")
    p.add_argument("--save-precision", choices=SAVE_PRECISIONS)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--output-name")
    add_job_options(p, gpus=1, name=False)


def _add_rerun(sub: Any) -> None:
    """`lathe rerun ID`."""
    p = sub.add_parser("rerun", help="submit a job's spec again on the same inputs (refused if its dataset changed)")
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="run even when the dataset changed")
    p.add_argument("--json", action="store_true")


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    spec = read_spec_file(args.spec)
    if args.validate:
        result = client.validate(spec)
        print_json(result) if args.json else print_validation(result)
        return 0
    job = client.submit(spec, idempotency_key=args.idempotency_key, webhook_url=args.webhook)
    for w in (job.get("warnings") or []):
        err(f"warning: {w}")
    if args.json:
        print_json(job)
    else:
        print(job["id"])
    return 0


def _adapter_uri(ref: str, client: Client) -> str:
    """A URI as it is; a local file is uploaded first (POST /v1/uploads, kind adapter); a job id stands
    for that finished job's final adapter."""
    if os.path.isfile(ref):
        return client.upload_adapter(ref)
    if ref.startswith(("s3://", "/", ".")) or "://" in ref:
        return ref
    job = client.get(ref)
    finals = [o for o in job.get("outputs") or [] if o.get("kind") == "adapter"]
    if job.get("phase") != "succeeded" or not finals:
        raise SystemExit(f"error: job {ref} is {job.get('phase')}, with no final adapter")
    return finals[0]["uri"]


def shrink_spec(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    """The `kind = "shrink"` spec `lathe shrink` submits (the rank rules of the spec's `shrink` section)."""
    shrink: dict[str, Any] = {"adapter": _adapter_uri(args.adapter, client), "plot": not args.no_plot}
    for field in ("rank", "method", "param", "recipe", "max_rank", "save_precision"):
        value = getattr(args, field)
        if value is not None:
            shrink[field] = value
    spec = kind_spec("shrink", args, model={"uri": args.model, "arch": args.arch}, shrink=shrink)
    if args.output_name:
        spec["save"] = {"output_name": args.output_name}
    return spec


def cmd_shrink(args: argparse.Namespace, client: Client) -> int:
    return submit_and_print(args, client, shrink_spec(args, client))


def merge_spec(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    """The `kind = "merge"` spec `lathe merge` submits. An adapter is a URI or a finished job's id (its
    final adapter), optionally with `:RATIO` (default 1)."""
    adapters = []
    for item in args.adapters:
        ref, ratio = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep:
            try:
                ref, ratio = head, float(tail)
            except ValueError:
                pass
        adapters.append({"uri": _adapter_uri(ref, client), "ratio": ratio})
    spec = kind_spec("merge", args, model={"uri": args.model, "arch": args.arch}, merge={"adapters": adapters})
    if args.save_precision:
        spec["merge"]["save_precision"] = args.save_precision
    if args.output_name:
        spec["save"] = {"output_name": args.output_name}
    return spec


def cmd_merge(args: argparse.Namespace, client: Client) -> int:
    return submit_and_print(args, client, merge_spec(args, client))


def caption_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The `kind = "caption"` spec `lathe caption` submits (options as `python -m trainer tag` names them)."""
    caption: dict[str, Any] = {
        "thresh": args.thresh, "general_threshold": args.general_threshold,
        "character_threshold": args.character_threshold, "undesired_tags": tag_list(args.undesired_tags),
        "remove_underscore": not args.keep_underscore, "character_tags_first": not args.general_first,
        "character_tag_expand": args.character_tag_expand, "use_rating_tags": args.use_rating_tags,
        "always_first_tags": tag_list(args.always_first_tags), "trigger_word": args.trigger,
        "append_tags": args.append_tags, "caption_extension": args.caption_extension,
        "remove": tag_list(args.remove), "add": tag_list(args.add), "min_count": args.min_count or 0,
        "dedupe": args.dedupe, "remove_orphans": args.remove_orphans, "output_uri": args.output_uri,
        "beam_search": args.beam_search, "num_beams": args.num_beams, "top_p": args.top_p,
        "max_length": args.max_length, "min_length": args.min_length, "replace": replace_pairs(args.replace),
    }
    spec = kind_spec("caption", args, dataset={"uri": args.dataset}, caption=caption)
    if args.model:
        spec["model"] = {"uri": args.model}
    return spec


def grid_spec(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    """The `kind = "grid"` spec `lathe grid` submits. A job id stands for all its saves (the service
    expands it); a local file is uploaded first; anything else is an adapter URI."""
    adapters = []
    for ref in args.adapters:
        is_job = not os.path.isfile(ref) and not ref.startswith(("s3://", "/", ".")) and "://" not in ref
        adapters.append({"job": ref} if is_job else {"uri": _adapter_uri(ref, client)})
    grid: dict[str, Any] = {"adapters": adapters, "prompts": args.prompt, "x": args.x, "y": args.y,
                            "sampler": args.sampler}
    if args.weights:
        grid["weights"] = [float(w) for w in args.weights.split(",")]
    if args.seeds:
        grid["seeds"] = [int(s) for s in args.seeds.split(",")]
    return kind_spec("grid", args, model={"uri": args.model, "arch": args.arch}, grid=grid)


def cmd_caption(args: argparse.Namespace, client: Client) -> int:
    return submit_and_print(args, client, caption_spec(args))


def cmd_grid(args: argparse.Namespace, client: Client) -> int:
    return submit_and_print(args, client, grid_spec(args, client))


def cmd_rerun(args: argparse.Namespace, client: Client) -> int:
    job = client.rerun(args.id, force=args.force)
    print_json(job) if args.json else print(job["id"])
    return 0
