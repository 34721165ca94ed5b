"""Installing LoRAs on a built DiT from outside: plain, FSDP2-sharded, block-swapped, compiled.

Design: MERGED into the weights, re-merged from pristine copies whenever the set or a strength changes.
For every tensor a LoRA touches, the value it had before any LoRA is kept once in host memory (under FSDP
only this rank's rows), and `W = cast(W0 + Σ_i strength_i · scale_i · B_i A_i)` is computed in float32 and
written into the tensor's storage in place. Removing the last LoRA of a tensor writes W0 back bit for bit
and frees its copy. Why merged rather than unmerged (a hook adding s·B(Ax) per Linear):
  * zero per-step cost, and every kernel that reads the weight (the fused GELU GEMM, later fp8) sees it;
  * torch.compile never recompiles: weights are graph inputs, written in place with the same shape, dtype
    and storage, so a new strength or another LoRA set is only new input data (no float baked into a graph);
  * FSDP2: the merge runs on the local shard, rows [start, stop) of dim 0, using B's same rows — no
    collective, no gather; FSDP2's CPU offload keeps the shard on the host and the merge writes it there;
  * fp8 layers (--quantize fp8): dequantize W0 with its per-channel scales, merge in fp32, quantize again
    (new scales written with the weight); the pristine fp8 W0 and scales are what is kept;
  * block swap / offload (BlockStreamer): the host copy that is streamed in each forward is updated and a
    unit already prefetched for the next forward is dropped, so the stale device copy is never used;
  * exact: always from W0, so switching back and forth never accumulates rounding.
Costs: host memory for the pristine copies of the touched tensors (≈ their size; a full-model LoRA on
14B bf16 is ~28 GB, divided by the FSDP world size), and one fp32 matmul per touched tensor per change
(on the compute device). A merge in bf16 rounds the delta to the weight's precision (as diffusers'
fuse_lora does). `apply_loras` runs no collective: every rank must get the same list (see the caller).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.lora import LoraFile, check_strength, file_key, read_lora

log = logging.getLogger("wan.lora")

MAX_CACHED_FILES = 4  # read LoRAs kept beyond the active ones, so switching back costs no re-read
LoraSpec = tuple[str | Path | LoraFile, float]


@dataclass
class LoraReport:
    """One applied LoRA, as the sidecar records it."""

    name: str
    path: str
    format: str
    strength: float
    rank: int
    tensors: int  # model tensors it changes
    skipped: int  # its keys for layers this model lacks (the image branch on a T2V model)
    unmatched: int  # its keys that name no DiT layer


@dataclass
class LoraSummary:
    """What `apply_loras` did: per-LoRA reports, tensors re-merged / restored, seconds spent."""

    loras: list[LoraReport] = field(default_factory=list)
    changed: int = 0
    restored: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Slot:
    """Where one parameter's values live on this process."""

    dst: Tensor  # the storage the forward reads (local shard, host copy of a streamed unit, or the weight)
    start: int  # first row of dim 0 held in dst
    shape: tuple[int, ...]  # the full (global) shape
    mirror: Tensor | None = None  # a streamed parameter's device data (written too when resident)
    unit: int | None = None  # the BlockStreamer unit holding it


@dataclass
class LoraState:
    """Per-model LoRA bookkeeping (kept on the model as `_lora_state`)."""

    originals: dict[str, Tensor] = field(default_factory=dict)  # pre-LoRA values of touched tensors (host)
    merged: dict[str, tuple] = field(default_factory=dict)  # name → signature of what is merged in now
    cache: dict[tuple, LoraFile] = field(default_factory=dict)  # file_key → read LoRA, most recent last
    warned: set[tuple] = field(default_factory=set)
    active: tuple[tuple[str, float], ...] = ()  # the (path, strength) list every rank has merged in now
    summary: LoraSummary | None = None  # what applying `active` reported


def lora_state(model: nn.Module) -> LoraState:
    """The model's LoRA state (created empty on first use)."""
    if not isinstance(getattr(model, "_lora_state", None), LoraState):
        model._lora_state = LoraState()
    return model._lora_state


