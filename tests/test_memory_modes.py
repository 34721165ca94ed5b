"""Block swap and offload percent change nothing numerically; TeaCache skips where it should and agrees
across ranks; presets load (the guide's JSON too)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.loading import load_dit
from engine.request import GenerationRequest
from engine.tiny import DIT_FILE
from parallel.offload import apply_offload, plan_offload
from tests.conftest import production_pipeline, reference_file, rel_err
from tests.multirank import ROOT, gang_env, latents, run_gang


@pytest.fixture(scope="module")
def dit_path(tiny_model_dir):
    return tiny_model_dir / "diffusion_models" / DIT_FILE


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 18, 26, generator=g), torch.tensor([800.0]), torch.randn(1, 9, 64, generator=g)


@pytest.mark.parametrize("swap, percent", [(1, 0.0), (3, 0.0), (0, 0.5), (1, 0.5), (0, 1.0), (99, 0.0)])
def test_block_swap_and_offload_leave_outputs_bitwise_unchanged(dit_path, swap, percent):
    x, t, ctx = _inputs()
    plain = load_dit(dit_path)
    with torch.no_grad():
        ref = plain(x, t, ctx)
    model = load_dit(dit_path)
    streamer = apply_offload(model, plan_offload(model.blocks, swap, percent), torch.device("cpu"))
    with torch.no_grad():
        out1 = model(x, t, ctx)
        out2 = model(x, t, ctx)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    units = len(streamer.units)
    assert units == (min(swap, 3) if percent == 0 else 3)
    # every unit copied in once per forward; the last block also prefetches the first for the next forward
    assert streamer.copies_in == 2 * units + (1 if units > 1 else 0)
    assert streamer.releases == 2 * units
    assert streamer.max_on_device <= 2, "at most the running block and the prefetched next one"
    for p in model.blocks[-1].parameters():  # swapped weights are not left on the device between forwards
        assert p.numel() == 0 or swap == 0


def test_offload_percent_takes_that_share_of_bytes(dit_path):
    model = load_dit(dit_path)
    plan = plan_offload(model.blocks, 1, 0.5)
    others = plan.total_bytes - plan.host_bytes
    assert plan.swapped == [2]
    share = (plan.host_bytes - plan.total_bytes / 3) / (2 * plan.total_bytes / 3)
    assert 0.35 < share < 0.65, share
    assert others > 0
    with pytest.raises(ValueError, match="offload_percent must be between 0 and 1, got 1.5"):
        plan_offload(model.blocks, 0, 1.5)


def test_teacache_skips_forwards_and_keeps_first_and_last_steps(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WAN_TINY_DIR", str(tiny_model_dir))
    pipe, state = production_pipeline(tiny_model_dir)
    assert pipe.model_key == state.info.key == "tiny"  # TeaCache's coefficients are chosen by this key
    req = GenerationRequest(prompt="a fox", width=208, height=144, frame_num=5, sample_steps=12, base_seed=3)
    base = pipe.generate(req, decode=False)
    cached = pipe.generate(GenerationRequest(**{**req.to_dict(), "teacache": 0.15}), decode=False)
    skipped = cached.info["skipped_steps"]
    assert base.dit_forwards == 24 and base.info["skipped_steps"] == []
    assert len(skipped) > 0 and cached.dit_forwards == 24 - len(skipped)
    steps = {s for s, _ in skipped}
    assert 0 not in steps and 11 not in steps
    assert {b for _, b in skipped} <= {"cond", "uncond"}
    assert 0 < rel_err(cached.latents, base.latents) < 0.5  # an approximation, not a no-op


@pytest.mark.multirank
def test_teacache_under_ulysses2_ring2_decides_like_one_process(tiny_model_dir, tmp_path):
    raw = {"prompt": "a fox", "size": "208*144", "frame_num": 5, "sample_steps": 12, "base_seed": 3, "teacache": 0.15}
    one, _ = run_gang(1, ["--dtype", "fp32"], [{"raw": raw, "save_latents": str(tmp_path / "one.st"), "decode": False}],
                      tmp_path / "one", tiny_model_dir)
    four, _ = run_gang(4, ["--dtype", "fp32", "--ulysses_size", "2", "--ring_size", "2"],
                       [{"raw": raw, "save_latents": str(tmp_path / "four.st"), "decode": False}], tmp_path / "four", tiny_model_dir)
    assert one[0]["meta"]["skipped_steps"], "the threshold must make TeaCache skip here"
    assert four[0]["meta"]["skipped_steps"] == one[0]["meta"]["skipped_steps"]
    assert four[0]["meta"]["dit_forwards"] == one[0]["meta"]["dit_forwards"]
    assert rel_err(latents(tmp_path / "four.st"), latents(tmp_path / "one.st")) < 1e-5


@pytest.mark.multirank
def test_swap_and_offload_with_fsdp_ulysses2_ring2_leave_latents_unchanged(tiny_model_dir, tmp_path):
    raw = {"prompt": "a fox", "size": "208*144", "frame_num": 9, "sample_steps": 3, "base_seed": 5}
    argv = ["--dtype", "fp32", "--use_fsdp", "--ulysses_size", "2", "--ring_size", "2"]
    plain, _ = run_gang(4, argv, [{"raw": raw, "save_latents": str(tmp_path / "a.st"), "decode": False}], tmp_path / "a",
                        tiny_model_dir)
    off, log = run_gang(4, argv + ["--blocks_to_swap", "1", "--offload_percent", "0.5"],
                        [{"raw": raw, "save_latents": str(tmp_path / "b.st"), "decode": False}], tmp_path / "b", tiny_model_dir)
    assert plain[0]["ok"] and off[0]["ok"]
    assert "offload under FSDP: 2 whole blocks (1 swapped + offload_percent 0.5 of the others)" in log
    assert torch.equal(latents(tmp_path / "a.st"), latents(tmp_path / "b.st"))


@pytest.mark.multirank
def test_swap_and_offload_without_fsdp_on_four_ranks_leave_latents_unchanged(tiny_model_dir, tmp_path):
    raw = {"prompt": "a fox", "size": "208*144", "frame_num": 9, "sample_steps": 3, "base_seed": 5}
    argv = ["--dtype", "fp32", "--ulysses_size", "2", "--ring_size", "2"]
    plain, _ = run_gang(4, argv, [{"raw": raw, "save_latents": str(tmp_path / "a.st"), "decode": False}], tmp_path / "a",
                        tiny_model_dir)
    off, _ = run_gang(4, argv + ["--blocks_to_swap", "2", "--offload_percent", "1.0"],
                      [{"raw": raw, "save_latents": str(tmp_path / "b.st"), "decode": False}], tmp_path / "b", tiny_model_dir)
    assert torch.equal(latents(tmp_path / "a.st"), latents(tmp_path / "b.st"))


# -- presets ---------------------------------------------------------------------------------------------
def test_every_preset_loads_into_the_run_config():
    from engine.cli import merge_config
    from presets import available_presets, load_preset

    names = available_presets()
    assert {"max_speed", "balanced", "low_vram", "single_gpu", "8gpu_distributed"} <= set(names)
    for name in names:
        cfg = merge_config(load_preset(name), {})
        assert 0 <= cfg.offload_percent <= 1
    guide = merge_config(load_preset("8gpu_distributed"), {})
    assert (guide.world_size, guide.ulysses_size, guide.ring_size) == (8, 2, 4)
    assert guide.use_fsdp and guide.t5_fsdp and guide.dit_fsdp and guide.use_context_parallel
    assert (guide.offload_percent, guide.blocks_to_swap, guide.compile, guide.teacache) == (0.5, 10, True, 0.2)
    assert guide.teacache_cache_device == "cpu"
    # CLI beats preset
    assert merge_config(load_preset("balanced"), {"blocks_to_swap": 3}).blocks_to_swap == 3


def test_the_guides_json_block_loads_as_a_preset(tmp_path):
    from presets import load_preset

    guide = reference_file("seed/8gpu_distributed_inference_guide.md").read_text()
    block = guide.split("```json", 1)[1].split("```", 1)[0]
    (tmp_path / "guide.json").write_text(block)
    values = load_preset(str(tmp_path / "guide.json"))
    assert values == {"world_size": 8, "use_fsdp": True, "use_context_parallel": True, "ulysses_size": 2,
                      "ring_size": 4, "t5_fsdp": True, "dit_fsdp": True}


def test_preset_world_size_mismatch_names_both(tiny_model_dir):
    proc = subprocess.run([sys.executable, "app.py", "--preset", "8gpu_distributed", "--prompt", "x"], cwd=ROOT,
                          env=gang_env(tiny_model_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "the preset/config asks for world_size 8 but 1 process(es) are running" in proc.stderr


def test_auto_preset_rule():
    from presets.auto import auto_settings

    big = auto_settings(8, 78.0, 26.6, 10.6, 40, 5120)
    assert big == {"use_fsdp": False, "t5_cpu": False, "blocks_to_swap": 0, "offload_percent": 0.0, "vae_tiling": False}
    four_small = auto_settings(4, 23.0, 26.6, 10.6, 40, 5120)
    assert four_small["use_fsdp"] and four_small["blocks_to_swap"] == 0 and not four_small["t5_cpu"]
    one_small = auto_settings(1, 23.0, 26.6, 10.6, 40, 5120)
    assert one_small["t5_cpu"] and one_small["vae_tiling"] and one_small["blocks_to_swap"] == 27
    tiny_card = auto_settings(1, 4.0, 26.6, 10.6, 40, 5120)
    assert (tiny_card["blocks_to_swap"], tiny_card["offload_percent"]) == (40, 1.0)
    card_24gb = auto_settings(1, 23.0, 26.6, 10.6, 40, 5120, fp8_ok=True)  # fp8 avoids the 27 swapped blocks
    assert card_24gb["quantize"] == "fp8" and card_24gb["t5_cpu"] and card_24gb["blocks_to_swap"] == 0
    assert "quantize" not in auto_settings(1, 12.0, 26.6, 10.6, 40, 5120, fp8_ok=True)  # too small even in fp8


def test_block_swap_in_a_bf16_run_keeps_the_fp32_tensors_and_the_output(dit_path):
    from types import SimpleNamespace

    from parallel.apply import load_dit_placed

    x, t, ctx = _inputs()
    plain = load_dit(dit_path, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = plain(x, t, ctx)
    cfg = SimpleNamespace(task=None, blocks_to_swap=1, offload_percent=0.5)
    model = load_dit_placed(cfg, SimpleNamespace(dit=dit_path), SimpleNamespace(device=torch.device("cpu")),
                            torch.bfloat16, None)
    streamer = model.block_runner.streamer
    host = {id(p): h for unit in streamer.units.values() for p, h in unit}
    for name, p in model.named_parameters():  # the host copies too: each tensor in its run dtype
        want = plain.get_parameter(name).dtype
        assert p.dtype == host.get(id(p), p).dtype == want, name
    assert plain.blocks[2].modulation.dtype == torch.float32 and plain.blocks[2].ffn[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref)
