"""The web console's static files under /ui/: an HTML shell, a stylesheet and ES modules.

The pages hold no data: their scripts fetch it from the API with the tenant token the user signed in
with (kept in sessionStorage), so these routes need no auth. Every answer carries a strict
Content-Security-Policy: scripts and styles from this origin only (no inline code, so an escaped string
that slipped through could still not run), images also as blob: (sample images are fetched with the
bearer header and shown from memory), no frames, no other origins.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.exceptions import NotFoundException

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# Served by exact name only: a request path is looked up in this table, never joined onto a folder.
FILES = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file() and p.suffix in MEDIA_TYPES}


def _file(name: str) -> Response[bytes]:
    path = FILES.get(name)
    if path is None:
        raise NotFoundException(f"no console file '{name}'")
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@get(["/ui", "/ui/"], include_in_schema=False, sync_to_thread=False)
def console_index() -> Response[bytes]:
    return _file("index.html")


@get("/ui/{name:path}", include_in_schema=False, sync_to_thread=False)
def console_file(name: str) -> Response[bytes]:
    return _file(name.lstrip("/"))


ROUTES = [console_index, console_file]
