"""`lathe`: run the service (`serve`, `dev`) and use it (`submit`, `status`, `logs`, `cancel`, `list`,
`pull`, `upload`, `delete`, `dataset report`). Client commands read LATHE_URL and LATHE_TOKEN.
`lathe tags` submits tag operations as a caption job (`--local`: edits caption files here, through the
storage code, into a new dataset version).

`lathe submit` prints the job id alone on stdout (`--json` for the whole record) so scripts can
capture it; messages and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import httpx

from service.cli_tags import add_job_arguments as add_tags_job_arguments
from service.cli_tags import cmd_tags_job
from service.client import ApiError, Client, read_spec_file
from trainer.core.shrink_choice import SHRINK_METHODS

TERMINAL = ("succeeded", "failed", "cancelled")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _err(message: str) -> None:
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------- server side


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.api.errors import ServiceError
    from service.settings import Settings, SettingsError
    from service.tenants import TokensFileError

    try:
        settings = Settings.from_env(os.environ, host=args.host, port=args.port)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(settings)  # reads the tokens file and the webhook secret: bad ones are config errors
    except (SettingsError, ServiceError, TokensFileError) as exc:
        _err(f"error: {exc}")
        return 2
    # Idle keep-alive connections are kept 75 s, not uvicorn's 5 s: a client (or a load balancer, whose
    # idle timeout is typically 60 s) that reuses a connection just as the server closes it gets a reset
    # (bench/load.py saw them as ReadError under load; an AWS ALB turns them into 502s).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", lifespan="on", timeout_keep_alive=75)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from service.dev.stack import DevStack

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stack = DevStack(args.dir, api_port=args.port, s3_port=args.s3_port, seed=not args.no_seed, verbose=args.verbose)
    try:
        stack.start()
    except RuntimeError as exc:
        _err(f"error: {exc}")
        stack.stop()
        return 1
    spec_path = stack.workdir / "example-spec.json"
    spec_path.write_text(json.dumps(stack.example_spec(), indent=2))
    _err(f"lathe dev: API {stack.url} (docs {stack.url}/schema), S3 {stack.s3_endpoint}, bucket s3://lathe\n"
         f"  export LATHE_URL={stack.url} LATHE_TOKEN={stack.token}\n"
         f"  lathe submit {spec_path}    # tiny model {stack.model_uri}, dataset {stack.dataset_uri}\n"
         "Ctrl-C stops everything.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


# ----------------------------------------------------------------------------------- client side


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    spec = read_spec_file(args.spec)
    if args.validate:
        result = client.validate(spec)
        _print_json(result) if args.json else _print_validation(result)
        return 0
    job = client.submit(spec, idempotency_key=args.idempotency_key, webhook_url=args.webhook)
    for w in (job.get("warnings") or []):
        _err(f"warning: {w}")
    if args.json:
        _print_json(job)
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
    spec: dict[str, Any] = {"version": 1, "kind": "shrink", "model": {"uri": args.model, "arch": args.arch},
                            "shrink": shrink, "resources": {"gpus": args.gpus}}
    if args.output_name:
        spec["save"] = {"output_name": args.output_name}
    return spec


def cmd_shrink(args: argparse.Namespace, client: Client) -> int:
    job = client.submit(shrink_spec(args, client), webhook_url=args.webhook)
    _print_json(job) if args.json else print(job["id"])
    return 0


def format_diff(diff: dict[str, Any]) -> list[str]:
    """`lathe diff`'s lines: one per spec field, dataset file, model, version and loss that differ."""
    lines = [f"--- {diff['a']}", f"+++ {diff['b']}"]
    for section in ("spec", "model", "versions"):
        for change in diff.get(section) or []:
            lines.append(f"{section}: {change['path']}: {json.dumps(change['a'])} -> {json.dumps(change['b'])}")
    for change in diff.get("dataset") or []:
        mark = {"added": "+", "removed": "-", "changed": "~"}[change["change"]]
        lines.append(f"dataset: {mark} {change['key']}")
    if diff.get("final_loss"):
        lines.append(f"final loss: {diff['final_loss']['a']} -> {diff['final_loss']['b']}")
    if not diff.get("complete", True):
        lines.append("(a job has no metadata.json yet: only the specs were compared)")
    return lines


