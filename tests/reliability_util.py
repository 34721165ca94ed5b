"""Helpers for tests/test_reliability.py: a `./launch.sh --nproc N` gang that torchrun may restart, serving on
a port its rank 0 binds itself (`--port 0`; a restarted rank 0 binds a new one), its rank processes and their
memory, a raw client of Gradio's queue protocol (every byte the client receives is kept, to look for
tracebacks), raw HTTP probes (no URL normalisation), the fuzz cases."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.multirank import rank_pids
from tests.ui_server import ROOT, announced_port

USER, PASSWORD = "reliability", "s3cret-pass"
# What a Python traceback looks like when it leaks into an answer.
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|\bline \d+, in \w+")
FIELDS = ("prompt", "negative_prompt", "size", "frame_num", "sample_steps", "sample_guide_scale", "sample_shift",
          "base_seed", "sample_solver", "batch_size", "ulysses_size", "ring_size", "cfg_size", "offload_percent",
          "blocks_to_swap", "teacache", "loras", "sample_timesteps")
LAYOUT_FIELDS = ("ulysses_size", "ring_size", "cfg_size")
# Any field name a validation error may start with ("layout": the product of the three layout sizes).
ERROR_FIELDS = (*FIELDS, "layout")
# Refusals of a combination name one field while another changed: the layout product names "layout"; explicit
# sample_timesteps need sample_solver euler and sample_steps equal to their count.
CROSS_FIELD = {"layout": set(LAYOUT_FIELDS), "sample_solver": {"sample_timesteps"}, "sample_steps": {"sample_timesteps"}}
BUSY = "Queue is full"


# -- the gang ---------------------------------------------------------------------------------------------
@dataclass
class Gang:
    """`./launch.sh --nproc N` (torchrun) serving the tiny model on CPU, started in its own session."""

    outputs: Path
    proc: subprocess.Popen
    log_path: Path
    nproc: int
    ready_at: float | None = None  # time.monotonic() when the page first answered
    _rank0: tuple[int, int | None] | None = field(default=None, repr=False)  # (rank 0's pid, its port)

    @property
    def port(self) -> int | None:
        """The port the live rank 0 announced (ui.py LISTENING); None while no live rank 0 has announced one
        (starting, or torchrun restarting the gang: a restarted rank 0 binds a new port)."""
        known = self._rank0
        if known is None or not alive(known[0]):
            pid = self.rank_pids().get(0)
            known = self._rank0 = (pid, None) if pid is not None else None
        if known is not None and known[1] is None:
            known = self._rank0 = (known[0], announced_port(self.log(0), known[0]))
        return known[1] if known is not None else None

    @property
    def url(self) -> str:
        port = self.port
        if port is None:
            raise RuntimeError(f"no rank 0 of the gang serves now:\n{self.log()}")
        return f"http://127.0.0.1:{port}"

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if tail else self.log_path.read_text(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def videos(self) -> list[Path]:
        return sorted(self.outputs.glob("*.mp4"))

    def rank_pids(self) -> dict[int, int]:
        return rank_pids(self.proc.pid)

    def rss_mib(self) -> dict[int, float]:
        """RANK → resident set size (MiB) of each rank process."""
        return {rank: rss_mib(pid) for rank, pid in sorted(self.rank_pids().items())}

    def serving(self) -> bool:
        port = self.port
        if port is None:
            return False
        try:
            return httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 240) -> Gang:
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gang exited with {self.proc.returncode} before serving:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gang did not serve within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.25)
        if self.ready_at is None:
            self.ready_at = time.monotonic()
        return self

    def watch_ready(self) -> threading.Thread:
        """Record `ready_at` from a background thread (only /gradio_api/info is asked: it never touches the gang)."""
        def watch() -> None:
            with contextlib.suppress(Exception):  # a gang that never serves is reported by wait_ready later
                self.wait_ready()

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """End the gang at once: the torchrun agent first (so it restarts nothing), then every rank."""
        pids = self.rank_pids()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)


def start_gang(tmp: Path, tiny_dir: Path, *args: str, nproc: int = 2, max_restarts: int = 3,
               auth: bool = True) -> Gang:
    """Start `./launch.sh --nproc N` with the test interpreter's venv (no set-up), without waiting."""
    tmp.mkdir(parents=True, exist_ok=True)
    outputs = tmp / "outputs"
    flags = ["--nproc", str(nproc), "--port", "0", "--outputs_dir", str(outputs), *args]
    if auth:
        flags += ["--auth", f"{USER}:{PASSWORD}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(WAN_TINY_DIR=str(tiny_dir), CUDA_VISIBLE_DEVICES="", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", LAUNCH_NO_VENV="1", LAUNCH_MAX_RESTARTS=str(max_restarts),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.pop("WAN_VENV", None)
    log_path = tmp / "gang.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["./launch.sh", *flags], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Gang(outputs, proc, log_path, nproc)


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- HTTP -------------------------------------------------------------------------------------------------
def login_cookies(url: str) -> httpx.Cookies:
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/login", data={"username": USER, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return http.cookies


def health(url: str, cookies: httpx.Cookies | None = None, deadline: float | None = None,
           timeout: float = 40) -> tuple[int | None, dict]:
    """(HTTP status, body) of /healthz; (None, {"error": ...}) when nothing answers."""
    params = {"deadline": str(deadline)} if deadline is not None else None
    try:
        r = httpx.get(url + "/healthz", params=params, cookies=cookies, timeout=timeout)
    except httpx.HTTPError as exc:
        return None, {"error": type(exc).__name__}
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"text": r.text}


