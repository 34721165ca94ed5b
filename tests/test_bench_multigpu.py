"""benchmarks/bench_multigpu.py end to end on the CPU (2 gloo ranks, the tiny model, tiny sizes), and the
random real-shape model files it writes for the GPU run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine.config import DIT_CONFIGS
from parallel.layout import valid_layouts
from tests.multirank import ROOT, gang_env

TINY_SIZES = ["--check_size", "64*64", "--check_frames", "5", "--check_steps", "2",
              "--forward_size", "64*64", "--forward_frames", "5", "--forward_runs", "1", "--forward_warmup", "0",
              "--peak_size", "64*64", "--peak_frames", "5", "--peak_steps", "1",
              "--e2e_size", "64*64", "--e2e_frames", "5", "--e2e_steps", "2"]


@pytest.mark.multirank
def test_two_gloo_ranks_write_every_measurement(tiny_model_dir, tmp_path):
    from benchmarks.bench_multigpu import KEYS
    from engine.memory_estimate import estimate, inputs_from_dict

    out, raw = tmp_path / "multigpu_2gpu.json", tmp_path / "raw" / "multigpu_2gpu.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           str(ROOT / "benchmarks" / "bench_multigpu.py"),
           "--model", "tiny", "--weights_dir", str(tmp_path / "models"), "--no_compile", "--out", str(out),
           "--raw", str(raw), *TINY_SIZES]
    proc = subprocess.run(cmd, cwd=ROOT, env=gang_env(tiny_model_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    res = json.loads(out.read_text())
    assert list(res) == list(KEYS)
    assert (res["gpu"], res["gpus"], res["torch"]) == ("cpu", 2, torch.__version__)
    layouts = [str(lay) for lay in valid_layouts(2, DIT_CONFIGS["tiny"].num_heads)]
    assert layouts == ["ulysses 1 × ring 2", "ulysses 2 × ring 1", "cfg 2 × ulysses 1 × ring 1"]
    errors = res["equal_to_one_gpu"]
    assert set(errors) == {*layouts, "dit_fsdp, ulysses 2 × ring 1"}
    assert all(isinstance(v, float) and 0 <= v < 1e-4 for v in errors.values()), errors  # fp32 on the CPU
    assert set(res["forward_ms"]) == {"1", *layouts} and all(v > 0 for v in res["forward_ms"].values())
    assert res["scaling"] == {k: res["forward_ms"]["1"] / res["forward_ms"][k] for k in layouts}
    # single_gpu pins world_size 1 and 8gpu_distributed world_size 8: neither runs on 2 ranks
    peaks = res["peak_gib_per_gpu"]
    assert set(peaks) == {"default", "dit_fsdp", "balanced", "low_vram", "max_speed", "auto", "distilled_4step", "fp8_24gb",
                          "fp8_speed"}
    for name, per_rank in peaks.items():
        assert len(per_rank) == 2 and all(isinstance(v, float) and v > 0 for v in per_rank), (name, per_rank)
    assert isinstance(res["end_to_end_s"], float) and res["end_to_end_s"] > 0
    assert {"text_encoder", "denoise", "per_step", "vae_decode"} <= set(res["stages"])
    assert all(isinstance(v, float) and v >= 0 for v in res["stages"].values())
    log = raw.read_text(encoding="utf-8")
    assert "setting 8gpu_distributed: skipped" in log and "setting single_gpu: skipped" in log
    lines = [json.loads(s.split(" ", 1)[1]) for s in log.splitlines() if s.startswith("memory-estimate ")]
    assert [d["setting"] for d in lines] == list(peaks)
    assert all(estimate(inputs_from_dict(d["inputs"])).allocated > 0 for d in lines)  # ready for fit_calibration


def test_random_real_shape_files_load_through_the_normal_loaders(tmp_path):
    from benchmarks.random_weights import DIT_FILE, write_model_dir
    from engine.factory import marked_random
    from engine.loading import load_dit, load_text_encoder, load_vae
    from engine.model_files import find_model_files
    from engine.tiny import TINY_T5

    root = write_model_dir(tmp_path / "models", "tiny", t5=TINY_T5, vae_dim=16)
    files = find_model_files(root)
    assert files.dit.name == DIT_FILE.format(key="tiny") and not marked_random(files.dit)  # real model key, real sizes
    dit = load_dit(files.dit, "cpu", torch.float32)
    assert dit.cfg == DIT_CONFIGS["tiny"]
    te = load_text_encoder(files.t5, files.tokenizer)
    assert te.encode(["a fox"])[0].shape[1] == TINY_T5["d_model"]
    vae = load_vae(files.vae)
    assert vae.decoder.conv1.out_channels == 4 * 16
    assert write_model_dir(root, "tiny") == root  # already there: not rewritten
