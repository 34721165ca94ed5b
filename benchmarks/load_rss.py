"""Host memory while loading a DiT checkpoint: write random bf16 weights (streamed, low memory), then load
them onto the GPU with engine.loading.load_dit in a fresh process and report peak RSS vs the file size.

    python benchmarks/load_rss.py --write /tmp/wan14b.safetensors --model 14B
    python benchmarks/load_rss.py --read /tmp/wan14b.safetensors
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_random(path: Path, model: str, seed: int = 0) -> None:
    """A safetensors file of random bf16 weights in the official layout, written tensor by tensor."""
    from benchmarks.random_weights import dit_shapes, write_random_safetensors

    write_random_safetensors(path, dit_shapes(model), seed)


def read(path: Path) -> dict:
    from engine.loading import load_dit

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_dit(path, dev, torch.bfloat16)
    if dev == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    size = path.stat().st_size / 2**30
    n = sum(p.numel() for p in model.parameters())
    return {"file_gib": round(size, 2), "peak_rss_gib": round(peak, 2), "rss_before_gib": round(rss0, 2),
            "rss_over_file": round(peak / size, 3), "load_s": round(secs, 1), "params": n}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--write")
    ap.add_argument("--read")
    ap.add_argument("--model", default="14B")
    a = ap.parse_args()
    if a.write:
        t0 = time.perf_counter()
        write_random(Path(a.write), a.model)
        print(json.dumps({"wrote": a.write, "gib": round(Path(a.write).stat().st_size / 2**30, 2),
                          "seconds": round(time.perf_counter() - t0, 1)}))
    if a.read:
        print(json.dumps(read(Path(a.read))))