def raw_get(port: int, target: str, cookie: str = "", timeout: float = 20) -> tuple[int, bytes]:
    """GET exactly `target` (no normalisation of ../ or %-escapes, unlike httpx); (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        if cookie:
            conn.putheader("Cookie", cookie)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def cookie_header(cookies: httpx.Cookies) -> str:
    return "; ".join(f"{k}={v}" for k, v in cookies.items())


@dataclass
class Answer:
    """One request through Gradio's queue, as the client saw it."""

    kind: str  # "result" | "error" | "busy" | "refused" (HTTP 4xx/5xx at join) | "lost" (stream ended without an answer)
    status: int | None = None
    error: str | None = None
    title: str | None = None
    output: Any = None
    raw: str = ""  # every byte received, for the traceback check
    seconds: float = 0.0


class QueueClient:
    """Gradio's queue protocol by hand (join, then the SSE stream), so that any JSON can be sent — NaN and
    ±Infinity literals, wrong types, huge numbers — and every byte of the answer can be inspected."""

    def __init__(self, url: str, api_name: str = "generate", login: bool = True) -> None:
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=120))
        if login:
            r = self.http.post("/login", data={"username": USER, "password": PASSWORD})
            assert r.status_code == 200, r.text
        config = self.http.get("/config").json()
        self.fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)

    def close(self) -> None:
        self.http.close()

    def join(self, body: str) -> httpx.Response:
        return self.http.post("/gradio_api/queue/join", content=body.encode("utf-8", "surrogatepass"),
                              headers={"content-type": "application/json"})

    def call(self, data: Any, fn_index: Any = None) -> Answer:
        t0 = time.monotonic()
        session = uuid.uuid4().hex[:12]
        body = json.dumps({"data": data, "fn_index": self.fn_index if fn_index is None else fn_index,
                           "session_hash": session, "event_data": None, "trigger_id": None})  # NaN/Infinity literals kept
        r = self.join(body)
        raw = r.text
        if r.status_code != 200:
            kind = "busy" if BUSY in r.text else "refused"
            return Answer(kind, r.status_code, error=r.text[:300], raw=raw, seconds=time.monotonic() - t0)
        event_id = r.json().get("event_id")
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                raw += line + "\n"
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (None, event_id):
                    continue
                if msg.get("msg") == "process_completed":
                    out = msg.get("output") or {}
                    seconds = time.monotonic() - t0
                    if msg.get("success"):
                        return Answer("result", 200, output=out.get("data"), raw=raw, seconds=seconds)
                    return Answer("error", 200, error=out.get("error"), title=msg.get("title"), raw=raw, seconds=seconds)
                if msg.get("msg") in ("unexpected_error", "close_stream"):
                    return Answer("lost", 200, error=str(msg.get("message")), raw=raw, seconds=time.monotonic() - t0)
        return Answer("lost", 200, error="stream ended", raw=raw, seconds=time.monotonic() - t0)


