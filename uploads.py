"""Image uploads of the web page (image-to-video models): the guard on Gradio's upload route, the guard on its
file route, and the deletion of each request's uploads once the request ends.

Gradio stores an upload in its cache folder (GRADIO_TEMP_DIR = outputs/.gradio-cache, engine.cli.upload_dir) as
<folder>/<hash>/<name> and names it by that path in the request; engine/images.py reads an image by path only
inside that folder. Gradio itself would store any number of files of any size and serve every file of that
folder to every client (its /file= route treats the folder as its own, and since it lies inside outputs/,
which is an allowed path, even inline as text/html). Here:

- a server whose model takes no images refuses the upload route (403);
- otherwise only multipart bodies of at most MAX_UPLOAD_FILES parts and MAX_UPLOAD_BODY bytes reach Gradio
  (413 before Gradio reads a byte of a larger body; Gradio's max_file_size = MAX_IMAGE_BYTES per file);
- an uploaded file is served back only to the browser that uploaded it (a cookie; its own preview) and only
  as an image; every other file of the folder only when it is Gradio's copy of a result in outputs/;
- the Controller releases the files of a request once it ends (completed, failed, cancelled or refused): a
  file is deleted once no upload references it any more; uploads that no request used are deleted after
  ABANDONED_S. Nothing outside the upload folder is ever deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.images import MAX_IMAGE_BYTES

log = logging.getLogger("wan.uploads")

MAX_UPLOAD_FILES = 2  # files in one upload request (the page and gradio_client send one each)
UPLOAD_OVERHEAD = 64 * 1024  # multipart headers and boundaries
MAX_UPLOAD_BODY = MAX_UPLOAD_FILES * MAX_IMAGE_BYTES + UPLOAD_OVERHEAD
ABANDONED_S = 3600.0  # an upload no request released is deleted this long after it came
COOKIE = "wan_uploader"  # who uploaded a file: only that browser sees it again (the image's preview)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_SPOOL_MEMORY = 2**20  # an upload body beyond this waits in an anonymous temporary file, not in memory
_FILE_ROUTE = re.compile(r"/file(?:=|/)(?P<path>.*)$", re.S)


@dataclass
class _Upload:
    owner: str
    refs: int = 1
    since: float = field(default_factory=time.monotonic)


class Uploads:
    """The uploads of this server: which browser uploaded each file, how many uploads reference it, and their
    deletion (only ever regular files inside `folder`)."""

    def __init__(self, folder: str | Path, outputs: str | Path, enabled: bool) -> None:
        self.folder, self.outputs, self.enabled = Path(folder).resolve(), Path(outputs).resolve(), enabled
        self._lock = threading.Lock()
        self._files: dict[Path, _Upload] = {}

    def inside(self, path: Any) -> Path | None:
        """`path` resolved (symlinks followed), if that lies strictly inside the upload folder; else None."""
        if not isinstance(path, (str, Path)) or not str(path).strip() or "\x00" in str(path):
            return None
        try:
            resolved = Path(os.path.realpath(os.path.abspath(str(path))))
        except (OSError, ValueError):
            return None
        return resolved if resolved != self.folder and resolved.is_relative_to(self.folder) else None

    def add(self, paths: Iterable[Any], owner: str) -> list[Path]:
        """Record files Gradio stored for an upload by `owner`; returns them (those inside the folder)."""
        kept = []
        with self._lock:
            for p in paths:
                path = self.inside(p)
                if path is None:
                    log.error("an upload was stored outside %s: %s", self.folder, str(p)[:200])
                    continue
                known = self._files.get(path)
                if known is None:
                    self._files[path] = _Upload(owner)
                else:  # the same bytes again (Gradio names a file by its hash): one more reference
                    known.refs += 1
                    known.owner, known.since = owner, time.monotonic()
                kept.append(path)
        return kept

    def release(self, *values: Any) -> list[Path]:
        """A request that named these uploads (paths; anything else is ignored) has ended: drop one reference
        each, delete a file once none is left (or when it was never recorded); returns what was deleted."""
        gone = []
        with self._lock:
            for value in values:
                path = self.inside(value)
                if path is None:
                    continue
                known = self._files.get(path)
                if known is not None and known.refs > 1:
                    known.refs -= 1
                    continue
                self._files.pop(path, None)
                if self._delete(path):
                    gone.append(path)
        self.purge()
        return gone

    def purge(self, max_age_s: float = ABANDONED_S) -> list[Path]:
        """Delete the uploads recorded more than `max_age_s` ago that no request released."""
        now, gone = time.monotonic(), []
        with self._lock:
            for path in [p for p, u in self._files.items() if now - u.since > max_age_s]:
                self._files.pop(path)
                if self._delete(path):
                    gone.append(path)
        return gone

    def owner(self, path: Path) -> str | None:
        with self._lock:
            known = self._files.get(path)
            return known.owner if known is not None else None

    def may_serve(self, target: str, owner: str | None) -> bool:
        """Whether the file route may answer for `target`: anything outside the upload folder is Gradio's own
        business; inside it, an upload only to its uploader (and only an image), any other file only when it
        is Gradio's copy of a result (a file of the same name and size directly in outputs/)."""
        paths = {self.inside(target)}
        with_links = Path(os.path.abspath(target)) if "\x00" not in target else None
        if with_links is not None and with_links != self.folder and with_links.is_relative_to(self.folder):
            paths.add(with_links)  # the folder named literally, whatever a link inside it points to
        paths.discard(None)
        if not paths:
            return True
        for path in paths:
            uploader = self.owner(path)
            if uploader is not None:
                if owner != uploader or path.suffix.lower() not in IMAGE_SUFFIXES:
                    return False
                continue
            result = self.outputs / path.name
            try:
                if path.is_symlink() or not result.is_file() or result.stat().st_size != path.stat().st_size:
                    return False
            except OSError:
                return False
        return True

    def _delete(self, path: Path) -> bool:
        """Unlink a regular file inside the folder and its hash folder once empty (caller holds the lock)."""
        if path.is_symlink() or not path.is_relative_to(self.folder):
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("could not delete the upload %s: %s", path, exc)
            return False
        parent = path.parent
        if parent != self.folder and parent.is_relative_to(self.folder):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty
        return True


