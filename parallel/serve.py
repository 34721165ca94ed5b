"""The serving loop: a Dispatcher on rank 0, `worker_loop` on ranks ≥ 1, all running requests in lockstep.

Rank 0 validates a request and resolves its seed, then broadcasts it on the control group; every rank
runs the pipeline. At every denoising step the ranks agree on a status (ok / cancel / error) over the
control group, so a cancel or an exception on any rank makes every rank leave at the same step. A failure
between collectives is handled by parallel/faults.py (the fault board, the watch, the gang's restart).
Health checks: parallel/health.py; start-up: parallel/startup.py.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.cli import RunConfig
from engine.pipeline import Cancelled, GenerationResult
from engine.request import GenerationRequest, RequestError, validate_request
from parallel import faults
from parallel.apply import ParallelState, apply_layout
from parallel.faults import EXIT_RESTART, ServerRestarting
from parallel.layout import LayoutError
from parallel.lora import LoraRefused, apply_request_loras
from parallel.replan import MemoryModeRefused, apply_request_memory_mode
from parallel.runtime import Runtime, exit_process, shutdown_runtime

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
        f = self.fault
        if f.get("where", "step") == "step" and f.get("rank") == self.rt.rank and f.get("step") == step:
            raise faults.InjectedFault(f.get("message") or f"injected fault on rank {self.rt.rank} at step {step}")
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
            first = next((e for e in errors if not any(t in e[1] for t in faults.TIMEOUT_WORDS)), errors[0])
            raise RankFailed(first[0], max(0, first[2]), first[1])
        raise Cancelled(f"cancelled at step {max(0, self.step)}")

    def fail(self, message: str) -> None:
        """Report a local failure into the agreement (always raises)."""
        self.agree(ERROR, message)
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
        free, total_b = torch.cuda.mem_get_info(d)
        total, free = total_b / 2**30, free / 2**30
        cached = (torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)) / 2**30  # ours to reuse
    else:
        name, used, total, free, cached = "cpu", 0.0, 0.0, 0.0, 0.0
    return {"rank": rt.rank, "device": f"{d} ({name})", "in_use_gib": round(used, 3),
            "peak_gib": round(peak_memory_gib(d), 3), "total_gib": round(total, 1), "free_gib": round(free, 3),
            "available_gib": round(free + cached, 3)}


class Server:
    """One per rank: the pipeline, the parallel state, and the loop that runs requests in lockstep."""

    def __init__(self, cfg: RunConfig, rt: Runtime, pipe, state: ParallelState) -> None:
        self.cfg, self.rt, self.pipe, self.state = cfg, rt, pipe, state
        self.last_memory: list[dict[str, Any]] = []
        self.failed: str | None = None  # set when the gang is ending after a failure (torchrun restarts it)
        self.board = faults.FaultBoard(faults.default_store() if rt.distributed else None)
        self.watch = faults.FaultWatch(self.board, cfg.fault_grace, self._stuck)
        if rt.heartbeat is not None:
            rt.heartbeat.on_lost = self._lost
        self.dispatcher = Dispatcher(self) if rt.rank == 0 else None
        self._closed = False

    @property
    def is_rank0(self) -> bool:
        return self.rt.rank == 0

    # -- every rank ---------------------------------------------------------------------------------------
    def execute(self, req: GenerationRequest, opts: dict, cancel=None, progress=None) -> GenerationResult:
        """Run one request on this rank in lockstep with the others; decode (spread over the ranks) when
        opts["decode"]. The video ends up in `result.video` on rank 0. Raises Cancelled or RankFailed,
        fresh exceptions raised after the request's memory was freed."""
        layout = self.state.layout_for(req.ulysses_size, req.ring_size, req.cfg_size)
        apply_layout(self.pipe, self.state.meshes.get(layout), self.state.kernel, self.state.sp_backend)
        fault = faults.check_fault(opts.get("fault"))
        hook = StepAgreement(self.rt, cancel, progress, fault)
        request_id = int(opts.get("id", 0))
        if self.rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.rt.device)
        result: GenerationResult | None = None
        outcome: Exception | None = None
        self.watch.begin(request_id)
        try:
            mode = apply_request_memory_mode(self.state.memory, self.rt, req.blocks_to_swap, req.offload_percent,
                                             faults.replan_fault(fault, self.rt.rank))  # every rank, agreed
            loras = apply_request_loras(self.pipe, self.rt, req.loras)  # every rank, before the first forward
            with faults.inject(self.pipe, fault, self.rt.rank):
                result = self.pipe.generate(req, on_step=hook, decode=False)
                result.info["loras"] = loras.to_dict()
                if mode is not None:
                    result.info["memory_mode"] = mode.to_dict()
                if opts.get("decode", True):
                    self._decode(result, hook)
        except Cancelled as exc:
            outcome = Cancelled(str(exc))
        except LoraRefused as exc:
            outcome = LoraRefused(exc.rank, exc.error)
        except MemoryModeRefused as exc:
            outcome = MemoryModeRefused(exc.rank, exc.error)
        except RankFailed as exc:
            outcome = RankFailed(exc.rank, exc.step, exc.error)
        except Exception as exc:  # noqa: BLE001 - posted for every rank, agreed, then raised as RankFailed
            outcome = self._report(exc, hook, req, request_id)
        # the original exception and its traceback (which hold the activations) are gone from here on
        self.watch.end()
        if outcome is not None:
            result = None
        self._after_request(outcome if isinstance(outcome, RankFailed) else None)
        if outcome is not None:
            raise outcome
        return result

    def _report(self, exc: Exception, hook: StepAgreement, req: GenerationRequest, request_id: int) -> Exception:
        """A local failure: post it on the fault board, then agree; returns the exception to raise."""
        message = faults.describe(exc, req)
        trace = "".join(traceback.format_exception(exc)).rstrip()  # text: a log record must not keep the frames
        log.error("rank %d: %s at step %d\n%s", self.rt.rank, message, max(0, hook.step), trace)
        self.board.post(request_id, self.rt.rank, max(0, hook.step), message)
        try:
            hook.fail(message)
        except RankFailed as agreed:
            return RankFailed(agreed.rank, agreed.step, agreed.error)
        except Cancelled as agreed:
            return Cancelled(str(agreed))
        return RankFailed(self.rt.rank, max(0, hook.step), message)

    def _after_request(self, failure: RankFailed | None) -> None:
        """Per-request state reset on every rank, after success or failure alike; after a failure on CUDA,
        a device that does not drain (a kernel waiting for a peer that left, a broken context) ends the gang."""
        cuda = self.rt.device.type == "cuda"
        broken = False
        try:
            self.pipe.reset_request_state(failure is not None)
        except Exception as exc:  # noqa: BLE001 - a broken CUDA context fails even this
            log.error("rank %d: resetting the request state failed: %s", self.rt.rank, exc)
            broken = True
        gc.collect()
        if failure is not None and cuda:
            drained = not broken and faults.device_drains(self.rt.device)
            if self.rt.any_flag(0 if drained else 1):
                self._end_gang("a GPU did not finish its queued work after the failure (a collective waiting for a "
                               "rank that left, or a CUDA error): its communicators cannot be trusted", failure)
        if cuda:
            torch.cuda.empty_cache()
        self.last_memory = self.rt.all_gather_object(memory_report(self.rt))

    def _stuck(self, rank: int, step: int, message: str) -> None:
        """The fault watch's verdict: a rank failed inside the request and this rank is still in it."""
        failure = RankFailed(rank, step, message)
        self._end_gang(f"{failure}; rank {self.rt.rank} is still inside the request {self.cfg.fault_grace:g} s later "
                       "(waiting in a collective for the failed rank)", failure)

    def _lost(self, why: str) -> None:
        """The heartbeat lost a rank: a running request's client gets the reason before the gang exits."""
        if self.dispatcher is not None and self.dispatcher.busy:
            self._end_gang(why, RuntimeError(f"the request was interrupted: {why}; the server is restarting"))

    def _end_gang(self, why: str, failure: Exception | None = None) -> None:
        """Answer the client (rank 0), abort the communicators and exit so that torchrun restarts the gang."""
        self.failed = str(failure) if failure is not None else why
        self.rt.exiting = True  # the heartbeat must not exit first (rank 0 still answers the client)
        log.error("rank %d: %s. Aborting the communicators and exiting (code %d) so that torchrun restarts the gang",
                  self.rt.rank, why, EXIT_RESTART)
        if self.dispatcher is not None:
            self.dispatcher.fail_running(failure or RuntimeError(why))
        faults.abort_communicators(self.rt.device)
        time.sleep(2.0 if self.is_rank0 else 4.0)  # rank 0's answer leaves before torchrun stops the gang
        exit_process(EXIT_RESTART)

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

                videos = [parallel_decode(vae, z[None], rt.rank, rt.world_size, rt.gather_object, agreed,
                                          tile=self.cfg.vae_tiling) for z in lat]  # --vae_tiling: each slice tiled
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
                except (Cancelled, RankFailed, LoraRefused, MemoryModeRefused) as exc:
                    log.info("rank %d: request ended: %s", self.rt.rank, exc)
                finally:
                    trim_host_memory()
            elif op == "probe":
                self.rt.all_gather_object(memory_report(self.rt))

    def shutdown(self) -> None:
        """Rank 0 tells the workers to exit; every rank tears its groups down (after a failure that ends the
        gang, the fault handling exits the process instead)."""
        if self._closed:
            return
        self._closed = True
        if self.failed:
            time.sleep(30)  # _end_gang exits the process; this only guards against it not doing so
            exit_process(EXIT_RESTART)
        if self.is_rank0 and self.rt.distributed:
            try:
                self.rt.broadcast_object({"op": "shutdown"})
            except Exception as exc:  # noqa: BLE001 - peers may already be gone
                log.warning("could not tell the workers to stop: %s", exc)
        shutdown_runtime(self.rt)


