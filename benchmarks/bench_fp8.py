"""fp8 on Hopper: kernel self-checks, then bf16 vs fp8 vs fp8+attn8 forwards of the 14B (and 1.3B) with random
weights made on the GPU, their error against an fp32 evaluation, the 50-step latents, the VAE decode variants
and the 24 GB case — every part wrapped, so a failure is recorded in the JSON and the rest still runs; the JSON
is rewritten after every part (a timeout keeps what was done).

    python benchmarks/bench_fp8.py --parts env,selfcheck,mem24,micro,forward --budget-s 480 --out r1.json
    python benchmarks/bench_fp8.py --parts env,sensitivity,latents,vae --budget-s 480 --out r2.json
    python benchmarks/bench_fp8.py --merge r1.json r2.json --out benchmarks/results/fp8_h200.json

Modes: bf16 (our forward, cuDNN attention: what runs without FlashAttention-4), fp8 (--quantize fp8, rule
--keep), fp8+attn8 (also --attention fp8: int8 QK, fp8 PV); extra_cases: fp8 + int8_qk (bf16 PV).
The fp32 reference (block by block, TF32 off, exact SDPA) of a 720p forward runs at --fp32-frames-720 frames
(default 21) to keep the time: every mode is evaluated at that frame count for its 720p error (rel_err_frames).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import fp32_reference, inputs, random_model, rel, time_cuda  # noqa: E402
from engine.config import DIT_CONFIGS, token_count  # noqa: E402
from engine.fp8 import Fp8Linear, quantize_rows  # noqa: E402
from parallel.quantize import Fp8Rule, apply_fp8, parse_keep_blocks  # noqa: E402

GIB = 2**30
SIZES = {"480p": "832*480", "720p": "1280*720"}


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
class Clock:
    """What with_exact_steps reads (the pipeline's step and step count)."""

    step, steps = 0, 0


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def peak() -> float:
    return round(torch.cuda.max_memory_allocated() / GIB, 2)


def kernel(name: str):
    from parallel.kernels import get_kernel

    return get_kernel(name, torch.device("cuda"))


def set_attention(model, name: str):
    from parallel.apply import apply_local_attention

    k = kernel(name)
    apply_local_attention(model, k)
    return k.name


def param_gib(model) -> float:
    return round(sum(p.numel() * p.element_size() for p in model.parameters()) / GIB, 3)


def left(deadline: float) -> float:
    return deadline - time.monotonic()


def step_diff(a, b) -> dict:
    """How two quantized tensors differ: share of equal values, the largest difference, the scales' relative one."""
    da, db = a.data.float(), b.data.float()
    return {"equal_share": round((da == db).float().mean().item(), 5), "max_abs_diff": (da - db).abs().max().item(),
            "scale_rel_diff": ((a.scale - b.scale).abs() / b.scale).max().item()}


def check(out: dict, name: str, fn) -> None:
    """Run one sub-check, recording its result or its error."""
    t0 = time.monotonic()
    try:
        out[name] = fn()
    except Exception as exc:  # noqa: BLE001 - recorded, the rest continues
        out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-1500:]}
    if isinstance(out[name], dict):
        out[name]["s"] = round(time.monotonic() - t0, 1)
    print(f"  {name}: {json.dumps(out[name])[:600]}", flush=True)


# ----------------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------------
def part_env(a, res, deadline) -> dict:
    import triton

    cap = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "capability": f"sm{cap[0]}{cap[1]}", "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "total_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1),
            "fast_accum": os.environ.get("WAN_FP8_FAST_ACCUM", "0")}


