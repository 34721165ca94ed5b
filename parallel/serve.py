"""The serving loop: a Dispatcher on rank 0, `worker_loop` on ranks ≥ 1, all running requests in lockstep.

Rank 0 validates a request and resolves its seed, then broadcasts it on the control group; every rank
runs the pipeline. At every denoising step the ranks agree on a status (ok / cancel / error) over the
control group, so a cancel or an exception on any rank makes every rank leave at the same step.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.cli import RunConfig
from engine.pipeline import Cancelled, GenerationResult
from engine.request import GenerationRequest, RequestError, validate_request
from parallel.apply import ParallelState, apply_layout, build_parallel_pipeline
from parallel.layout import LayoutError
from parallel.runtime import LaunchError, Runtime, init_runtime, picklable, shutdown_runtime

log = logging.getLogger("wan.serve")

OK, CANCEL, ERROR = 0, 1, 2
Progress = Callable[[int, int, float], None]  # (steps done, total, seconds since the loop started)


class RankFailed(RuntimeError):
    """A request failed on some rank; every rank left it at the same step."""

    def __init__(self, rank: int, step: int, message: str) -> None:
        super().__init__(f"rank {rank} failed at step {step}: {message}")
        self.rank, self.step, self.error = rank, step, message


class StepAgreement:
    """The per-step status check: each rank says ok / cancel / error; all raise the same outcome."""

    def __init__(self, rt: Runtime, cancel: threading.Event | None, progress: Progress | None, fault: dict | None) -> None:
        self.rt, self.cancel, self.progress, self.fault = rt, cancel, progress, fault or {}
        self.step = -1
        self.t0 = time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        self.step = step
        if self.fault.get("rank") == self.rt.rank and self.fault.get("step") == step:
            raise RuntimeError(self.fault.get("message", f"injected fault on rank {self.rt.rank} at step {step}"))
        code = CANCEL if self.cancel is not None and self.cancel.is_set() else OK
        self.agree(code, "cancelled")
        if self.progress is not None and step > 0:
            self.progress(step, total, time.perf_counter() - self.t0)

    def agree(self, code: int, message: str) -> None:
        """One round of agreement; raises Cancelled or RankFailed on every rank when any rank is not ok."""
        if self.rt.any_flag(code) == OK:
            return
        states = self.rt.all_gather_object((code, message, self.step))
        errors = [(r, m, s) for r, (c, m, s) in enumerate(states) if c == ERROR]
        if errors:
            timeouts = ("Timeout", "timed out", "Connection closed", "Connection reset")
            first = next((e for e in errors if not any(t in e[1] for t in timeouts)), errors[0])
            raise RankFailed(first[0], max(0, first[2]), first[1])
        raise Cancelled(f"cancelled at step {max(0, self.step)}")

    def fail(self, exc: BaseException) -> None:
        """Report a local exception into the agreement (always raises)."""
        self.agree(ERROR, picklable(exc))
        raise AssertionError("unreachable: agreement with an error always raises")


@dataclass
class Output:
    """What rank 0 hands back for one request."""

    request: GenerationRequest
    videos: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    latents_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)


def memory_report(rt: Runtime) -> dict[str, Any]:
    """This rank's device and memory (in use now, peak of the last request)."""
    from engine.pipeline import peak_memory_gib

    d = rt.device
    if d.type == "cuda":
        name = torch.cuda.get_device_name(d)
        used = torch.cuda.memory_allocated(d) / 2**30
        total = torch.cuda.get_device_properties(d).total_memory / 2**30
    else:
        name, used, total = "cpu", 0.0, 0.0
    return {"rank": rt.rank, "device": f"{d} ({name})", "in_use_gib": round(used, 3),
            "peak_gib": round(peak_memory_gib(d), 3), "total_gib": round(total, 1)}


