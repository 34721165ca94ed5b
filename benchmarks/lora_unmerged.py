"""What one LoRA would cost per DiT forward if it were applied unmerged (y = W·x + s·B(A·x) on every block Linear)
instead of merged into the weights (what parallel/lora.py does: no per-forward cost).

A DiT of the 14B's width with `--layers` blocks (random weights made on the device, no files), one forward
timed with CUDA events (median of --runs after warm-up) plain and with a forward hook adding the low-rank path
to each of a block's 10 Linears; the difference scaled to the 14B's 40 blocks.

    python benchmarks/lora_unmerged.py --size 1280*720 --frames 81 --ranks 32,64 --layers 4
    python benchmarks/lora_unmerged.py --device cpu --model tiny --size 64*64 --frames 5 --layers 3  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import inputs, random_model, time_cpu, time_cuda, with_attention  # noqa: E402
from engine.config import DIT_CONFIGS  # noqa: E402


def add_unmerged(model: nn.Module, rank: int, strength: float = 1.0) -> list:
    """Forward hooks y += s·B(A·x) on every Linear inside the blocks; returns the hook handles."""
    handles = []
    g = torch.Generator(next(model.parameters()).device).manual_seed(3)
    for block in model.blocks:
        for m in block.modules():
            if isinstance(m, nn.Linear):
                dev, dt = m.weight.device, m.weight.dtype
                a = (torch.randn(rank, m.in_features, generator=g, device=dev) / m.in_features**0.5).to(dt)
                b = (0.01 * torch.randn(m.out_features, rank, generator=g, device=dev)).to(dt)

                def hook(mod, args, out, a=a, b=b):
                    return out + strength * ((args[0] @ a.t()) @ b.t())

                handles.append(m.register_forward_hook(hook))
    return handles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="14B")
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--ranks", default="32,64")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    full = DIT_CONFIGS[a.model]
    cfg = dataclasses.replace(full, num_layers=min(a.layers, full.num_layers))
    w, h = (int(v) for v in a.size.split("*"))
    model = random_model(cfg, device=a.device)
    kernel = with_attention(model, a.attention, a.device)
    x, t, ctx = inputs(cfg, w, h, a.frames, device=a.device)
    timer = time_cuda if a.device == "cuda" else time_cpu

    def fwd():
        with torch.no_grad():
            model(x, t, ctx)

    plain = timer(fwd, a.runs)
    rows = []
    for r in (int(v) for v in a.ranks.split(",")):
        handles = add_unmerged(model, r)
        hooked = timer(fwd, a.runs)
        for hd in handles:
            hd.remove()
        per_block = (hooked - plain) / cfg.num_layers
        rows.append({"rank": r, "forward_ms": round(hooked, 1), "extra_ms_per_block": round(per_block, 2),
                     "extra_ms_per_14B_forward": round(per_block * full.num_layers, 1),
                     "extra_percent": round(100 * (hooked - plain) / plain, 1)})
    res = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "model": a.model, "layers_timed": cfg.num_layers, "size": a.size, "frames": a.frames, "attention": kernel,
           "plain_forward_ms": round(plain, 1), "plain_ms_per_block": round(plain / cfg.num_layers, 2),
           "unmerged": rows, "command": "python " + " ".join(sys.argv)}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
