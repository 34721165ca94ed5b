"""The whole serving path on one CUDA GPU with the embedded tiny model (no mp4: imageio-ffmpeg does not fit the
lent machine's carry limit): runtime → loading → layout → pipeline → agreement, with compile, block swap,
offload, TeaCache and the xfuser backend, plus a VAE decode. Prints one line per check.

    python benchmarks/gpu_smoke.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gang(argv: list[str], requests: list[dict], work: Path) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv + ["--outputs_dir", str(work / "out")], "requests": requests, "result": str(work / "r.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "gang.py"), str(work / "spec.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    print(proc.stderr[-2500:])
    return json.loads((work / "r.json").read_text())


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    os.environ["WAN_TINY_DIR"] = str(tmp / "tiny")
    req = {"prompt": "a fox", "size": "256*256", "frame_num": 17, "sample_steps": 6, "base_seed": 1}
    lat = lambda n: str(tmp / f"{n}.safetensors")  # noqa: E731
    runs = {
        "plain": ([], {}),
        "compile+swap+offload+teacache": (["--compile", "--blocks_to_swap", "1", "--offload_percent", "0.5"], {"teacache": 0.1}),
        "xfuser": (["--sp_backend", "xfuser"], {}),
        "sdpa_cudnn": (["--attention", "sdpa_cudnn"], {}),  # plain is --attention auto (flash_attn_4 when installed)
    }
    out = {}
    for name, (argv, extra) in runs.items():
        r = gang(argv, [{"raw": {**req, **extra}, "save_latents": lat(name), "decode": False}], tmp / name)[0]
        out[name] = {k: r.get(k) for k in ("ok", "error")} | ({"dit_forwards": r["meta"]["dit_forwards"],
                                                               "timings": r["meta"]["timings"],
                                                               "attention": r["meta"]["attention"],
                                                               "skipped": r["meta"]["skipped_steps"],
                                                               "memory": r["memory"]} if r.get("ok") else {})
        print(name, json.dumps(out[name]), flush=True)
    import torch
    from safetensors.torch import load_file

    a = load_file(lat("plain"))["latents"]
    for name in ("xfuser", "compile+swap+offload+teacache", "sdpa_cudnn"):
        if out[name].get("ok"):
            b = load_file(lat(name))["latents"]
            print(name, "rel err vs plain", ((a - b).norm() / a.norm()).item(), flush=True)
    from engine.loading import load_vae
    from engine.tiny import VAE_FILE

    vae = load_vae(tmp / "tiny" / "vae" / VAE_FILE, "cuda", torch.bfloat16)
    with torch.no_grad():
        v = vae.decode(a[:1].cuda().to(torch.bfloat16))
    print("vae decode on cuda", tuple(v.shape), float(v.float().abs().max()), flush=True)


if __name__ == "__main__":
    main()
