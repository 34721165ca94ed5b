"""Failure handling of the gang, in one place: what happens when a rank fails inside a request.

A failure at a step boundary is agreed over the control group (parallel/serve.py `StepAgreement`): every
rank leaves the request at the same step and keeps serving. A failure *between* collectives (inside
attention, a streamed block, the VAE decode; a CUDA OOM) leaves the other ranks waiting in a collective
that the failed rank will never join. So a rank that fails:

1. posts the failure on the fault board (the rendezvous store: no collective needed) — `FaultBoard.post`;
2. then joins the agreement, which completes when every other rank reaches a step boundary too.

Every rank runs a `FaultWatch` thread during a request. Once a failure is on the board, a rank still inside
the request `fault_grace` seconds later is stuck in a collective: the gang cannot finish the request, and
its communicators cannot be trusted. The watch then ends it the only safe way (what vLLM and TGI do): rank 0
answers the client with the failure ("rank k failed at step s: …") and refuses new requests ("restarting"),
NCCL communicators are aborted, and every rank exits with `EXIT_RESTART` so that torchrun restarts the gang.

After a failure that did end through the agreement, CUDA ranks check that their device still drains its
queued work (`device_drains`): a rank whose NCCL kernel waits for a peer that left, or whose context broke
(a device-side assert), makes the whole gang restart too (`Server._after_request`).

`inject` installs test faults inside the forward (attention, a block, the VAE decode, an OOM), used by the
tests and by benchmarks/gpu_lane.py; requests from the UI or the API can never carry one.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("wan.faults")

EXIT_RESTART = 3  # the gang exits with this after an abort; torchrun (launch.sh) restarts it
TIMEOUT_WORDS = ("Timeout", "timed out", "Connection closed", "Connection reset")
FAULT_SITES = ("step", "attention", "block", "vae", "oom", "cuda_error", "replan")


class ServerRestarting(RuntimeError):
    """The gang is ending after a failure it cannot recover from in place; torchrun restarts it."""


# -- the fault board ------------------------------------------------------------------------------------------
class FaultBoard:
    """Failures of the current request, posted by any rank and read by every rank, through the store."""

    def __init__(self, store) -> None:
        self.store = dist.PrefixStore("wan21/faults", store) if store is not None else None

    def post(self, request_id: int, rank: int, step: int, message: str) -> None:
        """Record this rank's failure of request `request_id` (never raises)."""
        if self.store is None:
            return
        try:
            n = self.store.add(f"{request_id}/count", 1)
            self.store.set(f"{request_id}/{n}", pickle.dumps((rank, step, message)))
        except Exception as exc:  # noqa: BLE001 - the store is gone: the heartbeat ends the gang
            log.warning("could not post the failure on the fault board: %s", exc)

    def read(self, request_id: int) -> tuple[int, int, str] | None:
        """The most telling failure posted for the request (a real cause before timeouts), or None."""
        if self.store is None or not self.store.check([f"{request_id}/1"]):
            return None
        n = self.store.add(f"{request_id}/count", 0)
        posted = []
        for i in range(1, n + 1):
            if self.store.check([f"{request_id}/{i}"]):
                posted.append(pickle.loads(self.store.get(f"{request_id}/{i}")))
        if not posted:
            return None
        return next((p for p in posted if not any(w in p[2] for w in TIMEOUT_WORDS)), posted[0])


