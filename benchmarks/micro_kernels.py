"""Kernel-level timings behind the DiT forward (14B shapes): projection GEMMs one by one vs fused, and the
attention backends for self- and cross-attention. Tells where a forward's time can still come from.

    python benchmarks/micro_kernels.py [--tokens 32760,75600]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_dit import matmul_peak, time_cuda  # noqa: E402

D, FFN, HEADS, CTX = 5120, 13824, 40, 512


def gemm_rows(tokens: int) -> list[tuple[str, float, float]]:
    """(name, ms, TFLOP/s) of the block's GEMMs at `tokens` rows."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, D, device=dev, dtype=dt)
    w = torch.randn(3 * D, D, device=dev, dtype=dt) * 0.02
    b = torch.randn(3 * D, device=dev, dtype=dt)
    w1, b1 = torch.randn(FFN, D, device=dev, dtype=dt) * 0.02, torch.randn(FFN, device=dev, dtype=dt)
    w2, b2 = torch.randn(D, FFN, device=dev, dtype=dt) * 0.02, torch.randn(D, device=dev, dtype=dt)
    h = torch.randn(tokens, FFN, device=dev, dtype=dt)
    ws = [w[i * D:(i + 1) * D].contiguous() for i in range(3)]
    bs = [b[i * D:(i + 1) * D].contiguous() for i in range(3)]
    f1 = 2 * tokens * D * D
    cases = [
        ("linear 5120->5120 (one of q/k/v/o)", lambda: F.linear(x, ws[0], bs[0]), f1),
        ("q, k, v as three GEMMs", lambda: [F.linear(x, ws[i], bs[i]) for i in range(3)], 3 * f1),
        ("q|k|v as one 5120->15360 GEMM", lambda: F.linear(x, w, b), 3 * f1),
        ("one GEMM + split + v.contiguous()", lambda: F.linear(x, w, b).split(D, -1)[2].contiguous(), 3 * f1),
        ("fc1 + GELU epilogue 5120->13824", lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True),
         2 * tokens * D * FFN),
        ("fc2 13824->5120", lambda: F.linear(h, w2, b2), 2 * tokens * D * FFN),
    ]
    out = []
    for name, fn, flop in cases:
        ms = time_cuda(fn, runs=10, warmup=3)
        out.append((name, ms, flop / ms / 1e9))
    return out


def attention_rows(tokens: int) -> list[tuple[str, float, float]]:
    """(name, ms, TFLOP/s) of self- and cross-attention under each SDPA backend; the strided v of a fused
    QKV GEMM too."""
    dev, dt = "cuda", torch.bfloat16
    hd = D // HEADS
    q = torch.randn(1, HEADS, tokens, hd, device=dev, dtype=dt)
    k = torch.randn(1, HEADS, tokens, hd, device=dev, dtype=dt)
    qkv = torch.randn(1, tokens, 3, HEADS, hd, device=dev, dtype=dt)
    v_strided = qkv[:, :, 2].transpose(1, 2)  # (1, heads, L, hd) with row stride 3·D
    kc = torch.randn(1, HEADS, CTX, hd, device=dev, dtype=dt)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    out = []
    ql = torch.randn(1, tokens, HEADS, hd, device=dev, dtype=dt).transpose(1, 2)  # the model's (B, L, H, hd) views
    kl = torch.randn(1, tokens, HEADS, hd, device=dev, dtype=dt).transpose(1, 2)
    for be in (SDPBackend.CUDNN_ATTENTION,):
        with sdpa_kernel([be]):
            o = F.scaled_dot_product_attention(ql, kl, kl)
            ms = time_cuda(lambda: F.scaled_dot_product_attention(ql, kl, kl), runs=5, warmup=2)
        out.append((f"self cudnn, (B,L,H,hd) views; out strides {tuple(o.stride())}", ms, 4 * tokens * tokens * D / ms / 1e9))
    for label, kk, vv, lk in [("self", k, k, tokens), ("self, strided v", k, v_strided, tokens), ("cross (512 keys)", kc, kc, CTX)]:
        flop = 4 * tokens * lk * D
        for name, be in backends.items():
            try:
                with sdpa_kernel([be]):
                    ms = time_cuda(lambda kk=kk, vv=vv: F.scaled_dot_product_attention(q, kk, vv), runs=5, warmup=2)
                out.append((f"{label} {name}", ms, flop / ms / 1e9))
            except RuntimeError as exc:
                out.append((f"{label} {name}: {str(exc).splitlines()[0][:60]}", float("nan"), float("nan")))
    return out


