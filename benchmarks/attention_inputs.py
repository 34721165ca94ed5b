"""Why cuDNN attention inside the model runs slower than on random inputs: times SDPA on the q/k/v that a
14B block really passes (captured from block 0 at 832×480×81) against copies in other layouts and random
tensors of the same shape, so layout and data effects are told apart.

    python benchmarks/attention_inputs.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_dit import inputs, random_model, time_cuda  # noqa: E402

from engine.config import DIT_CONFIGS  # noqa: E402


@torch.no_grad()
def main() -> None:
    cfg = dataclasses.replace(DIT_CONFIGS["14B"], num_layers=2)
    model = random_model(cfg)
    captured = {}
    attn = model.blocks[0].self_attn
    inner = attn.attn_fn

    def grab(q, k, v):
        captured.setdefault("qkv", (q, k, v))
        return inner(q, k, v)

    attn.attn_fn = grab
    model(*inputs(cfg, 832, 480, 81))
    q, k, v = captured["qkv"]  # (B, L, heads, hd) views
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; q {tuple(q.shape)} strides q {q.stride()} "
          f"k {k.stride()} v {v.stride()}; std q {q.float().std():.3f} k {k.float().std():.3f} v {v.float().std():.3f}")

    def sdpa(a, b, c):
        return lambda: F.scaled_dot_product_attention(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2))

    def bhld(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    rnd = [torch.randn_like(t) for t in (q, k, v)]
    cases = [
        ("model's q, k, v as passed", sdpa(q, k, v)),
        ("model's values, (B,H,L,hd) contiguous", sdpa(bhld(q), bhld(k), bhld(v))),
        ("model's values, all (B,L,H,hd) contiguous", sdpa(q.contiguous(), k.contiguous(), v.contiguous())),
        ("randn, same shapes", sdpa(*rnd)),
        ("model's q, k; randn v", sdpa(q, k, rnd[2])),
        ("randn q, k; model's v", sdpa(rnd[0], rnd[1], v)),
        ("model's q, k scaled 1/4", sdpa(q / 4, k / 4, v)),
        ("model's q, k; v = 0", sdpa(q, k, torch.zeros_like(v))),
    ]
    flop = 4 * q.shape[1] ** 2 * q.shape[2] * q.shape[3]
    for name, fn in cases * 2:  # twice: the second pass shows the clock's drift
        ms = time_cuda(fn, runs=10, warmup=2)
        print(f"{name:44s} {ms:8.3f} ms {flop / ms / 1e9:6.1f} TFLOP/s")


if __name__ == "__main__":
    main()