@torch.no_grad()
def part_selfcheck(a, res, deadline) -> dict:
    """Every fp8 kernel against its torch reference on the GPU."""
    from engine import fused
    from parallel.attention_fp8 import fp8_attention
    from parallel.kernels import math_attn_lse
    from parallel.usp import merge_partial

    out: dict = {}
    g = torch.Generator("cuda").manual_seed(0)
    dev = "cuda"

    def both(fn, *args, **kw):
        os.environ["WAN_FUSED"] = "1"
        x = fn(*args, **kw)
        os.environ["WAN_FUSED"] = "0"
        y = fn(*args, **kw)
        os.environ["WAN_FUSED"] = "1"
        return x, y

    x = torch.randn(1, 4096, 5120, generator=g, device=dev)
    sh, sc = 0.1 * torch.randn(1, 1, 5120, generator=g, device=dev), 0.1 * torch.randn(1, 1, 5120, generator=g, device=dev)
    y = torch.randn(1, 4096, 5120, generator=g, device=dev).bfloat16()
    gate = torch.randn(1, 1, 5120, generator=g, device=dev)
    check(out, "modulate_quant", lambda: step_diff(*both(fused.modulate, x, sh, sc, 1e-6, torch.bfloat16, quant=True)))

    def rn():
        (xa, ha), (xb, hb) = both(fused.residual_norm, x, y, gate, sh, sc, 1e-6, torch.bfloat16, True, quant=True)
        return {**step_diff(ha, hb), "residual_rel": rel(xa, xb)}

    check(out, "residual_norm_quant", rn)
    hid = (2 * torch.randn(4096, 13824, generator=g, device=dev)).bfloat16()
    check(out, "gelu_quant", lambda: step_diff(*both(fused.gelu_quant, hid)))
    check(out, "quant_rows_fp8", lambda: step_diff(*both(fused.quantize_rows_fused, y)))
    check(out, "quant_rows_int8_heads", lambda: step_diff(*both(fused.quantize_rows_fused, y.view(1, 4096, 40, 128),
                                                               int8=True)))

    def linear():
        lin = torch.nn.Linear(5120, 13824, device=dev, dtype=torch.bfloat16)
        f = Fp8Linear.from_linear(lin)
        xb = x[0].bfloat16()
        q = quantize_rows(xb)
        mm = f(q)  # torch._scaled_mm
        ref = torch.nn.functional.linear(q.dequantize(torch.float32), f.dequantized_weight(torch.float32), lin.bias.float())
        return {"scaled_mm_vs_dequantized_fp32": rel(mm, ref), "fp8_vs_bf16_linear": rel(mm, lin(xb)),
                "out_dtype": str(mm.dtype)}

    check(out, "fp8_linear_scaled_mm", linear)

    def attention(lq, lk, heads):
        q = torch.randn(1, lq, heads, 128, generator=g, device=dev).bfloat16().transpose(1, 2)
        k = (torch.randn(1, lk, heads, 128, generator=g, device=dev) + 0.3).bfloat16().transpose(1, 2)
        v = torch.randn(1, lk, heads, 128, generator=g, device=dev).bfloat16().transpose(1, 2)
        if lq * lk <= 4096 * 4096:
            ref, lse_ref = math_attn_lse(q, k, v)
        else:  # exact bf16 cuDNN as the reference at the DiT's size
            ref, lse_ref = kernel("sdpa_cudnn").attn_lse(q, k, v)
        r = {}
        for pv in (True, False):
            o, lse = fp8_attention(q, k, v, pv_fp8=pv)
            half = lk // 2
            o1, l1 = fp8_attention(q, k[:, :, :half], v[:, :, :half], pv_fp8=pv)
            o2, l2 = fp8_attention(q, k[:, :, half:], v[:, :, half:], pv_fp8=pv)
            merged, _ = merge_partial(*merge_partial(None, None, o1, l1), o2, l2)
            r["fp8" if pv else "int8_qk"] = {"rel_err": rel(o, ref), "lse_max_abs": (lse - lse_ref).abs().max().item(),
                                             "ring_merged_rel_err": rel(merged, ref)}
        return r

    check(out, "attention_2048", lambda: attention(2048, 2000, 8))
    check(out, "attention_32760_vs_cudnn", lambda: attention(32760, 32760, 40))
    return out


