"""The GPU lane (issue 14): the real server on the lent GPU, NCCL, every preset and memory mode, faults inside
a forward, a restart after a broken CUDA context, the Ulysses/Ring code paths and the admission-control
calibration points. Random weights of the real 14B DiT shapes (and the real VAE) written to disk and loaded
through the normal loaders; the text encoder is umt5-xxl's width (4096) with 2 layers and a small vocabulary.

    python benchmarks/gpu_lane.py                       # everything (≈ 15 min on an H200: use --part)
    python benchmarks/gpu_lane.py --part presets,modes  # one device call
    python benchmarks/gpu_lane.py --part faults,restart,paths
    python benchmarks/gpu_lane.py --part replan,lora      # per-request memory mode and LoRA switches
    python benchmarks/gpu_lane.py --part i2v              # image-to-video 14B (benchmarks/gpu_lane_i2v.py)
    python benchmarks/gpu_lane.py --smoke --device cpu  # the same code at tiny sizes on a CPU (a test)

Each case is its own gang: `torchrun --standalone --nproc_per_node 1 tests/gang.py` with WAN_ONE_RANK_GROUPS=1
(process groups, NCCL and FSDP2 on a one-rank mesh). Writes benchmarks/results/gpu_lane_<gpu>.json
{"gpu", "torch", "cases": [{"name", "ok", "seconds", "peak_gib", "detail"}]}, merged with an earlier file of
the same GPU (cases of this run replace those of the same name), and the raw log under benchmarks/results/raw/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import DIT_CONFIGS  # noqa: E402

LOG: list[str] = []
ONLY: set[str] | None = None  # --only: the case names to run


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


# -- random model files -----------------------------------------------------------------------------------------
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def write_safetensors(path: Path, tensors, metadata: dict) -> None:
    """Stream (name, tensor-producing callable, shape, dtype) items into a safetensors file, one at a time."""
    items = list(tensors)
    header, offset = {"__metadata__": metadata}, 0
    for name, _, shape, dtype in items:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for _, make, _, _ in items:
            t = make().contiguous().cpu()
            fh.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def random_items(module: torch.nn.Module, seed: int, device: str, dtype: torch.dtype):
    """(name, make, shape, dtype) for every tensor of a meta module: tiny.random_weights' distribution."""
    out = []
    for i, (name, t) in enumerate(module.state_dict().items()):
        shape = tuple(t.shape)
        leaf = name.rsplit(".", 1)[-1]

        def make(shape=shape, name=name, leaf=leaf, i=i):
            g = torch.Generator(device).manual_seed(seed * 100003 + i)
            r = torch.randn(shape, generator=g, device=device)
            if "norm" in name or leaf == "gamma":
                return (1.0 + 0.1 * r).to(dtype)
            if len(shape) >= 2 and leaf != "modulation":
                return (r / math.sqrt(math.prod(shape[1:]))).to(dtype)
            return (0.1 * r).to(dtype)

        out.append((name, make, shape, dtype))
    return out


def write_text_encoder_and_vae(root: Path, text_dim: int, smoke: bool, device: str, dtype: torch.dtype,
                               meta: dict) -> None:
    """The lane's umt5 (width text_dim, 2 layers, small vocabulary, its tokenizer) and VAE under root."""
    from transformers import UMT5Config, UMT5EncoderModel

    from engine.text_encoder import build_tiny_tokenizer
    from engine.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(dim=16 if smoke else 96, z_dim=16)
        t5 = UMT5EncoderModel(UMT5Config(
            vocab_size=2048, d_model=text_dim, num_layers=2, num_heads=4 if smoke else 64, d_kv=16 if smoke else 64,
            d_ff=128 if smoke else 10240, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
            relative_attention_max_distance=128, layer_norm_epsilon=1e-6, is_encoder_decoder=False))
    t5_items = [it for it in random_items(t5, 2, device, dtype) if it[0] != "encoder.embed_tokens.weight"]
    write_safetensors(root / "text_encoders" / "umt5_lane_random.safetensors", t5_items, meta)
    build_tiny_tokenizer(root / "text_encoders" / "tokenizer", vocab_size=2048)
    write_safetensors(root / "vae" / "wan_2.1_vae_lane_random.safetensors", random_items(vae, 3, device, dtype), meta)


