"""Everything the 2- and 8-GPU runs measure, in one torchrun call, on the serving path (start_server).

1. equal_to_one_gpu: the final latents of every valid layout (parallel.layout.valid_layouts for this world
   size and the model's heads) and of FSDP of the DiT, against a one-GPU reference that rank 0 computes
   alone with the same pipeline under the local layout (no collectives): relative error.
2. forward_ms, scaling: one DiT forward at --forward_size (CUDA events, median of --forward_runs after
   --forward_warmup; perf_counter on CPU) on rank 0 alone ("1") and under every layout (the slowest rank).
   A CFG-parallel layout runs one guided step (both branches at once) and reports half of it, the time per
   logical forward. scaling = forward_ms["1"] / forward_ms[layout].
3. peak_gib_per_gpu: every rank's peak for one request at --peak_size (decoded) with the default settings,
   FSDP of the DiT and every preset whose world_size matches (CUDA: max_memory_allocated; CPU: the process's
   max RSS, which never goes down between settings).
4. end_to_end_s, stages: one request through server.dispatcher.submit (T5, denoise, VAE decode, mp4) at
   --e2e_size with the default settings and layout.

Without --model_dir, random bf16 weights of the real shapes are written once to --weights_dir (~38 GB for
14B; reused by later runs); --model tiny uses the embedded tiny model (CPU smoke: tests/test_bench_multigpu.py).
The raw log (rank 0's output, and one `memory-estimate` JSON line per setting for engine.memory_estimate's
fit_calibration) goes next to the JSON under benchmarks/results/raw/. A run longer than a 10-minute slot
can be split: --parts equal,forward,peaks, then --parts e2e --merge.

    torchrun --standalone --nproc_per_node 8 benchmarks/bench_multigpu.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_dit import inputs, rel, time_cpu, time_cuda  # noqa: E402
from engine.request import GenerationRequest, validate_request  # noqa: E402
from parallel.apply import apply_layout, build_parallel_pipeline  # noqa: E402
from parallel.layout import LayoutGroups, ParallelLayout, valid_layouts  # noqa: E402

KEYS = ("gpu", "gpus", "torch", "equal_to_one_gpu", "forward_ms", "scaling", "peak_gib_per_gpu", "end_to_end_s", "stages")
PARTS = ("equal", "forward", "peaks", "e2e")
PROMPT = "a red fox running through fresh snow, cinematic"
FSDP = "dit_fsdp"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (every size, frame count, step count, model and path is a flag)."""
    ap = argparse.ArgumentParser(description="multi-GPU benchmark (see the module docstring)")
    ap.add_argument("--model", default="14B", choices=("14B", "1.3B", "tiny"), help="random weights of this size")
    ap.add_argument("--model_dir", help="real model files (models/ layout); default: random ones in --weights_dir")
    ap.add_argument("--weights_dir", help="where random real-shape files are written once (default /tmp/wan21_random_MODEL)")
    for part, size, frames, steps in (("check", "832*480", 81, 3), ("peak", "832*480", 81, 2), ("e2e", "1280*720", 81, 50)):
        ap.add_argument(f"--{part}_size", default=size)
        ap.add_argument(f"--{part}_frames", type=int, default=frames)
        ap.add_argument(f"--{part}_steps", type=int, default=steps)
    ap.add_argument("--forward_size", default="1280*720")
    ap.add_argument("--forward_frames", type=int, default=81)
    ap.add_argument("--forward_runs", type=int, default=3)
    ap.add_argument("--forward_warmup", type=int, default=1)
    ap.add_argument("--presets", default="all", help="comma-separated preset names, 'all' or 'none'")
    ap.add_argument("--no_compile", action="store_true", help="presets run without torch.compile (CPU)")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--app_args", default="", help="more app.py flags for every setting, e.g. '--sp_backend xfuser'")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)} to run")
    ap.add_argument("--out", help="default benchmarks/results/multigpu_<n>gpu.json")
    ap.add_argument("--raw", help="default benchmarks/results/raw/multigpu_<n>gpu.txt")
    ap.add_argument("--merge", action="store_true", help="keep the existing --out values of the parts not run")
    a = ap.parse_args(argv)
    a.parts = set(a.parts.split(","))
    if a.parts - set(PARTS):
        ap.error(f"--parts: unknown {sorted(a.parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    return a


class Tee:
    """A text stream writing to several streams (rank 0's output, also into the raw log)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


def say(rank: int, *msg) -> None:
    if rank == 0:
        print(*msg, flush=True)


def prepare_weights(a: argparse.Namespace) -> str:
    """The model folder: --model_dir, an empty one (→ the tiny model), or random real-shape files."""
    if a.model_dir:
        return a.model_dir
    root = Path(a.weights_dir or f"/tmp/wan21_random_{a.model}")
    if a.model == "tiny":
        root.mkdir(parents=True, exist_ok=True)
        return str(root)
    from benchmarks.random_weights import wait_for_model_dir, write_model_dir

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        t0 = time.perf_counter()
        write_model_dir(root, a.model)
        print(f"random {a.model} weights in {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        wait_for_model_dir(root)
    return str(root)


def make_request(server, size: str, frames: int, steps: int, layout: ParallelLayout | None = None,
                 **extra) -> GenerationRequest:
    """The same validated request on every rank (fixed seed) in `layout` (default: the server's)."""
    info = server.state.info
    raw = {"prompt": PROMPT, "size": size, "frame_num": frames, "sample_steps": steps, "sample_guide_scale": 5.0,
           "base_seed": 1234, **extra}
    req = validate_request(raw, info.limits, info.defaults)
    layout = layout or server.state.default_layout
    return GenerationRequest(**{**req.to_dict(), "ulysses_size": layout.ulysses, "ring_size": layout.ring,
                                "cfg_size": layout.cfg})


def timed(fn, runs: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of fn: CUDA events on a GPU, perf_counter on the CPU."""
    return time_cuda(fn, runs, warmup) if device.type == "cuda" else time_cpu(fn, runs, warmup)


def local(server) -> None:
    """The one-GPU layout on this rank: local tokens, local attention, sequential CFG (no collectives)."""
    apply_layout(server.pipe, LayoutGroups(ParallelLayout()), server.state.kernel)


def reference(server, a: argparse.Namespace):
    """Rank 0 alone: the one-GPU latents of the check request (None elsewhere)."""
    ref = None
    if server.rt.rank == 0:
        local(server)
        ref = server.pipe.generate(make_request(server, a.check_size, a.check_frames, a.check_steps, teacache=0.0),
                                   decode=False).latents
    server.rt.barrier()
    return ref


def equality(server, a: argparse.Namespace, ref, layouts: list[ParallelLayout | None], prefix: str = "") -> dict:
    """Relative error of each layout's final latents against the one-GPU reference (on rank 0)."""
    out = {}
    for lay in layouts:
        req = make_request(server, a.check_size, a.check_frames, a.check_steps, lay, teacache=0.0)
        res = server.execute(req, {"decode": False})
        name = prefix + str(lay or server.state.default_layout)
        if server.rt.rank == 0:
            out[name] = rel(res.latents, ref)
            say(0, f"equal_to_one_gpu {name}: {out[name]:.3e}")
    return out


@torch.no_grad()
def forwards(server, a: argparse.Namespace, layouts: list[ParallelLayout]) -> dict:
    """ms per logical DiT forward: "1" on rank 0 alone, then every layout (the slowest rank's median)."""
    rt, pipe, st = server.rt, server.pipe, server.state
    w, h = (int(v) for v in a.forward_size.split("*"))
    x, t, ctx = inputs(pipe.dit.cfg, w, h, a.forward_frames, device=rt.device)
    out = {}
    if rt.rank == 0:
        local(server)
        out["1"] = timed(lambda: pipe.dit(x, t, ctx), a.forward_runs, a.forward_warmup, rt.device)
        say(0, f"forward 1 GPU {a.forward_size}x{a.forward_frames}: {out['1']:.1f} ms")
    rt.barrier()
    for lay in layouts:
        apply_layout(pipe, st.meshes.get(lay), st.kernel, st.sp_backend)
        if lay.cfg > 1:  # one guided step = both branches at once: half of it per logical forward
            def fn():
                return pipe.predict_velocity(x, t, ctx, ctx, 5.0)
        else:
            def fn():
                return pipe.dit(x, t, ctx)
        ms = timed(fn, a.forward_runs, a.forward_warmup, rt.device) / lay.cfg
        every = rt.all_gather_object(ms)
        out[str(lay)] = max(every)
        say(rt.rank, f"forward {lay}: {out[str(lay)]:.1f} ms (ranks {[round(v, 1) for v in every]})")
    return out


def estimate_inputs(server, req: GenerationRequest):
    """engine.memory_estimate's description of rank 0 for this request under this server's settings."""
    from engine import memory_estimate as me

    cfg, st, pipe = server.cfg, server.state, server.pipe
    lay = st.layout_for(req.ulysses_size, req.ring_size, req.cfg_size)
    t5c = pipe.text_encoder.model.config
    t5 = {k: getattr(t5c, k) for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")}
    mode = me.MemoryMode(
        world_size=server.rt.world_size, dit_fsdp=st.dit_fsdp, blocks_to_swap=cfg.blocks_to_swap,
        offload_percent=cfg.offload_percent, t5="fsdp" if st.t5_fsdp else "cpu" if cfg.t5_cpu else "gpu",
        offload_model=cfg.offload_model, dtype_bytes=torch.finfo(st.info.dtype).bits // 8, vae_decode=True,
        vae_tiling=cfg.vae_tiling, vae_parts=server.rt.world_size if st.parallel_vae else 1)
    return me.EstimateInputs(pipe.dit.cfg, me.Request(req.width, req.height, req.frame_num, req.batch_size,
                                                      req.sample_guide_scale != 1.0),
                             me.Layout(lay.cfg, lay.ring, lay.ulysses), mode, t5,
                             sum(p.numel() for p in pipe.vae.parameters()), pipe.vae.decoder.conv1.out_channels // 4)


def peak(server, a: argparse.Namespace, name: str) -> list[float]:
    """Every rank's peak GiB for one decoded request at --peak_size (its estimate goes to the raw log)."""
    from engine.memory_estimate import GIB, estimate

    req = make_request(server, a.peak_size, a.peak_frames, a.peak_steps)
    server.execute(req, {"decode": True})
    peaks = [round(m["peak_gib"], 3) for m in server.last_memory]
    if server.rt.rank == 0:
        inp = estimate_inputs(server, req)
        est = estimate(inp)
        say(0, f"peak {name}: {peaks} GiB per rank; estimate for rank 0 {est.allocated / GIB:.2f} GiB ({est.peak_phase})")
        say(0, "memory-estimate " + json.dumps({"setting": name, "inputs": asdict(inp), "measured_gib": peaks,
                                                 "device": server.rt.device.type, "estimate_gib": est.allocated / GIB},
                                                ensure_ascii=False))
    return peaks


def rebuild(server, argv: list[str]):
    """The same gang with another start-up configuration: the old pipeline is freed, the new one assembled by
    build_parallel_pipeline (process groups of the layouts reused). None when it cannot run here (a preset
    that pins another world size)."""
    from app import load_config

    cfg, rt = load_config(argv), server.rt
    if cfg.world_size is not None and cfg.world_size != rt.world_size:
        return None
    if cfg.preset == "auto":
        from parallel.startup import resolve_auto  # what start_server does for --preset auto
    meshes, backend, compiled = server.state.meshes, server.state.sp_backend, server.cfg.compile
    server.pipe = server.state = None
    gc.collect()
    if compiled:
        torch._dynamo.reset()  # compiled code holds the old modules
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    if cfg.preset == "auto":
        cfg = resolve_auto(cfg, rt)
    pipe, state = build_parallel_pipeline(cfg, rt)
    if state.sp_backend == backend:
        state.meshes = meshes
    rt.barrier()
    return type(server)(cfg, rt, pipe, state)


def preset_names(a: argparse.Namespace) -> list[str]:
    from presets import available_presets

    if a.presets == "none":
        return []
    return [*available_presets(), "auto"] if a.presets == "all" else a.presets.split(",")


def save(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: res[k] for k in KEYS}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def run(a: argparse.Namespace) -> int:
    from app import load_config
    from parallel.serve import start_server

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"multigpu_{world}gpu.json")
    raw = Path(a.raw or ROOT / "benchmarks" / "results" / "raw" / f"multigpu_{world}gpu.txt")
    if rank == 0:
        raw.parent.mkdir(parents=True, exist_ok=True)
        log = raw.open("w")
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
        print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    model_dir = prepare_weights(a)
    work = Path(tempfile.mkdtemp(prefix="bench_multigpu_"))
    base = ["--model_dir", model_dir, "--attention", a.attention, "--outputs_dir", str(work), *shlex.split(a.app_args)]
    server = start_server(load_config(base))
    dev = server.rt.device
    res: dict = {k: None if k == "end_to_end_s" else {} for k in KEYS}
    if a.merge and rank == 0 and out.exists():  # rank 0 alone keeps the results
        res.update(json.loads(out.read_text(encoding="utf-8")))
    res.update(gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", gpus=world, torch=torch.__version__)
    layouts = valid_layouts(world, server.state.info.num_heads)
    say(rank, f"{world} ranks on {res['gpu']}, model {server.state.info.key}, layouts: {[str(x) for x in layouts]}")
    if dev.type != "cuda":
        say(rank, "CPU: peaks are each process's max RSS (never reset between settings), times are perf_counter")
    ref, current = None, "default"
    if "equal" in a.parts:
        ref = reference(server, a)
        res["equal_to_one_gpu"] = equality(server, a, ref, layouts)
    if "forward" in a.parts:
        res["forward_ms"] = forwards(server, a, layouts)
        if rank == 0:
            res["scaling"] = {k: res["forward_ms"]["1"] / v for k, v in res["forward_ms"].items() if k != "1"}
    if "peaks" in a.parts:
        res["peak_gib_per_gpu"] = {"default": peak(server, a, "default")}
    if rank == 0:
        save(res, out)
    settings = [(FSDP, base + ["--dit_fsdp"])] if {"equal", "peaks"} & a.parts else []
    if "peaks" in a.parts:
        settings += [(p, base + ["--preset", p] + (["--compile", "false"] if a.no_compile else []))
                     for p in preset_names(a)]
    for name, argv in settings:
        new = rebuild(server, argv)
        if new is None:
            say(rank, f"setting {name}: skipped (it pins another world_size than {world}, or cannot be resolved)")
            continue
        server, current = new, name
        if name == FSDP and "equal" in a.parts:
            res["equal_to_one_gpu"].update(equality(server, a, ref, [None], "dit_fsdp, "))
        if "peaks" in a.parts:
            res["peak_gib_per_gpu"][name] = peak(server, a, name)
        if rank == 0:
            save(res, out)
    if "e2e" in a.parts and current != "default":
        server = rebuild(server, base)
    if rank != 0:
        server.worker_loop()  # serves the end-to-end request (if any) until rank 0's shutdown
        server.shutdown()
        return 0
    try:
        if "e2e" in a.parts:
            raw_req = {"prompt": PROMPT, "size": a.e2e_size, "frame_num": a.e2e_frames, "sample_steps": a.e2e_steps,
                       "sample_guide_scale": 5.0, "base_seed": 1234}
            t0 = time.perf_counter()
            done = server.dispatcher.submit(raw_req, save_file=str(work / "e2e.mp4"), decode=True)
            res["end_to_end_s"] = time.perf_counter() - t0
            res["stages"] = {k.removesuffix("_s"): v for k, v in done.meta["timings"].items()}
            say(0, f"end to end {a.e2e_size}x{a.e2e_frames}, {a.e2e_steps} steps: {res['end_to_end_s']:.1f} s, "
                   f"stages {res['stages']}, layout {done.meta['layout']}, peaks {[m['peak_gib'] for m in done.memory]}")
        save(res, out)
        say(0, json.dumps({k: res[k] for k in KEYS}, indent=1, ensure_ascii=False))
        say(0, f"wrote {out} and {raw}")
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()
    code = run(parse_args())
    from parallel.runtime import exit_process

    exit_process(code)