# -- fuzz cases ---------------------------------------------------------------------------------------------
def base_request(layout: tuple[int, int, int] = (None, None, None)) -> list[Any]:
    """The cheapest valid request (16*16, 1 frame, 1 step: ~0.5 s on 2 CPU cores), in /generate's order;
    `layout` = (ulysses, ring, cfg), None: the server's default."""
    u, r, c = layout
    return ["a red fox in the snow", "", "16*16", 1, 1, 5.0, 5.0, 7, "unipc", 1, u, r, c, 0.0, 0, 0.0, [], ""]


def hostile_values() -> list[Any]:
    """Values no field should take, plus a few that some fields legitimately accept."""
    nan, inf = float("nan"), float("inf")
    return [
        # wrong types
        None, True, False, [], {}, [1, 2], [None], [[[]]], {"a": 1}, {"path": "../../etc/passwd"},
        {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
        {"path": "../../../../etc/passwd", "url": "file:///etc/passwd", "meta": {"_type": "gradio.FileData"}},
        # numbers: non-finite, negative, huge, fractional
        nan, inf, -inf, 0, -1, -7, 1, 0.5, -0.0, 1e-300, 1e308, -1e308, 2**31, -(2**31) - 1, 2**63, 2**64 + 1,
        10**30, -(10**30), 10**400, 4 * 60 + 1.5,
        # strings that look like numbers, or not
        "", " ", "0", "-1", "5", "1e309", "nan", "NaN", "Infinity", "-inf", "0x10", "1_000", "١٢", " 17 ", "4n+1",
        # long and control-character strings
        "x" * 100_000, "é" * 2001, "\x00", "\x00\x01\x02\x1b[2J\x7f\x9b", "a\r\nb\tc", "\u202e\u200b\ufeff", "名前🎥" * 50,
        "a cat \ud800", "\udfff",
        # path-like, injection-like
        "../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "file:///etc/passwd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%252e%252e%252fetc%252fpasswd", "/proc/self/environ", "~/.ssh/id_rsa",
        "outputs/../../app.py", "<script>alert(1)</script>", "{{7*7}}", "${jndi:ldap://127.0.0.1/x}",
        "'; DROP TABLE t; --", "\r\n\r\nHTTP/1.1 200 OK", "208*144\n", "16*16*16", "0*0", "-16*-16", "99999*99999",
        "16x16", "16 * 16", "1e3*16", "unipc ", "UNIPC", "ulysses 3 × ring 1",
    ]


def fuzz_cases(n: int, layout: tuple[int, int, int], seed: int = 0) -> list[tuple[list[Any], set[str]]]:
    """n requests, each the base request with 1 to 3 fields set to hostile values; with the fields changed.
    The first len(FIELDS) × len(hostile_values()) cases (in a seeded order) set every hostile value on every
    field once; the rest are random combinations."""
    rng = random.Random(seed)
    values = hostile_values()
    sweep = [(i, v) for i in range(len(FIELDS)) for v in values]
    rng.shuffle(sweep)
    cases = []
    for k in range(n):
        data = base_request(layout)
        if k < len(sweep):
            picks = [sweep[k]]
        else:
            picks = [(i, rng.choice(values)) for i in rng.sample(range(len(FIELDS)), rng.randint(1, 3))]
        for i, v in picks:
            data[i] = v
        cases.append((data, {FIELDS[i] for i, _ in picks}))
    return cases


def expensive(data: list[Any]) -> bool:
    """A valid but costly combination (big sizes, many frames/steps/videos): not what this fuzz is about."""
    def num(x: Any) -> float:
        try:
            f = float(x)
        except (TypeError, ValueError, OverflowError):
            return 0.0
        return f if math.isfinite(f) else 0.0

    size = data[2] if isinstance(data[2], str) else ""
    sides = [int(s) for s in re.findall(r"\d+", size)[:2]] if re.fullmatch(r"\s*\d{1,5}\s*[*xX]\s*\d{1,5}\s*", size) else []
    pixels = sides[0] * sides[1] if len(sides) == 2 else 0
    frames = num(data[3]) if data[3] is not None else 17
    steps = num(data[4]) if data[4] is not None else 10
    batch = num(data[9]) if data[9] is not None else 1
    return pixels > 320 * 320 or frames > 33 or steps > 20 or batch > 2


@dataclass
class FuzzTally:
    results: int = 0
    field_errors: int = 0
    gradio_refusals: int = 0  # FileData-shaped values: Gradio's own file check refuses them before our handler
    busy: int = 0
    bad: list[str] = field(default_factory=list)
    tracebacks: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.results + self.field_errors + self.gradio_refusals + self.busy + len(self.bad)


def file_data_shaped(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("meta"), dict) and value["meta"].get("_type") == "gradio.FileData"


def judge(answer: Answer, data: list[Any], changed: set[str], tally: FuzzTally) -> None:
    """Count one fuzz answer; anything that is not a result, a field error naming a changed field, "busy", or
    Gradio's refusal of a FileData-shaped value goes into tally.bad with the request."""
    if TRACEBACK.search(answer.raw):
        tally.tracebacks += 1
        tally.bad.append(f"traceback text in the answer to {short(data)}: {answer.raw[:300]!r}")
        return
    if answer.kind == "result":
        tally.results += 1
    elif answer.kind == "busy":
        tally.busy += 1
    elif answer.kind == "error" and answer.error and answer.error.split(":", 1)[0] in ERROR_FIELDS:
        named = answer.error.split(":", 1)[0]
        if named in changed or changed & CROSS_FIELD.get(named, set()):
            tally.field_errors += 1
        else:
            tally.bad.append(f"error names {named!r} but only {sorted(changed)} changed: {short(data)} -> {answer.error[:200]!r}")
    elif answer.kind == "error" and answer.error is None and any(file_data_shaped(v) for v in data):
        tally.gradio_refusals += 1
    else:
        tally.bad.append(f"{answer.kind} {answer.status} {answer.title!r} {str(answer.error)[:200]!r} for {short(data)}")


def short(data: Any) -> str:
    return repr([(v[:40] + f"...({len(v)} chars)") if isinstance(v, str) and len(v) > 40 else v for v in data])[:400] \
        if isinstance(data, list) else repr(data)[:400]


# -- fuzz of the JSON API (/v1/videos) -----------------------------------------------------------------------
API_FIELDS = ("prompt", "negative_prompt", "size", "frame_num", "sample_steps", "sample_guide_scale", "sample_shift",
              "seed", "sample_solver", "batch_size", "ulysses_size", "ring_size", "cfg_size", "offload_percent",
              "blocks_to_swap", "teacache", "loras", "sample_timesteps", "image", "last_frame")
# the cheapest valid job (16*16, 1 frame, 1 step); every other field: the server's default
API_BASE = {"prompt": "a red fox in the snow", "size": "16*16", "frame_num": 1, "sample_steps": 1, "seed": 7}
# a refusal may name the page's field for the API's name
API_NAMED = {"base_seed": "seed"}


def api_envelope_bodies() -> list[tuple[str, bytes]]:
    """Bodies that are not a request object at all: broken JSON, other JSON types, odd encodings, sizes, keys."""
    good = json.dumps(API_BASE)
    return [
        ("empty", b""), ("not json", b"{not json"), ("truncated", good[:-3].encode()), ("null", b"null"),
        ("number", b"42"), ("string", b'"a fox"'), ("list", b'["a fox"]'), ("true", b"true"),
        ("NaN literal", b"NaN"), ("latin-1", '{"prompt": "caf\xe9"}'.encode("latin-1")), ("utf-16", good.encode("utf-16")),
        ("BOM", b"\xef\xbb\xbf" + good.encode()), ("NUL bytes", b"\x00" * 64), ("invalid utf-8", b'{"prompt": "\xff\xfe"}'),
        ("deep list", b"[" * 50_000 + b"]" * 50_000), ("deep object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        ("5000-digit int", b'{"prompt": "x", "frame_num": 1' + b"0" * 5000 + b"}"),
        ("1e999", b'{"prompt": "x", "sample_shift": 1e999}'), ("-0", b'{"prompt": "x", "seed": -0}'),
        ("duplicate keys", b'{"prompt": "x", "prompt": ""}'), ("2 MB body", ('{"prompt": "' + "x" * 2_000_000 + '"}').encode()),
        ("many keys", json.dumps({f"k{i}": i for i in range(20_000)}).encode()),
        ("empty key", json.dumps({**API_BASE, "": 1}).encode()), ("proto key", json.dumps({**API_BASE, "__proto__": {}}).encode()),
        ("long key", json.dumps({**API_BASE, "k" * 10_000: 1}).encode()),
        ("control key", json.dumps({**API_BASE, "\u0000\u001b[2J": 1}).encode()),
        ("surrogate key", json.dumps({**API_BASE, "\ud800": 1}).encode()),
        ("base_seed and seed", json.dumps({**API_BASE, "base_seed": 3}).encode()),
        ("model object", json.dumps({**API_BASE, "model": {"a": 1}}).encode()),
        ("whitespace", b" \n\t " + good.encode() + b" \n"), ("trailing garbage", good.encode() + b"}}"),
    ]


def api_fuzz_cases(n: int, seed: int = 0) -> list[tuple[bytes, set[str]]]:
    """n JSON bodies: the cheapest valid job with 1 to 3 fields set to hostile values (every field with every
    hostile value in a seeded order first, then random combinations); with the fields changed."""
    rng = random.Random(seed)
    values = hostile_values()
    sweep = [(f, v) for f in API_FIELDS for v in values]
    rng.shuffle(sweep)
    cases = []
    for k in range(n):
        picks = [sweep[k]] if k < len(sweep) else [(f, rng.choice(values)) for f in rng.sample(API_FIELDS, rng.randint(1, 3))]
        body = dict(API_BASE)
        body.update(picks)
        cases.append((json.dumps(body).encode("utf-8", "surrogatepass"), {f for f, _ in picks}))
    return cases


def api_expensive(body: bytes) -> bool:
    """A valid but costly job (big size, many frames/steps/videos), in tests/reliability_util.expensive's terms."""
    try:
        d = json.loads(body)
    except ValueError:
        return False
    if not isinstance(d, dict):
        return False
    row = [d.get("seed" if f == "base_seed" else f) for f in FIELDS]
    return expensive(row)


def judge_api(status: int, text: str, changed: set[str] | None, tally: FuzzTally, what: str) -> str | None:
    """Count one answer of POST /v1/videos; the accepted job's id (to cancel it), else None. Anything but a job,
    a 400/413, a 422 naming a changed field (any field for an envelope probe: changed None), or 429 goes into
    tally.bad."""
    if TRACEBACK.search(text):
        tally.tracebacks += 1
        tally.bad.append(f"traceback text in the answer to {what}: {text[:300]!r}")
        return None
    try:
        body = json.loads(text)
    except ValueError:
        tally.bad.append(f"{status} not JSON for {what}: {text[:200]!r}")
        return None
    if status == 200 and body.get("object") == "video" and body.get("status") == "queued":
        tally.results += 1
        return body["id"]
    error = body.get("error") if isinstance(body, dict) else None
    if status == 429 and error:
        tally.busy += 1
    elif status in (400, 413) and error and error.get("message"):
        tally.field_errors += 1
    elif status == 422 and error and str(error.get("message", "")).startswith(f"{error.get('field')}:"):
        named = API_NAMED.get(error["field"], error["field"])
        if changed is None or named in changed or changed & CROSS_FIELD.get(named, set()):
            tally.field_errors += 1
        else:
            tally.bad.append(f"422 names {named!r} but only {sorted(changed)} changed: {what} -> {text[:200]!r}")
    else:
        tally.bad.append(f"{status} {text[:200]!r} for {what}")
    return None


# -- hostile images (image-to-video servers) ------------------------------------------------------------------
def image_bytes(fmt: str = "PNG", w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """A random-pixel image in `fmt` (any format Pillow writes)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def png_declaring(w: int, h: int) -> bytes:
    """A small, well-formed PNG whose header declares w×h pixels, with a few rows of data: a decompression bomb
    (or, at sizes the server takes, a truncated image)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (1 + w) * 8)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def hostile_image_files() -> list[tuple[str, str, bytes]]:
    """(case, file name, bytes) of files no image input should take, each uploaded and then named in a request."""
    png = image_bytes("PNG", 256, 256, seed=1)
    return [
        ("random bytes", "noise.png", random.Random(3).randbytes(4096)),
        ("truncated PNG", "cut.png", png[: len(png) // 3]),
        ("PNG declaring 30000x30000 (bomb)", "bomb.png", png_declaring(30000, 30000)),
        ("PNG declaring 9000x16 (over 8192 a side)", "wide.png", png_declaring(9000, 16)),
        ("8x8 PNG (under 16 a side)", "tiny.png", image_bytes("PNG", 8, 8)),
        ("GIF", "anim.gif", image_bytes("GIF")),
        ("BMP", "pic.bmp", image_bytes("BMP")),
        ("TIFF", "pic.tiff", image_bytes("TIFF")),
        ("GIF named .png", "gif.png", image_bytes("GIF", seed=2)),
        ("0-byte file", "empty.png", b""),
        ("text file", "passwd.png", b"root:x:0:0:root:/root:/bin/bash\n"),
        ("HTML", "page.html", b"<script>alert(1)</script>"),
        ("JPEG header only", "head.jpg", image_bytes("JPEG", 256, 256)[:200]),
    ]


def hostile_image_values(upload_dir: Path) -> list[tuple[str, Any]]:
    """(case, value) of image fields that are no upload at all: paths, traversal, wrong types."""
    fd = {"meta": {"_type": "gradio.FileData"}}
    return [
        ("system file path", "/etc/passwd"),
        ("relative path with ../", "../../../../../../etc/passwd"),
        ("upload folder then ../", f"{upload_dir}/../../../../../../etc/passwd"),
        ("the app's own source", str(ROOT / "app.py")),
        ("missing upload", f"{upload_dir}/{uuid.uuid4().hex}/gone.png"),
        ("the upload folder itself", str(upload_dir)),
        ("FileData of a system file", {"path": "/etc/passwd", **fd}),
        ("FileData with ../", {"path": f"{upload_dir}/../../../../../../etc/passwd", **fd}),
        ("FileData of a URL", {"path": "http://169.254.169.254/latest/meta-data/", "url": "http://169.254.169.254/", **fd}),
        ("dict without path", {"a": 1}),
        ("dict with a number path", {"path": 5}),
        ("empty string", ""),
        ("integer", 7),
        ("boolean", True),
        ("list", ["/etc/passwd"]),
        ("NUL in path", f"{upload_dir}/x\x00.png"),
        ("data URL", "data:image/png;base64,iVBORw0KGgo="),
    ]


def upload_file(url: str, cookies: httpx.Cookies | None, name: str, data: bytes) -> httpx.Response:
    """POST one file to Gradio's upload route, as the page and gradio_client do."""
    return httpx.post(url + "/gradio_api/upload", files={"files": (name, data)}, cookies=cookies, timeout=60)