def write_models(root: Path, smoke: bool, device: str) -> dict:
    """The lane's model folder: DiT (14B or tiny), umt5 (width 4096, 2 layers), VAE; returns app flags."""
    from engine.dit import WanDiT

    t0 = time.perf_counter()
    done = root / "written.json"
    if done.exists():  # an earlier call on the same (warm) machine wrote them
        say(f"reusing the lane's model files in {root}")
        return json.loads(done.read_text())
    meta = {"random_weights": "true", "note": "GPU lane: random weights of the real shapes"}
    for d in ("diffusion_models", "text_encoders", "vae"):
        (root / d).mkdir(parents=True, exist_ok=True)
    dcfg = DIT_CONFIGS["tiny" if smoke else "14B"]
    with torch.device("meta"):
        dit = WanDiT(dcfg)
    dtype = torch.float32 if smoke else torch.bfloat16
    dit_path = root / "diffusion_models" / ("wan_tiny_lane.safetensors" if smoke else "wan2.1_t2v_14B_lane_random.safetensors")
    write_safetensors(dit_path, random_items(dit, 1, device, dtype), meta)
    write_text_encoder_and_vae(root, dcfg.text_dim, smoke, device, dtype, meta)
    say(f"wrote the lane's random model files in {time.perf_counter() - t0:.1f} s:",
        f"DiT {dit_path.stat().st_size / 2**30:.2f} GiB")
    flags = ["--model_dir", str(root), "--tokenizer", str(root / "text_encoders" / "tokenizer")]
    m = {"flags": flags + ([] if smoke else ["--task", "t2v-14B"]), "dit_gib": dit_path.stat().st_size / 2**30}
    done.write_text(json.dumps(m))
    return m


