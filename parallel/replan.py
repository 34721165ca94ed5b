"""Per-request memory mode: `blocks_to_swap` and `offload_percent` changed between requests, on every rank.

A request whose memory mode differs from the one in force re-plans the DiT's weights before its first
forward: tensors move between the GPU and page-locked host memory (parallel/offload.py's streamer without
FSDP; each rank's own shards with FSDP: parallel/fsdp.py `set_shard_home`). The values are the same on
every rank (they come with the broadcast request), so every rank re-plans the same way; a rank whose
re-plan fails puts its previous plan back and reports the failure through the request's agreement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from parallel.offload import OffloadPlan, StreamingRunner, apply_offload, plan_fsdp_offload, plan_offload

log = logging.getLogger("wan.replan")


@dataclass
class MemoryMode:
    """The memory mode in force: what was asked, what it became, and what the last change cost."""

    blocks_to_swap: int = 0
    offload_percent: float = 0.0
    host_blocks: int = 0  # blocks (FSDP) or units holding host-resident tensors
    host_gib: float = 0.0  # this rank's block weights in host memory
    replan_s: float = 0.0  # seconds the last change took (0 when the request kept the mode)

    def to_dict(self) -> dict:
        return asdict(self)


def _plan(model: nn.Module, fsdp: bool, blocks_to_swap: int, offload_percent: float) -> OffloadPlan:
    planner = plan_fsdp_offload if fsdp else plan_offload
    return planner(model.blocks, blocks_to_swap, offload_percent)


def _host_bytes_fsdp(model: nn.Module) -> int:
    from parallel.fsdp import fsdp_groups

    return sum(fp._sharded_param_data.numel() * fp._sharded_param_data.element_size()
               for b in model.blocks for g in fsdp_groups(b) for fp in g.fsdp_params if fp.offload_to_cpu)


def apply_memory_mode(model: nn.Module, blocks_to_swap: int, offload_percent: float, device: torch.device,
                      fsdp: bool, on_block: Callable[[int], None] | None = None) -> MemoryMode:
    """Place the DiT's block weights for this memory mode (from whatever mode is in force now);
    `on_block(i)` runs after block i moved (tests inject faults there)."""
    plan = _plan(model, fsdp, blocks_to_swap, offload_percent)
    swap = min(blocks_to_swap, len(model.blocks))
    if fsdp:
        from parallel.fsdp import set_shard_home

        moves = [(i, i in plan.swapped) for i in range(len(model.blocks))]
        for i, host in sorted(moves, key=lambda m: not m[1]):  # blocks going to the host first
            set_shard_home(model.blocks[i], host, device)  # a no-op where the block is already there
            if on_block is not None:
                on_block(i)
        host_bytes, units = _host_bytes_fsdp(model), len(plan.swapped)
    else:
        outer = model.block_runner if hasattr(model.block_runner, "inner") else None  # TeaCache around it
        if outer is not None:
            model.block_runner = outer.inner
        try:
            streamer = apply_offload(model, plan, device, on_block)
        finally:
            if outer is not None:
                outer.inner, model.block_runner = model.block_runner, outer
        host_bytes = streamer.host_bytes if streamer is not None else 0
        units = len(streamer.units) if streamer is not None else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return MemoryMode(swap, float(offload_percent), units, round(host_bytes / 2**30, 3))


class MemoryModes:
    """The mode in force on this rank and the per-request switch (`use`), with its cost measured."""

    def __init__(self, model: nn.Module, device: torch.device, fsdp: bool, blocks_to_swap: int,
                 offload_percent: float) -> None:
        self.model, self.device, self.fsdp = model, device, fsdp
        self.current = MemoryMode(min(blocks_to_swap, len(model.blocks)), float(offload_percent))
        self.current.host_gib = round(self._host_bytes() / 2**30, 3)
        self.changes = 0

    def _host_bytes(self) -> int:
        if self.fsdp:
            return _host_bytes_fsdp(self.model)
        runner = self.model.block_runner
        while runner is not None and not isinstance(runner, StreamingRunner):
            runner = getattr(runner, "inner", None)
        return runner.streamer.host_bytes if runner is not None else 0

    def use(self, blocks_to_swap: int | None, offload_percent: float | None,
            on_block: Callable[[int], None] | None = None) -> MemoryMode:
        """The request's mode (None: keep the one in force): re-planned when it differs. On a failure the
        previous mode is put back before the error propagates (and if even that fails, the error says so)."""
        cur = self.current
        swap = cur.blocks_to_swap if blocks_to_swap is None else min(int(blocks_to_swap), len(self.model.blocks))
        pct = cur.offload_percent if offload_percent is None else float(offload_percent)
        if (swap, pct) == (cur.blocks_to_swap, cur.offload_percent):
            cur.replan_s = 0.0
            return cur
        t0 = time.perf_counter()
        try:
            mode = apply_memory_mode(self.model, swap, pct, self.device, self.fsdp, on_block)
        except BaseException as exc:
            try:
                apply_memory_mode(self.model, cur.blocks_to_swap, cur.offload_percent, self.device, self.fsdp)
            except BaseException as again:  # noqa: BLE001 - reported with the first failure
                raise RuntimeError(f"changing the memory mode to blocks_to_swap {swap}, offload_percent {pct:g} "
                                   f"failed ({exc}) and putting the previous mode back failed too ({again})") from exc
            raise
        mode.replan_s = round(time.perf_counter() - t0, 3)
        log.info("memory mode: blocks_to_swap %d → %d, offload_percent %g → %g: %.2f GiB of block weights in "
                 "host memory (re-planned in %.2f s)", cur.blocks_to_swap, swap, cur.offload_percent, pct,
                 mode.host_gib, mode.replan_s)
        self.current = mode
        self.changes += 1
        return mode


class MemoryModeRefused(RuntimeError):
    """A request's memory mode failed on some rank; every rank kept (or went back to) the previous mode."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.error = rank, message


def apply_request_memory_mode(modes: MemoryModes | None, rt, blocks_to_swap: int | None,
                              offload_percent: float | None, on_block: Callable[[int], None] | None = None,
                              ) -> MemoryMode | None:
    """A request's memory mode on this rank, agreed with every rank (call on every rank, before the first
    forward). No collective when the request keeps the mode in force (the same on every rank: every change is
    agreed). Otherwise each rank re-plans, the ranks agree on (ok, message), and if any rank failed the ranks
    that changed go back and every rank raises MemoryModeRefused naming the first failed rank."""
    if modes is None:
        return None
    cur = modes.current
    before = (cur.blocks_to_swap, cur.offload_percent)
    swap = before[0] if blocks_to_swap is None else min(int(blocks_to_swap), len(modes.model.blocks))
    pct = before[1] if offload_percent is None else float(offload_percent)
    if (swap, pct) == before:
        cur.replan_s = 0.0
        return cur
    ok, message, mode = True, "", cur
    try:
        mode = modes.use(swap, pct, on_block)
    except Exception as exc:  # noqa: BLE001 - agreed with every rank below, then raised everywhere
        ok = False
        message = (f"changing the memory mode to blocks_to_swap {swap}, offload_percent {pct:g} failed: {exc}; "
                   f"every rank kept blocks_to_swap {before[0]}, offload_percent {before[1]:g}")
        log.error("rank %d: %s", rt.rank, message)
    verdicts = rt.all_gather_object((ok, message))
    failed = [(r, m) for r, (good, m) in enumerate(verdicts) if not good]
    if failed:
        if ok:
            modes.use(*before)  # back to the mode every rank still has
        raise MemoryModeRefused(*failed[0])
    return mode