def find_streamer(model: nn.Module):
    """The BlockStreamer behind the model's block runner (through wrappers such as TeaCache), or None."""
    runner, seen = getattr(model, "block_runner", None), 0
    while runner is not None and seen < 8:
        if hasattr(runner, "streamer"):
            return runner.streamer
        runner, seen = getattr(runner, "inner", None), seen + 1
    return None


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2 module in its sharded state, so the registered parameters are the shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _slots(model: nn.Module, streamer) -> dict[str, _Slot]:
    """name → where its values live (this rank's rows under FSDP, the host copy under block swap)."""
    hosted = {}
    if streamer is not None:
        for i, unit in streamer.units.items():
            for p, host in unit:
                hosted[id(p)] = (i, host)
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover
        DTensor = ()  # noqa: N806
    out = {}
    for name, p in model.named_parameters():
        if id(p) in hosted:
            i, host = hosted[id(p)]
            out[name] = _Slot(host, 0, tuple(host.shape), mirror=p, unit=i)
        elif isinstance(p, DTensor):
            local, rows = p.to_local(), p.shape[0] if p.dim() else 1
            if all(isinstance(pl, Replicate) for pl in p.placements):
                start = 0
            elif tuple(p.placements) == (Shard(0),):
                world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
                start = min(rank * math.ceil(rows / world), rows)
            else:
                raise RuntimeError(f"LoRA merge supports FSDP's row sharding only; '{name}' is {p.placements}")
            out[name] = _Slot(local, start, tuple(p.shape))
        else:
            out[name] = _Slot(p.detach(), 0, tuple(p.shape))
    return out


def _compute_device(model: nn.Module, streamer) -> torch.device:
    if streamer is not None:
        return streamer.device
    for p in model.parameters():
        if p.device.type not in ("cpu", "meta"):
            return p.device
    return torch.device("cpu")


def read_loras(model: nn.Module, loras: Sequence[LoraSpec]) -> list[tuple[LoraFile, float]]:
    """Read and validate each (path or LoraFile, strength) against this model, through the model's cache."""
    state = lora_state(model)
    streamer = find_streamer(model)
    shapes = None
    out = []
    for spec, strength in loras:
        strength = check_strength(strength)
        if isinstance(spec, LoraFile):
            out.append((spec, strength))
            continue
        key = file_key(Path(spec)) if Path(spec).is_file() else None
        lf = state.cache.pop(key, None) if key else None
        if lf is None:
            if shapes is None:
                _reshard(model)
                shapes = {n: s.shape for n, s in _slots(model, streamer).items()}
            lf = read_lora(spec, shapes)
            key = lf.key
        state.cache[key] = lf  # most recently used last
        out.append((lf, strength))
    return out


def apply_loras(model: nn.Module, loras: Sequence[LoraSpec], device: torch.device | str | None = None,
                streamer=None) -> LoraSummary:
    """Make the model's weights those of the base model plus these LoRAs at these strengths.

    `loras`: (path or LoraFile, strength) pairs, in order; an empty list restores the base weights. Only the
    tensors whose LoRAs or strengths changed since the last call are rewritten. Every file is read and
    validated before anything changes, so a bad file leaves the previous set in place.
    """
    t0 = time.perf_counter()
    chosen = read_loras(model, loras)
    state = lora_state(model)
    streamer = streamer if streamer is not None else find_streamer(model)
    dev = torch.device(device) if device is not None else _compute_device(model, streamer)
    contrib: dict[str, list[tuple[LoraFile, float]]] = {}
    for lf, strength in chosen:
        for target in lf.deltas:
            contrib.setdefault(target, []).append((lf, strength))
    sigs = {t: tuple((lf.key or id(lf), s) for lf, s in c) for t, c in contrib.items()}
    todo = [t for t in contrib if state.merged.get(t) != sigs[t]] + [t for t in state.merged if t not in contrib]
    summary = LoraSummary()
    if todo:
        _reshard(model)
        slots = _slots(model, streamer)
        if streamer is not None and any(slots[t].unit is not None for t in todo):
            _quiesce(streamer)
        with torch.no_grad():
            for t in todo:
                slot = slots[t]
                sname = _fp8_scale_name(t, slot, slots)  # an fp8 weight: its per-channel scale changes too
                if t not in state.originals:
                    state.originals[t] = slot.dst.detach().to("cpu", copy=True)
                    if sname is not None:
                        state.originals[sname] = slots[sname].dst.detach().to("cpu", copy=True)
                if t in contrib and sname is not None:
                    w8, scale = _merged_fp8(state.originals[t], state.originals[sname], slot, contrib[t], t, dev)
                    _write(slot, w8)
                    _write(slots[sname], scale)
                elif t in contrib:
                    _write(slot, _merged(state.originals[t], slot, contrib[t], t, dev))
                if t in contrib:
                    state.merged[t] = sigs[t]
                    summary.changed += 1
                else:
                    _write(slot, state.originals.pop(t))
                    if sname is not None:
                        _write(slots[sname], state.originals.pop(sname))
                    state.merged.pop(t)
                    summary.restored += 1
    _trim_cache(state, {lf.key for lf, _ in chosen})
    for lf, s in chosen:
        summary.loras.append(LoraReport(lf.name, str(lf.path), lf.fmt, s, lf.rank, len(lf.deltas), lf.skipped,
                                        len(lf.unmatched)))
        _warn_once(state, lf)
    summary.seconds = time.perf_counter() - t0
    if todo:
        log.info("LoRA: %s; %d tensors merged, %d restored in %.2f s",
                 ", ".join(f"{r.name}@{r.strength:g}" for r in summary.loras) or "none", summary.changed,
                 summary.restored, summary.seconds)
    return summary