class Server:
    """One per rank: the pipeline, the parallel state, and the loop that runs requests in lockstep."""

    def __init__(self, cfg: RunConfig, rt: Runtime, pipe, state: ParallelState) -> None:
        self.cfg, self.rt, self.pipe, self.state = cfg, rt, pipe, state
        self.last_memory: list[dict[str, Any]] = []
        self.dispatcher = Dispatcher(self) if rt.rank == 0 else None
        self._closed = False

    @property
    def is_rank0(self) -> bool:
        return self.rt.rank == 0

    # -- every rank ---------------------------------------------------------------------------------------
    def execute(self, req: GenerationRequest, opts: dict, cancel=None, progress=None) -> GenerationResult:
        """Run one request on this rank in lockstep with the others; decode (spread over the ranks) when
        opts["decode"]. The video ends up in `result.video` on rank 0."""
        layout = self.state.layout_for(req.ulysses_size, req.ring_size, req.cfg_size)
        apply_layout(self.pipe, self.state.meshes.get(layout), self.state.kernel, self.state.sp_backend)
        hook = StepAgreement(self.rt, cancel, progress, opts.get("fault"))
        if self.rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.rt.device)
        try:
            try:
                result = self.pipe.generate(req, on_step=hook, decode=False)
                if opts.get("decode", True):
                    self._decode(result, hook)
                return result
            except (Cancelled, RankFailed):
                raise
            except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised as RankFailed
                log.error("rank %d: %s at step %d", self.rt.rank, picklable(exc), hook.step)
                hook.fail(exc)
                raise
        finally:
            gc.collect()
            if self.rt.device.type == "cuda":
                torch.cuda.empty_cache()
            self.last_memory = self.rt.all_gather_object(memory_report(self.rt))

    def _decode(self, result: GenerationResult, hook: StepAgreement) -> None:
        """VAE decode: patch-parallel over all ranks when several hold the VAE, else on rank 0."""
        t0 = time.perf_counter()
        pipe, rt = self.pipe, self.rt
        if self.cfg.offload_model and rt.device.type == "cuda" and not self.state.dit_fsdp:
            pipe.dit.to("cpu")  # the official --offload_model: the DiT leaves the GPU before decoding
        try:
            if rt.distributed and self.state.parallel_vae:
                from parallel.vae_parallel import parallel_decode

                vae = pipe.vae
                lat = result.latents.to(rt.device, next(vae.parameters()).dtype)

                def agreed() -> None:
                    hook.step = -1
                    hook.agree(OK, "")  # every rank finished its slice (or all leave together)

                videos = [parallel_decode(vae, z[None], rt.rank, rt.world_size, rt.gather_object, agreed) for z in lat]
                if rt.rank == 0:
                    result.video = torch.cat(videos)
            elif rt.rank == 0:
                result.video = pipe.decode(result.latents.to(rt.device), tiled=self.cfg.vae_tiling)
        finally:
            if self.cfg.offload_model and rt.device.type == "cuda" and not self.state.dit_fsdp:
                pipe.dit.to(rt.device)
        result.timings["vae_decode_s"] = round(time.perf_counter() - t0, 4)
        result.timings["total_s"] = round(result.timings.get("total_s", 0.0) + result.timings["vae_decode_s"], 4)

    def worker_loop(self) -> None:
        """Ranks ≥ 1: wait on the control group for rank 0's messages, forever (until shutdown)."""
        while True:
            msg = self.rt.broadcast_object(None)
            op = msg.get("op")
            if op == "shutdown":
                log.info("rank %d: shutdown", self.rt.rank)
                return
            if op == "generate":
                req = GenerationRequest(**msg["request"])
                try:
                    self.execute(req, msg.get("options", {}))
                except (Cancelled, RankFailed) as exc:
                    log.info("rank %d: request ended: %s", self.rt.rank, exc)
                finally:
                    trim_host_memory()
            elif op == "probe":
                self.rt.all_gather_object(memory_report(self.rt))

    def shutdown(self) -> None:
        """Rank 0 tells the workers to exit; every rank tears its groups down."""
        if self._closed:
            return
        self._closed = True
        if self.is_rank0 and self.rt.distributed:
            try:
                self.rt.broadcast_object({"op": "shutdown"})
            except Exception as exc:  # noqa: BLE001 - peers may already be gone
                log.warning("could not tell the workers to stop: %s", exc)
        shutdown_runtime(self.rt)


