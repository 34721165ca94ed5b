"""Rank 0 after a request: decode, write the mp4(s), the JSON sidecar(s) and the optional latents file."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file as save_safetensors

from engine.config import FPS
from engine.pipeline import GenerationResult
from engine.video import resolve_save_path, video_to_uint8, write_mp4, write_sidecar

log = logging.getLogger("wan.outputs")


def _batch_path(save_file: str | None, i: int, n: int) -> str | None:
    if save_file is None or n == 1:
        return save_file
    p = Path(save_file)
    return str(p.with_name(f"{p.stem}_{i}{p.suffix or '.mp4'}"))


def image_meta(req) -> dict:
    """Image-to-video: the conditioning images as sha256 of their normalised PNG bytes and their size (the
    images themselves are not kept)."""
    out = {}
    for name in ("image", "last_frame"):
        data = getattr(req, name, None)
        if data:
            import struct

            w, h = struct.unpack(">II", data[16:24])  # the PNG's IHDR
            out[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": f"{w}*{h}"}
    return out


def sidecar_meta(server, result: GenerationResult, index: int) -> dict:
    """The settings, timings and memory of one generated video."""
    req, st, rt = result.request, server.state, server.rt
    mem = server.last_memory
    return {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        **image_meta(req),
        "seed": req.base_seed + index,
        "size": req.size,
        "frame_num": req.frame_num,
        "steps": req.sample_steps,
        "guidance": req.sample_guide_scale,
        "shift": req.sample_shift,
        "solver": req.sample_solver,
        "batch_size": req.batch_size,
        "batch_index": index,
        "fps": FPS,
        "model": server.pipe.model_name,
        "model_size": st.info.key,
        "random_weights": bool(server.pipe.random_weights),
        "dit_forwards": int(result.dit_forwards),
        "teacache": req.teacache,
        "skipped_steps": result.info.get("skipped_steps", []),
        **({"teacache_disabled_reason": result.info["teacache_disabled_reason"]}
           if result.info.get("teacache_disabled_reason") else {}),
        "sample_timesteps": list(req.sample_timesteps),
        "timesteps": result.info.get("timesteps", []),
        "loras": result.info.get("loras", {"loras": []}),
        "memory_mode": result.info.get("memory_mode", st.memory_mode),
        "layout": {"world_size": rt.world_size, "cfg_size": req.cfg_size, "ring_size": req.ring_size,
                   "ulysses_size": req.ulysses_size},
        "fsdp": {"dit": st.dit_fsdp, "t5": st.t5_fsdp},
        "attention": st.kernel.name,
        "dtype": str(st.info.dtype).replace("torch.", ""),
        "timings": result.timings,
        "peak_memory_gib": max((m["peak_gib"] for m in mem), default=result.peak_memory_gib),
        "memory_per_rank": mem,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_outputs(server, result: GenerationResult, save_file: str | None, save_latents: str | None):
    """Write the latents (if asked) and, when the request was decoded, every mp4 and sidecar (rank 0)."""
    from parallel.serve import Output

    req = result.request
    out = Output(req, memory=server.last_memory)
    if save_latents:
        p = Path(save_latents)
        p.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({"latents": result.latents.contiguous()}, str(p))
        out.latents_path = p
    if result.video is None:
        out.meta = sidecar_meta(server, result, 0)
        return out
    outputs_dir = Path(server.cfg.outputs_dir)
    for i in range(req.batch_size):
        path = resolve_save_path(_batch_path(save_file, i, req.batch_size), outputs_dir, req.base_seed + i)
        t1 = time.perf_counter()
        write_mp4(video_to_uint8(result.video[i]), path, fps=FPS)
        result.timings["write_mp4_s"] = round(time.perf_counter() - t1, 4)
        meta = sidecar_meta(server, result, i)
        out.sidecars.append(write_sidecar(path, meta))
        out.videos.append(path)
        out.meta = meta
        log.info("wrote %s (seed %d)", path, req.base_seed + i)
    return out
