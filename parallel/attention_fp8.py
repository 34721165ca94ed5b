"""8-bit attention for Hopper (`--attention fp8` / `int8_qk`): a Triton flash-attention forward with Q and K in
int8, one scale per (token, head), keys smoothed by their mean (SageAttention's recipe: int8 has 7 bits of
magnitude where e4m3 has 3 of mantissa, ~6x less score error), and P·V in fp8 e4m3 (`fp8`: V with one scale
per (head, channel), P scaled by 448) or in bf16 (`int8_qk`, more exact). Non-causal, head dim 128, (B, H,
L, D) in, bf16 out, and the log-sum-exp (fp32, natural log) that Ring attention merges partial results with.

Quality guard: `--attention_exact_steps N` runs the exact kernel on the first and last N denoising steps
(`with_exact_steps`); the choice is a function of the step number only, so every rank takes the same one.
The pre-passes: q and k are quantized per 128-channel row (engine.fused.quantize_rows_fused, one pass each;
the softmax scale and log2(e) are folded into q's scale), v per channel and transposed (K-major, as Hopper's
fp8 tensor-core MMA wants its B operand). Triton's interpreter runs it on the CPU (tests) except a bf16 dot,
which it emulates in fp32 there.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from engine.fp8 import FP8, FP8_MAX
from engine.fused import _HAS_TRITON, quantize_rows_fused

LOG2E = 1.4426950408889634

if _HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_block(q, sq, k_base, v_base, sk_base, skn, svn, svd, sskn, start, Lk, m_i, l_i, acc, offs_n, offs_d,
                    PV_FP8: tl.constexpr, INTERP: tl.constexpr):
        """One key block of the online softmax: scores int8 × int8 → int32 → fp32 (log2 units), then P·V."""
        n = start + offs_n
        ncol = n < Lk
        k = tl.load(k_base + n[None, :].to(tl.int64) * skn + offs_d[:, None], mask=ncol[None, :], other=0.0)  # (D, N)
        sk = tl.load(sk_base + n * sskn, mask=ncol, other=0.0)
        s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32) * sq[:, None] * sk[None, :]  # (M, N), int8 × int8
        s = tl.where(ncol[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * svn + offs_d[None, :] * svd, mask=ncol[:, None], other=0.0)
        if PV_FP8:
            pv = tl.dot((p * 448.0).to(v.dtype), v)  # P in [0, 448]: e4m3's range
        elif INTERP:  # the interpreter's bf16 dot is wrong (Triton 3.6): the same roundings, an fp32 product
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _attn_fp8_kernel(Q, K, V, SQ, SK, SV, Out, Lse,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, svd,
                         ssqb, ssqh, ssqm, sskb, sskh, sskn,
                         sob, soh, som, H, Lq, Lk,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr,
                         LK_STATIC: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        mrow = offs_m < Lq
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :], mask=mrow[:, None],
                    other=0.0)
        sq = tl.load(SQ + b * ssqb + h * ssqh + offs_m * ssqm, mask=mrow, other=0.0)  # × softmax scale × log2(e)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        sk_base = SK + b * sskb + h * sskh
        if LK_STATIC > 0:  # Triton's interpreter cannot loop to a run-time bound (nor assign a plain int)
            for start in range(0, LK_STATIC, BLOCK_N):
                m_i, l_i, acc = _attn_block(q, sq, k_base, v_base, sk_base, skn, svn, svd, sskn, start, Lk, m_i, l_i,
                                            acc, offs_n, offs_d, PV_FP8, True)
        else:
            for start in range(0, Lk, BLOCK_N):
                m_i, l_i, acc = _attn_block(q, sq, k_base, v_base, sk_base, skn, svn, svd, sskn, start, Lk, m_i, l_i,
                                            acc, offs_n, offs_d, PV_FP8, False)
        if PV_FP8:
            sv = tl.load(SV + bh.to(tl.int64) * D + offs_d)  # (D,) per-channel scale of v, / 448 for p
            acc = acc * (sv / 448.0)[None, :]
        out = acc / l_i[:, None]
        tl.store(Out + b * sob + h * soh + offs_m[:, None].to(tl.int64) * som + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mrow[:, None])
        tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mrow)

    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in ((128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                                   (64, 64, 4, 3), (128, 64, 4, 4))]
    _attn_fp8_tuned = triton.autotune(_CONFIGS, key=["Lq", "Lk", "D", "PV_FP8"])(_attn_fp8_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _quant_heads(x: Tensor, extra: float = 1.0) -> tuple[Tensor, Tensor]:
    """(B, H, L, D) → int8 data (same shape and layout as x when x is a (B, L, H, D) view, no copy) and the
    per-(token, head) scale (B, H, L) fp32, times `extra`."""
    t = x.transpose(1, 2)  # (B, L, H, D): the model's layout, where each head's 128 channels are contiguous
    q = quantize_rows_fused(t if t.is_contiguous() else t.contiguous(), int8=True)
    return q.data.transpose(1, 2), (q.scale.squeeze(-1) * extra).transpose(1, 2)  # (B, H, L, D), (B, H, L)


def _quant_v(v: Tensor) -> tuple[Tensor, Tensor]:
    """v (B, H, L, D) → e4m3 with one scale per (b, h, channel), laid out (B, H, D, L) contiguous (K-major)
    and returned as its (B, H, L, D) view; the scales (B·H, D) fp32."""
    amax = v.abs().amax(dim=2, keepdim=True).float().clamp_min(1e-12)  # (B, H, 1, D)
    v8 = (v.float() * (FP8_MAX / amax)).to(FP8).transpose(2, 3).contiguous().transpose(2, 3)  # (B, H, L, D) view
    return v8, (amax / FP8_MAX).reshape(-1, v.shape[-1]).contiguous()


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, pv_fp8: bool = True, smooth_k: bool = True,
                  blocks: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention with 8-bit QK (int8, per-token scales) and PV (fp8; bf16 with pv_fp8=False):
    q (B, H, Lq, 128), k/v (B, H, Lk, 128) bf16 → (out (B, H, Lq, 128) in q's dtype, lse (B, H, Lq) fp32).
    smooth_k subtracts the keys' mean over tokens before quantizing (SageAttention's smoothing: softmax is
    unchanged, the LSE is corrected by q·mean). `blocks` (BLOCK_M, BLOCK_N) fixes the tiles (the interpreter
    tests); else autotuned on CUDA."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d)
    k_mean = None
    if smooth_k:
        k_mean = k.float().mean(dim=2, keepdim=True)  # (B, H, 1, D)
        k = (k - k_mean).to(q.dtype)  # keeps k's (B, L, H, D) layout
    q8, sq = _quant_heads(q, LOG2E * scale)
    k8, sk = _quant_heads(k)
    if pv_fp8:
        v_in, sv = _quant_v(v)
    else:
        v_in, sv = v, q.new_ones(1, dtype=torch.float32)
    out = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Lq, D) view
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    args = (q8, k8, v_in, sq, sk, sv, out, lse,
            q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
            v_in.stride(0), v_in.stride(1), v_in.stride(2), v_in.stride(3),
            sq.stride(0), sq.stride(1), sq.stride(2), sk.stride(0), sk.stride(1), sk.stride(2),
            out.stride(0), out.stride(1), out.stride(2), h, lq, lk)
    if blocks is not None or _interpreting():
        bm, bn = blocks or (16, 16)
        _attn_fp8_kernel[(triton.cdiv(lq, bm), b * h)](*args, D=d, BLOCK_M=bm, BLOCK_N=bn, PV_FP8=pv_fp8,
                                                       LK_STATIC=lk if _interpreting() else 0)
    else:
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * h)  # noqa: E731
        _attn_fp8_tuned[grid](*args, D=d, PV_FP8=pv_fp8, LK_STATIC=0)
    if k_mean is not None:  # the scores were q·(k − mean): log Σ exp(q·k·scale) = lse + q·mean·scale
        lse = lse + scale * torch.matmul(q.float(), k_mean.transpose(-1, -2)).squeeze(-1)  # (B, H, Lq)
    return out, lse


def fp8_kernel(name: str, device: torch.device, exact):
    """The registry entry for --attention fp8 (int8 QK, fp8 PV) or int8_qk (int8 QK, bf16 PV); cross-attention
    (512 text keys) stays on the exact kernel `exact`."""
    from parallel.kernels import BackendUnavailable, Kernel

    if not _HAS_TRITON:
        raise BackendUnavailable(f"attention {name} needs Triton (pip install triton), or use --attention auto")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = "the CPU" if device.type != "cuda" else "sm{}{}".format(*torch.cuda.get_device_capability(device))
        raise BackendUnavailable(f"attention {name} needs an NVIDIA GPU with fp8 tensor cores (Ada sm89, Hopper sm90 "
                                 f"or newer); this is {where}: use --attention auto")
    pv = name == "fp8"

    @torch.compiler.disable  # a Triton kernel with its own quantization passes: outside the compiled graph
    def attn_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if q.shape[-1] != 128:
            return exact.attn_lse(q, k, v)
        return fp8_attention(q, k, v, pv_fp8=pv)

    return Kernel(name, lambda q, k, v: attn_lse(q, k, v)[0], attn_lse, exact=False, cross=exact.cross_attn)


def with_exact_steps(kernel, exact, n: int, clock):
    """`kernel` on the inner steps, `exact` on the first and last n steps of a request. `clock` has `step` (the
    step running, from 0) and `steps` (the request's step count; 0 outside a request: exact)."""
    from parallel.kernels import Kernel

    if n <= 0 or kernel.exact:
        return kernel

    def pick():
        s, total = clock.step, clock.steps
        return exact if (s < n or s >= total - n) else kernel

    @torch.compiler.disable  # the step is a Python int: a graph must not guard on it
    def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return pick().attn(q, k, v)

    @torch.compiler.disable
    def attn_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return pick().attn_lse(q, k, v)

    return Kernel(f"{kernel.name} (exact {exact.name} on the first and last {n} steps)", attn, attn_lse, exact=False,
                  cross=exact.cross_attn)
