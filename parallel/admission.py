"""Admission control: a request whose estimated peak GPU memory exceeds what the fullest rank has available
is refused before any rank starts, with a sentence naming size, frames and batch and what would fit.

The estimate is engine/memory_estimate.py (calibrated against the GPU lane's measured peaks:
benchmarks/calibrate_memory.py, docs/BENCHMARKS.md). "Available" is each rank's free device memory plus
what its caching allocator holds but does not use, measured between requests by the memory probe.
"""

from __future__ import annotations

import logging
from typing import Any

from engine.memory_estimate import GIB, EstimateInputs, Layout, MemoryMode, Request, what_fits
from engine.request import GenerationRequest, RequestError

log = logging.getLogger("wan.admission")

def estimate_inputs(server, req: GenerationRequest) -> EstimateInputs:
    """The estimate's view of `req` on this server: model, request, layout and memory mode."""
    cfg, st, pipe = server.cfg, server.state, server.pipe
    layout = st.layout_for(req.ulysses_size, req.ring_size, req.cfg_size)
    t5_model = getattr(pipe.text_encoder, "model", None)
    t5 = dict(getattr(t5_model, "config", None).to_dict()) if t5_model is not None else {}
    t5 = {k: t5[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k in t5}
    t5_place = "fsdp" if st.t5_fsdp else ("cpu" if cfg.t5_cpu else "gpu")
    now = getattr(st, "memory_mode", None) or {"blocks_to_swap": cfg.blocks_to_swap, "offload_percent": cfg.offload_percent}
    swap = req.blocks_to_swap if req.blocks_to_swap is not None else now["blocks_to_swap"]
    pct = req.offload_percent if req.offload_percent is not None else now["offload_percent"]
    mode = MemoryMode(world_size=server.rt.world_size, dit_fsdp=st.dit_fsdp, blocks_to_swap=swap,
                      offload_percent=pct, t5=t5_place, offload_model=cfg.offload_model,
                      dtype_bytes=st.info.dtype.itemsize, fp8=getattr(cfg, "quantize", "none") == "fp8",
                      vae_decode=True, vae_tiling=cfg.vae_tiling, vae_parts=server.rt.world_size if st.parallel_vae else 1)
    request = Request(req.width, req.height, req.frame_num, req.batch_size, cfg=req.sample_guide_scale != 1.0)
    kw: dict[str, Any] = {"t5": t5} if len(t5) == 6 else {}
    return EstimateInputs(pipe.dit.cfg, request, Layout(layout.cfg, layout.ring, layout.ulysses), mode, **kw)


def check_fits(server, req: GenerationRequest, memory: list[dict[str, Any]]) -> None:
    """Raise RequestError("size", what would fit) when `req` cannot fit on the fullest rank (CUDA only)."""
    if server.rt.device.type != "cuda" or not memory:
        return
    try:
        avail = [(m.get("available_gib", m.get("free_gib", 0.0)), m["rank"]) for m in memory]
        free_gib, rank = min(avail)
        fit = what_fits(estimate_inputs(server, req), int(free_gib * GIB), rank=rank, loaded=True)
    except Exception as exc:  # noqa: BLE001 - the estimate advises; a fault in it must never stop serving
        log.warning("admission control could not estimate the request (%s: %s); admitting it", type(exc).__name__, exc)
        return
    if not fit.fits:
        log.warning("refused before start: %s", fit.sentence)
        raise RequestError("size", fit.sentence)