def cmd_rerun(args: argparse.Namespace, client: Client) -> int:
    job = client.rerun(args.id, force=args.force)
    _print_json(job) if args.json else print(job["id"])
    return 0


def cmd_diff(args: argparse.Namespace, client: Client) -> int:
    diff = client.diff(args.a, args.b)
    if args.json:
        _print_json(diff)
    else:
        print("\n".join(format_diff(diff)))
    return 0


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
    spec: dict[str, Any] = {"version": 1, "kind": "merge", "model": {"uri": args.model, "arch": args.arch},
                            "merge": {"adapters": adapters}, "resources": {"gpus": args.gpus}}
    if args.save_precision:
        spec["merge"]["save_precision"] = args.save_precision
    if args.output_name:
        spec["save"] = {"output_name": args.output_name}
    if args.name:
        spec["name"] = args.name
    return spec


def cmd_merge(args: argparse.Namespace, client: Client) -> int:
    job = client.submit(merge_spec(args, client), webhook_url=args.webhook)
    _print_json(job) if args.json else print(job["id"])
    return 0


def caption_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The `kind = "caption"` spec `lathe caption` submits (options as `python -m trainer tag` names them)."""
    split = lambda values: [t.strip() for v in values or [] for t in v.split(",") if t.strip()]  # noqa: E731
    caption: dict[str, Any] = {
        "thresh": args.thresh, "general_threshold": args.general_threshold,
        "character_threshold": args.character_threshold, "undesired_tags": split(args.undesired_tags),
        "remove_underscore": not args.keep_underscore, "character_tags_first": not args.general_first,
        "character_tag_expand": args.character_tag_expand, "use_rating_tags": args.use_rating_tags,
        "always_first_tags": split(args.always_first_tags), "trigger_word": args.trigger,
        "append_tags": args.append_tags, "caption_extension": args.caption_extension,
        "remove": split(args.remove), "add": split(args.add), "min_count": args.min_count or 0,
        "dedupe": args.dedupe, "remove_orphans": args.remove_orphans, "output_uri": args.output_uri,
        "beam_search": args.beam_search, "num_beams": args.num_beams, "top_p": args.top_p,
        "max_length": args.max_length, "min_length": args.min_length,
    }
    replace = {}
    for pair in args.replace or []:
        old, _, new = pair.partition("=")
        replace[old] = new  # an empty side is named by the spec check
    caption["replace"] = replace
    spec: dict[str, Any] = {"version": 1, "kind": "caption", "dataset": {"uri": args.dataset},
                            "caption": caption, "resources": {"gpus": args.gpus}}
    if args.model:
        spec["model"] = {"uri": args.model}
    if args.name:
        spec["name"] = args.name
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
    spec: dict[str, Any] = {"version": 1, "kind": "grid", "model": {"uri": args.model, "arch": args.arch},
                            "grid": grid, "resources": {"gpus": args.gpus}}
    if args.name:
        spec["name"] = args.name
    return spec


def cmd_caption(args: argparse.Namespace, client: Client) -> int:
    job = client.submit(caption_spec(args), webhook_url=args.webhook)
    _print_json(job) if args.json else print(job["id"])
    return 0


def cmd_grid(args: argparse.Namespace, client: Client) -> int:
    job = client.submit(grid_spec(args, client), webhook_url=args.webhook)
    _print_json(job) if args.json else print(job["id"])
    return 0


def _print_validation(result: dict[str, Any]) -> None:
    pre = result.get("preflight") or {}
    print(f"ok: {pre.get('images', 0)} images, {pre.get('steps_per_epoch', 0)} steps/epoch, "
          f"{pre.get('total_steps', 0)} steps in {pre.get('epochs', 0)} epoch(s)")
    for w in result.get("warnings", []):
        print(f"warning: {w['path']}: {w['message']}")


def _bar(progress: dict[str, Any], width: int = 30) -> str:
    step, total = progress.get("step") or 0, progress.get("total_steps") or 0
    filled = int(width * step / total) if total else 0
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("eta_s") is not None:
        parts.append(f"eta {_duration(progress['eta_s'])}")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _status_line(job: dict[str, Any]) -> str:
    line = f"{job['id']}  {job['phase']:<10} {_bar(job.get('progress') or {})}"
    if job.get("error"):
        line += f"  error {job['error']['reason']}: {job['error']['message']}"
    return line


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    job = client.get(args.id)
    if not args.watch:
        _print_json(job) if args.json else print(_status_line(job))
        return 0 if job["phase"] != "failed" else 1
    tty = sys.stdout.isatty()
    print(_status_line(job), end="\r" if tty else "\n", flush=True)
    phase = job["phase"]
    if phase not in TERMINAL:
        for _, _, event in client.events(args.id):
            job.update({"phase": event["phase"], "progress": event.get("progress") or {}, "error": event.get("error")})
            end = "\n" if (not tty or event["phase"] != phase) else "\r"
            print(_status_line(job) + " " * 8, end=end, flush=True)
            phase = event["phase"]
            if phase in TERMINAL:
                break
    job = client.get(args.id)
    print(("\n" if tty else "") + f"{job['id']} {job['phase']}")
    return 0 if job["phase"] == "succeeded" else 1


def cmd_logs(args: argparse.Namespace, client: Client) -> int:
    seen: list[str] = []
    while True:
        lines = client.logs(args.id, args.tail).splitlines()
        for line in _new_lines(seen, lines):
            print(line, flush=True)
        seen = lines
        if not args.follow or client.get(args.id)["phase"] in TERMINAL:
            if args.follow:  # the last lines written before the end
                for line in _new_lines(seen, client.logs(args.id, args.tail).splitlines()):
                    print(line, flush=True)
            return 0
        time.sleep(args.interval)


def _new_lines(old: list[str], new: list[str]) -> list[str]:
    """Lines of the tail `new` that come after the tail `old` (the longest overlap wins)."""
    if not old:
        return new
    for k in range(min(len(old), len(new)), 0, -1):
        if old[-k:] == new[:k]:
            return new[k:]
    return new


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel(args.id)
    print(f"{job['id']} {job['phase']} (cancel requested)")
    return 0


def cmd_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete(args.id)
    print(f"{args.id} deleted")
    return 0


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    page = client.list(status=args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        _print_json(page)
        return 0
    for item in page["items"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(item["submitted_at"]))
        print(f"{item['id']}  {item.get('kind', 'train'):<6} {item['phase']:<10} {when}  {item.get('step', 0)}/{item.get('total_steps', 0)}  "
              f"{item.get('name') or ''}")
    if page.get("next_cursor"):
        _err(f"more: lathe list --cursor {page['next_cursor']}")
    return 0


def cmd_pull(args: argparse.Namespace, client: Client) -> int:
    files = client.pull(args.id, args.dir)
    for path in files:
        print(path)
    if not files:
        _err(f"{args.id} has no outputs yet")
        return 1
    return 0


def cmd_upload(args: argparse.Namespace, client: Client) -> int:
    name = args.name or os.path.basename(os.path.abspath(args.dir))
    grant = client.upload(args.dir, name)
    _err(f"uploaded {args.dir} ({len(grant['files'])} files in the last batch)")
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
        _print_json(report)
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
    from trainer.core.dataset.layout import IMAGE_EXTENSIONS
    from trainer.core.dataset.tagops import TagOp, apply_ops, orphan_captions
    from trainer.core.dataset.versions import write_version
    from trainer.core.failures import JobFailure
    from trainer.core.storage import StorageError

    if not args.dest:
        _err("error: lathe tags --local needs DEST, an empty location for the new version")
        return 2
    ops: list[TagOp] = []
    for pair in args.replace or []:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            _err(f"error: --replace takes OLD=NEW, got {pair!r}")
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
        _err("error: no operation given (--add, --remove, --replace, --trigger, --min-count, --dedupe, "
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
        _err(f"error: {exc.message}")
        return 1
    except (StorageError, ValueError) as exc:
        _err(f"error: {exc}")
        return 1
    _err(f"wrote {args.dest}: {result.captions_written} caption files, {result.copied} other files copied"
         + (f", {len(result.removed)} orphan caption files left out" if result.removed else ""))
    print(args.dest)
    return 0


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lathe", description="Lathe: LoRA/LyCORIS training as a service")
    parser.add_argument("--url", help="API URL (default: LATHE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--token", help="API token (default: LATHE_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API (settings from LATHE_* variables, see docs/api.md)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p = sub.add_parser("dev", help="local S3 + API + local launcher on 127.0.0.1, seeded with a tiny model and dataset")
    p.add_argument("--dir", default=".lathe/dev", help="working folder (tokens, seeds, trainer runs)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--s3-port", type=int, default=0)
    p.add_argument("--no-seed", action="store_true", help="skip the tiny model and dataset")
    p.add_argument("--verbose", action="store_true", help="also log every request to the local S3 server")

    p = sub.add_parser("submit", help="submit SPEC.(json|toml); prints the job id")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="print the whole job record")
    p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    p.add_argument("--webhook", help="URL called on terminal states (Standard Webhooks signature)")
    p.add_argument("--validate", action="store_true", help="only validate and preflight; launch nothing")
    p = sub.add_parser("merge", help="merge adapters into a base model (a merge job); prints the job id")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[:RATIO]",
                   help="adapter URI or finished job id, ratio in -10…10 (default 1)")
    p.add_argument("--model", required=True, help="base model URI (single file or diffusers folder)")
    p.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--output-name", help="name of the merged checkpoint (default: last)")
    p.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--name")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the job (0: CPU)")
    p.add_argument("--webhook")
    p.add_argument("--json", action="store_true")
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
    p.add_argument("--name")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the job (0: CPU)")
    p.add_argument("--webhook")
    p.add_argument("--json", action="store_true")
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
    p.add_argument("--name")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the job (0: CPU)")
    p.add_argument("--webhook")
    p.add_argument("--json", action="store_true")
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
    p.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--output-name")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the job (0: CPU)")
    p.add_argument("--webhook")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("rerun", help="submit a job's spec again on the same inputs (refused if its dataset changed)")
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="run even when the dataset changed")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("diff", help="what differs between two jobs: spec, dataset files, model, versions, loss")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("status", help="a job's phase and progress")
    p.add_argument("id")
    p.add_argument("--watch", action="store_true", help="follow with a progress bar until the job ends")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("logs", help="the trainer's log")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int, default=200)
    p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p = sub.add_parser("cancel", help="cancel a job (it checkpoints first)")
    p.add_argument("id")
    p = sub.add_parser("delete", help="delete a finished job and its outputs")
    p.add_argument("id")
    p = sub.add_parser("list", help="jobs, newest first")
    p.add_argument("--status", choices=["queued", "preparing", "training", "shrinking", "merging", "captioning", "rendering", "uploading",
                                        *TERMINAL])
    p.add_argument("--limit", type=int)
    p.add_argument("--cursor")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("pull", help="download a job's outputs into DIR (checks sha256)")
    p.add_argument("id")
    p.add_argument("dir")
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
    return parser


CLIENT_COMMANDS = {"submit": cmd_submit, "merge": cmd_merge, "shrink": cmd_shrink, "caption": cmd_caption, "grid": cmd_grid, "diff": cmd_diff, "rerun": cmd_rerun,
                   "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel, "delete": cmd_delete,
                   "list": cmd_list, "pull": cmd_pull, "upload": cmd_upload, "dataset": cmd_dataset_report,
                   "tags": cmd_tags_job}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "dev":
        return cmd_dev(args)
    if args.command == "tags" and args.local:
        return cmd_tags(args)
    try:
        with Client(args.url, args.token) as client:
            return CLIENT_COMMANDS[args.command](args, client)
    except ApiError as exc:
        _err(exc.explain())
        return 1
    except (OSError, httpx.HTTPError) as exc:
        _err(f"error: cannot reach {args.url or os.environ.get('LATHE_URL') or 'the API'}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
