"""FlashAttention-4 (CuTe DSL, `flash-attn-4` from PyPI) against cuDNN attention on this card, at the 14B's
shapes: time per call and error against an fp32 evaluation of the same inputs (a slice of query rows).

    python benchmarks/fa4_check.py        # needs flash-attn-4 and nvidia-cutlass-dsl installed
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import time_cuda  # noqa: E402

HEADS, HD = 40, 128


def fa4(q, k, v):
    """(B, L, H, D) in and out, like our attention functions."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def cudnn(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def reference(q, k, v, rows: int = 512):
    """fp32 attention of the first `rows` queries over all keys: (B, rows, H, D)."""
    qs = q[:, :rows].float().transpose(1, 2)
    s = qs @ k.float().transpose(1, 2).transpose(-1, -2) / HD**0.5  # (B, H, rows, Lk)
    return (s.softmax(-1) @ v.float().transpose(1, 2)).transpose(1, 2)


def rel(a, b) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


@torch.no_grad()
def ring_check() -> None:
    """The server's flash_attn_4 kernel (parallel/kernels.py) as ring attention uses it: its log-sum-exp equals
    cuDNN's, and two halves of the keys merged (parallel/usp.py merge_partial) equal one call."""
    from parallel.kernels import _cudnn_lse, get_kernel
    from parallel.usp import merge_partial

    kern = get_kernel("flash_attn_4", torch.device("cuda"))
    g = torch.Generator("cuda").manual_seed(2)
    q, k, v = (torch.randn(1, HEADS, 4096, HD, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    o4, l4 = kern.attn_lse(q, k, v)
    oc, lc = _cudnn_lse(q, k, v)
    o, lse = merge_partial(None, None, *kern.attn_lse(q, k[:, :, :2048], v[:, :, :2048]))
    o, lse = merge_partial(o, lse, *kern.attn_lse(q, k[:, :, 2048:], v[:, :, 2048:]))
    print(f"ring check: lse shape {tuple(l4.shape)}, |lse fa4 - lse cudnn| max {(l4 - lc).abs().max().item():.2e}, "
          f"out fa4 vs cudnn {rel(o4, oc.float()):.2e}, two merged halves vs one call {rel(o, o4.float()):.2e}; "
          f"cross-attention kernel: {kern.cross_attn.__qualname__}")


@torch.no_grad()
def main() -> None:
    ring_check()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    t0 = time.time()
    for lq, lk in [(32760, 32760), (75600, 75600), (32760, 512)]:
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(1, n, HEADS, HD, device="cuda", dtype=torch.bfloat16, generator=g) for n in (lq, lk, lk))
        ref = reference(q, k, v)
        flop = 4 * lq * lk * HEADS * HD
        for name, fn in [("cudnn", cudnn), ("fa4", fa4)]:
            try:
                out = fn(q, k, v)
                if name == "fa4" and lq == 32760 and lk == lq:
                    print(f"first fa4 call incl. JIT compile: {time.time() - t0:.1f} s since start")
                ms = time_cuda(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), runs=10, warmup=2)
                print(f"{lq:6d}x{lk:6d} {name:6s} {ms:9.3f} ms {flop / ms / 1e9:6.1f} TFLOP/s  "
                      f"rel err vs fp32 {rel(out[:, :512], ref):.2e}  out {tuple(out.shape)} {out.dtype}")
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{lq:6d}x{lk:6d} {name:6s} failed: {type(exc).__name__}: {str(exc)[:300]}")
    torch.cuda.synchronize()
    # the cudnn/fa4 ordering effect: run them interleaved once more at 480p
    g = torch.Generator("cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 32760, HEADS, HD, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    for name, fn in [("fa4", fa4), ("cudnn", cudnn), ("fa4", fa4), ("cudnn", cudnn)]:
        try:
            print(f"again {name:6s} {time_cuda(lambda fn=fn: fn(q, k, v), runs=20, warmup=2):9.3f} ms")
        except Exception as exc:  # noqa: BLE001
            print(f"again {name} failed: {exc}")


if __name__ == "__main__":
    main()
