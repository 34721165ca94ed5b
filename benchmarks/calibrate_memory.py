"""Admission control's memory estimate against the peaks the GPU lane measured (no GPU needed).

Reads benchmarks/results/gpu_lane_<gpu>.json (per-request `max_memory_allocated` peaks of the real server,
random 14B weights, decode off), rebuilds each request's EstimateInputs (model, size, frames, batch, memory
mode, the lane's text encoder) and prints estimate vs measured; `--fit` refits the activation coefficients
to these points and prints them with the errors after the fit.

    python benchmarks/calibrate_memory.py [--lane benchmarks/results/gpu_lane_h200.json] [--fit]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import DIT_CONFIGS  # noqa: E402
from engine.memory_estimate import GIB, EstimateInputs, Layout, MemoryMode, Request, estimate, fit_calibration  # noqa: E402

LANE_T5 = {"vocab_size": 2048, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 2, "num_heads": 64}
# the lane's gangs (benchmarks/gpu_lane.py part_modes / part_presets) as memory modes; FSDP on one rank
# (the mode gangs ran with the decode off, the preset gangs decoded)
MODES = {
    "mode:plain": MemoryMode(vae_decode=False),
    "mode:block_swap_20": MemoryMode(blocks_to_swap=20, vae_decode=False),
    "mode:offload_percent_0.5": MemoryMode(offload_percent=0.5, vae_decode=False),
    "mode:fsdp+offload": MemoryMode(dit_fsdp=True, blocks_to_swap=25, vae_decode=False),  # whole blocks: 10 + 0.5 × 30
    "mode:teacache": MemoryMode(vae_decode=False),
    "preset:max_speed": MemoryMode(),
    "preset:auto": MemoryMode(),
    "preset:single_gpu": MemoryMode(blocks_to_swap=14, t5="cpu", offload_model=True, vae_tiling=True),
    "preset:low_vram": MemoryMode(dit_fsdp=True, blocks_to_swap=40, t5="cpu", offload_model=True, vae_tiling=True),
}


def points(lane: dict) -> list[tuple[str, EstimateInputs, float]]:
    """(label, inputs, measured peak bytes) for every successful request of the modelled cases."""
    out = []
    for c in lane["cases"]:
        mode = MODES.get(c["name"])
        if mode is None or not c.get("ok"):
            continue
        for r in c.get("per_request", []):
            if not r.get("ok") or not r.get("size"):
                continue
            w, h = (int(v) for v in r["size"].split("*"))
            req = Request(w, h, r["frames"], r["batch"] or 1, cfg=True)
            inp = EstimateInputs(DIT_CONFIGS["14B"], req, Layout(), mode, dict(LANE_T5))
            out.append((f"{c['name']} {r['size']}x{r['frames']} b{r['batch']}", inp, r["peak_gib"] * GIB))
    return out


def report(pts, cal=None) -> list[float]:
    errs = []
    for label, inp, meas in pts:
        e = estimate(inp, cal) if cal else estimate(inp)
        err = (e.allocated - meas) / meas
        errs.append(err)
        print(f"{label:48s} measured {meas / GIB:7.2f} GiB  estimate {e.allocated / GIB:7.2f} GiB  "
              f"{err * 100:+6.1f} %  ({e.peak_phase})")
    print(f"max |error| {max(abs(x) for x in errs) * 100:.1f} % over {len(errs)} requests")
    return errs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lane", default=str(ROOT / "benchmarks" / "results" / "gpu_lane_h200.json"))
    ap.add_argument("--fit", action="store_true")
    a = ap.parse_args()
    lane = json.loads(Path(a.lane).read_text())
    pts = points(lane)
    print(f"{lane['gpu']}, torch {lane['torch']}: the estimate's defaults")
    report(pts)
    if a.fit:
        cal, _ = fit_calibration([(inp, meas) for _, inp, meas in pts],
                                 names=("ACT_COPIES_PER_TOKEN_DIM", "FFN_COPIES_PER_TOKEN", "FIXED_BYTES"))
        print("fitted:", {k: getattr(cal, k) for k in ("ACT_COPIES_PER_TOKEN_DIM", "FFN_COPIES_PER_TOKEN", "FIXED_BYTES")})
        report(pts, cal)


if __name__ == "__main__":
    main()
