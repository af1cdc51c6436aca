"""`lathe`: run the service (`serve`, `dev`) and use it (`submit`, `status`, `logs`, `cancel`, `list`,
`pull`, `upload`, `delete`, `dataset report`). Client commands read LATHE_URL and LATHE_TOKEN.
`lathe tags` submits tag operations as a caption job (`--local`: edits caption files here, through the
storage code, into a new dataset version).

`lathe submit` prints the job id alone on stdout (`--json` for the whole record) so scripts can
capture it; messages and errors go to stderr. This module is the entry point and the parser; the
commands are in cli_server.py, cli_submit.py, cli_jobs.py and cli_datasets.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx

from service import cli_datasets, cli_jobs, cli_server, cli_submit
from service.cli_output import err
from service.cli_tags import cmd_tags_job
from service.client import ApiError, Client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lathe", description="Lathe: LoRA/LyCORIS training as a service")
    parser.add_argument("--url", help="API URL (default: LATHE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--token", help="API token (default: LATHE_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (cli_server, cli_submit, cli_jobs, cli_datasets):  # the order `lathe --help` lists them in
        group.add_parsers(sub)
    return parser


CLIENT_COMMANDS = {
    "submit": cli_submit.cmd_submit, "merge": cli_submit.cmd_merge, "shrink": cli_submit.cmd_shrink,
    "caption": cli_submit.cmd_caption, "grid": cli_submit.cmd_grid, "rerun": cli_submit.cmd_rerun,
    "diff": cli_jobs.cmd_diff, "status": cli_jobs.cmd_status, "logs": cli_jobs.cmd_logs,
    "cancel": cli_jobs.cmd_cancel, "delete": cli_jobs.cmd_delete, "list": cli_jobs.cmd_list,
    "pull": cli_jobs.cmd_pull, "upload": cli_datasets.cmd_upload, "dataset": cli_datasets.cmd_dataset_report,
    "tags": cmd_tags_job,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cli_server.cmd_serve(args)
    if args.command == "dev":
        return cli_server.cmd_dev(args)
    if args.command == "tags" and args.local:
        return cli_datasets.cmd_tags(args)
    try:
        with Client(args.url, args.token) as client:
            return CLIENT_COMMANDS[args.command](args, client)
    except ApiError as exc:
        err(exc.explain())
        return 1
    except (OSError, httpx.HTTPError) as exc:
        err(f"error: cannot reach {args.url or os.environ.get('LATHE_URL') or 'the API'}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