def default_store():
    """The store of the default process group (None without one)."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


class FaultWatch:
    """Watches the fault board while this rank is inside a request; calls `on_stuck(rank, step, message)`
    when a failure was posted and this rank is still inside the request `grace` seconds later."""

    def __init__(self, board: FaultBoard, grace: float, on_stuck: Callable[[int, int, str], None],
                 poll: float = 0.2) -> None:
        self.board, self.grace, self.on_stuck, self.poll = board, max(0.0, grace), on_stuck, poll
        self._lock = threading.Lock()
        self._request: int | None = None
        self._seen: float | None = None
        self.fault: tuple[int, int, str] | None = None  # the failure posted for the running request, once seen
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if board.store is not None:
            self._thread = threading.Thread(target=self._run, name="wan-fault-watch", daemon=True)
            self._thread.start()

    def begin(self, request_id: int) -> None:
        with self._lock:
            self._request, self._seen, self.fault = request_id, None, None
        self._wake.set()

    def end(self) -> None:
        with self._lock:
            self._request, self._seen, self.fault = None, None, None

    def _run(self) -> None:
        while True:
            with self._lock:
                req = self._request
            if req is None:
                self._wake.wait()
                self._wake.clear()
                continue
            time.sleep(self.poll)
            try:
                fault = self.board.read(req)
            except Exception:  # noqa: BLE001 - store gone: the heartbeat ends the gang
                continue
            if fault is None:
                continue
            with self._lock:
                if self._request != req:
                    continue
                if self._seen is None:
                    self._seen, self.fault = time.monotonic(), fault
                    log.info("rank %d posted a failure of request %d at step %d: %s", fault[0], req, fault[1], fault[2])
                    continue
                stuck = time.monotonic() - self._seen >= self.grace
            if stuck:
                self.on_stuck(*fault)
                return


# -- ending the gang ------------------------------------------------------------------------------------------
def abort_communicators(device: torch.device, timeout: float = 10.0) -> None:
    """Abort every NCCL communicator so kernels waiting for a peer that left return (bounded in time)."""
    if device.type != "cuda" or not dist.is_initialized():
        return
    done = threading.Event()

    def run() -> None:
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception as exc:  # noqa: BLE001 - exiting anyway
            log.warning("aborting the communicators: %s", exc)
        done.set()

    threading.Thread(target=run, name="wan-abort", daemon=True).start()
    if not done.wait(timeout):
        log.warning("aborting the communicators took longer than %.0f s; exiting anyway", timeout)


def device_drains(device: torch.device, timeout: float = 10.0) -> bool:
    """Whether the device finishes the work queued so far within `timeout` and reports no error."""
    if device.type != "cuda":
        return True
    try:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        deadline = time.monotonic() + timeout
        while not event.query():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        torch.cuda.synchronize(device)  # raises on a sticky error (device-side assert, illegal address)
        return True
    except Exception as exc:  # noqa: BLE001 - the context is broken
        log.error("the GPU reports an error after the failure: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return False


# -- what the user reads --------------------------------------------------------------------------------------
def describe(exc: BaseException, req: Any = None) -> str:
    """One line for a failure; an out-of-memory error becomes one sentence saying what to change."""
    from parallel.runtime import picklable

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        what = (f" ({req.size}, {req.frame_num} frames, batch {req.batch_size})" if req is not None else "")
        return (f"out of GPU memory{what}: use fewer frames, a smaller size or batch, or save memory with "
                "--blocks_to_swap / --offload_percent (the low_vram preset), FSDP (--dit_fsdp) or more ranks")
    return picklable(exc)


# -- test faults ----------------------------------------------------------------------------------------------
class InjectedFault(RuntimeError):
    """A fault raised on purpose by a test or the GPU lane."""


def check_fault(fault: dict | None) -> dict | None:
    """A fault spec {rank, step, where, message?, block?} checked (ValueError naming what is wrong)."""
    if not fault:
        return None
    where = fault.get("where", "step")
    if where not in FAULT_SITES:
        raise ValueError(f"fault 'where' must be one of {', '.join(FAULT_SITES)}, got {where!r}")
    return {"where": where, "rank": int(fault.get("rank", 0)), "step": int(fault.get("step", 0)),
            "block": int(fault.get("block", 0)), "message": str(fault.get("message", ""))}


def replan_fault(fault: dict | None, rank: int):
    """For a fault {where: replan, block: i}: an `on_block` callback that raises after block i moved (the
    re-plan of a changed memory mode, half done), on the fault's rank; None otherwise."""
    if not fault or fault["where"] != "replan" or fault["rank"] != rank:
        return None

    def on_block(i: int) -> None:
        if i == fault["block"]:
            raise InjectedFault(fault["message"] or f"injected fault in the memory re-plan on rank {rank} "
                                                    f"after block {i}")

    return on_block


def _raise(fault: dict, rank: int, device: torch.device) -> None:
    where = fault["where"]
    if where == "oom":
        if device.type == "cuda":  # a real one: more than the card has
            free, _ = torch.cuda.mem_get_info(device)
            torch.empty(int(free) + 2**30, dtype=torch.uint8, device=device)
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 80.00 GiB (injected on rank {rank})")
    if where == "cuda_error" and device.type == "cuda":  # a sticky error: an out-of-bounds gather on the GPU
        idx = torch.tensor([1 << 30], device=device)
        torch.zeros(4, device=device)[idx].sum().item()
    if where == "vae":
        raise InjectedFault(fault["message"] or f"injected fault in the VAE decode on rank {rank}")
    raise InjectedFault(fault["message"] or f"injected fault in {where} on rank {rank} at step {fault['step']}")


@contextlib.contextmanager
def inject(pipe, fault: dict | None, rank: int) -> Iterator[None]:
    """Install `fault` (from check_fault) inside the forward of this rank for the duration of a request."""
    if not fault or fault["rank"] != rank or fault["where"] == "step":
        yield
        return
    where, block = fault["where"], fault["block"]
    handles = []

    def due() -> bool:
        return pipe.step == fault["step"]

    if where == "attention":
        attn = pipe.dit.blocks[block].self_attn
        inner = attn.attn_fn

        def faulty(q, k, v):
            if due():
                _raise(fault, rank, q.device)
            return inner(q, k, v)

        attn.attn_fn = faulty
        handles.append(lambda: setattr(attn, "attn_fn", inner) if attn.attn_fn is faulty else None)
    elif where in ("block", "oom", "cuda_error"):
        def pre(module, args):
            if due():
                _raise(fault, rank, args[0].device)

        h = pipe.dit.blocks[block].register_forward_pre_hook(pre)
        handles.append(h.remove)
    elif where == "vae":
        vae = pipe.vae
        if vae is not None:
            for name in ("decode", "decode_tail"):
                inner_fn = getattr(vae, name)

                def faulty_decode(*a, _inner=inner_fn, **kw):
                    _raise(fault, rank, torch.device("cpu"))
                    return _inner(*a, **kw)

                setattr(vae, name, faulty_decode)
            handles.append(lambda: [vae.__dict__.pop(n, None) for n in ("decode", "decode_tail")])
    try:
        yield
    finally:
        for undo in handles:
            undo()
