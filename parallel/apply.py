"""Applying parallelism to the single-process engine from outside (torchtitan style).

Order at start-up (`build_parallel_pipeline`): load (FSDP-sharded where asked) → attention kernel →
[memory modes, compile: parallel/offload.py, parallel/speed.py] . Per request (`apply_layout`): the
token split, the sequence-parallel attention and the CFG strategy for the request's layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from engine.cli import RunConfig
from engine.dit import LocalTokens, WanDiT
from engine.factory import ModelInfo, model_info, resolve_dtype, resolve_files, task_config
from engine.loading import build_dit, load_dit, load_text_encoder, load_vae, open_dit
from engine.pipeline import SequentialCFG, WanPipeline
from parallel.kernels import Kernel, get_kernel
from parallel.layout import LayoutGroups, MeshCache, ParallelLayout, cross_node_note, resolve_layout
from parallel.replan import MemoryModes
from parallel.runtime import Runtime
from parallel.sequence import SequenceShards
from parallel.usp import USPAttention

log = logging.getLogger("wan.parallel")


class LocalAttention:
    """A local kernel in the model's (B, L, heads, D) layout."""

    def __init__(self, kernel: Kernel, cross: bool = False) -> None:
        self.kernel = kernel
        self.fn = kernel.cross_attn if cross else kernel.attn

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class ParallelCFG:
    """CFG parallel: one half of the ranks runs the conditional branch, the other the unconditional."""

    def __init__(self, groups: LayoutGroups) -> None:
        self.groups = groups

    def __call__(self, pipe: WanPipeline, x: Tensor, t: Tensor, ctx_c: Tensor, ctx_u: Tensor, guide: float) -> Tensor:
        if guide == 1.0:
            return pipe.model_forward(x, t, ctx_c, "cond")
        cond = self.groups.cfg_rank == 0
        v = pipe.model_forward(x, t, ctx_c if cond else ctx_u, "cond" if cond else "uncond")
        pipe.dit_forwards += 1  # the other half's forward: logical forwards stay 2 per step
        parts = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(parts, v.contiguous(), group=self.groups.cfg_group)  # [cond, uncond] by cfg rank
        v_c, v_u = parts
        return v_u + guide * (v_c - v_u)


@dataclass
class ParallelState:
    """What the serving loop needs besides the pipeline."""

    rt: Runtime
    info: ModelInfo
    kernel: Kernel
    meshes: MeshCache
    default_layout: ParallelLayout
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    use_context_parallel: bool = True
    sp_backend: str = "native"
    startup_log: list[str] = field(default_factory=list)
    parallel_vae: bool = False
    memory: MemoryModes | None = None  # the per-request memory mode (block swap / offload percent)
    _noted: set = field(default_factory=set)  # layouts whose cross-node note was logged

    @property
    def memory_mode(self) -> dict:
        """The memory mode in force: blocks_to_swap, offload_percent, host_gib, replan_s."""
        return self.memory.current.to_dict() if self.memory is not None else {}

    def layout_for(self, ulysses: int | None, ring: int | None, cfg: int | None) -> ParallelLayout:
        """The layout of a request (its sizes, else the start-up defaults), checked."""
        d = self.default_layout
        if ulysses is None and ring is None and cfg is None:
            return d
        lay = resolve_layout(
            self.rt.world_size, self.info.num_heads, ulysses if ulysses is not None else d.ulysses,
            ring if ring is not None else d.ring, cfg if cfg is not None else d.cfg, self.use_context_parallel,
            self.rt.local_world_size,
        )
        note = cross_node_note(lay, self.rt.local_world_size, self.rt.world_size)
        if note and lay not in self._noted:
            self._noted.add(lay)
            log.warning(note)
        return lay


def apply_local_attention(dit: WanDiT, kernel: Kernel) -> None:
    """One GPU, no layout: every block's attention through `kernel` (cross-attention through its cross kernel)."""
    local, cross = LocalAttention(kernel), LocalAttention(kernel, cross=True)
    for block in dit.blocks:
        block.self_attn.attn_fn = local
        block.cross_attn.attn_fn = cross


def apply_layout(pipe: WanPipeline, groups: LayoutGroups, kernel: Kernel, sp_backend: str = "native") -> None:
    """Point the DiT's token split, attention functions and the CFG strategy at this layout's groups."""
    dit: WanDiT = pipe.dit
    local, cross = LocalAttention(kernel), LocalAttention(kernel, cross=True)
    shards = None
    if groups.layout.sp > 1:
        shards = SequenceShards(groups)
        dit.tokens = shards
        self_attn = USPAttention(groups, shards, kernel)
    else:
        dit.tokens = LocalTokens()
        self_attn = local
    if sp_backend == "xfuser" and groups.ulysses_group is not None:  # one process has no groups: local attention
        from parallel.xfuser_backend import XfuserAttention

        self_attn = XfuserAttention(groups, shards, self_attn, kernel.name, pipe.device)
    for block in dit.blocks:
        block.self_attn.attn_fn = self_attn
        block.cross_attn.attn_fn = cross
    pipe.guidance = ParallelCFG(groups) if groups.layout.cfg > 1 else SequentialCFG()