def upload_path(value: Any) -> Any:
    """A page / API image value as the request's field: the path of Gradio's FileData ({"path": ...} or an
    object with .path), a string as given, anything else as it is (validate_request refuses it)."""
    if isinstance(value, dict):
        path = value.get("path")
        return path if isinstance(path, str) else value
    path = getattr(value, "path", None)
    return path if isinstance(path, str) else value


def raw_file_input(component, field: str) -> None:
    """Let every value of a file input (gr.Image) reach the handler as it was sent: no decoding by Gradio (which
    would open the image with Pillow before engine/images.py checks it) and no FileData parsing (whose refusal
    of a string names no field); FileData naming a URL is refused, where Gradio would download it. The
    component keeps its API description. Gradio still refuses FileData that points outside its upload folder.
    Instance attributes, as ui_parts.server_checked."""
    import gradio as gr
    from gradio_client.utils import is_http_url_like

    from engine.images import _limit_text

    info, as_input = component.api_info(), component.api_info_as_input()
    component.api_info = lambda: info
    component.api_info_as_input = lambda: as_input
    component.data_model = None
    component.preprocess = lambda payload: payload
    fetch = component.async_move_resource_to_block_cache

    async def no_downloads(path):
        if isinstance(path, str) and is_http_url_like(path):
            raise gr.Error(f"{field}: must be uploaded image data, not a URL ({_limit_text()})",
                           title=f"Invalid {field}", print_exception=False)
        return await fetch(path)

    component.async_move_resource_to_block_cache = no_downloads


# -- ASGI middleware --------------------------------------------------------------------------------------
def _is_upload_route(path: str) -> bool:
    return path.rstrip("/").endswith("/upload")


def _cookie(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            for item in value.decode("latin-1").split(";"):
                key, _, val = item.strip().partition("=")
                if key == COOKIE and val:
                    return val
    return None


def _header(scope, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == name), "")


async def _answer(scope, receive, send, status: int, detail: str) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