@torch.no_grad()
def part_micro(a, res, deadline) -> dict:
    """GEMMs bf16 vs fp8 (fast accumulation off/on), the quantizing kernels, attention kernels."""
    from engine import fused

    out: dict = {}
    g = torch.Generator("cuda").manual_seed(0)
    m = 32760
    for k_in, n_out in ((5120, 5120), (5120, 13824), (13824, 5120)):
        def gemm(k_in=k_in, n_out=n_out):
            x = torch.randn(m, k_in, generator=g, device="cuda").bfloat16()
            w = (torch.randn(n_out, k_in, generator=g, device="cuda") / math.sqrt(k_in)).bfloat16()
            flops = 2 * m * k_in * n_out
            ms_bf16 = time_cuda(lambda: torch.nn.functional.linear(x, w), 10, 3)
            q = quantize_rows(x)
            f = Fp8Linear.from_linear(torch.nn.Linear(k_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16))
            f.weight.data, f.weight_scale.data = quantize_rows(w).data, quantize_rows(w).scale.view(-1)
            sa, sb = q.scale.view(-1, 1), f.weight_scale.view(1, -1)
            r = {"bf16_ms": round(ms_bf16, 3), "bf16_tflops": round(flops / ms_bf16 / 1e9)}
            for fast in (False, True):
                ms = time_cuda(lambda fast=fast: torch._scaled_mm(q.data, f.weight.t(), scale_a=sa, scale_b=sb,
                                                                  out_dtype=torch.bfloat16, use_fast_accum=fast), 10, 3)
                r[f"fp8{'_fast' if fast else ''}_ms"] = round(ms, 3)
                r[f"fp8{'_fast' if fast else ''}_tflops"] = round(flops / ms / 1e9)
            r["quantize_input_ms"] = round(time_cuda(lambda: fused.quantize_rows_fused(x), 10, 3), 3)
            return r

        check(out, f"gemm_{m}x{k_in}x{n_out}", gemm)

    def norms():
        x = torch.randn(1, m, 5120, generator=g, device="cuda")
        sh, sc = torch.randn(1, 1, 5120, device="cuda"), torch.randn(1, 1, 5120, device="cuda")
        hid = torch.randn(1, m, 13824, generator=g, device="cuda").bfloat16()
        return {"modulate_bf16_ms": round(time_cuda(lambda: fused.modulate(x, sh, sc, 1e-6, torch.bfloat16), 10, 3), 3),
                "modulate_fp8_ms": round(time_cuda(lambda: fused.modulate(x, sh, sc, 1e-6, torch.bfloat16, quant=True), 10, 3), 3),
                "gelu_quant_ms": round(time_cuda(lambda: fused.gelu_quant(hid), 10, 3), 3),
                "gelu_bf16_torch_ms": round(time_cuda(lambda: torch.nn.functional.gelu(hid, approximate="tanh"), 10, 3), 3)}

    check(out, "norm_kernels", norms)
    for tokens in (32760, 75600):
        def attn(tokens=tokens):
            q, k, v = (torch.randn(1, tokens, 40, 128, generator=g, device="cuda").bfloat16().transpose(1, 2)
                       for _ in range(3))
            flops = 4 * tokens * tokens * 128 * 40
            r = {}
            for name in ("sdpa_cudnn", "fp8", "int8_qk"):
                fn = kernel(name).attn
                fn(q, k, v)  # compile / autotune
                ms = time_cuda(lambda fn=fn: fn(q, k, v), 5, 1)
                r[name] = {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9)}
            return r

        if left(deadline) > 60:
            check(out, f"attention_{tokens}", attn)
    return out


