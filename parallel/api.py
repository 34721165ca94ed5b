"""The jobs API for programs, OpenAI-style (`/v1/videos`), and `GET /metrics`: starlette routes on the page's
own server and port (mounted by ui.serve_ui next to /healthz), sharing the page's one queue.

    POST   /v1/videos                 {"prompt", ...} → {"id", "object": "video", "status": "queued", ...}
    GET    /v1/videos                 a page of jobs, newest first (?limit=&after=&order=&status=)
    GET    /v1/videos/{id}            status, progress, queue position, timings, error
    GET    /v1/videos/{id}/content    the mp4 (?index=N for batch_size > 1)
    DELETE /v1/videos/{id}            cancel (queued: at once; running: at the next step, every rank);
                                      ?purge=true on a finished job removes it and its files
    GET    /metrics                   Prometheus text format

Every value goes through the page's validation (dispatcher.validate), so the messages are the page's. With
--api_key every call needs `Authorization: Bearer KEY` (401 otherwise). Without a key the routes answer only
on a loopback --listen without --share; elsewhere 403 saying how to enable them (--api_key, or --api_open).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import ipaddress
import json
import logging
import re
from pathlib import Path
from typing import Any

from engine.request import RequestError, validate_request
from parallel.job_queue import JobQueue, QueueFull
from parallel.jobs import FINISHED, IMAGE_FIELDS, STATUSES, is_job_id

log = logging.getLogger("wan.api")

# The request fields of POST /v1/videos (the page's form, `seed` for base_seed, images as base64)
API_FIELDS = ("prompt", "negative_prompt", "size", "frame_num", "sample_steps", "sample_guide_scale", "sample_shift",
              "seed", "sample_solver", "batch_size", "ulysses_size", "ring_size", "cfg_size", "offload_percent",
              "blocks_to_swap", "teacache", "loras", "sample_timesteps", *IMAGE_FIELDS)
IGNORED_FIELDS = ("model",)  # OpenAI clients send it; this server runs the one model it loaded
NUMBER_FIELDS = ("ulysses_size", "ring_size", "cfg_size", "offload_percent", "blocks_to_swap")  # as validated
MAX_BODY_BYTES = 2**20  # a request without images (prompts ≤ 2,000 characters)
LIST_LIMIT = 100
LOOPBACK_NAMES = ("localhost",)


class ApiError(Exception):
    """An answer other than 200: status, message, the field it is about, headers."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.kind, self.headers = status, message, field, kind, headers or {}

    def response(self):
        return json_response({"error": {"message": self.message, "type": self.kind, "field": self.field}},
                             self.status, self.headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None):
    """JSON with every non-ASCII character escaped (a lone surrogate in an echoed value cannot break it)."""
    from starlette.responses import Response

    text = json.dumps(body, ensure_ascii=True, allow_nan=False, default=str)
    return Response(text, status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store", **(headers or {})})


# -- who may call --------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Gate:
    """The API's access rule: the key when one was given; otherwise open on loopback only (or with --api_open)."""

    def __init__(self, key: str | None, listen: str, share: bool, api_open: bool) -> None:
        self.key = key.encode("latin-1") if key else None
        self.closed: str | None = None
        if not key and not api_open and (share or not is_loopback(listen)):
            where = "a share link" if share else f"{listen}"
            self.closed = (f"the /v1/ API and /metrics are off: this server serves {where} without --api_key. Start it "
                           "with --api_key KEY (or --api_key_file FILE) and send 'Authorization: Bearer KEY', or with "
                           "--api_open to serve them without a key")

    def describe(self) -> str:
        if self.closed:
            return "off (403): no --api_key on a non-loopback address; add --api_key or --api_open"
        return "a Bearer key required" if self.key else "open (loopback, no key)"

    def check(self, request) -> None:
        """Raise ApiError 403 / 401 unless this request may call the API."""
        if self.closed:
            raise ApiError(403, self.closed, kind="api_disabled")
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the server's "
                                "--api_key", kind="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# -- POST /v1/videos: the body → a checked raw request ---------------------------------------------------------
def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or ApiError 400."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        what = "is not UTF-8" if isinstance(exc, UnicodeDecodeError) else "is not valid JSON"
        raise ApiError(400, f"the request body {what}; send a JSON object like {{\"prompt\": \"a fox in the snow\"}}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(payload).__name__}")
    return payload


def decode_image(name: str, value: Any) -> bytes:
    """A base64 image field (optionally a data: URL) → its bytes; RequestError naming the field otherwise."""
    from engine.images import MAX_IMAGE_BYTES

    what = f"must be a PNG, JPEG or WebP image as a base64 string (at most {MAX_IMAGE_BYTES // 2**20} MB)"
    if not isinstance(value, str):
        raise RequestError(name, f"{what}; got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(name, f"{what}; a data: URL must be data:image/...;base64,<data>")
    text = "".join(text.split())
    if len(text) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise RequestError(name, f"{what}; got {len(text) * 3 // 4 / 2**20:.1f} MB")
    if not re.fullmatch(r"[A-Za-z0-9+/_-]*={0,2}", text) or len(text) % 4 == 1:
        raise RequestError(name, f"{what}; this is not valid base64")
    try:
        data = base64.b64decode(text.translate(str.maketrans("-_", "+/")) + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(name, f"{what}; this is not valid base64") from None
    if not data:
        raise RequestError(name, f"{what}; got an empty string")
    return data


def build_request(payload: dict[str, Any], dispatcher) -> tuple[dict[str, Any], int]:
    """The API body as the page's raw request, checked the page's way; (raw, steps). RequestError otherwise."""
    for key in payload:
        if key not in API_FIELDS and key not in IGNORED_FIELDS and key != "base_seed":
            raise RequestError(str(key)[:60], f"unknown field; the fields are {', '.join(API_FIELDS)}")
    if payload.get("model") is not None and not isinstance(payload["model"], str):
        raise RequestError("model", f"must be text (it is ignored: this server runs one model), got "
                                    f"{type(payload['model']).__name__}")
    if "seed" in payload and "base_seed" in payload:
        raise RequestError("seed", "give seed or base_seed, not both")
    raw = {k: payload.get(k) for k in API_FIELDS if k != "seed"}
    raw["base_seed"] = payload.get("seed", payload.get("base_seed"))
    for name in IMAGE_FIELDS:
        if raw[name] is not None:
            raw[name] = decode_image(name, raw[name])
    info = dispatcher.info
    req = validate_request(raw, info.limits, info.defaults)  # the field checks first, as the page does them
    raw.update({k: getattr(req, k) for k in NUMBER_FIELDS if raw[k] is not None})  # layout_for takes numbers only
    req = dispatcher.validate(raw)
    raw["_resolved"] = {"size": req.size, "frame_num": req.frame_num, "sample_steps": req.sample_steps,
                        "batch_size": req.batch_size}
    return {k: v for k, v in raw.items() if v is not None}, req.sample_steps


def page_field(exc: RequestError) -> RequestError:
    """The page's renaming of a layout refusal (ui_parts.layout_field), so that both say the same."""
    from ui_parts import layout_field  # rank 0 only, where the page (and gradio) is loaded

    return layout_field(exc)


async def read_body(request, limit: int) -> bytes:
    """The request body, or ApiError 413 past `limit` bytes (stopped reading there)."""
    length = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over {limit // 1024} KiB", kind="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


# -- answers --------------------------------------------------------------------------------------------------
def video_object(job: dict[str, Any], model: str) -> dict[str, Any]:
    """A job as the API shows it (OpenAI's video object, plus this server's steps, queue position and timings)."""
    req, status = job["request"], job["status"]
    resolved = req.get("_resolved", {})
    total = job["steps_total"] or resolved.get("sample_steps")
    done = total if status == "completed" else job["steps_done"]
    created, started, finished = job["created_at"], job["started_at"], job["finished_at"]
    timings: dict[str, Any] = {}
    if started is not None:
        timings["queued_s"] = round(started - created, 3)
    if finished is not None:
        timings["total_s"] = round(finished - created, 3)
        if started is not None:
            timings["run_s"] = round(finished - started, 3)
    if job["timings"]:
        timings["stages"] = job["timings"]  # the sidecar's: text encoder, denoise, per step, VAE decode, mp4
    videos = [p for p in job["outputs"] if p.endswith(".mp4")]
    shown = {k: v for k, v in req.items() if not k.startswith("_") and k not in IMAGE_FIELDS}
    shown.update({k: f"<{k} of this job>" for k in req.get("_images", [])})
    return {
        "id": job["id"], "object": "video", "status": status, "model": model, "source": job["source"],
        "created_at": int(created), "started_at": None if started is None else int(started),
        "completed_at": None if finished is None else int(finished),
        "prompt": req.get("prompt"), "size": resolved.get("size", req.get("size")),
        "frame_num": resolved.get("frame_num", req.get("frame_num")),
        "seed": job["seed"],  # the seed used, once it ran
        "progress": int(100 * done / total) if total else 0, "steps_done": done, "steps_total": total,
        "queue_position": job["position"], "attempts": job["attempts"], "cancel_requested": job["cancel_requested"],
        "error": {"message": job["error"], "code": job["reason"]} if status == "failed" else None,
        "timings": timings, "videos": len(videos),
        "content_url": f"/v1/videos/{job['id']}/content" if status == "completed" and videos else None,
        "request": shown,
    }


def _int_param(request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"\d{1,6}", text) or not lo <= int(text) <= hi:
        raise ApiError(400, f"{name}: must be an integer between {lo} and {hi}, got {text[:40]!r}", field=name)
    return int(text)


def api_routes(server, cfg, jobs: JobQueue) -> list:
    """The /v1/videos routes and /metrics for the page's app (starlette Routes)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, Response
    from starlette.routing import Route

    from parallel.metrics import CONTENT_TYPE

    gate = Gate(cfg.api_key, cfg.listen, cfg.share, cfg.api_open)
    dispatcher = server.dispatcher
    model = str(getattr(server.pipe, "model_name", None) or server.state.info.key)
    body_limit = MAX_BODY_BYTES + dispatcher.info.limits.image_inputs * ((20 * 2**20 * 4) // 3 + 1024)
    log.info("jobs API on /v1/videos and /metrics: %s", gate.describe())

    def guarded(handler):
        @functools.wraps(handler)
        async def endpoint(request):
            try:
                gate.check(request)
                return await handler(request)
            except ApiError as exc:
                return exc.response()
            except Exception:  # noqa: BLE001 - logged with its traceback; the client gets one line
                log.exception("%s %s failed", request.method, request.url.path)
                return ApiError(500, "internal error (see the server log)", kind="server_error").response()
        return endpoint

    def job_or_404(video_id: str) -> dict[str, Any]:
        job = jobs.view(video_id) if is_job_id(video_id) else None
        if job is None:
            raise ApiError(404, f"no video job {video_id[:80]!r}", field="id", kind="not_found")
        return job

    def accept(payload: dict[str, Any]) -> dict[str, Any]:
        try:
            raw, steps = build_request(payload, dispatcher)
        except RequestError as exc:
            exc = page_field(exc)
            raise ApiError(422, str(exc), field=exc.field) from None
        try:
            return jobs.enqueue(raw, "api", steps)
        except QueueFull as exc:
            raise ApiError(429, str(exc), kind="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None

    @guarded
    async def videos(request):
        if request.method == "POST":
            payload = parse_json(await read_body(request, body_limit))
            job = await run_in_threadpool(accept, payload)
            return json_response(video_object(job, model))
        limit = _int_param(request, "limit", 20, 1, LIST_LIMIT)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order: must be asc or desc, got {order[:40]!r}", field="order")
        status = request.query_params.get("status")
        if status is not None and status not in STATUSES:
            raise ApiError(400, f"status: must be one of {', '.join(STATUSES)}, got {status[:40]!r}", field="status")
        after = request.query_params.get("after")
        if after is not None:
            job_or_404(after)
        rows, more = await run_in_threadpool(jobs.store.list_jobs, limit, after, order, status)
        data = [video_object(jobs.view(r["id"]) or r, model) for r in rows]
        return json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": more})

    @guarded
    async def video(request):
        video_id = request.path_params["video_id"]
        job = job_or_404(video_id)
        if request.method == "GET":
            return json_response(video_object(job, model))
        purge = request.query_params.get("purge", "false")
        if purge not in ("true", "false"):
            raise ApiError(400, f"purge: must be true or false, got {purge[:40]!r}", field="purge")
        if job["status"] in FINISHED:
            if purge == "true":
                removed = await run_in_threadpool(jobs.store.delete, video_id)
                return json_response({"id": video_id, "object": "video.deleted", "deleted": True, "files": len(removed)})
            return json_response(video_object(job, model))  # already over: nothing to cancel
        return json_response(video_object(await run_in_threadpool(jobs.cancel, video_id) or job, model))

    @guarded
    async def content(request):
        job = job_or_404(request.path_params["video_id"])
        variant = request.query_params.get("variant", "video")
        if variant != "video":
            raise ApiError(400, f"variant: only video is served, got {variant[:40]!r}", field="variant")
        if job["status"] != "completed":
            raise ApiError(409, f"the video is not ready: the job is {job['status']}", kind="not_ready")
        videos = [p for p in job["outputs"] if p.endswith(".mp4")]
        index = _int_param(request, "index", 0, 0, max(0, len(videos) - 1))
        path = Path(videos[index]) if videos else None
        outputs = Path(cfg.outputs_dir).resolve()
        if path is None or not path.resolve().is_relative_to(outputs) or not path.is_file():
            raise ApiError(404, "the video file is gone from the outputs folder", kind="not_found")
        return FileResponse(path, media_type="video/mp4", filename=f"{job['id']}.mp4" if len(videos) == 1 else
                            f"{job['id']}_{index}.mp4", headers={"Cache-Control": "no-store"})

    @guarded
    async def metrics(request):
        body = await run_in_threadpool(jobs.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    return [Route("/v1/videos", videos, methods=["GET", "POST"]),
            Route("/v1/videos/{video_id}", video, methods=["GET", "DELETE"]),
            Route("/v1/videos/{video_id}/content", content, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"])]
