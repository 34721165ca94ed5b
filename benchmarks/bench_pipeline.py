"""The whole pipeline on one GPU with random weights of the real sizes: 14B DiT (bf16), umt5-xxl encoder
(bf16), Wan VAE (bf16): T5 encode, per-step time, VAE decode, peak memory, total seconds; the same with
TeaCache; and the VAE decode at 1280×720×81 with and without tiling.

    python benchmarks/bench_pipeline.py --steps 50 --out benchmarks/results/pipeline_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import random_model  # noqa: E402
from engine.config import DIT_CONFIGS, UMT5_XXL  # noqa: E402
from engine.pipeline import WanPipeline  # noqa: E402
from engine.request import GenerationRequest  # noqa: E402

DEV = "cuda"
DTYPE = torch.bfloat16


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Well-scaled random values in place: norms near 1, weights ~ N(0, 1/fan_in), the rest small."""
    g = torch.Generator(DEV).manual_seed(seed)
    for name, p in module.named_parameters():
        fan = math.prod(p.shape[1:]) if p.dim() >= 2 else 1
        r = torch.randn(p.shape, generator=g, device=DEV)
        if "norm" in name or name.endswith("gamma"):
            p.copy_(1.0 + 0.1 * r)
        elif fan > 1:
            p.copy_(r / math.sqrt(fan))
        else:
            p.copy_(0.1 * r)
    return module


def text_encoder(smoke: bool = False):
    from transformers import UMT5Config, UMT5EncoderModel

    from engine.text_encoder import TextEncoder, build_tiny_tokenizer, load_tokenizer

    small = dict(vocab_size=2048, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    cfg = UMT5Config(**(small if smoke else UMT5_XXL),
                     relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                     layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    model = randomize(model.to_empty(device=DEV), 2).to(DTYPE).eval()
    model.encoder.embed_tokens.weight = model.shared.weight
    tok_dir = Path(tempfile.mkdtemp())
    build_tiny_tokenizer(tok_dir)  # ids < 2048 are valid for the full vocabulary; encode cost is the same
    return TextEncoder(model, load_tokenizer(tok_dir))


def vae(smoke: bool = False):
    from engine.vae import WanVAE

    with torch.device("meta"):
        v = WanVAE(dim=16 if smoke else 96)
    return randomize(v.to_empty(device=DEV), 3).to(DTYPE).eval()


def gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else 0.0


def save(res: dict, out: str | None) -> None:
    if out:
        Path(out).write_text(json.dumps(res, indent=1))


def reset() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", default="832*480")
    ap.add_argument("--teacache", type=float, default=0.2)
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    ap.add_argument("--attention", default=None, help="the server's kernel (auto, sdpa_cudnn, flash_attn_4, ...); "
                                                       "default: plain SDPA")
    a = ap.parse_args()
    global DEV, DTYPE
    if a.smoke:
        DEV, DTYPE = "cpu", torch.float32
        a.size, a.steps = "64*64", 2
    w, h = (int(v) for v in a.size.split("*"))
    res = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__, "size": a.size, "frames": 81,
           "steps": a.steps, "guidance": 5.0, "weights": "random (real shapes)"}
    dit = random_model(DIT_CONFIGS["tiny" if a.smoke else "14B"], device=DEV)
    if a.attention:  # as apply_layout sets it on one GPU
        from parallel.apply import apply_local_attention
        from parallel.kernels import get_kernel

        kernel = get_kernel(a.attention, torch.device(DEV))
        res["attention"] = kernel.name
        apply_local_attention(dit, kernel)
    te, v = text_encoder(a.smoke), vae(a.smoke)
    pipe = WanPipeline(dit, te, v, DEV, model_name="14B-random")
    pipe.model_key = "14B"
    req = GenerationRequest(prompt="a red fox running through fresh snow, cinematic", width=w, height=h,
                            frame_num=81, sample_steps=a.steps, sample_guide_scale=5.0, sample_shift=5.0, base_seed=1)
    pipe.generate(GenerationRequest(**{**req.to_dict(), "sample_steps": 1}), decode=False)  # warm-up
    reset()
    t0 = time.perf_counter()
    r = pipe.generate(req, decode=True)
    res["pipeline"] = {"total_s": round(time.perf_counter() - t0, 1), **r.timings, "dit_forwards": r.dit_forwards,
                       "peak_gib": gib()}
    print("pipeline", res["pipeline"], flush=True)
    save(res, a.out)
    te.to("cpu")  # room for the 720p decode; back for the TeaCache run
    reset()
    shape = (1, 16, 2, 8, 8) if a.smoke else (1, 16, 21, 90, 160)  # 1280×720×81
    z = torch.randn(shape, device=DEV, generator=torch.Generator(DEV).manual_seed(5))
    res["vae_720p"] = {}
    for tiled in (False, True):
        reset()
        t0 = time.perf_counter()
        try:
            video = v.decode(z.to(DTYPE), tile=tiled)
            if DEV == "cuda":
                torch.cuda.synchronize()
            res["vae_720p"]["tiled" if tiled else "untiled"] = {"s": round(time.perf_counter() - t0, 1), "peak_gib": gib(),
                                                               "frames": video.shape[2]}
            del video
        except torch.OutOfMemoryError as exc:
            res["vae_720p"]["tiled" if tiled else "untiled"] = {"error": str(exc)[:200]}
        print("vae 720p", tiled, res["vae_720p"], flush=True)
    save(res, a.out)
    te.to(DEV)
    reset()
    t0 = time.perf_counter()
    r = pipe.generate(GenerationRequest(**{**req.to_dict(), "teacache": a.teacache}), decode=False)
    res["teacache"] = {"threshold": a.teacache, "denoise_s": r.timings["denoise_s"], "dit_forwards": r.dit_forwards,
                       "skipped": len(r.info["skipped_steps"]), "peak_gib": gib(),
                       "note": "random weights: TeaCache decides from how far the timestep embedding moves between "
                               "steps, which random weights do not reproduce; the count does not predict trained weights"}
    print("teacache", res["teacache"], flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