@torch.no_grad()
def part_forward(a, res, deadline) -> dict:
    """bf16 vs fp8 vs fp8+attn8 forwards, timed in the same run, with their error vs fp32."""
    out: dict = {"rule": a.keep, "attention_bf16": "sdpa_cudnn", "fp32_reference": "block by block, TF32 off, exact SDPA"}
    rule = parse_keep_blocks(a.keep)
    for model_name in a.models.split(","):
        if left(deadline) < 60:
            out[f"{model_name}_skipped"] = "out of time"
            continue
        cfg = DIT_CONFIGS[model_name]
        sizes = a.sizes.split(",") if model_name == "14B" else ["480p"]
        m = random_model(cfg, device="cuda", dtype=torch.bfloat16)
        set_attention(m, "sdpa_cudnn")
        feeds = {}
        for s in sizes:
            w, h = (int(v) for v in SIZES[s].split("*"))
            err_frames = a.frames if s == "480p" else a.fp32_frames_720
            feeds[s] = (inputs(cfg, w, h, a.frames), inputs(cfg, w, h, err_frames), err_frames)
        refs, outs = {}, {}
        if not a.no_fp32:
            for s, (_, err_in, _f) in feeds.items():
                if left(deadline) < 120:
                    break
                t0 = time.monotonic()
                refs[s] = fp32_reference(m, *err_in).cpu()
                out[f"{model_name}_{s}_fp32_ref_s"] = round(time.monotonic() - t0, 1)
                free()

        for mode, setup in (("bf16", None), ("fp8", "quantize"), ("fp8+attn8", "fp8"), ("fp8+int8_qk", "int8_qk")):
            try:
                if setup == "quantize":
                    apply_fp8(m, rule)
                    free()
                    out[f"{model_name}_weights_gib"] = {"fp8": param_gib(m)}
                    if model_name == "14B":
                        res["fp8_weights_gib"] = param_gib(m)
                elif setup:
                    out[f"{model_name}_attention_{setup}"] = set_attention(m, setup)
                run_mode(a, res, out, deadline, m, model_name, mode, feeds, refs, outs)
            except Exception as exc:  # noqa: BLE001
                out[f"{model_name}_{mode}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(traceback.format_exc(), flush=True)
                free()
        del m
        free()
    return out


def run_mode(a, res: dict, out: dict, deadline: float, model, model_name: str, mode: str, feeds: dict, refs: dict,
             outs: dict) -> None:
    """Time one mode at every size (median of --runs after a warm-up), its peak and its error vs fp32."""
    for s, (tin, err_in, f) in feeds.items():
        if left(deadline) < 30:
            out.setdefault("skipped", []).append(f"{model_name} {s} {mode}")
            continue
        torch.cuda.reset_peak_memory_stats()
        y = model(*tin)
        ms = time_cuda(lambda tin=tin: model(*tin), a.runs, 1)
        w, h = (int(v) for v in SIZES[s].split("*"))
        case = {"model": model_name, "size": SIZES[s], "frames": a.frames, "mode": mode, "ours_ms": round(ms, 1),
                "rel_err_vs_fp32": None, "peak_gib": peak(), "tokens": token_count(w, h, a.frames)}
        if s in refs:
            ye = y if f == a.frames else model(*err_in)
            case["rel_err_vs_fp32"] = rel(ye, refs[s].cuda())
            case["rel_err_frames"] = f
            outs[(s, mode)] = ye.float().cpu()
            if (s, "bf16") in outs and mode != "bf16":
                case["rel_err_vs_bf16"] = rel(outs[(s, mode)], outs[(s, "bf16")])
        bf = [c for c in res["cases"] if c["model"] == model_name and c["size"] == SIZES[s] and c["mode"] == "bf16"]
        if bf and mode != "bf16":
            case["speedup_vs_bf16"] = round(bf[0]["ours_ms"] / ms, 3)
        print("  case", json.dumps(case), flush=True)
        (res["cases"] if mode in ("bf16", "fp8", "fp8+attn8") else res["extra_cases"]).append(case)
        del y
        free()


def build_fp8_direct(cfg, rule: Fp8Rule, seed: int = 0):
    """A DiT built with fp8 layers from the start, random values made and quantized one tensor at a time on the
    GPU (the bf16 model never exists: the 24 GB case)."""
    from engine.fp8 import quantize_weight
    from engine.loading import build_dit

    m = build_dit(cfg, torch.bfloat16)
    apply_fp8(m, rule)
    m = m.to_empty(device="cuda")
    g = torch.Generator("cuda").manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, Fp8Linear):
                w = torch.randn(mod.out_features, mod.in_features, generator=g, device="cuda") / math.sqrt(mod.in_features)
                mod.weight.data, mod.weight_scale.data = quantize_weight(w)
                del w
        for name, p in m.named_parameters():
            if name.endswith(("weight_scale",)) or p.dtype == torch.float8_e4m3fn:
                continue
            fan = math.prod(p.shape[1:]) if p.dim() >= 2 and "modulation" not in name else 1
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + (0.1 if fan == 1 else 1 / math.sqrt(fan)) * torch.randn(p.shape, generator=g, device="cuda"))
    return m.eval().requires_grad_(False)


def random_vae(dtype=torch.bfloat16):
    from engine.tiny import random_value
    from engine.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(dim=96)
    vae = vae.to_empty(device="cuda")
    g = torch.Generator("cuda").manual_seed(3)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.copy_(random_value(name, tuple(p.shape), g, "cuda"))
    return vae.to(dtype).eval().requires_grad_(False)