def teacache_agreement(rt: Runtime, pipe: WanPipeline):
    """TeaCache decisions agreed over the control group, per branch (compute if any rank of the branch wants
    to); the other branch's skips (CFG parallel) are recorded too, so every rank counts the same forwards."""

    def agree(branch: str, want: bool) -> bool:
        votes = rt.all_gather_object((branch, bool(want)))
        compute: dict[str, bool] = {}
        for b, w in votes:
            compute[b] = compute.get(b, False) or w
        for b, c in compute.items():
            if b != branch and not c and pipe.cache is not None:
                pipe.cache.skipped.append((pipe.cache.step, b))
        return compute[branch]

    return agree if rt.distributed else None


def load_dit_placed(cfg: RunConfig, files, rt: Runtime, dtype: torch.dtype, mesh) -> WanDiT:
    """The DiT sharded (FSDP) or whole, with the block-swap / offload plan applied from the start: the
    planned tensors go straight to host memory (FSDP: this rank's shards, via FSDP2's CPU offload)."""
    from parallel.offload import (
        apply_offload,
        fsdp_offload_units,
        host_param_names,
        plan_fsdp_offload,
        plan_offload,
    )

    view, dcfg = open_dit(files.dit, dtype)
    dcfg = task_config(cfg, files) or dcfg  # --task: the file must be that model (else: first mismatching tensor)
    model = build_dit(dcfg, dtype)  # each tensor in its run dtype (keep_fp32 ones fp32) before sharding
    prepare = None
    if getattr(cfg, "quantize", "none") == "fp8":  # fp8 layers on the meta model first: the offload plan counts their real bytes
        from engine.cli import FP8_FSDP_REFUSAL
        from parallel.quantize import apply_fp8, parse_keep_blocks

        if mesh is not None:
            raise ValueError(f"quantize: {FP8_FSDP_REFUSAL}")
        rule = parse_keep_blocks(cfg.fp8_keep_blocks)
        apply_fp8(model, rule)

        def prepare(m: WanDiT) -> None:
            apply_fp8(m, rule)
    planner = plan_fsdp_offload if mesh is not None else plan_offload
    plan = planner(model.blocks, cfg.blocks_to_swap, cfg.offload_percent)
    if mesh is not None:
        from parallel.fsdp import apply_fsdp, load_sharded

        offloaded, _ = fsdp_offload_units(model, plan)
        apply_fsdp(model, model.blocks, mesh, offload=offloaded)
        load_sharded(model, view, rt.device, dtype, "Wan2.1 DiT", files.dit, host_modules=offloaded)
        from parallel.fsdp import set_shard_home

        for block in offloaded:  # FSDP2 loaded them into plain host memory: pin each at its exact size
            set_shard_home(block, True, rt.device)
        if not plan.empty:
            log.info("offload under FSDP: %d whole blocks (%d swapped + offload_percent %g of the others) keep this "
                     "rank's shards in host memory", len(plan.swapped), min(cfg.blocks_to_swap, len(model.blocks)),
                     cfg.offload_percent)
        return model.eval().requires_grad_(False)
    model = load_dit(files.dit, rt.device, dtype, expect=dcfg, host_names=host_param_names(model, plan) or None,
                     prepare=prepare)
    if prepare is not None:
        from parallel.quantize import fp8_summary

        log.info("%s", fp8_summary(model))
    apply_offload(model, plan, rt.device)
    return model


def load_image_encoder_for(dit: WanDiT, cfg: RunConfig, files, device: torch.device, dtype: torch.dtype):
    """Image-to-video DiTs: the CLIP image encoder, on every rank (each conditions its own copy of the request),
    where the text encoder runs (--t5_cpu keeps both on the CPU); fp16 on CUDA as the official code, else fp32.
    None for text-to-video."""
    if not dit.cfg.has_image_branch:
        return None
    from engine.clip import load_image_encoder
    from engine.model_files import image_encoder_missing

    if files.image_encoder is None:
        raise image_encoder_missing(files, cfg.model_dir)
    enc_dtype = torch.float16 if device.type == "cuda" and dtype != torch.float32 else torch.float32
    return load_image_encoder(files.image_encoder, device, enc_dtype)