class Dispatcher:
    """Rank 0's entry point: submit(raw request) → validated, broadcast, run everywhere, written to disk."""

    def __init__(self, server: Server) -> None:
        from parallel.health import HealthCheck

        self.server = server
        self._lock = threading.Lock()
        self.cancel_event = threading.Event()
        self.busy = False
        self._next_id = 0
        self._running: Future | None = None
        self.health = HealthCheck(self)

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


    def cancel(self) -> None:
        """Stop the running request at the next step boundary on every rank."""
        if self.busy:
            self.cancel_event.set()

    def _check_alive(self) -> None:
        if self.server.failed:
            raise ServerRestarting(f"the server is restarting after a failure ({self.server.failed}); "
                                   "try again in a minute")

    def fail_running(self, exc: BaseException) -> None:
        """End the running request's wait with `exc` (the gang is ending; its thread never returns)."""
        running = self._running
        if running is not None and not running.done():
            with contextlib.suppress(Exception):  # finished meanwhile
                running.set_exception(exc)

    def submit(self, raw: dict, save_file: str | None = None, save_latents: str | None = None,
               progress: Progress | None = None, fault: dict | None = None, decode: bool = True) -> Output:
        """Run one request (serialised with any other submission) and write its files.

        The gang's work runs on its own thread; this call waits for its result, or for the fault handling
        to end the wait when the gang is stuck (parallel/faults.py), so a client always gets an answer."""
        from parallel.outputs import write_outputs

        self._check_alive()
        req = self.validate(raw).with_seed()
        layout = self.server.state.layout_for(raw.get("ulysses_size"), raw.get("ring_size"), raw.get("cfg_size"))
        req = GenerationRequest(**{**req.to_dict(), "ulysses_size": layout.ulysses, "ring_size": layout.ring,
                                   "cfg_size": layout.cfg})
        faults.check_fault(fault)
        with self._lock:
            self._check_alive()
            if self.server.rt.device.type == "cuda":  # admission control: before any rank starts
                from parallel.admission import check_fits

                check_fits(self.server, req, self.server.last_memory or self._probe_ranks())
            self.busy = True
            self.cancel_event.clear()
            self._next_id += 1
            opts: dict = {"decode": decode, "id": self._next_id, **({"fault": fault} if fault else {})}
            done: Future = Future()
            self._running = done

            def work() -> None:
                try:
                    self.server.rt.broadcast_object({"op": "generate", "request": req.to_dict(), "options": opts})
                    result = self.server.execute(req, opts, self.cancel_event, progress)
                    out = write_outputs(self.server, result, save_file, save_latents)
                    if not done.done():
                        done.set_result(out)
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                    if not done.done():
                        done.set_exception(exc)

            threading.Thread(target=work, name=f"wan-request-{self._next_id}", daemon=True).start()
            try:
                return done.result()
            finally:
                self._running = None
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



def start_server(cfg: RunConfig) -> Server:
    """Join the gang, load every model, and return this rank's Server (parallel/startup.py)."""
    from parallel.startup import start_server as start

    return start(cfg)