@torch.no_grad()
def part_mem24(a, res, deadline) -> dict:
    """The 14B with --quantize fp8 at 832×480×81 under a 22 GiB allocator cap (a 24 GB card), no block swap: one
    forward (cuDNN and fp8 attention) and the VAE decode of its output. T5 would run on the CPU (not here)."""
    free()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = a.cap_gib * GIB
    torch.cuda.set_per_process_memory_fraction(cap / total)
    out: dict = {"cap_gib": a.cap_gib, "rule": a.keep}
    try:
        torch.cuda.reset_peak_memory_stats()
        m = build_fp8_direct(DIT_CONFIGS["14B"], parse_keep_blocks(a.keep))
        out["weights_gib"] = param_gib(m)
        out["after_build_peak_gib"] = peak()
        cfg = DIT_CONFIGS["14B"]
        tin = inputs(cfg, 832, 480, 81)
        for attn in ("sdpa_cudnn", "fp8"):
            def fwd(attn=attn, m=m):
                set_attention(m, attn)
                torch.cuda.reset_peak_memory_stats()
                t0 = time.monotonic()
                y = m(*tin)
                torch.cuda.synchronize()
                r = {"ok": True, "peak_gib": peak(), "s": round(time.monotonic() - t0, 2)}
                res.setdefault("_mem24_latent", y.float().cpu())
                return r

            check(out, f"forward_{attn}", fwd)
        del m
        free()

        def decode():
            vae = random_vae()
            z = res.pop("_mem24_latent", torch.randn(1, 16, 21, 60, 104))[:1].cuda().bfloat16()
            torch.cuda.reset_peak_memory_stats()
            vae.decode(z)
            torch.cuda.synchronize()
            return {"ok": True, "peak_gib": peak()}

        check(out, "vae_decode", decode)
    finally:
        res.pop("_mem24_latent", None)
        free()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return out


@torch.no_grad()
def part_sensitivity(a, res, deadline) -> dict:
    """Which blocks to keep in bf16: each block quantized alone (error vs the bf16 output), then whole rules
    (error vs fp32), on the 14B at 832×480×--sens-frames."""
    cfg = DIT_CONFIGS["14B"]
    m = random_model(cfg, device="cuda", dtype=torch.bfloat16)
    set_attention(m, "sdpa_cudnn")
    tin = inputs(cfg, 832, 480, a.sens_frames)
    ref16 = m(*tin)
    out: dict = {"frames": a.sens_frames, "per_block_rel_err_vs_bf16": []}
    picked = range(len(m.blocks)) if a.sens_blocks == "all" else [int(b) for b in a.sens_blocks.split(",")]
    out["blocks"] = list(picked)
    for i in picked:
        if left(deadline) < 90:
            out["stopped_at_block"] = i
            break
        saved = m.blocks[i]
        m.blocks[i] = copy.deepcopy(saved)
        holder = torch.nn.Module()
        holder.blocks = torch.nn.ModuleList([m.blocks[i]])
        apply_fp8(holder, Fp8Rule(0, 0))
        out["per_block_rel_err_vs_bf16"].append(rel(m(*tin), ref16))
        m.blocks[i] = saved
        free()
    ref32 = fp32_reference(m, *tin) if left(deadline) > 60 else None
    if ref32 is not None:
        out["bf16_rel_err_vs_fp32"] = rel(ref16, ref32)
    out["rules"] = {}
    for first, last in ((0, 0), (1, 1), (2, 2), (4, 4), (10, 10)):
        if left(deadline) < 30 or ref32 is None:
            break
        q = copy.deepcopy(m)
        apply_fp8(q, Fp8Rule(first, last))
        out["rules"][f"{first},{last}"] = {"rel_err_vs_fp32": rel(q(*tin), ref32), "weights_gib": param_gib(q)}
        del q
        free()
    return out