class LoraRefused(RuntimeError):
    """A request's LoRAs failed on some rank; every rank kept (or went back to) the previous set."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.error = rank, message


def apply_request_loras(pipe, rt, loras: Sequence[tuple[str, float]]) -> LoraSummary:
    """A request's LoRAs on this rank's DiT, agreed with every rank (call on every rank, before the first forward).

    Nothing happens (no collective) when neither the request nor the installed set has a LoRA. Otherwise the
    set is applied when it changed, then the ranks agree on (ok, message); if any rank failed, the ranks that
    applied it go back to the previous set and every rank raises LoraRefused naming the first failed rank.
    """
    state = lora_state(pipe.dit)
    want = tuple((str(p), float(s)) for p, s in loras)
    active = state.active
    if not want and not active:
        return LoraSummary()
    ok, message, summary = True, "", state.summary or LoraSummary()
    if want != active:
        try:
            summary = apply_loras(pipe.dit, list(want))
        except Exception as exc:  # noqa: BLE001 - agreed with every rank below, then raised everywhere
            ok, message = False, str(exc)
            log.error("rank %d: LoRA refused: %s", rt.rank, message)
    verdicts = rt.all_gather_object((ok, message))
    failed = [(r, m) for r, (good, m) in enumerate(verdicts) if not good]
    if failed:
        if ok and want != active:
            apply_loras(pipe.dit, list(active))  # back to the set every rank still has
        raise LoraRefused(*failed[0])
    if want != active:
        state.active, state.summary = want, summary
        return summary
    return LoraSummary(loras=summary.loras)  # unchanged: nothing merged or restored for this request


def _merged(original: Tensor, slot: _Slot, parts: list[tuple[LoraFile, float]], target: str,
            dev: torch.device) -> Tensor:
    """W0 + Σ strength·delta over this slot's rows, in float32 on `dev`, cast to the weight's dtype."""
    n = slot.dst.shape[0] if slot.dst.dim() else 1
    acc = original.to(dev, torch.float32, copy=True)
    if slot.dst.numel():
        for lf, strength in parts:
            if strength:
                acc += strength * lf.deltas[target].rows(slot.start, slot.start + n, dev).view_as(acc)
    return acc.to(slot.dst.dtype)


def _fp8_scale_name(target: str, slot: _Slot, slots: dict[str, _Slot]) -> str | None:
    """The `weight_scale` beside an fp8 weight (engine.fp8.Fp8Linear), else None."""
    from engine.checkpoint import FP8_DTYPES

    name = target[: -len("weight")] + "weight_scale" if target.endswith(".weight") else None
    return name if slot.dst.dtype in FP8_DTYPES and name in slots else None


def _merged_fp8(w8: Tensor, scale: Tensor, slot: _Slot, parts: list[tuple[LoraFile, float]], target: str,
                dev: torch.device) -> tuple[Tensor, Tensor]:
    """fp8 weights: dequantize W0 (its per-channel scales), add the deltas in fp32, quantize again per output
    channel; from the pristine fp8 W0 every time, so removing the LoRAs restores it bit for bit."""
    from engine.fp8 import dequantize_weight, quantize_weight

    acc = dequantize_weight(w8.to(dev), scale.to(dev), torch.float32)
    if slot.dst.numel():
        n = slot.dst.shape[0]
        for lf, strength in parts:
            if strength:
                acc += strength * lf.deltas[target].rows(slot.start, slot.start + n, dev).view_as(acc)
    return quantize_weight(acc)


def _write(slot: _Slot, value: Tensor) -> None:
    slot.dst.copy_(value.view_as(slot.dst))
    if slot.mirror is not None and slot.mirror.numel() == slot.dst.numel():  # a resident streamed unit
        slot.mirror.data.copy_(value.view_as(slot.mirror))


def _quiesce(streamer) -> None:
    """Wait for in-flight host→device copies, then drop prefetched units (their copies are stale now)."""
    if streamer.cuda:
        streamer.stream.synchronize()
    streamer.pending.clear()


def _trim_cache(state: LoraState, active: set) -> None:
    spare = [k for k in state.cache if k not in active]
    for k in spare[: max(0, len(spare) - MAX_CACHED_FILES)]:
        del state.cache[k]


def _warn_once(state: LoraState, lf: LoraFile) -> None:
    if lf.key in state.warned:
        return
    state.warned.add(lf.key)
    if lf.skipped:
        log.warning("LoRA %s: %d keys are for layers this model lacks (the image-to-video branch, e.g. %s): "
                    "skipped", lf.path, lf.skipped, ", ".join(lf.skipped_examples))
    if lf.unmatched:
        log.warning("LoRA %s: %d keys name no layer of the Wan2.1 DiT and are ignored (e.g. %s)", lf.path,
                    len(lf.unmatched), ", ".join(lf.unmatched[:3]))