class GuardUploads:
    """ASGI middleware for …/upload: 403 when the model takes no images; otherwise 400 unless multipart with a
    boundary, 413 for a body over MAX_UPLOAD_BODY (at once when Content-Length says so, else as soon as the
    body grows past it), 400 for more than MAX_UPLOAD_FILES parts. A body that passes is handed to Gradio,
    and the files it stored are recorded with their uploader (a cookie set here)."""

    def __init__(self, app, uploads: Uploads) -> None:
        self.app, self.uploads = app, uploads

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not _is_upload_route(scope["path"]):
            await self.app(scope, receive, send)
            return
        if not self.uploads.enabled:
            await _answer(scope, receive, send, 403, "uploads are disabled on this server: its model takes no images")
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        boundary = re.search(r'(?i)^\s*multipart/form-data\s*;.*\bboundary="?([^";]{1,200})"?',
                             _header(scope, b"content-type"))
        if boundary is None:
            await _answer(scope, receive, send, 400, "an upload must be multipart/form-data with a boundary")
            return
        declared = _header(scope, b"content-length").strip()
        limit = (f"an upload is at most {MAX_UPLOAD_FILES} files of {MAX_IMAGE_BYTES // 2**20} MB "
                 f"(a body of at most {MAX_UPLOAD_BODY:,} bytes)")
        if declared.isdigit() and int(declared) > MAX_UPLOAD_BODY:
            await _answer(scope, receive, send, 413, f"{limit}; this one is {int(declared):,} bytes")
            return
        spool_dir = self.uploads.folder if self.uploads.folder.is_dir() else None
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY, dir=spool_dir) as body:
            delimiter = b"--" + boundary.group(1).encode("latin-1")
            size, parts, tail, more = 0, 0, b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                more = message.get("more_body", False)
                if size > MAX_UPLOAD_BODY:
                    await _answer(scope, receive, send, 413, f"{limit}; this one is larger")
                    return
                window = tail + chunk
                parts += sum(1 for m in re.finditer(re.escape(delimiter), window) if m.end() > len(tail))
                tail = window[-len(delimiter):]
                body.write(chunk)
            files = max(parts - 1, 0)  # the closing delimiter ends the last part
            if files > MAX_UPLOAD_FILES:
                await _answer(scope, receive, send, 400, f"{limit}; this one has {files} parts")
                return
            body.seek(0)
            await self._forward(scope, body, receive, send)

    async def _forward(self, scope, body, receive, send) -> None:
        owner = _cookie(scope)
        new_owner = owner is None
        owner = owner or secrets.token_urlsafe(18)
        done = False

        async def replay():
            nonlocal done
            if done:
                return await receive()  # nothing more to read: waits for the client to go away
            chunk = body.read(2**16)
            done = not chunk
            return {"type": "http.request", "body": chunk, "more_body": not done}

        status, answer = 500, []

        async def record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if new_owner:
                    cookie = f"{COOKIE}={owner}; Path=/; HttpOnly; SameSite=Strict"
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            elif message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
                if status == 200 and not message.get("more_body", False):
                    try:
                        paths = json.loads(b"".join(answer))
                    except ValueError:
                        paths = []
                    self.uploads.add(paths if isinstance(paths, list) else [], owner)
            await send(message)

        await self.app(scope, replay, record)


class GuardFiles:
    """ASGI middleware for Gradio's file route (GET/HEAD …/file=PATH and …/file/PATH): inside the upload folder
    only what Uploads.may_serve allows; 403 for the rest. Everything else goes on to Gradio unchanged."""

    def __init__(self, app, uploads: Uploads) -> None:
        self.app, self.uploads = app, uploads

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            route = _FILE_ROUTE.search(scope["path"])
            if route is not None and not self.uploads.may_serve(route.group("path"), _cookie(scope)):
                await _answer(scope, receive, send, 403, "uploaded files are not served")
                return
        await self.app(scope, receive, send)


def _is_file_data(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("meta"), dict) and obj["meta"].get("_type") == "gradio.FileData"


def strip_file_data(obj: Any, uploads: Uploads) -> tuple[Any, bool]:
    """`obj` with every FileData that names no upload of this server (a path elsewhere, a URL) replaced by its
    bare `path` value, and whether anything changed. Gradio would refuse such a value with a traceback in the
    log (a path) or download it (a URL); as a plain value it reaches the handler, whose refusal names the field."""
    changed = False

    def walk(node: Any, depth: int) -> Any:
        nonlocal changed
        if depth > 64:
            return node
        if _is_file_data(node) and uploads.inside(node.get("path")) is None:
            changed = True
            return node.get("path")
        if isinstance(node, list):
            return [walk(v, depth + 1) for v in node]
        if isinstance(node, dict):
            return {k: walk(v, depth + 1) for k, v in node.items()}
        return node

    return walk(obj, 0), changed


class GuardFileData:
    """ASGI middleware for POST …/queue/join (behind GuardQueueJoin, which bounds the body): FileData values that
    name no upload of this server become plain values (strip_file_data) before Gradio sees them."""

    def __init__(self, app, uploads: Uploads) -> None:
        self.app, self.uploads = app, uploads

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/queue/join"):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
            data, changed = strip_file_data(parsed.get("data"), self.uploads) if isinstance(parsed, dict) else (None, False)
        except (ValueError, RecursionError):
            changed = False
        if changed:
            body = json.dumps({**parsed, "data": data}).encode("utf-8", "surrogatepass")
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await forward_with_body(self.app, scope, body, receive, send)


async def forward_with_body(app, scope, body: bytes, receive, send) -> None:
    """Pass an HTTP request on to `app` after a middleware read its whole body: the body is replayed once, then
    the client's own messages (a disconnect) follow."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    await app(scope, replay, send)