def sample_latents(model, steps: int, shift: float, x0, ctx, ctx_u, clock: Clock, guide: float = 5.0) -> torch.Tensor:
    """A UniPC run with CFG from x0 (the clock tells the attention which step runs)."""
    from engine.scheduler import make_scheduler

    sched = make_scheduler("unipc", steps, shift)
    x = x0.clone()
    clock.steps = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps.tolist()):
        clock.step = i
        tt = torch.full((1,), float(t), device="cuda")
        v_c, v_u = model(x, tt, ctx), model(x, tt, ctx_u)
        x = sched.step((v_u + guide * (v_c - v_u)).float(), i, x)
    clock.steps = 0
    return x.float().cpu()


@torch.no_grad()
def part_latents(a, res, deadline) -> dict:
    """50-step UniPC runs with CFG from the same seed: final latents of fp8 and fp8+attn8 (exact on the first and
    last --exact-steps steps) against the bf16 run; the 1.3B at 832×480×81, the 14B at --latent-frames-14b."""
    from parallel.attention_fp8 import with_exact_steps

    out: dict = {"steps": a.steps, "exact_steps": a.exact_steps}
    for model_name, frames, shift in (("1.3B", 81, 8.0), ("14B", a.latent_frames_14b, 5.0)):
        if left(deadline) < 120:
            out[f"{model_name}_skipped"] = "out of time"
            continue
        cfg = DIT_CONFIGS[model_name]
        m = random_model(cfg, device="cuda", dtype=torch.bfloat16)
        set_attention(m, "sdpa_cudnn")
        x0, _, ctx = inputs(cfg, 832, 480, frames, seed=7)
        _, _, ctx_u = inputs(cfg, 832, 480, frames, seed=8)
        clock = Clock()

        def sample(model, x0=x0, ctx=ctx, ctx_u=ctx_u, shift=shift, clock=clock) -> torch.Tensor:
            return sample_latents(model, a.steps, shift, x0, ctx, ctx_u, clock)

        r: dict = {"frames": frames}
        t0 = time.monotonic()
        ref = sample(m)
        r["bf16_s"] = round(time.monotonic() - t0, 1)
        apply_fp8(m, parse_keep_blocks(a.keep))
        free()
        for mode, attn in (("fp8", None), ("fp8+attn8", "fp8")):
            if left(deadline) < 60:
                r[f"{mode}_skipped"] = "out of time"
                continue
            try:
                if attn:
                    from parallel.apply import apply_local_attention

                    apply_local_attention(m, with_exact_steps(kernel(attn), kernel("sdpa_cudnn"), a.exact_steps, clock))
                t0 = time.monotonic()
                lat = sample(m)
                r[mode] = {"rel_err_vs_bf16": rel(lat, ref), "s": round(time.monotonic() - t0, 1)}
            except Exception as exc:  # noqa: BLE001
                r[mode] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"  latents {model_name} {mode}: {r.get(mode)}", flush=True)
        out[model_name] = r
        del m
        free()
    return out


@torch.no_grad()
def part_vae(a, res, deadline) -> dict:
    """The VAE decode of a 480p×81 latent (bf16): the current code against cuDNN autotuning (benchmark=True),
    channels-last-3d and both, output difference vs the current code; the top kernels of one decode."""
    vae = random_vae()
    z = torch.randn(1, 16, 21, 60, 104, device="cuda").bfloat16()
    out: dict = {}
    bench0 = torch.backends.cudnn.benchmark
    base = None
    for name, bench, cl in (("current", False, False), ("cudnn_benchmark", True, False),
                            ("channels_last_3d", False, True), ("benchmark+channels_last_3d", True, True)):
        if left(deadline) < 40:
            out[name] = "skipped: out of time"
            continue

        def variant(bench=bench, cl=cl):
            torch.backends.cudnn.benchmark = bench
            fmt = torch.channels_last_3d if cl else torch.contiguous_format
            for mod in vae.modules():
                if isinstance(mod, torch.nn.Conv3d):
                    mod.weight.data = mod.weight.data.contiguous(memory_format=fmt)
            zz = z.contiguous(memory_format=fmt)
            y = vae.decode(zz)
            ms = time_cuda(lambda: vae.decode(zz), 2, 1)
            r = {"ms": round(ms, 1)}
            nonlocal base
            if base is None:
                base = (y.float().cpu(), ms)
            else:
                r["rel_diff_vs_current"] = rel(y.float().cpu(), base[0])
                r["speedup"] = round(base[1] / ms, 3)
            return r

        check(out, name, variant)
    torch.backends.cudnn.benchmark = bench0
    if left(deadline) > 30:
        def prof():
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as p:
                vae.decode(z)
                torch.cuda.synchronize()
            table = p.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=80)
            print(table, flush=True)
            return {"top_kernels": table.splitlines()[:26]}

        check(out, "profile", prof)
    return out