def build_parallel_pipeline(cfg: RunConfig, rt: Runtime, files=None) -> tuple[WanPipeline, ParallelState]:
    """Every rank: find files, load the models (sharded where asked), pick the kernel and default layout."""
    notes: list[str] = [f"Initialized distributed environment with {rt.world_size} processes"] if rt.distributed else []
    files = files or resolve_files(cfg)
    dtype = resolve_dtype(cfg.dtype, rt.device)
    dit_fsdp = cfg.dit_fsdp or cfg.use_fsdp
    t5_fsdp = cfg.t5_fsdp or cfg.use_fsdp
    if (dit_fsdp or t5_fsdp) and not rt.has_groups:
        notes.append("FSDP needs more than one process: running without it")
        dit_fsdp = t5_fsdp = False
    if t5_fsdp and cfg.t5_cpu:
        notes.append("--t5_cpu keeps the text encoder on the CPU: not sharding it")
        t5_fsdp = False
    mesh = None
    if dit_fsdp or t5_fsdp:
        from parallel.fsdp import flat_mesh

        mesh = flat_mesh(rt.device, rt.world_size)
    t5_device = torch.device("cpu") if cfg.t5_cpu else rt.device
    t5_dtype = torch.float32 if t5_device.type == "cpu" and rt.device.type == "cpu" else dtype
    shard = None
    if t5_fsdp:
        from parallel.fsdp import t5_sharder

        shard = t5_sharder(mesh, rt.device, t5_dtype, files.t5)
    text_encoder = load_text_encoder(files.t5, files.tokenizer, t5_device, t5_dtype, shard=shard)
    info = model_info(files, cfg, dtype, count_tokens=text_encoder.count_tokens)
    dit = load_dit_placed(cfg, files, rt, dtype, mesh if dit_fsdp else None)
    if cfg.compile:
        from parallel.speed import apply_compile

        apply_compile(dit, cfg.compile_backend)
        notes.append(f"torch.compile ({cfg.compile_backend}) on every DiT block")
    if dit_fsdp or t5_fsdp:
        parts = " and ".join(p for p, on in (("DiT", dit_fsdp), ("T5", t5_fsdp)) if on)
        notes.append(f"Applied FSDP to model ({parts}, {rt.world_size} shards)")
    parallel_vae = rt.distributed  # every rank decodes a slice; one rank alone holds the VAE otherwise
    vae_dtype = torch.float32 if rt.device.type == "cpu" else dtype
    vae = load_vae(files.vae, rt.device, vae_dtype) if (rt.rank == 0 or parallel_vae) else None
    image_encoder = load_image_encoder_for(dit, cfg, files, t5_device, dtype)
    kernel = get_kernel(cfg.attention, rt.device)
    layout = resolve_layout(rt.world_size, info.num_heads, cfg.ulysses_size, cfg.ring_size, cfg.cfg_size,
                            cfg.use_context_parallel, rt.local_world_size)
    pipe = WanPipeline(dit, text_encoder, vae, rt.device, model_name=files.name, random_weights=files.random_weights)
    if not kernel.exact and cfg.attention_exact_steps > 0:  # 8-bit attention: exact on the first/last steps
        from parallel.attention_fp8 import with_exact_steps

        kernel = with_exact_steps(kernel, get_kernel("auto", rt.device), cfg.attention_exact_steps, pipe)
    pipe.model_key = info.key
    pipe.image_encoder = image_encoder
    pipe.offload_t5 = cfg.offload_model and not t5_fsdp and t5_device.type == "cuda"
    pipe.teacache_device = "cpu" if cfg.teacache_cache_device in ("cpu", "offload_device") else "gpu"
    pipe.teacache_agree = teacache_agreement(rt, pipe)
    if cfg.sp_backend == "xfuser" and not rt.distributed:
        notes.append("sp_backend xfuser: one process has no sequence parallelism; the local attention kernel runs")
    if cfg.sp_backend == "xfuser" and rt.device.type != "cuda":
        from parallel.kernels import BackendUnavailable

        raise BackendUnavailable("sp_backend xfuser has no CPU path (xDiT's attention calls CUDA kernels only); "
                                 "use --sp_backend native")
    state = ParallelState(rt, info, kernel, MeshCache(rt.world_size, rt.rank, cfg.sp_backend == "xfuser", rt.device), layout, dit_fsdp, t5_fsdp,
                          cfg.use_context_parallel, cfg.sp_backend, notes, parallel_vae,
                          MemoryModes(dit, rt.device, dit_fsdp, cfg.blocks_to_swap, cfg.offload_percent))
    context_parallel = layout.sp > 1
    notes.append(f"attention kernel: {kernel.name}; default layout: {layout}"
                 + (f" ({rt.nnodes} nodes: Ulysses inside a node, Ring across nodes)" if rt.nnodes > 1 else ""))
    note = cross_node_note(layout, rt.local_world_size, rt.world_size)
    if note:
        notes.append(note)
    notes.append(f"Setup complete: FSDP={str(dit_fsdp or t5_fsdp).lower()}, Context Parallel={str(context_parallel).lower()}")
    if rt.rank == 0:
        for line in notes[1 if rt.distributed else 0 :]:  # the first line was logged by the runtime
            log.info(line)
    return pipe, state
