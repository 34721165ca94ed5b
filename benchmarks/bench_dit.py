"""One DiT forward, ours vs diffusers' WanTransformer3DModel with the SAME weights, in one process.

Random weights are made on the GPU in our model (fp32 values, then bf16 except `WanDiT.keep_fp32`, as the
loader does); diffusers' model is built on the meta device and given the very same tensors (its converter
renames, `assign=True` aliases them; only the few it keeps in bf16 where ours are fp32 are copied), so both
fit in memory. Times are CUDA-event medians after warm-up; TFLOP/s use the model-FLOPs formula below.

    python benchmarks/bench_dit.py --models 14B --sizes 832*480 --frames 81 --runs 5 [--compile]
    python benchmarks/bench_dit.py --fp32-ref --precision-compare   # error vs fp32: fp32 small tensors vs all bf16
    python benchmarks/bench_dit.py --device cpu --models tiny --sizes 64*64 --frames 5 --runs 1 --fp32-ref \
        --precision-compare   # smoke run on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import DIT_CONFIGS, DiTConfig, token_count  # noqa: E402
from engine.loading import build_dit  # noqa: E402


def model_flops(cfg: DiTConfig, tokens: int, text_len: int = 512) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): per layer
    self-attn projections 4·2·L·d², attention 2·2·L²·d, cross-attn q/o 2·2·L·d², k/v 2·2·Lc·d²,
    cross attention 2·2·L·Lc·d, FFN 2·2·L·d·ffn; plus the text embedding and head (small)."""
    d, f, L, Lc = cfg.dim, cfg.ffn_dim, tokens, text_len
    per_layer = 8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * Lc * d * d + 4 * L * Lc * d + 4 * L * d * f
    return cfg.num_layers * per_layer + 2 * Lc * (cfg.text_dim * d + d * d) + 2 * L * d * 64


def matmul_peak(n: int = 8192, runs: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, runs, warmup=3)
    return 2 * n**3 / (ms / 1e3) / 1e12


def time_cuda(fn, runs: int, warmup: int = 1) -> float:
    """Median milliseconds over `runs` after `warmup` calls, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def time_cpu(fn, runs: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds over `runs` after `warmup` calls (the CPU smoke mode)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.no_grad()
def random_model(cfg: DiTConfig, seed: int = 0, device: str = "cuda", dtype: torch.dtype | None = None,
                 keep_fp32: bool = True):
    """Our DiT with random weights made directly on the device, each tensor in its run dtype as the loader gives
    it (`dtype`, default bf16 on the GPU and fp32 on the CPU; the `WanDiT.keep_fp32` tensors stay fp32), from
    fp32 values drawn tensor by tensor. keep_fp32=False: every tensor in `dtype` (the old rule), same values."""
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    m = build_dit(cfg, dtype) if keep_fp32 else build_dit(cfg).to(dtype)  # meta: no memory yet
    m = m.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in m.named_parameters():
        fan = math.prod(p.shape[1:]) if p.dim() >= 2 and "modulation" not in name else 1
        scale = 0.1 if fan == 1 else 1 / math.sqrt(fan)
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(base + scale * torch.randn(p.shape, generator=g, device=device))  # rounded to p's dtype
    return m.eval().requires_grad_(False)


# diffusers' own float32 modules (WanTransformer3DModel._keep_in_fp32_modules); its forward feeds the other
# layers activations in the weights' dtype, so those get our tensors in the run dtype
DIFFUSERS_FP32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def diffusers_alias(ours, cfg: DiTConfig, device: str = "cuda"):
    """diffusers' model sharing our weight tensors (no extra memory but the few it keeps in ours' run dtype)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with torch.device("meta"):
        ref = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        )
    sd = convert_wan_transformer_to_diffusers(dict(ours.state_dict()))
    for name, v in sd.items():
        fp32 = any(part in DIFFUSERS_FP32 for part in name.split("."))
        sd[name] = v.to(torch.float32 if fp32 else ours.dtype)  # the same tensor where the dtype agrees
    ref.load_state_dict(sd, strict=True, assign=True)
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    ref.rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024).to(device)  # its tables are buffers: rebuild off meta
    leftover = [n for n, b in ref.named_buffers() if b.is_meta] + [n for n, p in ref.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"diffusers tensors left on meta: {leftover[:3]}")
    return ref.to(device).eval().requires_grad_(False)