PARTS = {"env": part_env, "selfcheck": part_selfcheck, "mem24": part_mem24, "micro": part_micro,
         "forward": part_forward, "sensitivity": part_sensitivity, "latents": part_latents, "vae": part_vae}
MIN_S = {"selfcheck": 20, "mem24": 60, "micro": 40, "forward": 90, "sensitivity": 90, "latents": 120, "vae": 40}


def merge(paths: list[str], out: str) -> None:
    """Several runs' JSON files into one (cases appended, parts by name)."""
    res: dict = {"cases": [], "parts": {}, "errors": {}}
    for p in paths:
        r = json.loads(Path(p).read_text())
        for k in ("gpu", "torch", "fp8_weights_gib"):
            if r.get(k) is not None:
                res[k] = r[k]
        res["cases"] += r.get("cases", [])
        res.setdefault("extra_cases", []).extend(r.get("extra_cases", []))
        res["parts"].update(r.get("parts", {}))
        res["errors"].update(r.get("errors", {}))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="env,selfcheck,mem24,micro,forward")
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting parts/cases after this many seconds")
    ap.add_argument("--out", default=None, help="default benchmarks/results/fp8_<gpu>.json")
    ap.add_argument("--models", default="14B,1.3B")
    ap.add_argument("--sizes", default="480p,720p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", default="1,1", help="fp8 rule: FIRST,LAST blocks kept in bf16")
    ap.add_argument("--no-fp32", action="store_true")
    ap.add_argument("--fp32-frames-720", type=int, default=21)
    ap.add_argument("--cap-gib", type=float, default=22.0)
    ap.add_argument("--sens-frames", type=int, default=17)
    ap.add_argument("--sens-blocks", default="all", help="sensitivity: the blocks quantized alone ('all' or a list)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--exact-steps", type=int, default=5)
    ap.add_argument("--latent-frames-14b", type=int, default=17)
    ap.add_argument("--merge", nargs="+", default=None, help="merge these result files into --out and exit")
    a = ap.parse_args()
    if a.merge:
        merge(a.merge, a.out or "benchmarks/results/fp8_merged.json")
        return
    t0 = time.monotonic()
    deadline = t0 + a.budget_s
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    short = gpu.lower().replace("nvidia ", "").split()[0]
    path = Path(a.out or f"benchmarks/results/fp8_{short}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"gpu": gpu, "torch": torch.__version__, "fp8_weights_gib": None, "cases": [], "extra_cases": [],
                 "parts": {}, "errors": {}, "skipped": []}
    for name in a.parts.split(","):
        if left(deadline) < MIN_S.get(name, 0):
            res["skipped"].append(name)
            print(f"== {name}: skipped ({left(deadline):.0f} s left)", flush=True)
            continue
        print(f"== {name} ({left(deadline):.0f} s left)", flush=True)
        ts = time.monotonic()
        try:
            res["parts"][name] = PARTS[name](a, res, deadline)
        except Exception as exc:  # noqa: BLE001 - recorded; the next part runs
            res["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(traceback.format_exc(), flush=True)
        finally:
            free()
        res["parts"].setdefault(name, {})
        if isinstance(res["parts"][name], dict):
            res["parts"][name]["part_s"] = round(time.monotonic() - ts, 1)
        res.pop("_mem24_latent", None)
        path.write_text(json.dumps(res, indent=1, default=str))
    print(f"total {time.monotonic() - t0:.0f} s; wrote {path}", flush=True)
    for c in res["cases"] + res["extra_cases"]:
        print(f"{c['model']:5} {c['size']:9} {c['mode']:12} {c['ours_ms']:9.1f} ms  x{c.get('speedup_vs_bf16', 1):.3f}  "
              f"err {c.get('rel_err_vs_fp32')}  peak {c['peak_gib']} GiB", flush=True)


if __name__ == "__main__":
    main()
