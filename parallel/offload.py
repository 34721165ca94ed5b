"""Memory modes: block swap and offload percent, one mechanism.

`--blocks_to_swap N`: the last N blocks keep all their weights in (pinned) host memory.
`--offload_percent p`: of the parameter bytes of the other blocks, the fraction p (chosen Linear layers,
the same share in every block) lives in host memory too.
Per block, the host-resident tensors are one *unit*: streamed to the GPU on a side CUDA stream one
block ahead of use, released after the block ran; at most two units are on the GPU at any time. On a
CPU the same copy-in / release code runs against a separate host store, with the copies counted.
Under FSDP the same plan is applied through FSDP2's CPU offload of this rank's shards (`fsdp_offload`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger("wan.offload")


@dataclass
class OffloadPlan:
    """Which tensors of which blocks live in host memory."""

    swapped: list[int] = field(default_factory=list)  # whole blocks
    layers: dict[int, list[str]] = field(default_factory=dict)  # block → Linear module names offloaded
    host_bytes: int = 0
    total_bytes: int = 0

    def modules(self, blocks: nn.ModuleList, i: int) -> list[nn.Module]:
        if i in self.swapped:
            return [blocks[i]]
        return [blocks[i].get_submodule(n) for n in self.layers.get(i, [])]

    @property
    def empty(self) -> bool:
        return not self.swapped and not any(self.layers.values())


def _bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def plan_offload(blocks: nn.ModuleList, blocks_to_swap: int, offload_percent: float) -> OffloadPlan:
    """The last `blocks_to_swap` blocks whole, then the share `offload_percent` of each other block's bytes
    (its largest Linear layers first, stopping at the count closest to the target)."""
    if not 0.0 <= offload_percent <= 1.0:
        raise ValueError(f"offload_percent must be between 0 and 1, got {offload_percent}")
    n = len(blocks)
    if blocks_to_swap < 0:
        raise ValueError(f"blocks_to_swap must be 0 or more, got {blocks_to_swap}")
    if blocks_to_swap > n:
        log.warning("blocks_to_swap %d is more than the model's %d blocks: swapping all %d", blocks_to_swap, n, n)
        blocks_to_swap = n
    plan = OffloadPlan(swapped=list(range(n - blocks_to_swap, n)))
    plan.total_bytes = sum(_bytes(b) for b in blocks)
    plan.host_bytes = sum(_bytes(blocks[i]) for i in plan.swapped)
    if offload_percent > 0:
        for i in range(n - blocks_to_swap):
            linears = sorted(((name, _bytes(m)) for name, m in blocks[i].named_modules() if isinstance(m, nn.Linear)),
                             key=lambda t: -t[1])
            target = offload_percent * _bytes(blocks[i])
            chosen, acc = [], 0
            for name, b in linears:
                if abs(acc + b - target) <= abs(acc - target) or offload_percent >= 1.0:
                    chosen.append(name)
                    acc += b
            plan.layers[i] = chosen
            plan.host_bytes += acc
    return plan


class HostStore:
    """One flat host buffer holding copies of a unit's tensors, pinned in place on CUDA.

    PyTorch's pinned host allocator rounds every block up to a power of two (a 135 MiB FFN weight takes
    256 MiB, ~1.5x host memory for a 14B block), so each unit's tensors share one plain allocation that is
    page-locked with cudaHostRegister: pinned for asynchronous copies, at its exact size."""

    def __init__(self, tensors: list[Tensor], pin: bool) -> None:
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // 64) * 64  # 64-byte alignment for every view
        self.flat = torch.empty(max(total, 1), dtype=torch.uint8)
        self.nbytes = total
        self.registered = False
        if pin and total:  # pinned first: the copies below are then direct DMA from the GPU (no staging copy)
            err = torch.cuda.cudart().cudaHostRegister(self.flat.data_ptr(), total, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {total / 2**20:.1f} MiB failed with CUDA error {int(err)}")
            self.registered = True
        self.views: list[Tensor] = []
        for t, off, n in zip(tensors, offsets, sizes):
            view = self.flat[off : off + n].view(t.dtype).view(t.shape)
            view.copy_(t.detach())
            self.views.append(view)

    def close(self) -> None:
        """Unpin the buffer (before it is freed)."""
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.registered = False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter teardown
            self.close()


def plan_fsdp_offload(blocks: nn.ModuleList, blocks_to_swap: int, offload_percent: float) -> OffloadPlan:
    """The plan under FSDP: whole blocks only. FSDP2 gathers a unit's parameters in that module's forward
    hooks, but the DiT calls some Linear weights directly (the GELU fused into the FFN's GEMM on CUDA), so an
    offloaded Linear as its own FSDP unit would be used still sharded. `offload_percent` becomes that share of
    the non-swapped blocks, offloaded whole (the blocks just before the swapped ones)."""
    base = plan_offload(blocks, blocks_to_swap, offload_percent)  # validates and clamps
    n, swap = len(blocks), len(base.swapped)
    extra = round(offload_percent * (n - swap))
    plan = OffloadPlan(swapped=list(range(n - swap - extra, n)), total_bytes=base.total_bytes)
    plan.host_bytes = sum(_bytes(blocks[i]) for i in plan.swapped)
    return plan


class BlockStreamer:
    """Host copies of each unit's tensors; `fetch` streams a unit in, `release` drops it from the device.

    The state (`pending`, `resident`) is per forward: `reset()` releases every device copy and forgets
    pending copies, and the runner calls it when a block raises, so one failed forward (an OOM on a 24 GB
    card) never leaves the streamer believing a unit is resident."""

    def __init__(self, blocks: nn.ModuleList, plan: OffloadPlan, device: torch.device,
                 previous: BlockStreamer | None = None, on_block: Callable[[int], None] | None = None,
                 hosted: dict[int, Tensor] | None = None) -> None:
        """Move the planned tensors to host memory. With `previous` (the streamer of the plan in force), this
        is a re-plan between requests, block by block: the tensors the new plan keeps on the host are copied
        from where they are now (a block whose host set is unchanged keeps its buffer), those it no longer
        plans go back to the device, then the old buffer is freed; blocks that gain host bytes go first, so
        neither side ever holds more than one block beyond the larger of the two plans. Every parameter is
        at all times either on the device or in `hosted` (shared with `previous`), so a re-plan that fails
        half-way (host memory, a copy) is undone by re-planning to the old plan with this streamer as
        `previous` (parallel/replan.py). `on_block(i)` runs after each block (tests inject faults there)."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.plan = plan
        self.units: dict[int, list[tuple[nn.Parameter, Tensor]]] = {}
        self.stores: dict[int, HostStore] = {}
        if hosted is None:
            hosted = previous.hosted if previous is not None else {}
        self.hosted: dict[int, Tensor] = hosted  # id(param) → its host copy, for every host-resident parameter
        old_units = previous.units if previous is not None else {}
        if previous is not None:
            previous.reset()
            if previous.cuda:
                previous.stream.synchronize()
        self.stream = previous.stream if previous is not None and previous.cuda else (
            torch.cuda.Stream(device) if self.cuda else None)
        wanted = {i: [p for m in plan.modules(blocks, i) for p in m.parameters()] for i in range(len(blocks))}

        def growth(i: int) -> int:  # host bytes this block gains under the new plan
            old = sum(p.numel() * p.element_size() for p in blocks[i].parameters() if id(p) in hosted)
            return sum(p.numel() * p.element_size() for p in wanted[i]) - old

        for i in sorted(range(len(blocks)), key=lambda i: -growth(i)):
            params = wanted[i]
            ids = [id(p) for p in params]
            old_store = previous.stores.pop(i, None) if previous is not None else None
            if params and old_store is not None and [id(p) for p, _ in old_units.get(i, [])] == ids:
                self.stores[i], self.units[i] = old_store, old_units[i]  # the same tensors: keep the buffer
                old_store = None
            elif params:
                store = HostStore([hosted.get(id(p), p.data) for p in params], pin=self.cuda)
                self.stores[i] = store
                self.units[i] = list(zip(params, store.views))
                for p, view in zip(params, store.views):
                    p.data = torch.empty(0, dtype=p.dtype, device=device)
                    hosted[id(p)] = view
            keep = set(ids)
            for p in blocks[i].parameters():
                if id(p) in hosted and id(p) not in keep:
                    p.data = hosted[id(p)].to(device, copy=True)  # back on the device (a copy: the buffer goes)
                    del hosted[id(p)]
            if old_store is not None:
                old_store.close()
            if on_block is not None:
                on_block(i)
        if previous is not None:
            previous.units.clear()
        self.order = sorted(self.units)
        self.pending: dict[int, tuple[list[Tensor], object]] = {}
        self.resident: set[int] = set()
        self.copies_in = 0
        self.releases = 0
        self.resets = 0
        self.max_on_device = 0

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory the streamed tensors take (exact: no allocator rounding)."""
        return sum(s.nbytes for s in self.stores.values())

    def fetch(self, i: int) -> None:
        """Start copying unit i to the device (side stream on CUDA)."""
        if i not in self.units or i in self.pending or i in self.resident:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                tensors = [h.to(self.device, non_blocking=True) for _, h in self.units[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            tensors, event = [h.clone() for _, h in self.units[i]], None
        self.pending[i] = (tensors, event)
        self.copies_in += 1
        self.max_on_device = max(self.max_on_device, len(self.pending) + len(self.resident))

    def before(self, i: int) -> None:
        """Make unit i resident (waiting for its copy), then start the copy of the next unit."""
        if i in self.units:
            self.fetch(i)
            tensors, event = self.pending.pop(i)
            if self.cuda:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in tensors:
                    t.record_stream(current)
            for (p, _), t in zip(self.units[i], tensors):
                p.data = t
            self.resident.add(i)
        if self.order:
            later = [j for j in self.order if j > i]
            self.fetch(later[0] if later else self.order[0])

    def after(self, i: int) -> None:
        """Release unit i's device copies (the allocator reuses them once the compute stream is done)."""
        if i not in self.units:
            return
        for p, _ in self.units[i]:
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        self.resident.discard(i)
        self.releases += 1

    def reset(self) -> None:
        """Forget every pending copy and release every resident unit (after a failed forward)."""
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            for tensors, _ in self.pending.values():
                for t in tensors:
                    t.record_stream(current)  # freed only after the work queued so far
        self.pending.clear()
        for i in list(self.resident):
            self.after(i)
        self.resident.clear()
        self.resets += 1

    def close(self) -> None:
        """Drop the host copies (the parameters stay empty: only for a streamer being replaced)."""
        self.reset()
        for store in self.stores.values():
            store.close()
        self.stores.clear()


class StreamingRunner:
    """A block runner that streams each block's host-resident weights around the inner runner's loop."""

    def __init__(self, streamer: BlockStreamer) -> None:
        self.streamer = streamer

    def reset(self) -> None:
        """Forget any in-flight unit (per-request state reset)."""
        self.streamer.reset()

    def __call__(self, model, x: Tensor, e: Tensor, e0: Tensor, context: Tensor, rope: Tensor) -> Tensor:
        streamer = self.streamer
        if streamer.resident:  # a forward that did not finish (the next unit may be pending: that one is kept)
            streamer.reset()
        try:
            for i, block in enumerate(model.blocks):
                streamer.before(i)
                x = block(x, e0, context, rope)
                streamer.after(i)
        except BaseException:
            streamer.reset()
            raise
        return x


def host_param_names(model: nn.Module, plan: OffloadPlan) -> set[str]:
    """Full parameter names of everything the plan keeps in host memory (to load them there directly)."""
    names = set()
    for i in range(len(model.blocks)):
        for m in plan.modules(model.blocks, i):
            prefix = next(n for n, mm in model.named_modules() if mm is m)
            names.update(f"{prefix}.{pn}" for pn, _ in m.named_parameters())
    return names


def apply_offload(model: nn.Module, plan: OffloadPlan, device: torch.device,
                  on_block: Callable[[int], None] | None = None) -> BlockStreamer | None:
    """Keep the planned tensors in host memory and stream them during the forward (non-FSDP models).
    On a model that streams already (a per-request re-plan), the tensors move from the old plan to this
    one; an empty plan puts every tensor back on the device and the plain block loop back in place."""
    runner = model.block_runner
    previous = runner.streamer if isinstance(runner, StreamingRunner) else None
    hosted = model.__dict__.setdefault("_host_copies", {})  # outlives a streamer whose re-plan failed half-way
    if plan.empty and previous is None and not hosted:
        return None
    streamer = BlockStreamer(model.blocks, plan, device, previous, on_block, hosted)
    if plan.empty:
        from engine.dit import run_blocks

        model.block_runner = run_blocks
        return None
    model.block_runner = StreamingRunner(streamer)
    log.info("offload: %d blocks swapped + %.2f GiB of other layers: %.2f GiB of %.2f GiB of block weights in host "
             "memory, streamed one block ahead", len(plan.swapped), (plan.host_bytes - sum(_bytes(model.blocks[i]) for i in plan.swapped)) / 2**30,
             plan.host_bytes / 2**30, plan.total_bytes / 2**30)
    return streamer


def fsdp_offload_units(model: nn.Module, plan: OffloadPlan) -> tuple[list[nn.Module], list[nn.Module]]:
    """For FSDP: (modules to shard with CPU offload, the rest of the blocks). Offloaded Linear layers
    become their own FSDP units, so their shards alone live in host memory."""
    offloaded, plain = [], []
    for i, block in enumerate(model.blocks):
        if i in plan.swapped:
            offloaded.append(block)
        else:
            offloaded.extend(plan.modules(model.blocks, i))
            plain.append(block)
    return offloaded, plain
