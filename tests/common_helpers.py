"""Helpers several test folders share: the spec overrides, polling, bucket teardown and the app
clients. A uniquely named module, imported as `tests.common_helpers` (never through `conftest`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any


def apply_changes(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`doc` with dotted keys overridden (`{"training.max_train_steps": 5}`); a None value removes the key."""
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.1, what: str = "") -> Any:
    """The first truthy value of `predicate()`, polled every `interval_s`; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}; last value {last!r}")


def delete_bucket(s3: Any, name: str) -> None:
    """Empty the bucket (every page of the listing), then delete it."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=name)


def app_clients(settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """For a fixture to `yield from`: a factory of the real app (built from `settings(**overrides)`)
    behind litestar's TestClient; every client is closed and its launcher's trainers killed at the end."""
    from litestar.testing import TestClient

    from service.api.app import create_app

    opened: list[Any] = []

    def make(**overrides: Any) -> Any:
        client = TestClient(create_app(settings(**overrides), events_poll_s=0.1), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in reversed(opened):
        launcher = client.app.state.services.extra.get("launcher")
        client.__exit__(None, None, None)
        if launcher is not None and hasattr(launcher, "shutdown"):
            launcher.shutdown(kill=True, timeout_s=5)
