"""One DiT forward, ours vs diffusers' WanTransformer3DModel with the SAME weights, in one process.

Random bf16 weights are made on the GPU in our model; diffusers' model is built on the meta device and
given the very same tensors (its converter renames, `assign=True` aliases them), so both fit in memory.
Times are CUDA-event medians after warm-up; TFLOP/s use the model-FLOPs formula below.

    python benchmarks/bench_dit.py --models 14B --sizes 832*480 --frames 81 --runs 5 [--compile]
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


@torch.no_grad()
def random_model(cfg: DiTConfig, seed: int = 0, device: str = "cuda"):
    """Our DiT with random weights made directly on the device (bf16 on the GPU)."""
    m = build_dit(cfg).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in m.named_parameters():
        fan = math.prod(p.shape[1:]) if p.dim() >= 2 and "modulation" not in name else 1
        scale = 0.1 if fan == 1 else 1 / math.sqrt(fan)
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(base + scale * torch.randn(p.shape, generator=g, device=device))
    return m.to(torch.bfloat16 if device == "cuda" else torch.float32).eval().requires_grad_(False)


def diffusers_alias(ours, cfg: DiTConfig):
    """diffusers' model sharing our weight tensors (no extra memory)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with torch.device("meta"):
        ref = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        )
    sd = convert_wan_transformer_to_diffusers(dict(ours.state_dict()))
    ref.load_state_dict(sd, strict=True, assign=True)
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    ref.rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024).to("cuda")  # its tables are buffers: rebuild off meta
    leftover = [n for n, b in ref.named_buffers() if b.is_meta] + [n for n, p in ref.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"diffusers tensors left on meta: {leftover[:3]}")
    return ref.to("cuda").eval().requires_grad_(False)


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
    """The same (bf16-rounded) weights evaluated in float32 without TF32, one block at a time
    (an fp32 copy of each block in turn), with the default exact SDPA: the correctness reference."""
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
    try:
        for mod in small:
            mod.float()
        model.block_runner = runner
        return model(x, t, ctx)
    finally:
        model.block_runner = saved
        for mod in small:
            mod.to(torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = tf32


@torch.no_grad()
def bench_case(model_name: str, size: str, frames: int, runs: int, compile_: bool, with_diffusers: bool,
               peak_tflops: float, fp32_ref: bool = False, profile: bool = False, compile_mode: str | None = None,
               attention: str | None = None):
    cfg = DIT_CONFIGS[model_name]
    w, h = (int(v) for v in size.split("*"))
    ours = random_model(cfg)
    kernel_name = "sdpa (torch's choice: cuDNN on Hopper)"
    if attention:  # the server's kernels (parallel/kernels.py), as apply_layout sets them on one GPU
        from parallel.apply import apply_local_attention
        from parallel.kernels import get_kernel

        kernel = get_kernel(attention, torch.device("cuda"))
        kernel_name = kernel.name
        apply_local_attention(ours, kernel)
    x, t, ctx = inputs(cfg, w, h, frames)
    tokens = token_count(w, h, frames)
    flops = model_flops(cfg, tokens)
    case = {"model": model_name, "size": size, "frames": frames, "tokens": tokens, "attention": kernel_name,
            "compile": compile_, "model_tflop": round(flops / 1e12, 1)}
    if compile_:
        from parallel.speed import apply_compile

        apply_compile(ours, "inductor", compile_mode)
        case["compile_mode"] = compile_mode or "default"
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = ours(x, t, ctx)
    torch.cuda.synchronize()
    case["ours_first_call_s"] = round(time.perf_counter() - t0, 1)
    ms = time_cuda(lambda: ours(x, t, ctx), runs)
    case.update(ours_ms=round(ms, 1), ours_tflops=round(flops / ms / 1e9, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                ours_pct_of_matmul_peak=round(100 * flops / ms / 1e9 / peak_tflops, 1))
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            ours(x, t, ctx)
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    if with_diffusers:
        ref = diffusers_alias(ours, cfg)
        if compile_:
            ref.compile_repeated_blocks(fullgraph=True)
        torch.cuda.reset_peak_memory_stats()
        xb, cb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)  # diffusers runs in the weights' dtype
        out_ref = ref(xb, t, cb, return_dict=False)[0]
        dms = time_cuda(lambda: ref(xb, t, cb, return_dict=False)[0], runs)
        case.update(diffusers_ms=round(dms, 1), diffusers_tflops=round(flops / dms / 1e9, 1),
                    diffusers_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    ratio_diffusers_over_ours=round(dms / ms, 3), rel_err_vs_diffusers=rel(out, out_ref))
    if fp32_ref:
        ref32 = fp32_reference(ours, x, t, ctx)
        case["rel_err_vs_fp32"] = rel(out, ref32)
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
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one forward of ours")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for ours (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--attention", default=None, help="our attention kernel as the server picks it (--attention of "
                                                       "app.py: auto, sdpa_cudnn, flash_attn_4, ...); default: plain SDPA")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    peak = matmul_peak()
    print(f"GPU {gpu}, torch {torch.__version__}, bf16 matmul 8192^3: {peak:.0f} TFLOP/s", flush=True)
    cases = []
    for m in a.models.split(","):
        for s in a.sizes.split(","):
            for comp in ([False, True] if a.compile else [False]):
                c = bench_case(m, s, a.frames, a.runs, comp, not a.no_diffusers, peak, a.fp32_ref and not comp,
                               a.profile, a.compile_mode, a.attention)
                print(json.dumps(c), flush=True)
                cases.append(c)
                torch._dynamo.reset()  # compiled code holds the models: let them go before the next case
                gc.collect()
                torch.cuda.empty_cache()
    res = {"gpu": gpu, "torch": torch.__version__, "matmul_tflops": round(peak, 1), "cases": cases}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"{'model':6} {'size':9} {'cmp':4} {'ours ms':>9} {'diff ms':>9} {'ratio':>6} {'TFLOP/s':>8} {'peak GiB':>8} {'rel err':>9}")
    for c in cases:
        print(f"{c['model']:6} {c['size']:9} {str(c['compile'])[0]:4} {c['ours_ms']:9.1f} {c.get('diffusers_ms', 0):9.1f} "
              f"{c.get('ratio_diffusers_over_ours', 0):6.3f} {c['ours_tflops']:8.1f} {c['peak_gib']:8.2f} {c.get('rel_err_vs_diffusers', 0):9.2e}")


if __name__ == "__main__":
    main()
