"""The GPU lane's image-to-video part (issue 17): the I2V-14B DiT (random weights of the real shapes, 32.8 GB
bf16) with the real-size CLIP ViT-H/14 image encoder (ComfyUI clip_vision_h layout, fp16), loaded through the
normal loaders, serving image requests on one GPU.

    python benchmarks/gpu_lane.py --part i2v                 # on the GPU (writes its own model folder)
    python benchmarks/gpu_lane.py --part i2v --smoke --device cpu

One gang serves: 480p (832*480 area, an image of 832×480) with 4 steps, the same with blocks_to_swap 20 (its
latents must equal the first's bit for bit: the image branch's weights stream like the rest), then 720p
(1280*720) with 4 steps and the VAE decode. Per step = denoise seconds / steps (two DiT forwards: CFG); the
end-to-end of the official 40 steps = text + image encoding + 40 × per step + decode, from the same request.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks.gpu_lane import (
    case,
    gang,
    peak,
    random_items,
    say,
    write_safetensors,
    write_text_encoder_and_vae,
)

OFFICIAL_STEPS = 40  # the I2V default (engine/config.py SAMPLE_DEFAULTS["i2v-14B"])


def write_i2v_models(root: Path, smoke: bool, device: str) -> dict:
    """DiT (I2V 14B or tiny-i2v), CLIP tower, umt5 (width 4096, 2 layers), VAE; returns app flags."""
    from engine.clip import CLIP_H14, TINY_IMAGE_CLIP, transformers_shapes
    from engine.config import DIT_CONFIGS
    from engine.dit import WanDiT

    done = root / "written.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    meta = {"random_weights": "true", "note": "GPU lane: random weights of the real shapes"}
    for d in ("diffusion_models", "text_encoders", "vae", "clip_vision"):
        (root / d).mkdir(parents=True, exist_ok=True)
    dcfg = DIT_CONFIGS["tiny-i2v" if smoke else "i2v-14B"]
    with torch.device("meta"):
        dit = WanDiT(dcfg)
    dtype = torch.float32 if smoke else torch.bfloat16
    dit_path = root / "diffusion_models" / "wan2.1_i2v_14B_lane_random.safetensors"
    write_safetensors(dit_path, random_items(dit, 11, device, dtype), meta)
    clip_cfg = TINY_IMAGE_CLIP if smoke else CLIP_H14

    class Shapes(torch.nn.Module):  # random_items takes a module: a state dict of the clip_vision_h shapes
        def state_dict(self, *a, **k):
            return {n: torch.empty(s, device="meta") for n, s in transformers_shapes(clip_cfg).items()}

    clip_dtype = torch.float32 if smoke else torch.float16
    write_safetensors(root / "clip_vision" / "clip_vision_h_lane_random.safetensors",
                      random_items(Shapes(), 12, device, clip_dtype), {**meta, "clip_heads": str(clip_cfg.heads)})
    write_text_encoder_and_vae(root, dcfg.text_dim, smoke, device, dtype, meta)
    say(f"wrote the I2V lane's random model files in {time.perf_counter() - t0:.1f} s:",
        f"DiT {dit_path.stat().st_size / 2**30:.2f} GiB")
    flags = ["--model_dir", str(root), "--tokenizer", str(root / "text_encoders" / "tokenizer")]
    m = {"flags": flags + ([] if smoke else ["--task", "i2v-14B"]), "dit_gib": dit_path.stat().st_size / 2**30}
    done.write_text(json.dumps(m))
    return m


def _image(path: Path, w: int, h: int) -> str:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def part_i2v(m_t2v: dict, req: dict, work: Path) -> list[dict]:
    """The I2V gang; m_t2v only says whether this is the real run (--task) or the CPU smoke."""
    from safetensors.torch import load_file

    smoke = "--task" not in m_t2v["flags"]
    m = write_i2v_models(work / "models_i2v", smoke, "cpu" if smoke else "cuda")
    name = "i2v:14B" if not smoke else "i2v:tiny"
    d = work / name.replace(":", "_")
    up = d / "out" / ".gradio-cache"  # the server's upload folder (requests may name files only inside it)
    sizes = (("208*144", 208, 144), ("256*256", 256, 256)) if smoke else (("832*480", 832, 480), ("1280*720", 1280, 720))
    frames = req["frame_num"] if smoke else 81
    steps = 2 if smoke else 4
    base = {"prompt": req["prompt"], "frame_num": frames, "sample_steps": steps, "base_seed": 7}
    lo, hi = sizes
    swap = 1 if smoke else 20
    reqs = [
        {"raw": {**base, "size": lo[0], "image": _image(up / "lo.png", lo[1], lo[2])}, "decode": False,
         "save_latents": str(d / "lo.st")},
        {"raw": {**base, "size": lo[0], "image": str(up / "lo.png"), "blocks_to_swap": swap}, "decode": False,
         "save_latents": str(d / "lo_swap.st")},
        {"raw": {**base, "size": hi[0], "image": _image(up / "hi.png", hi[1], hi[2]), "blocks_to_swap": 0},
         "decode": True},
    ]
    res, log, wall = gang(name, m["flags"], reqs, work, timeout=560)
    if len(res) != len(reqs) or not all(r.get("ok") for r in res):
        return [case(name, False, wall, 0.0, f"{len(res)} results: " + str([r.get("error") for r in res])
                     + log[-2000:].replace("\n", " | "))]
    same = torch.equal(load_file(reqs[0]["save_latents"])["latents"], load_file(reqs[1]["save_latents"])["latents"])
    rows = []
    for r in res:
        t, meta = r["meta"]["timings"], r["meta"]
        enc = t.get("text_encoder_s", 0) + t.get("image_encoder_s", 0)
        row = {"size": meta["size"], "frames": meta["frame_num"], "steps": meta["steps"],
               "blocks_to_swap": meta["memory_mode"]["blocks_to_swap"], "per_step_s": round(t["per_step_s"], 3),
               "encode_s": round(enc, 2), "image_encoder_s": t.get("image_encoder_s"),
               "vae_decode_s": t.get("vae_decode_s"), "peak_gib": peak(r), "dit_forwards": meta["dit_forwards"]}
        if t.get("vae_decode_s") is not None:
            row["e2e_40_steps_s"] = round(enc + OFFICIAL_STEPS * t["per_step_s"] + t["vae_decode_s"], 1)
        rows.append(row)
    lo_e2e = rows[0]["encode_s"] + OFFICIAL_STEPS * rows[0]["per_step_s"] + (rows[2]["vae_decode_s"] or 0) * (
        (832 * 480) / (1280 * 720))  # 480p decode: scaled from the 720p one by pixels (not measured)
    detail = "; ".join(f"{x['size']}×{x['frames']} swap {x['blocks_to_swap']}: {x['per_step_s']:.2f} s/step, encode "
                       f"{x['encode_s']:.1f} s, peak {x['peak_gib']:.1f} GiB"
                       + (f", decode {x['vae_decode_s']:.1f} s, e2e {OFFICIAL_STEPS} steps {x['e2e_40_steps_s']:.0f} s"
                          if "e2e_40_steps_s" in x else "") for x in rows)
    detail += f"; 480p e2e {OFFICIAL_STEPS} steps ≈ {lo_e2e:.0f} s (decode scaled); swap-{swap} latents bitwise equal: {same}"
    return [case(name, same, wall, max(x["peak_gib"] for x in rows), detail, per_request=rows,
                 e2e_480p_40_steps_s=round(lo_e2e, 1))]
