"""FSDP2 for the DiT and the T5 encoder: `fully_shard` per block, then the root, over one flat mesh.

Weights are loaded straight into the shards: the module is sharded on the meta device, given empty
local storage, and each rank copies in only its rows of each tensor, read from the mmap'd file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from engine.checkpoint import CheckpointView, WrongModelError, cast_to_run_dtype, run_dtype

log = logging.getLogger("wan.fsdp")


def flat_mesh(device: torch.device, world: int):
    """A 1-D DeviceMesh over all ranks (a 2-D mesh would make fully_shard do HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))


def apply_fsdp(root: nn.Module, blocks: Iterable[nn.Module], mesh, offload: Iterable[nn.Module] = ()) -> nn.Module:
    """Shard each block, then the root (parameters stay in their dtype; no mixed-precision cast).

    Modules in `offload` (whole blocks, or Linear layers inside blocks) get FSDP2's CPU offload: this
    rank's shard lives in (pinned) host memory and is copied in for the all-gather. Each block asks FSDP
    to prefetch the next block's all-gather, so the copies overlap compute.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    offload_ids = {id(m) for m in offload}
    policy = CPUOffloadPolicy(pin_memory=False)  # pinned afterwards at exact size: set_shard_home
    blocks = list(blocks)
    for block in blocks:
        for sub in block.modules():
            if sub is not block and id(sub) in offload_ids:
                fully_shard(sub, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
        kw = {"offload_policy": policy} if id(block) in offload_ids else {}
        fully_shard(block, mesh=mesh, reshard_after_forward=True, **kw)
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    for block, nxt in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([nxt])
    return root


@torch.no_grad()
def load_sharded(module: nn.Module, view: CheckpointView, device: torch.device, dtype: torch.dtype, what: str, path,
                 host_modules: Iterable[nn.Module] = ()) -> nn.Module:
    """Fill an FSDP2-sharded meta module: each rank reads only the rows of dim 0 it keeps, in the dtype the
    parameter was sharded with, which must be its run dtype (cast_to_run_dtype before fully_shard).

    Modules in `host_modules` (the units sharded with FSDP2's CPU offload) are materialised in host memory,
    as FSDP2 requires, and every other tensor straight on `device`: nothing is allocated on the GPU first
    and moved (that would need the whole model's bytes on the GPU once)."""
    from torch.distributed.tensor import DTensor

    expected = {n: p for n, p in module.named_parameters()}
    for n, p in expected.items():
        if p.is_floating_point() and p.dtype != run_dtype(module, n, dtype):
            raise RuntimeError(f"{what}: '{n}' was sharded as {p.dtype}, not its run dtype "
                               f"{run_dtype(module, n, dtype)}: call cast_to_run_dtype before fully_shard")
        if n not in view:
            raise WrongModelError(f"{path} is not a {what} checkpoint: tensor '{n}' is missing")
        if tuple(view.shape(n)) != tuple(p.shape):
            raise WrongModelError(
                f"{path} does not match the {what}: tensor '{n}' has shape {tuple(view.shape(n))} in the file "
                f"but the model expects {tuple(p.shape)}"
            )
    materialize(module, device, host_modules)
    for n, p in module.named_parameters():
        if isinstance(p, DTensor):
            local = p.to_local()
            rank, world = p.device_mesh.get_local_rank(), p.device_mesh.size()
            rows = p.shape[0]
            chunk = -(-rows // world)
            start = min(rank * chunk, rows)
            if local.shape[0]:
                part = view.read_rows(n, start, start + local.shape[0], local.dtype)
                local.copy_(part.to(device=local.device, dtype=local.dtype))
        else:
            p.copy_(view.read(n, p.dtype).to(device=p.device, dtype=p.dtype))
    return module


def materialize(module: nn.Module, device: torch.device, host_modules: Iterable[nn.Module] = ()) -> None:
    """`to_empty` per module: the subtrees in `host_modules` on the CPU, everything else on `device`."""
    host = list(host_modules)
    inside = {id(m) for h in host for m in h.modules()}
    for m in host:
        m.to_empty(device="cpu", recurse=True)
    for m in module.modules():
        if id(m) not in inside:
            m.to_empty(device=device, recurse=False)


def fsdp_groups(module: nn.Module) -> list:
    """The FSDP2 parameter groups `fully_shard(module)` made (none for a module that was not sharded)."""
    state_of = getattr(module, "_get_fsdp_state", None)
    if state_of is None:
        return []
    state = state_of()
    return list(getattr(state, "_fsdp_param_groups", None) or
                ([state._fsdp_param_group] if getattr(state, "_fsdp_param_group", None) is not None else []))


def shards_on_host(module: nn.Module) -> bool:
    """Whether this FSDP unit's shards live in host memory (FSDP2's CPU offload)."""
    return any(fp.offload_to_cpu for g in fsdp_groups(module) for fp in g.fsdp_params)


@torch.no_grad()
def set_shard_home(module: nn.Module, host: bool, device: torch.device) -> int:
    """Move this FSDP unit's shards (this rank's rows) between `device` and host memory, between forwards.

    On the host the shards of the unit share one exact-size page-locked buffer (offload.HostStore: FSDP2's
    own `pin_memory()` rounds each tensor up to a power of two, ~1.6x host memory for a 14B block), and the
    unit is marked for FSDP2's CPU offload (its all-gather copies the shard in first). Returns the bytes moved.
    Uses FSDP2's per-parameter state (torch 2.6+): the padded flat shard, the DTensor registered on the module."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from parallel.offload import HostStore

    if isinstance(module, nn.Module) and hasattr(module, "reshard"):
        module.reshard()  # the registered parameters are the shards
    moved = 0
    for group in fsdp_groups(module):
        old_store = getattr(group, "_wan_host_store", None)
        params = [fp for fp in group.fsdp_params if fp.offload_to_cpu != host or (host and old_store is None)]
        if not params:
            continue
        if host:
            store = HostStore([fp._sharded_param_data for fp in params], pin=device.type == "cuda")
            padded = store.views
        else:
            store = None
            padded = [fp._sharded_param_data.to(device, copy=True) for fp in params]
        for fp, flat in zip(params, padded):
            moved += flat.numel() * flat.element_size()
            shape = fp.padded_sharded_param_size
            fp._sharded_param_data = flat.view(-1)
            local = flat.view(shape).narrow(0, 0, fp.sharded_size[0])  # this rank's rows, without the padding
            fp.offload_to_cpu = host
            fp.pin_memory = host and device.type == "cuda"
            fp.sharded_param = nn.Parameter(fp.to_sharded_dtensor(local), requires_grad=False)
            fp._setattr_on_modules(fp.sharded_param)
        group.offload_policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if host else OffloadPolicy()
        if old_store is not None:
            old_store.close()  # a re-pinned unit's shards were copied out of it
        group._wan_host_store = store if host else None
    return moved


def t5_sharder(mesh, device: torch.device, dtype: torch.dtype, path):
    """A `shard(model, view)` for engine.loading.load_text_encoder: FSDP2 per T5 block, then the root."""

    def shard(model: nn.Module, view: CheckpointView) -> None:
        cast_to_run_dtype(model, dtype)  # the meta model is fp32: shard it in the run dtype
        apply_fsdp(model, model.encoder.block, mesh)
        load_sharded(model, view, device, dtype, "umt5 text encoder", path)

    return shard