def residual_rows(tokens: int) -> list[tuple[str, float, float]]:
    """o-projection + gated fp32 residual: bf16 GEMM then one elementwise pass, vs the gate folded into the
    weight and the residual added in the GEMM epilogue (addmm with a float32 C and out_dtype=float32)."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, D, device=dev)
    h = torch.randn(tokens, D, device=dev, dtype=dt)
    w, b = torch.randn(D, D, device=dev, dtype=dt) * 0.02, torch.randn(D, device=dev, dtype=dt)
    gate = torch.randn(D, device=dev)

    def two_pass():
        return torch.addcmul(x, F.linear(h, w, b), gate)

    def epilogue():
        wg = (w.float() * gate[:, None]).to(dt)  # the gate folded into the weight (once per step)
        return torch.addmm(x + (b.float() * gate), h, wg.t(), out_dtype=torch.float32)

    def epilogue_gemm_only():
        return torch.addmm(x, h, w.t(), out_dtype=torch.float32)

    rows = []
    for name, fn in [("o-proj + addcmul residual (2 kernels)", two_pass), ("gate in weight, residual in epilogue", epilogue),
                     ("addmm fp32 C/out only", epilogue_gemm_only)]:
        try:
            ms = time_cuda(fn, runs=10, warmup=3)
            rows.append((name, ms, 2 * tokens * D * D / ms / 1e9))
        except RuntimeError as exc:
            rows.append((f"{name}: {str(exc).splitlines()[0][:60]}", float("nan"), float("nan")))
    return rows


def elementwise_rows(tokens: int) -> list[tuple[str, float, float]]:
    """(name, ms, GB/s) of the fused elementwise kernels (engine/fused.py) at the 14B width."""
    from engine import fused
    from engine.dit import rope_table

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, tokens, D, device=dev)
    y = torch.randn(1, tokens, D, device=dev, dtype=dt)
    q = torch.randn(1, tokens, D, device=dev, dtype=dt)
    gate, shift, scale = (torch.randn(1, 1, D, device=dev) for _ in range(3))
    w = torch.randn(D, device=dev)
    table = rope_table((21, 1, tokens // 21), D // HEADS, torch.device(dev))  # 21 latent frames
    gb_x, gb_h = tokens * D * 4 / 1e9, tokens * D * 2 / 1e9

    cases = [
        ("rms_norm_rope", lambda: fused.rms_norm_rope(q, w, 1e-6, table, HEADS), 2 * gb_h),
        ("gated_residual", lambda: fused.gated_residual(x, y, gate), 2 * gb_x + gb_h),
        ("modulate", lambda: fused.modulate(x, shift, scale, 1e-6, dt), gb_x + gb_h),
        ("gated_residual + modulate (2 kernels)",
         lambda: fused.modulate(fused.gated_residual(x, y, gate), shift, scale, 1e-6, dt), 3 * gb_x + 2 * gb_h),
        ("residual_norm (1 kernel)", lambda: fused.residual_norm(x, y, gate, shift, scale, 1e-6, dt), 2 * gb_x + 2 * gb_h),
    ]
    rows = []
    for name, fn, gb in cases:
        ms = time_cuda(fn, runs=20, warmup=3)
        rows.append((name, ms, gb / ms * 1e3 / 1e3))  # TB/s in the last column for these
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32760,75600")
    ap.add_argument("--only", default="gemm,residual,attention,elementwise")
    args = ap.parse_args()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul 8192^3: {matmul_peak():.0f} TFLOP/s")
    for tokens in (int(t) for t in args.tokens.split(",")):
        parts = {"gemm": gemm_rows, "residual": residual_rows, "attention": attention_rows,
                 "elementwise": elementwise_rows}
        rows = [r for key in args.only.split(",") for r in parts[key](tokens)]
        for name, ms, tf in rows:  # TFLOP/s, or TB/s for the elementwise kernels
            print(f"{tokens:6d}  {name:48s} {ms:9.3f} ms {tf:7.1f} TFLOP/s")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