class Dispatcher:
    """Rank 0's entry point: submit(raw request) → validated, broadcast, run everywhere, written to disk."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._lock = threading.Lock()
        self.cancel_event = threading.Event()
        self.busy = False
        self._health_lock = threading.Lock()
        self._probe: dict | None = None  # the last /healthz probe (shared by concurrent checks, reused for 1 s)

    @property
    def info(self):
        return self.server.state.info

    def validate(self, raw: dict) -> GenerationRequest:
        """A checked request (RequestError naming the field otherwise); seed still as given."""
        req = validate_request(raw, self.info.limits, self.info.defaults)
        try:
            self.server.state.layout_for(raw.get("ulysses_size"), raw.get("ring_size"), raw.get("cfg_size"))
        except LayoutError as exc:
            raise RequestError("layout", str(exc)) from None
        return req

    def memory(self) -> list[dict[str, Any]]:
        """Every rank's device and memory now (a probe through every rank; serialised with requests)."""
        with self._lock:
            return self._probe_ranks()

    def _probe_ranks(self) -> list[dict[str, Any]]:
        """The probe through every rank (the caller holds the request lock): every rank's memory report."""
        self.server.rt.broadcast_object({"op": "probe"})
        mem = self.server.rt.all_gather_object(memory_report(self.server.rt))
        self.server.last_memory = [{**m, "peak_gib": old.get("peak_gib", m["peak_gib"])}
                                   for m, old in zip(mem, self.server.last_memory or mem)]
        return mem

    def health(self, deadline_s: float = 5.0) -> dict[str, Any]:
        """Whether every rank answers now, as a report with `healthy: bool` (the /healthz route's body).

        Idle: a tiny probe goes through every rank (the {"op": "probe"} broadcast, then every rank's memory
        report gathered over the control group) within `deadline_s`. The probe runs on a helper thread that
        holds the request lock until the gang has left the collective, so a probe that outlives its deadline
        (a rank stopped or gone) answers unhealthy without leaving the gang half inside a collective: the
        next request waits for it (and a gang that never answers is ended by the heartbeat). Concurrent
        callers share one probe, and a probe that finished less than 1 s ago is reused, so a flood of health
        checks cannot starve requests of the gang.
        Busy (a request holds the gang): a probe would queue behind it, so the answer is "busy", healthy iff
        the heartbeat saw every rank within its timeout.
        """
        t0 = time.monotonic()
        rt = self.server.rt
        deadline_s = max(0.0, float(deadline_s))
        report: dict[str, Any] = {"healthy": False, "status": "unhealthy", "world_size": rt.world_size,
                                  "deadline_s": deadline_s, "heartbeat_age_s": None, "heartbeat_timeout_s": None}
        beat_ok = True
        hb = rt.heartbeat
        if hb is not None:
            age = max(0.0, time.time() - hb.last_ok)
            report.update(heartbeat_age_s=round(age, 3), heartbeat_timeout_s=hb.timeout)
            beat_ok = bool(hb.healthy) and age <= hb.timeout

        def run_probe(probe: dict) -> None:  # holds self._lock (taken by the caller), releases it at the end
            try:
                probe["ranks"] = self._probe_ranks()
            except Exception as exc:  # noqa: BLE001 - a peer is gone: reported, the heartbeat ends the gang
                probe["error"] = picklable(exc)
            finally:
                probe["finished"] = time.monotonic()
                probe["done"].set()
                self._lock.release()

        with self._health_lock:
            probe = self._probe
            if probe is None or (probe["done"].is_set() and time.monotonic() - probe["finished"] > 1.0):
                if self._lock.acquire(blocking=False):
                    probe = self._probe = {"started": time.monotonic(), "done": threading.Event(), "ranks": None,
                                           "error": None, "finished": None}
                    threading.Thread(target=run_probe, args=(probe,), name="wan-health-probe", daemon=True).start()
                elif probe is None or probe["done"].is_set():
                    probe = None  # a request (or a memory report) holds the gang
        if probe is None:
            report.update(healthy=beat_ok, status="busy" if beat_ok else "unhealthy",
                          request_running=bool(self.busy), ranks=self.server.last_memory,
                          reason=None if beat_ok else "the heartbeat has not seen every rank within its timeout")
            report["check_s"] = round(time.monotonic() - t0, 4)
            return report
        probe["done"].wait(max(0.0, deadline_s - (time.monotonic() - t0)))
        report["probe_age_s"] = round(time.monotonic() - probe["started"], 4)
        if not probe["done"].is_set():
            report["reason"] = (f"the probe started {time.monotonic() - probe['started']:.1f} s ago has not come "
                                f"back from every rank (deadline {deadline_s:g} s)")
        elif probe["error"] is not None:
            report["reason"] = f"the probe failed: {probe['error']}"
        elif not beat_ok:
            report["reason"] = "the heartbeat has not seen every rank within its timeout"
        else:
            report.update(healthy=True, status="ok", probe_s=round(probe["finished"] - probe["started"], 4))
        report["ranks"] = probe["ranks"] or []
        report["check_s"] = round(time.monotonic() - t0, 4)
        return report

    def cancel(self) -> None:
        """Stop the running request at the next step boundary on every rank."""
        if self.busy:
            self.cancel_event.set()

    def submit(self, raw: dict, save_file: str | None = None, save_latents: str | None = None,
               progress: Progress | None = None, fault: dict | None = None, decode: bool = True) -> Output:
        """Run one request (serialised with any other submission) and write its files."""
        from parallel.outputs import write_outputs

        req = self.validate(raw).with_seed()
        layout = self.server.state.layout_for(raw.get("ulysses_size"), raw.get("ring_size"), raw.get("cfg_size"))
        req = GenerationRequest(**{**req.to_dict(), "ulysses_size": layout.ulysses, "ring_size": layout.ring,
                                   "cfg_size": layout.cfg})
        opts: dict = {"decode": decode, **({"fault": fault} if fault else {})}
        with self._lock:
            self.busy = True
            self.cancel_event.clear()
            try:
                self.server.rt.broadcast_object({"op": "generate", "request": req.to_dict(), "options": opts})
                result = self.server.execute(req, opts, self.cancel_event, progress)
                return write_outputs(self.server, result, save_file, save_latents)
            finally:
                self.busy = False
                self.cancel_event.clear()
                trim_host_memory()