# -- one gang per case --------------------------------------------------------------------------------------------
def gang(name: str, argv: list[str], requests: list[dict], work: Path, restarts: int = 0,
         timeout: float = 420) -> tuple[list[dict], str, float]:
    """tests/gang.py under torchrun (one rank, process groups on): results, log tail, wall seconds."""
    d = work / name.replace(":", "_").replace("+", "_")
    d.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv + ["--outputs_dir", str(d / "out")], "requests": requests, "result": str(d / "r.json"),
            "mp4": False}
    (d / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "WAN_ONE_RANK_GROUPS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           f"--max_restarts={restarts}", str(ROOT / "tests" / "gang.py"), str(d / "spec.json")]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"TIMEOUT after {timeout} s\n" + ((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
    wall = time.perf_counter() - t0
    (d / "gang.log").write_text(log)
    lines = d / "r.jsonl"
    results = [json.loads(x) for x in lines.read_text().splitlines()] if lines.exists() else []
    return results, log, wall


def peak(r: dict) -> float:
    return max((m.get("peak_gib", 0.0) for m in r.get("memory") or []), default=0.0)


def in_use(r: dict) -> float:
    return max((m.get("in_use_gib", 0.0) for m in r.get("memory") or []), default=0.0)


def case(name: str, ok: bool, seconds: float, peak_gib: float, detail: str, **extra) -> dict:
    c = {"name": name, "ok": bool(ok), "seconds": round(seconds, 3), "peak_gib": round(peak_gib, 3), "detail": detail}
    c.update(extra)
    say(("PASS" if ok else "FAIL"), json.dumps(c))
    return c


def summarize(name: str, results: list[dict], log: str, wall: float, want: int) -> dict:
    """A case from a gang whose requests should all succeed; the first one's figures."""
    ok = len(results) == want and all(r.get("ok") for r in results)
    if not results:
        return case(name, False, wall, 0.0, "no result: " + log[-1500:].replace("\n", " | "))
    r = results[0]
    rss = r.get("host_rss_gib", {})
    err = next((x.get("error") for x in results if not x.get("ok")), None)
    detail = (f"{len(results)}/{want} requests ok; first request {r['seconds']:.1f} s (gang wall {wall:.0f} s incl. load); "
              f"host RSS {rss.get('now')} GiB (peak {rss.get('peak')}); dit_forwards "
              f"{(r.get('meta') or {}).get('dit_forwards')}" + (f"; error: {err}" if err else ""))
    return case(name, ok, r["seconds"], peak(r), detail, per_request=[
        {"ok": x.get("ok"), "seconds": round(x.get("seconds", 0), 3), "peak_gib": peak(x), "in_use_gib": in_use(x),
         "size": (x.get("meta") or {}).get("size"), "frames": (x.get("meta") or {}).get("frame_num"),
         "batch": (x.get("meta") or {}).get("batch_size")} for x in results])


# -- the parts ------------------------------------------------------------------------------------------------
def part_presets(m: dict, req: dict, work: Path) -> list[dict]:
    from presets import available_presets

    out = []
    for name in [*available_presets(), "auto"]:
        if ONLY and f"preset:{name}" not in ONLY:
            continue
        argv = m["flags"] + ["--preset", name]
        if name == "8gpu_distributed":  # its memory settings on one rank: the 8-rank layout cannot run here
            argv += ["--world_size", "1", "--ulysses_size", "1", "--ring_size", "1"]
        res, log, wall = gang(f"preset:{name}", argv, [{"raw": req, "decode": True}], work)
        out.append(summarize(f"preset:{name}", res, log, wall, 1))
    return out


def part_modes(m: dict, req: dict, work: Path, cal: list[dict]) -> list[dict]:
    """Memory modes and speed knobs; the plain, swap and FSDP+offload gangs also run the calibration sizes."""
    modes = {
        "mode:plain": [],
        "mode:block_swap_20": ["--blocks_to_swap", "20"],
        "mode:offload_percent_0.5": ["--offload_percent", "0.5"],
        "mode:fsdp+offload": ["--dit_fsdp", "--offload_percent", "0.5", "--blocks_to_swap", "10"],
        "mode:compile": ["--compile"],
        "mode:teacache": [],
        "mode:fsdp+compile": ["--dit_fsdp", "--compile"],
        "mode:compile+swap+offload+teacache": ["--compile", "--blocks_to_swap", "10", "--offload_percent", "0.5"],
    }
    out = []
    for name, flags in modes.items():
        if ONLY and name not in ONLY:
            continue
        r = dict(req, teacache=0.2) if "teacache" in name else req
        reqs = [{"raw": r, "decode": False}]
        if name in ("mode:plain", "mode:block_swap_20", "mode:fsdp+offload"):
            reqs += [{"raw": dict(req, **c, sample_steps=1), "decode": False} for c in cal]
        res, log, wall = gang(name, m["flags"] + flags, reqs, work)
        out.append(summarize(name, res, log, wall, len(reqs)))
    return out


def part_faults(m: dict, req: dict, work: Path) -> list[dict]:
    """One gang with 4 streamed blocks: a good request, then each fault followed by a good request."""
    last = DIT_CONFIGS["tiny" if "--task" not in m["flags"] else "14B"].num_layers - 1
    faults = [("fault:streamed_block", {"where": "block", "block": last, "step": 1}, False),
              ("fault:attention", {"where": "attention", "block": 0, "step": 0}, False),
              ("fault:vae", {"where": "vae"}, True),
              ("fault:oom", {"where": "oom", "block": min(3, last), "step": 0}, False)]
    reqs = [{"raw": req, "decode": False}]
    for _, f, decode in faults:
        reqs += [{"raw": req, "decode": decode, "fault": {"rank": 0, **f}}, {"raw": req, "decode": decode}]
    res, log, wall = gang("faults", m["flags"] + ["--blocks_to_swap", "4"], reqs, work)
    out = []
    if len(res) != len(reqs):
        return [case(n, False, wall, 0.0, f"{len(res)} of {len(reqs)} results: " + log[-1500:].replace("\n", " | "))
                for n, _, _ in faults]
    base = in_use(res[0])
    for i, (name, _, _) in enumerate(faults):
        bad, good = res[1 + 2 * i], res[2 + 2 * i]
        back = in_use(good)
        within = abs(back - base) <= 0.01 * max(base, 1e-9)
        ok = (not bad["ok"]) and good["ok"] and within and not bad.get("restarting")
        out.append(case(name, ok, bad["seconds"], peak(bad),
                        f"failed as expected: {bad.get('error')!r}; next request ok={good['ok']} in {good['seconds']:.1f} s; "
                        f"GPU memory in use {base:.3f} GiB before, {back:.3f} GiB after ({'within' if within else 'NOT within'} 1 %)",
                        in_use_before_gib=base, in_use_after_gib=back))
    return out


def part_restart(m: dict, req: dict, work: Path) -> list[dict]:
    """A broken CUDA context (device-side assert) inside the forward: the gang exits, torchrun restarts it,
    the next request succeeds; seconds from the failed answer to the next result."""
    reqs = [{"raw": req, "decode": False}, {"raw": req, "decode": False, "fault": {"rank": 0, "where": "cuda_error", "step": 0}},
            {"raw": req, "decode": False}]
    res, log, wall = gang("restart:cuda_error", m["flags"], reqs, work, restarts=1)
    if len(res) != 3:
        return [case("restart:cuda_error", False, wall, 0.0, f"{len(res)} of 3 results: " + log[-2000:].replace("\n", " | "))]
    bad, good = res[1], res[2]
    gap = good["t"] - bad["t"]
    ok = not bad["ok"] and bad.get("restarting") and good["ok"] and good.get("attempt") == 1
    return [case("restart:cuda_error", ok, gap, peak(good),
                 f"failed: {bad.get('error')!r}; gang restarted (attempt {good.get('attempt')}); next request done "
                 f"{gap:.1f} s after the failure's answer (its own run {good['seconds']:.1f} s, so serving again after "
                 f"{gap - good['seconds']:.1f} s; model files in the page cache)", serving_again_s=round(gap - good["seconds"], 2))]


def part_paths(device: str) -> list[dict]:
    """Ulysses (all-to-all) and Ring (batched P2P to itself, two ring blocks) on a one-rank process group,
    against the local kernel at the 14B's head shapes (in a subprocess: its own process group)."""
    proc = subprocess.run([sys.executable, str(Path(__file__)), "--paths-check", "--device", device], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    say(proc.stdout[-3000:], proc.stderr[-3000:])
    try:
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [case("mode:ulysses_ring_paths", False, 0.0, 0.0, (proc.stdout + proc.stderr)[-1500:])]
    return [case("mode:ulysses_ring_paths", r["ok"], r["seconds"], r["peak_gib"], r["detail"])]


def paths_check(device: str) -> None:
    import torch.distributed as dist

    from parallel.kernels import get_kernel
    from parallel.layout import LayoutGroups, ParallelLayout
    from parallel.usp import USPAttention, ulysses_gather_seq, ulysses_scatter_seq

    dev = torch.device(device if device == "cpu" else "cuda:0")
    store = dist.FileStore(tempfile.mktemp(), 1)
    kw = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=0, world_size=1, **kw)
    group = dist.new_group([0])
    kernel = get_kernel("auto", dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    b, n, h, d = (1, 7800, 40, 128) if dev.type == "cuda" else (1, 96, 4, 16)
    g = torch.Generator(dev).manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g, device=dev).to(dtype) for _ in range(3))
    t0 = time.perf_counter()
    x = ulysses_scatter_seq(ulysses_gather_seq(q, 1, group), 1, group)  # NCCL all_to_all on one rank

    class Full:
        def valid_keys(self, block: int, length: int) -> int:
            return length

    # a ring of two blocks that are both this rank's: duplicated keys leave softmax attention unchanged
    # (gloo cannot send to itself: on a CPU only the Ulysses half runs)
    ref = kernel.attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if dev.type == "cuda":
        groups = LayoutGroups(ParallelLayout(ring=2), ring_group=group, ring_ranks=(0, 0), ring_rank=0)
        out = USPAttention(groups, Full(), kernel)(q, k, v)
        torch.cuda.synchronize()
    else:
        out = ref
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    ok = torch.equal(x, q) and err < (5e-3 if dtype == torch.bfloat16 else 1e-5)
    pk = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    print(json.dumps({"ok": ok, "seconds": time.perf_counter() - t0, "peak_gib": pk,
                      "detail": f"Ulysses all-to-all identity on one rank: {torch.equal(x, q)}; ring of 2 blocks via "
                                f"batch_isend_irecv to itself + log-sum-exp merge vs one {kernel.name} call: rel err {err:.2e} "
                                f"({b}×{n} tokens, {h} heads of {d})"}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="presets,modes,faults,restart,paths")
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes (CPU test of the lane)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", default=None, help="request size W*H (default 832*480; 208*144 with --smoke)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/gpu_lane_<gpu>.json)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--only", default=None, help="comma-separated case names to run (of the parts chosen)")
    ap.add_argument("--paths-check", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.paths_check:
        return paths_check(a.device)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_lane_"))
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    tag = "cpu" if a.device == "cpu" else gpu.split()[1].lower() if len(gpu.split()) > 1 else gpu.lower()
    out_path = Path(a.out or ROOT / "benchmarks" / "results" / f"gpu_lane_{tag}.json")
    say(f"GPU lane on {gpu}, torch {torch.__version__}, parts {a.part}, work {work}")
    parts = a.part.split(",")
    if parts == ["i2v"]:  # its own model folder only (the T2V 14B and the I2V 14B do not both fit the disk)
        m = {"flags": [] if a.smoke else ["--task"], "dit_gib": 0.0}
    else:
        m = write_models(work / "models", a.smoke, "cuda" if a.device == "cuda" else "cpu")
    size = a.size or ("208*144" if a.smoke else "832*480")
    req = {"prompt": "a red fox running through fresh snow", "size": size, "frame_num": a.frames,
           "sample_steps": a.steps, "base_seed": 7}
    cal = ([{"size": "208*144", "frame_num": 9}] if a.smoke else
           [{"size": "832*480", "frame_num": 81}, {"size": "1280*720", "frame_num": 81},
            {"size": "832*480", "frame_num": 81, "batch_size": 2}])
    global ONLY
    ONLY = set(a.only.split(",")) if a.only else None
    cases: list[dict] = []
    for p in parts:
        t0 = time.perf_counter()
        if p == "presets":
            cases += part_presets(m, req, work)
        elif p == "modes":
            cases += part_modes(m, req, work, cal)
        elif p == "faults":
            cases += part_faults(m, req, work)
        elif p == "restart":
            cases += part_restart(m, req, work)
        elif p == "paths":
            cases += part_paths(a.device)
        elif p == "i2v":
            sys.modules.setdefault("benchmarks.gpu_lane", sys.modules[__name__])
            from benchmarks import gpu_lane_i2v

            cases += gpu_lane_i2v.part_i2v(m, req, work)
        elif p in ("replan", "lora"):
            sys.modules.setdefault("benchmarks.gpu_lane", sys.modules[__name__])  # one LOG, one ONLY
            from benchmarks import gpu_lane_switch

            cases += (gpu_lane_switch.part_replan if p == "replan" else gpu_lane_switch.part_lora)(m, req, work)
        say(f"part {p}: {time.perf_counter() - t0:.0f} s")
        save(out_path, gpu, cases, m)
    raw = ROOT / "benchmarks" / "results" / "raw" / f"gpu_lane_{tag}_{'_'.join(parts)}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("\n".join(LOG) + "\n")
    for d in sorted(work.glob("*/gang.log")):  # the gangs' own logs, tails
        raw.write_text(raw.read_text() + f"\n===== {d.parent.name} =====\n" + d.read_text()[-4000:])
    failed = [c["name"] for c in cases if not c["ok"]]
    say(f"{len(cases) - len(failed)} of {len(cases)} cases ok" + (f"; failed: {', '.join(failed)}" if failed else ""))


def save(path: Path, gpu: str, cases: list[dict], m: dict) -> None:
    old = json.loads(path.read_text()) if path.exists() else {}
    names = {c["name"] for c in cases}
    merged = [c for c in old.get("cases", []) if c["name"] not in names] + cases
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "dit_file_gib": round(m["dit_gib"], 2),
                                "command": "python " + " ".join(sys.argv), "cases": merged}, indent=1) + "\n")


if __name__ == "__main__":
    main()
