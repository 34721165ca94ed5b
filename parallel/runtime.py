"""Process groups: the compute group (NCCL on CUDA, gloo on CPU) and a gloo control group with a long
timeout for requests, status and cancel, so idle workers wait for days without tripping a watchdog."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("wan.runtime")

CONTROL_TIMEOUT = timedelta(days=30)


class LaunchError(RuntimeError):
    """The process was started in a way that cannot work (explained in the message)."""


@dataclass
class Runtime:
    """This process's place in the gang."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    control: Any = None  # gloo group for control messages (None when world_size == 1)
    compute: Any = None  # the compute group (the default group), None when world_size == 1
    node: int = 0  # which machine (torchrun's GROUP_RANK)
    host: str = ""
    heartbeat: Any = None
    exiting: bool = False  # set when the gang is ending after a failure (parallel/faults.py)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def has_groups(self) -> bool:
        """Whether process groups exist (several ranks, or one rank with WAN_ONE_RANK_GROUPS=1)."""
        return self.compute is not None

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    # -- control plane ----------------------------------------------------------------------------------
    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's object on every rank, over the control group."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, over the control group."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's object on rank 0 (None elsewhere), over the control group."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def any_flag(self, code: int) -> int:
        """Max of a small integer over all ranks (control group): a cheap per-step status check."""
        if not self.distributed:
            return code
        t = torch.tensor([code], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control)


def setup_logging(level: str, rank: int = 0) -> None:
    """Log lines to stderr, each with this process's rank."""
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr, force=True)


def _launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def init_runtime(dist_timeout: float = 600.0, device: str | None = None) -> Runtime:
    """Join the gang started by torchrun (or run alone) and create both process groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not _launched_by_torchrun():
        raise LaunchError(
            f"WORLD_SIZE={world} is set but this process was not started by torchrun, so the other "
            f"{world - 1} ranks would never join and this process would wait forever. Start every rank with "
            f"`./launch.sh --nproc {world} ...` (it runs `torchrun --nproc_per_node={world} app.py ...`), "
            "or unset WORLD_SIZE/RANK to run on one process."
        )
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    node = int(os.environ.get("GROUP_RANK", str(rank // max(1, local_world))))
    rt = Runtime(rank, world, local_rank, local_world, dev, node=node, host=socket.gethostname())
    one_rank_groups = os.environ.get("WAN_ONE_RANK_GROUPS") == "1" and _launched_by_torchrun()
    if world == 1 and not one_rank_groups:
        return rt
    _die_with_agent()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    store = _attempt_store(rank, world, timedelta(seconds=dist_timeout))
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=world)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=dist_timeout), **kwargs)
    rt.compute = dist.group.WORLD
    if world == 1:  # the GPU lane: NCCL and FSDP2 on a one-rank mesh, so that their code runs on one GPU
        log.info("one rank with process groups (WAN_ONE_RANK_GROUPS=1): backend %s", backend)
        return rt
    rt.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    if rank == 0:
        log.info("Initialized distributed environment with %d processes", world)
    return rt


def _attempt_store(rank: int, world: int, timeout: timedelta):
    """The rendezvous store torchrun gave this gang, under a prefix of this attempt (None: plain env://).

    torchrun (max_restarts > 0) restarts a failed gang against the same agent TCPStore, which still holds
    the dead gang's keys (its gloo/NCCL addresses, barrier counters): without a fresh prefix the new gang
    connects to dead peers ("Connection refused") or waits in init_process_group forever."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if attempt is None or not addr or not port:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, int(port), world, is_master=not agent_store and rank == 0, timeout=timeout,
                          **({} if agent_store else {"multi_tenant": True}))
    return dist.PrefixStore(f"wan21/attempt_{attempt}", store)


def _die_with_agent() -> None:
    """Linux: this rank is killed when its torchrun agent dies (a node lost with its agent takes its ranks
    along, so the peers' sockets close and they fail fast instead of waiting)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Heartbeat:
    """A background all-reduce on its own gloo group every `interval` s: a rank or node that is gone (or
    stuck for `timeout` s) makes every surviving rank exit non-zero, even while the gang is idle, so
    torchrun can restart it. `healthy` and `last_ok` feed the health check."""

    def __init__(self, rt: Runtime, interval: float = 5.0, timeout: float = 30.0) -> None:
        self.rt, self.interval, self.timeout = rt, interval, timeout
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.last_ok = time.time()
        self.healthy = True
        self.on_lost: Any = None  # set by the server: called with a reason before the process exits
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._stop.wait(self.interval)
            beat = torch.tensor([1.0 if self._stop.is_set() else 0.0])
            try:
                dist.all_reduce(beat, op=dist.ReduceOp.MAX, group=self.group)
                self.last_ok = time.time()
            except Exception as exc:  # noqa: BLE001 - a peer is gone: the whole gang must go
                self.healthy = False
                if self.rt.exiting:  # the fault handling is ending the gang and exits by itself
                    return
                log.error("rank %d (node %d, %s) lost contact with the gang: %s; exiting so that torchrun can "
                          "restart it", self.rt.rank, self.rt.node, self.rt.host, picklable(exc))
                if self.on_lost is not None:  # the server answers its client first, then exits
                    self.on_lost(f"a rank of the gang stopped answering the heartbeat ({picklable(exc)})")
                exit_process(1)
            if beat.item() > 0:  # some rank is shutting down: every thread leaves on this same beat
                return

    def stop(self) -> None:
        """Leave together with the other ranks (called by every rank at shutdown)."""
        self._stop.set()
        self._thread.join(timeout=self.timeout + self.interval)


def shutdown_runtime(rt: Runtime) -> None:
    """Tear the process groups down together (safe to call twice)."""
    if rt.heartbeat is not None:
        rt.heartbeat.stop()
    if rt.distributed and dist.is_initialized():
        try:
            dist.barrier(group=rt.control)  # nobody tears down while a peer still talks to it
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.debug("destroy_process_group: %s", exc)


def exit_process(code: int) -> None:
    """Leave a rank of a gang without running C++ static destructors (gloo's background threads can abort
    the process at interpreter teardown after a clean shutdown); flushes Python's buffers first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def picklable(exc: BaseException) -> str:
    """A one-line, always-picklable description of an exception."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    try:
        pickle.dumps(text)
    except Exception:  # noqa: BLE001
        text = type(exc).__name__
    return text[:2000]