def trim_host_memory() -> None:
    """Give the host memory freed by a request back to the system (glibc only; elsewhere a no-op).

    Each request's tensors are freed, but glibc keeps freed blocks in the malloc arena of the thread that
    used them, and the UI runs every request on a fresh thread: without a trim, rank 0's RSS grew ~40 MiB
    per request on CPU (776 → 1,892 MiB over 33 requests, docs/RELIABILITY.md)."""
    libc = _libc()
    if libc is not None:
        gc.collect()
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """glibc (for malloc_trim), or None on other C libraries."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None


def fingerprint(path: Path) -> tuple:
    """Cheap identity of a model file or folder: names, sizes, and a hash of each file's first and last MiB."""
    import hashlib

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        h = hashlib.sha256()
        size = f.stat().st_size
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
            if size > 2**21:
                fh.seek(size - 2**20)
                h.update(fh.read())
        out.append((f.name, size, h.hexdigest()[:16]))
    return tuple(out)


def preflight(cfg: RunConfig, rt: Runtime):
    """Every rank finds and fingerprints its own model files (each node reads its own --model_dir); a file
    missing or different on any node stops every rank at once, with a message naming the node and file."""
    from engine.checkpoint import ModelFileError
    from engine.factory import resolve_files

    files, status = None, None
    try:
        files = resolve_files(cfg)
        parts = {"DiT": files.dit, "text encoder": files.t5, "VAE": files.vae}
        status = ("ok", {k: (str(v), fingerprint(Path(v))) for k, v in parts.items()})
    except (ModelFileError, OSError) as exc:
        status = ("error", str(exc))
    everyone = rt.all_gather_object((rt.node, rt.host, status))
    for node, host, (kind, detail) in everyone:
        if kind == "error":
            raise LaunchError(f"node {node} ({host}): {detail}")
    _, _, (_, ref) = everyone[0]
    for node, host, (_, mine) in everyone:
        for part, (path, fp) in mine.items():
            if fp != ref[part][1]:
                raise LaunchError(
                    f"node {node} ({host}) has a different {part} file than node 0: {path} "
                    f"({sum(f[1] for f in fp):,} bytes) vs node 0's {ref[part][0]} ({sum(f[1] for f in ref[part][1]):,} bytes); "
                    "every node must hold the same model files"
                )
    return files


