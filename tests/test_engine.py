"""The single-process engine end to end: headless flags, files written, determinism, the tiny model,
and the text-encoder / VAE layouts through the public loaders."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loading import load_text_encoder, load_vae
from engine.request import GenerationRequest
from engine.text_encoder import t5_hf_to_wan
from engine.tiny import DIT_FILE, T5_FILE, VAE_FILE, ensure_tiny_model
from engine.video import probe_mp4
from tests.conftest import production_pipeline
from tests.multirank import ROOT, gang_env

SIDECAR_FIELDS = {"prompt", "negative_prompt", "seed", "size", "frame_num", "steps", "guidance", "shift", "solver",
                  "model", "random_weights", "dit_forwards", "timings", "peak_memory_gib", "memory_mode"}


def run_app(args, tiny_dir, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd, env=gang_env(tiny_dir),
                          capture_output=True, text=True, timeout=timeout)


def test_headless_run_writes_mp4_sidecar_and_latents(tiny_model_dir, tmp_path):
    save = tmp_path / "fox.mp4"
    lat = tmp_path / "deep" / "lat.safetensors"
    proc = run_app(["--prompt", "a fox in the snow", "--size", "208*144", "--frame_num", "9", "--sample_steps", "3",
                    "--base_seed", "42", "--sample_guide_scale", "4.5", "--sample_shift", "3", "--sample_solver", "euler",
                    "--save_file", str(save), "--save_latents", str(lat)], tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Saved {save}" in proc.stdout
    assert probe_mp4(save) == {"frames": 9, "width": 208, "height": 144, "codec": "h264", "pix_fmt": "yuv420p",
                               "fps": 16.0}
    meta = json.loads((tmp_path / "fox.json").read_text())
    assert set(meta) >= SIDECAR_FIELDS
    assert (meta["seed"], meta["size"], meta["frame_num"], meta["steps"], meta["guidance"], meta["shift"],
            meta["solver"]) == (42, "208*144", 9, 3, 4.5, 3.0, "euler")
    assert meta["random_weights"] is True and meta["dit_forwards"] == 6 and isinstance(meta["dit_forwards"], int)
    assert meta["negative_prompt"].startswith("色调艳丽")
    assert meta["memory_mode"] == {"blocks_to_swap": 0, "offload_percent": 0.0, "host_blocks": 0, "host_gib": 0.0,
                                   "replan_s": 0.0}
    tensors = load_file(str(lat))
    assert list(tensors) == ["latents"] and tensors["latents"].shape == (1, 16, 3, 18, 26)
    assert "RANDOM weights" in proc.stderr


def test_generated_names_never_come_from_the_prompt(tiny_model_dir, tmp_path):
    proc = run_app(["--prompt", "../../etc/passwd secret fox", "--size", "208*144", "--frame_num", "5",
                    "--sample_steps", "1", "--outputs_dir", str(tmp_path / "outputs")], tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [p.name for p in (tmp_path / "outputs").iterdir()]
    assert len(names) == 2 and all(n.startswith("wan_") for n in names)
    assert not any("fox" in n or "passwd" in n for n in names)


def test_bad_flag_values_exit_with_the_field_named(tiny_model_dir, tmp_path):
    proc = run_app(["--prompt", "x", "--size", "208*144", "--frame_num", "80"], tiny_model_dir)
    assert proc.returncode == 2
    assert "frame_num: must be 4n+1 between 1 and 241" in proc.stderr


def test_same_seed_gives_bitwise_identical_latents_and_batches_use_consecutive_seeds(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WAN_TINY_DIR", str(tiny_model_dir))
    pipe, state = production_pipeline(tiny_model_dir)
    assert state.info.key == "tiny" and state.info.random_weights
    req = GenerationRequest(prompt="a boat", width=208, height=144, frame_num=5, sample_steps=3, base_seed=11)
    a = pipe.generate(req, decode=False).latents
    b = pipe.generate(req, decode=False).latents
    assert torch.equal(a, b)
    batch = pipe.generate(GenerationRequest(**{**req.to_dict(), "batch_size": 2}), decode=False)
    nxt = pipe.generate(GenerationRequest(**{**req.to_dict(), "base_seed": 12}), decode=False).latents
    assert batch.latents.shape[0] == 2 and batch.dit_forwards == 6  # one batched forward per branch and step
    assert (batch.latents[0] - a[0]).abs().max() < 1e-4 and (batch.latents[1] - nxt[0]).abs().max() < 1e-4


def test_guidance_one_runs_one_forward_per_step(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WAN_TINY_DIR", str(tiny_model_dir))
    pipe, _ = production_pipeline(tiny_model_dir)
    req = GenerationRequest(prompt="a", width=208, height=144, frame_num=5, sample_steps=4, base_seed=1,
                            sample_guide_scale=1.0)
    assert pipe.generate(req, decode=False).dit_forwards == 4


def _race(root: str) -> str:
    ensure_tiny_model(root)
    return load_file(f"{root}/diffusion_models/{DIT_FILE}")["head.head.bias"].sum().item()


def test_tiny_model_generated_by_racing_processes_is_complete_and_identical(tmp_path):
    root = str(tmp_path / "tiny")
    with mp.get_context("spawn").Pool(3) as pool:
        sums = pool.map(_race, [root] * 3)
    assert len(set(sums)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary folders left behind
    for sub, name in (("diffusion_models", DIT_FILE), ("text_encoders", T5_FILE), ("vae", VAE_FILE)):
        assert (tmp_path / "tiny" / sub / name).exists()


def test_text_encoder_from_wan_pth_and_hf_safetensors_gives_same_embeddings(tiny_model_dir, tmp_path):
    hf = load_file(str(tiny_model_dir / "text_encoders" / T5_FILE))
    torch.save(t5_hf_to_wan(hf), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    tok = tiny_model_dir / "text_encoders" / "tokenizer"
    a = load_text_encoder(tiny_model_dir / "text_encoders" / T5_FILE, tok)
    b = load_text_encoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", tok)
    prompts = ["a fox in the snow", "un renard dans la neige, très détaillé"]
    for x, y in zip(a.encode(prompts), b.encode(prompts)):
        assert torch.equal(x, y)
    assert a.encode(prompts)[0].shape[0] == a.count_tokens(prompts[0])


def test_text_encoder_without_tokenizer_says_where_it_looked(tiny_model_dir, tmp_path):
    from engine.checkpoint import ModelNotFoundError

    save_file(load_file(str(tiny_model_dir / "text_encoders" / T5_FILE)), tmp_path / "umt5.safetensors")
    with pytest.raises(ModelNotFoundError, match="no tokenizer for .*umt5.safetensors: looked for tokenizer"):
        load_text_encoder(tmp_path / "umt5.safetensors")


def test_vae_from_diffusers_folder_equals_official_file(tiny_model_dir, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    official = load_file(str(tiny_model_dir / "vae" / VAE_FILE))
    (tmp_path / "vae").mkdir()
    save_file(convert_wan_vae_to_diffusers(dict(official)), tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    a = load_vae(tiny_model_dir / "vae" / VAE_FILE)
    b = load_vae(tmp_path / "vae")
    z = torch.randn(1, 16, 2, 4, 6)
    with torch.no_grad():
        assert torch.equal(a.decode(z), b.decode(z))


def test_task_flag_refuses_a_file_of_another_size(tiny_model_dir):
    """The user's files must be the task's model (the embedded tiny model stands in only when there are none)."""
    proc = run_app(["--prompt", "x", "--task", "t2v-1.3B", "--size", "832*480", "--frame_num", "5",
                    "--model_dir", str(tiny_model_dir)], tiny_model_dir)
    assert proc.returncode == 2
    assert "does not match the Wan2.1 DiT (1.3B): tensor 'patch_embedding.weight' has shape (512, 16, 1, 2, 2) in " \
           "the file but the model expects (1536, 16, 1, 2, 2)" in proc.stderr
