"""Memory modes, attention backends, compile, the sequence-parallel paths and TeaCache on one GPU, 14B
random bf16 weights, one DiT forward at 832×480×81. Prints a table; writes JSON to --out.

    python benchmarks/bench_modes.py --out benchmarks/results/modes_h100.json [--skip compile,xfuser]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import inputs, model_flops, random_model, rel, time_cuda  # noqa: E402
from engine.config import DIT_CONFIGS, token_count  # noqa: E402
from engine.dit import run_blocks  # noqa: E402
from engine.scheduler import make_scheduler  # noqa: E402
from engine.teacache import coefficients_for  # noqa: E402
from parallel.apply import LocalAttention  # noqa: E402
from parallel.kernels import get_kernel  # noqa: E402
from parallel.layout import ParallelLayout  # noqa: E402
from parallel.offload import apply_offload, plan_offload  # noqa: E402


def set_attention(model, kernel) -> None:
    for b in model.blocks:
        b.self_attn.attn_fn = LocalAttention(kernel)
        b.cross_attn.attn_fn = LocalAttention(kernel)


def restore(model, streamer) -> None:
    """Undo apply_offload: every weight back on the GPU, the plain block loop."""
    if streamer is None:
        return
    for unit in streamer.units.values():
        for p, host in unit:
            p.data = host.to("cuda")
    streamer.pending.clear()
    model.block_runner = run_blocks
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(model, x, t, ctx, runs, ref=None):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = model(x, t, ctx)
    ms = time_cuda(lambda: model(x, t, ctx), runs)
    r = {"ms": round(ms, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if ref is not None:
        r["rel_err_vs_plain"] = rel(out, ref)
        r["bitwise_equal"] = bool(torch.equal(out, ref))
    return r, out


def teacache_counts(model, steps: int = 50) -> dict:
    """Forwards TeaCache computes for 50 steps with CFG at each threshold (decision from e only)."""
    out = {}
    sched = make_scheduler("unipc", steps, 5.0)
    es = [model.time_embed(torch.tensor([float(t)], device="cuda"))[0].float() for t in sched.timesteps.tolist()]
    poly = np.poly1d(coefficients_for("14B"))
    for thr in (0.1, 0.2, 0.3):
        acc, computed, prev = 0.0, 0, None
        for i, e in enumerate(es):
            if i == 0 or i == steps - 1 or prev is None:
                compute, acc = True, 0.0
            else:
                acc += float(poly(((e - prev).abs().mean() / prev.abs().mean()).item()))
                compute = acc >= thr
                if compute:
                    acc = 0.0
            computed += int(compute)
            prev = e
        out[str(thr)] = {"forwards": 2 * computed, "of": 2 * steps}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="832*480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--skip", default="")
    ap.add_argument("--out")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    cfg = DIT_CONFIGS["14B"]
    w, h = (int(v) for v in a.size.split("*"))
    flops = model_flops(cfg, token_count(w, h, a.frames))
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": a.size, "frames": a.frames,
           "model_tflop": round(flops / 1e12, 1)}
    model = random_model(cfg)
    x, t, ctx = inputs(cfg, w, h, a.frames)
    kern = get_kernel("auto", torch.device("cuda"))
    set_attention(model, kern)
    with torch.no_grad():
        plain, ref = measure(model, x, t, ctx, a.runs)
        res["plain"] = {**plain, "attention": kern.name}
        print("plain", plain, flush=True)
        # 1. memory modes: (blocks_to_swap, offload_percent)
        res["offload"] = {}
        for swap, pct in ((10, 0.5), (40, 0.0), (0, 1.0), (20, 0.0)):
            plan = plan_offload(model.blocks, swap, pct)
            t0 = time.perf_counter()
            streamer = apply_offload(model, plan, torch.device("cuda"))
            torch.cuda.empty_cache()
            setup_s = time.perf_counter() - t0
            r, _ = measure(model, x, t, ctx, a.runs, ref)
            r.update(ratio_vs_plain=round(r["ms"] / plain["ms"], 3), host_gib=round(plan.host_bytes / 2**30, 2),
                     setup_s=round(setup_s, 1), max_units_on_gpu=streamer.max_on_device)
            res["offload"][f"{swap},{pct}"] = r
            print("offload", swap, pct, r, flush=True)
            restore(model, streamer)
        # 2. attention backends
        res["attention"] = {}
        for name in ("sdpa_cudnn", "sdpa_flash", "sage"):
            try:
                k = get_kernel(name, torch.device("cuda"))
                set_attention(model, k)
                r, _ = measure(model, x, t, ctx, a.runs, ref)
                r["speedup_vs_plain"] = round(plain["ms"] / r["ms"], 3)
            except Exception as exc:  # noqa: BLE001 - recorded
                r = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            res["attention"][name] = r
            print("attention", name, r, flush=True)
        set_attention(model, kern)
        # 3. the sequence-parallel paths on one rank: our USP attention + token split, and xDiT's
        from parallel.layout import LayoutGroups
        from parallel.sequence import SequenceShards
        from parallel.usp import USPAttention

        world = dist.group.WORLD
        groups = LayoutGroups(ParallelLayout(), world, world, world, world, ring_ranks=(0,))
        shards = SequenceShards(groups)
        model.tokens = shards
        res["sp_one_rank"] = {}
        for backend in ("native", "xfuser"):
            if backend in skip:
                continue
            try:
                native = USPAttention(groups, shards, kern)
                if backend == "xfuser":
                    from parallel.xfuser_backend import XfuserAttention

                    attn = XfuserAttention(groups, shards, native, kern.name, torch.device("cuda"))
                else:
                    attn = native
                for b in model.blocks:
                    b.self_attn.attn_fn = attn
                r, _ = measure(model, x, t, ctx, a.runs, ref)
                r["name"] = getattr(attn, "name", "native USP")
            except Exception as exc:  # noqa: BLE001
                r = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            res["sp_one_rank"][backend] = r
            print("sp", backend, r, flush=True)
        from engine.dit import LocalTokens

        model.tokens = LocalTokens()
        set_attention(model, kern)
        # 4. ring merge on this GPU's kernel: attention over 2 KV halves merged by log-sum-exp vs one call
        from parallel.usp import merge_partial

        g = torch.Generator("cuda").manual_seed(3)
        q, k_, v = (torch.randn(1, 40, 32760, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        full = kern.attn(q, k_, v)
        o1, l1 = kern.attn_lse(q, k_[:, :, :16000], v[:, :, :16000])
        o2, l2 = kern.attn_lse(q, k_[:, :, 16000:], v[:, :, 16000:])
        merged, _ = merge_partial(*merge_partial(None, None, o1, l1), o2, l2)
        res["ring_merge_rel_err"] = rel(merged, full)
        print("ring merge rel err", res["ring_merge_rel_err"], flush=True)
        # 5. TeaCache forward counts (random weights: their timestep embedding is not a trained one)
        res["teacache_50_steps"] = teacache_counts(model)
        print("teacache", res["teacache_50_steps"], flush=True)
        # 6. compile
        if "compile" not in skip:
            from parallel.speed import apply_compile

            apply_compile(model, "inductor")
            t0 = time.perf_counter()
            model(x, t, ctx)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            r, _ = measure(model, x, t, ctx, a.runs, ref)
            r.update(first_call_s=round(first, 1), speedup_vs_plain=round(plain["ms"] / r["ms"], 3))
            res["compile"] = r
            print("compile", r, flush=True)
            plan = plan_offload(model.blocks, 10, 0.5)
            streamer = apply_offload(model, plan, torch.device("cuda"))
            r, _ = measure(model, x, t, ctx, a.runs, ref)
            r["ratio_vs_compiled"] = round(r["ms"] / res["compile"]["ms"], 3)
            res["compile_with_offload_10_0.5"] = r
            print("compile+offload", r, flush=True)
            restore(model, streamer)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
