"""The commands about jobs already submitted: `diff`, `status`, `logs`, `cancel`, `delete`, `list`, `pull`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from service.cli_output import TERMINAL, err, print_json, status_line
from service.client import Client


def add_parsers(sub: Any) -> None:
    """`diff`, `status`, `logs`, `cancel`, `delete`, `list` and `pull`."""
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


def cmd_diff(args: argparse.Namespace, client: Client) -> int:
    diff = client.diff(args.a, args.b)
    if args.json:
        print_json(diff)
    else:
        print("\n".join(format_diff(diff)))
    return 0


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    job = client.get(args.id)
    if not args.watch:
        print_json(job) if args.json else print(status_line(job))
        return 0 if job["phase"] != "failed" else 1
    tty = sys.stdout.isatty()
    print(status_line(job), end="\r" if tty else "\n", flush=True)
    phase = job["phase"]
    if phase not in TERMINAL:
        for _, _, event in client.events(args.id):
            job.update({"phase": event["phase"], "progress": event.get("progress") or {}, "error": event.get("error")})
            end = "\n" if (not tty or event["phase"] != phase) else "\r"
            print(status_line(job) + " " * 8, end=end, flush=True)
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
        for line in new_lines(seen, lines):
            print(line, flush=True)
        seen = lines
        if not args.follow or client.get(args.id)["phase"] in TERMINAL:
            if args.follow:  # the last lines written before the end
                for line in new_lines(seen, client.logs(args.id, args.tail).splitlines()):
                    print(line, flush=True)
            return 0
        time.sleep(args.interval)


def new_lines(old: list[str], new: list[str]) -> list[str]:
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
        print_json(page)
        return 0
    for item in page["items"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(item["submitted_at"]))
        print(f"{item['id']}  {item.get('kind', 'train'):<6} {item['phase']:<10} {when}  {item.get('step', 0)}/{item.get('total_steps', 0)}  "
              f"{item.get('name') or ''}")
    if page.get("next_cursor"):
        err(f"more: lathe list --cursor {page['next_cursor']}")
    return 0


def cmd_pull(args: argparse.Namespace, client: Client) -> int:
    files = client.pull(args.id, args.dir)
    for path in files:
        print(path)
    if not files:
        err(f"{args.id} has no outputs yet")
        return 1
    return 0