def resolve_auto(cfg: RunConfig, rt: Runtime, files=None) -> RunConfig:
    """`--preset auto`: memory settings from the smallest free GPU memory and the model size (flags win)."""
    import math

    from engine.factory import resolve_files
    from engine.loading import build_dit, open_dit
    from presets.auto import auto_settings, free_memory_gib

    files = files or resolve_files(cfg)
    _, dcfg = open_dit(files.dit)
    dit_gib = sum(p.numel() for p in build_dit(dcfg).parameters()) * (2 if rt.device.type == "cuda" else 4) / 2**30
    from engine.checkpoint import open_checkpoint

    t5 = open_checkpoint(files.t5)
    t5_gib = sum(math.prod(t5.shape(k)) for k in t5 if k != "spiece_model") * 2 / 2**30
    free = min(rt.all_gather_object(free_memory_gib(rt.device)))
    chosen = auto_settings(rt.world_size, free, dit_gib, t5_gib, dcfg.num_layers, dcfg.dim)
    chosen = {k: v for k, v in chosen.items() if k not in cfg.cli_keys}
    if rt.rank == 0:
        log.info("preset auto: %.1f GiB free on the smallest GPU, DiT %.1f GiB, T5 %.1f GiB → %s",
                 min(free, 1e6), dit_gib, t5_gib, chosen)
    return cfg.replace(**chosen)


def start_server(cfg: RunConfig) -> Server:
    """Join the gang, load every model, and return this rank's Server."""
    import os

    from app import setup_logging

    setup_logging(cfg.log_level, int(os.environ.get("RANK", "0")))
    rt = init_runtime(cfg.dist_timeout)
    if rt.distributed:
        from parallel.runtime import Heartbeat

        rt.heartbeat = Heartbeat(rt, timeout=cfg.heartbeat_timeout)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and rt.rank == 0:
        log.warning("the gang was restarted after a failure (restart %d of at most %s); serving again",
                    restarts, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
    if cfg.world_size is not None and cfg.world_size != rt.world_size:
        raise LaunchError(
            f"the preset/config asks for world_size {cfg.world_size} but {rt.world_size} process(es) are running: "
            f"start with ./launch.sh --nproc {cfg.world_size}, or change world_size to {rt.world_size}"
        )
    from engine.checkpoint import ModelFileError

    try:
        files = preflight(cfg, rt)
        if cfg.preset == "auto":
            cfg = resolve_auto(cfg, rt, files)
        pipe, state = build_parallel_pipeline(cfg, rt, files)
    except (ModelFileError, ValueError) as exc:  # bad files, layouts, backends: a message, not a traceback
        shutdown_runtime(rt)
        raise LaunchError(str(exc)) from exc
    rt.barrier()
    return Server(cfg, rt, pipe, state)