def inputs(cfg: DiTConfig, width: int, height: int, frames: int, seed: int = 1, device: str | torch.device = "cuda"):
    g = torch.Generator(device).manual_seed(seed)
    f = (frames - 1) // 4 + 1
    x = torch.randn(1, 16, f, height // 8, width // 8, generator=g, device=device)
    t = torch.tensor([700.0], device=device)
    ctx = torch.zeros(1, 512, cfg.text_dim, device=device)
    ctx[:, :120] = torch.randn(1, 120, cfg.text_dim, generator=g, device=device)
    return x, t, ctx


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def fp32_reference(model, x, t, ctx):
    """The same weights (bf16-rounded where the model holds them in bf16) evaluated in float32 without TF32,
    one block at a time (an fp32 copy of each block in turn), with the default exact SDPA: the correctness
    reference."""
    import copy

    from engine.attention import dense_attention

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    small = [model.patch_embedding, model.text_embedding, model.time_embedding, model.time_projection, model.head]

    def runner(m, h, e, e0, c, rope):
        for block in m.blocks:
            b32 = copy.deepcopy(block).float()
            b32.self_attn.attn_fn = b32.cross_attn.attn_fn = dense_attention
            h = b32(h, e0, c, rope)
            del b32
        return h

    saved = model.block_runner
    dtypes = [(p, p.dtype) for mod in small for p in mod.parameters()]
    try:
        for mod in small:
            mod.float()
        model.block_runner = runner
        return model(x, t, ctx)
    finally:
        model.block_runner = saved
        for p, dtype in dtypes:  # each back to its own dtype (the keep_fp32 ones stay fp32; bf16→fp32 is exact)
            p.data = p.data.to(dtype)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def with_attention(model, attention: str | None, device: str) -> str:
    """Point the model's attention at the server's kernel (parallel/kernels.py), as apply_layout does on one GPU."""
    if not attention:
        return "sdpa (torch's choice: cuDNN on Hopper)" if device == "cuda" else "sdpa"
    from parallel.apply import apply_local_attention
    from parallel.kernels import get_kernel

    kernel = get_kernel(attention, torch.device(device))
    apply_local_attention(model, kernel)
    return kernel.name


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def bench_case(model_name: str, size: str, frames: int, runs: int, compile_: bool, with_diffusers: bool,
               peak_tflops: float | None, fp32_ref: bool = False, profile: bool = False, compile_mode: str | None = None,
               attention: str | None = None, precision_compare: bool = False, device: str = "cuda"):
    cfg = DIT_CONFIGS[model_name]
    w, h = (int(v) for v in size.split("*"))
    dtype = torch.bfloat16  # the GPU run dtype, also on the CPU so that the errors mean the same
    timer = time_cuda if device == "cuda" else time_cpu
    ours = random_model(cfg, device=device, dtype=dtype)
    kernel_name = with_attention(ours, attention, device)
    x, t, ctx = inputs(cfg, w, h, frames, device=device)
    tokens = token_count(w, h, frames)
    flops = model_flops(cfg, tokens)
    case = {"model": model_name, "size": size, "frames": frames, "tokens": tokens, "attention": kernel_name,
            "compile": compile_, "model_tflop": round(flops / 1e12, 1)}
    if compile_:
        from parallel.speed import apply_compile

        apply_compile(ours, "inductor", compile_mode)
        case["compile_mode"] = compile_mode or "default"
    reset_peak(device)
    t0 = time.perf_counter()
    out = ours(x, t, ctx)
    sync(device)
    case["ours_first_call_s"] = round(time.perf_counter() - t0, 1)
    ms = timer(lambda: ours(x, t, ctx), runs)
    case.update(ours_ms=round(ms, 1), ours_tflops=round(flops / ms / 1e9, 1), peak_gib=peak_gib(device),
                ours_pct_of_matmul_peak=round(100 * flops / ms / 1e9 / peak_tflops, 1) if peak_tflops else None)
    if profile and device == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            ours(x, t, ctx)
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    if with_diffusers:
        ref = diffusers_alias(ours, cfg, device)
        if compile_:
            ref.compile_repeated_blocks(fullgraph=True)
        reset_peak(device)
        xb, cb = x.to(dtype), ctx.to(dtype)  # diffusers runs in the weights' dtype
        out_ref = ref(xb, t, cb, return_dict=False)[0]
        dms = timer(lambda: ref(xb, t, cb, return_dict=False)[0], runs)
        case.update(diffusers_ms=round(dms, 1), diffusers_tflops=round(flops / dms / 1e9, 1),
                    diffusers_peak_gib=peak_gib(device), ratio_diffusers_over_ours=round(dms / ms, 3),
                    rel_err_vs_diffusers=rel(out, out_ref))
        del ref
    out_old = None
    if precision_compare:  # the old rule: the same fp32 values with EVERY tensor cast to bf16
        old = random_model(cfg, device=device, dtype=dtype, keep_fp32=False)
        with_attention(old, attention, device)
        out_old = old(x, t, ctx)
        case["all_bf16_ms"] = round(timer(lambda: old(x, t, ctx), runs), 1)
        case["rel_err_fp32_small_vs_all_bf16"] = rel(out, out_old)
        del old
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if fp32_ref:
        # fp32 evaluation of ours' weights: bf16-rounded big matrices (as both rules hold them), the keep_fp32
        # tensors unrounded (the checkpoint's values); the all-bf16 model differs from it by those tensors' rounding
        ref32 = fp32_reference(ours, x, t, ctx)
        case["rel_err_vs_fp32"] = rel(out, ref32)
        if out_old is not None:
            case["all_bf16_rel_err_vs_fp32"] = rel(out_old, ref32)
        if with_diffusers:
            case["diffusers_rel_err_vs_fp32"] = rel(out_ref, ref32)
    return case


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="14B")
    ap.add_argument("--sizes", default="832*480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fp32-ref", action="store_true", help="also compare with a float32 evaluation (slow)")
    ap.add_argument("--precision-compare", action="store_true",
                    help="also build the model with the old rule (every tensor bf16, no fp32 small tensors) from the "
                         "same values: its time, its difference from ours and (with --fp32-ref) its error vs fp32 "
                         "(uncompiled cases only)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one forward of ours")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for ours (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--attention", default=None, help="our attention kernel as the server picks it (--attention of "
                                                       "app.py: auto, sdpa_cudnn, flash_attn_4, ...); default: plain SDPA")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke run (e.g. --models tiny --sizes 64*64 --frames 5 --runs 1), bf16 weights")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if a.device == "cuda":
        gpu = torch.cuda.get_device_name()
        peak = matmul_peak()
        print(f"GPU {gpu}, torch {torch.__version__}, bf16 matmul 8192^3: {peak:.0f} TFLOP/s", flush=True)
    else:
        gpu, peak = "cpu", None
        print(f"CPU smoke run, torch {torch.__version__}", flush=True)
    cases = []
    for m in a.models.split(","):
        for s in a.sizes.split(","):
            for comp in ([False, True] if a.compile else [False]):
                c = bench_case(m, s, a.frames, a.runs, comp, not a.no_diffusers, peak, a.fp32_ref and not comp,
                               a.profile, a.compile_mode, a.attention, a.precision_compare and not comp, a.device)
                print(json.dumps(c), flush=True)
                cases.append(c)
                torch._dynamo.reset()  # compiled code holds the models: let them go before the next case
                gc.collect()
                if a.device == "cuda":
                    torch.cuda.empty_cache()
    res = {"gpu": gpu, "torch": torch.__version__, "matmul_tflops": round(peak, 1) if peak else None, "cases": cases}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"{'model':6} {'size':9} {'cmp':4} {'ours ms':>9} {'diff ms':>9} {'ratio':>6} {'TFLOP/s':>8} {'peak GiB':>8} "
          f"{'rel err':>9} {'vs fp32':>9} {'bf16 all':>9}")
    for c in cases:
        print(f"{c['model']:6} {c['size']:9} {str(c['compile'])[0]:4} {c['ours_ms']:9.1f} {c.get('diffusers_ms', 0):9.1f} "
              f"{c.get('ratio_diffusers_over_ours', 0):6.3f} {c['ours_tflops']:8.1f} {c['peak_gib'] or 0:8.2f} "
              f"{c.get('rel_err_vs_diffusers', 0):9.2e} {c.get('rel_err_vs_fp32', 0):9.2e} "
              f"{c.get('all_bf16_rel_err_vs_fp32', 0):9.2e}")


if __name__ == "__main__":
    main()
