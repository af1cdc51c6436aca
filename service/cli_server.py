"""`lathe serve` (the API, settings from LATHE_* variables) and `lathe dev` (a local stack to try it on)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

from service.cli_output import err


def add_parsers(sub: Any) -> None:
    """`serve` and `dev`."""
    p = sub.add_parser("serve", help="run the API (settings from LATHE_* variables, see docs/api.md)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p = sub.add_parser("dev", help="local S3 + API + local launcher on 127.0.0.1, seeded with a tiny model and dataset")
    p.add_argument("--dir", default=".lathe/dev", help="working folder (tokens, seeds, trainer runs)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--s3-port", type=int, default=0)
    p.add_argument("--no-seed", action="store_true", help="skip the tiny model and dataset")
    p.add_argument("--verbose", action="store_true", help="also log every request to the local S3 server")


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
        err(f"error: {exc}")
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
        err(f"error: {exc}")
        stack.stop()
        return 1
    spec_path = stack.workdir / "example-spec.json"
    spec_path.write_text(json.dumps(stack.example_spec(), indent=2))
    err(f"lathe dev: API {stack.url} (docs {stack.url}/schema), S3 {stack.s3_endpoint}, bucket s3://lathe\n"
         f"  export LATHE_URL={stack.url} LATHE_TOKEN={stack.token}\n"
         f"  console {stack.console_url}    # sign in with the LATHE_TOKEN above\n"
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
