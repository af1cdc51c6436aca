"""HTTP rules every route shares, kept out of the handlers: HEAD, OPTIONS and `Allow`, and what a JSON
request body is.

- `MethodRules` wraps the app in front of litestar's router: HEAD is answered wherever GET is (RFC 9110
  §9.3.2: the GET's status and headers, no body), OPTIONS lists every method of the path, and every 405
  carries `Allow`. The methods of a path come from the app's routes (one HTTPRoute may hold several
  handlers, e.g. GET and POST /v1/jobs) plus HEAD wherever GET is.
- `JsonRequest` is the app's request class: a body is JSON only when sent as `application/json` or
  `application/*+json` (415 otherwise), and a body msgspec cannot decode gets a message naming the
  problem.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
from litestar import Request
from litestar.exceptions import NotFoundException, SerializationException
from litestar.utils import normalize_path

from service.api import errors

JSON_MEDIA_TYPES = "application/json or application/*+json"
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[!#$&^_.+\w-]+\+)?json", re.ASCII)


def allowed_methods(app: Any, path: str) -> list[str] | None:
    """The methods the path answers, sorted (None: no route has the path)."""
    table: dict[str, set[str]] | None = app.state.get("methods_by_route")
    if table is None:
        table = {}
        for route in app.routes:
            table.setdefault(route.path_format, set()).update(getattr(route, "methods", ()))
        app.state["methods_by_route"] = table
    try:
        # Every HTTP route has an OPTIONS handler: routing with it names the path's template.
        template = app.asgi_router.handle_routing(path=normalize_path(path), method="OPTIONS")[4]
    except (NotFoundException, KeyError):
        return None
    methods = set(table.get(template, ()))
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods) if methods else None


class MethodRules:
    """HEAD, OPTIONS and `Allow` for every path (see the module docstring)."""

    def __init__(self, app: Any, litestar_app: Any) -> None:
        self.app, self.litestar_app = app, litestar_app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if root_path := scope.get("root_path", ""):
            path = path.split(root_path, maxsplit=1)[-1]
        allow = allowed_methods(self.litestar_app, path)
        method = scope["method"]
        if method == "OPTIONS" and allow is not None:
            headers = [(b"allow", ", ".join(allow).encode())]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_allow(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405 and allow is not None:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", ", ".join(allow).encode())]}
            await send(message)

        if method == "HEAD" and allow is not None and "GET" in allow:
            await self._head(scope, receive, send_with_allow)
        else:
            await self.app(scope, receive, send_with_allow)

    async def _head(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the GET and send its status and headers only. A streamed answer (an event stream never
        ends by itself) is ended, and its producer stopped, at its first body chunk."""
        async with anyio.create_task_group() as group:
            ended = False

            async def send_head(message: Any) -> None:
                nonlocal ended
                if message["type"] != "http.response.body":
                    await send(message)
                    return
                if ended:
                    return
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if message.get("more_body", False):
                    group.cancel_scope.cancel()

            scope["method"] = "GET"  # in place: what routing records on the scope stays visible outside
            await self.app(scope, receive, send_head)


class JsonRequest(Request):
    """The app's request class: where a request body becomes JSON."""

    async def json(self) -> Any:
        content_type = self.headers.get("content-type", "")
        media_type = content_type.partition(";")[0].strip().lower()
        if not _JSON_MEDIA_TYPE.fullmatch(media_type):
            sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
            raise errors.UnsupportedMediaType(f"the body must be JSON sent as {JSON_MEDIA_TYPES}; this request "
                                              f"has {sent}")
        try:
            return await super().json()
        except SerializationException as exc:
            raise SerializationException(describe_json_error(await self.body(), str(exc))) from exc


# A \u escape of a UTF-16 surrogate, not itself escaped (an even number of backslashes before it).
_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*(\\u[dD][89a-fA-F][0-9a-fA-F]{2})")


def describe_json_error(body: bytes, message: str) -> str:
    """msgspec's decode error, or what is really wrong where msgspec's words mislead: it reports a lone
    UTF-16 surrogate escape (half of a pair, which no Unicode text can hold) as truncated input."""
    if "truncated" in message or "surrogate" in message:
        escapes = list(_SURROGATE_ESCAPE.finditer(body))
        i = 0
        while i < len(escapes):
            found = escapes[i]
            high = found.group(1)[3:4].lower() in b"89ab"
            nxt = escapes[i + 1] if i + 1 < len(escapes) else None
            if high and nxt is not None and nxt.start(1) == found.end(1) and nxt.group(1)[3:4].lower() in b"cdef":
                i += 2  # a complete pair
                continue
            return (f"JSON is malformed: the string escape {found.group(1).decode()} at byte {found.start(1)} is "
                    "half of a UTF-16 surrogate pair (a lone surrogate is not a Unicode character); send the "
                    "character itself or the complete pair")
    return message
