"""engine/clip.py: the Wan2.1 I2V image encoder against transformers' CLIPVisionModel, its file layouts,
its preprocessing and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.checkpoint import LazyStateDict, WrongModelError, open_checkpoint
from engine.clip import (
    CLIP_H14,
    CLIP_MEAN,
    CLIP_STD,
    TINY_CLIP,
    ClipVisionConfig,
    WanImageEncoder,
    clip_preprocess,
    image_encoder_layout,
    load_image_encoder,
    write_random_image_encoder,
)
from engine.factory import marked_random
from tests.clip_util import random_hf_model, reference_model, write_all_layouts


def _images(n: int = 2, h: int = 40, w: int = 50, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = random_hf_model(TINY_CLIP, seed=0)
    return hf, write_all_layouts(hf, tmp_path_factory.mktemp("clip"))


def _hidden_states(hf, pixels: torch.Tensor):
    with torch.no_grad():
        return reference_model(hf)(pixel_values=pixels, output_hidden_states=True).hidden_states


def test_tokens_equal_transformers_hidden_states_of_the_penultimate_block(tiny):
    hf, paths = tiny
    images = _images()
    hs = _hidden_states(hf, clip_preprocess(images, TINY_CLIP.image_size))
    # hidden_states[0] is the embeddings AFTER pre_layrnorm, hidden_states[i] the output of block i (1-based)
    assert len(hs) == TINY_CLIP.layers + 1
    enc = load_image_encoder(paths["comfyui"], "cpu", torch.float32)
    assert len(enc.blocks) == TINY_CLIP.layers - 1
    out = enc.encode(images)
    assert out.shape == (2, TINY_CLIP.tokens, TINY_CLIP.width)
    torch.testing.assert_close(out, hs[TINY_CLIP.layers - 1], atol=1e-5, rtol=0)
    with torch.no_grad():  # hidden_states[0] = pre_norm(patches + class token + positions)
        x = enc.patch_embedding(clip_preprocess(images, 28)).flatten(2).transpose(1, 2)
        x = torch.cat([enc.cls_embedding.expand(2, -1, -1), x], 1) + enc.pos_embedding
        torch.testing.assert_close(enc.pre_norm(x), hs[0], atol=1e-5, rtol=0)


def test_all_layouts_written_from_the_same_weights_give_identical_features(tiny):
    _, paths = tiny
    images = _images()
    expect = {"official": "official", "comfyui": "transformers", "diffusers": "transformers", "open_clip": "open_clip"}
    outs = {}
    for name, path in paths.items():
        assert image_encoder_layout(open_checkpoint(path), path) == expect[name]
        enc = load_image_encoder(path, "cpu", torch.float32)
        assert enc.cfg == TINY_CLIP
        outs[name] = enc.encode(images)
    for name, out in outs.items():
        assert torch.equal(out, outs["official"]), name


def test_preprocess_matches_a_direct_computation():
    images = _images(1, 33, 47)
    got = clip_preprocess(images, 28)
    for c in range(3):
        plane = F.interpolate(images[:, c : c + 1], size=(28, 28), mode="bicubic", align_corners=False)[0, 0]
        want = ((plane + 1) / 2 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(got[0, c], want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="N, 3, H, W"):
        clip_preprocess(images[0], 28)


def test_a_wider_model_takes_its_heads_from_the_diffusers_config(tmp_path):
    cfg = ClipVisionConfig(image_size=28, patch_size=14, width=96, layers=3, heads=6, mlp=128)
    hf = random_hf_model(cfg, seed=3)
    paths = write_all_layouts(hf, tmp_path)
    assert json.loads((paths["diffusers"] / "config.json").read_text())["num_attention_heads"] == 6
    enc = load_image_encoder(paths["diffusers"], "cpu", torch.float32)
    assert enc.cfg.heads == 6
    images = _images(1)
    hs = _hidden_states(hf, clip_preprocess(images, 28))
    torch.testing.assert_close(enc.encode(images), hs[cfg.layers - 1], atol=1e-5, rtol=0)
    with pytest.raises(WrongModelError, match="attention heads"):  # no config, width not in the table
        load_image_encoder(paths["comfyui"], "cpu", torch.float32)


def test_real_vit_h14_shapes_match_transformers_at_two_blocks():
    cfg = ClipVisionConfig(layers=2)  # ViT-H/14 width, heads, MLP and 257 tokens; 2 blocks keep it fast
    hf = random_hf_model(cfg, seed=4)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "clip_vision_h.safetensors"
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
        enc = load_image_encoder(path, "cpu", torch.float32)
    images = _images(1, 480, 832)
    out = enc.encode(images)
    assert out.shape == (1, 257, 1280)
    torch.testing.assert_close(out, _hidden_states(hf, clip_preprocess(images, 224))[1], atol=1e-5, rtol=0)


def test_full_h14_on_meta_has_31_blocks_and_the_official_output_shape():
    with torch.device("meta"):
        enc = WanImageEncoder(CLIP_H14)
        out = enc(torch.empty(2, 3, 224, 224))
    assert len(enc.blocks) == 31 and out.shape == (2, 257, 1280)
    block = sum(p.numel() for p in enc.blocks[0].parameters())
    assert block == 12 * 1280**2 + 13 * 1280  # qkv + proj + 2-layer MLP of 5120 + norms


def test_random_writer_is_marked_and_loads_deterministically(tmp_path):
    a = write_random_image_encoder(tmp_path / "a.safetensors", TINY_CLIP, seed=7)
    b = write_random_image_encoder(tmp_path / "b.safetensors", TINY_CLIP, seed=7)
    assert marked_random(a)
    enc = load_image_encoder(a, "cpu", torch.float32)
    out = enc.encode(_images())
    assert torch.equal(load_image_encoder(b, "cpu", torch.float32).encode(_images()), out)
    assert enc.cfg == TINY_CLIP and out.shape == (2, 5, 64) and torch.isfinite(out).all()
    odd = ClipVisionConfig(image_size=42, patch_size=14, width=48, layers=2, heads=3, mlp=96)
    assert load_image_encoder(write_random_image_encoder(tmp_path / "c.safetensors", odd), "cpu", torch.float32).cfg == odd
    bf16 = load_image_encoder(a, "cpu", torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.encode(_images()).float(), out, atol=0.1, rtol=0.05)


def test_a_file_of_another_model_is_refused_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2)},
              str(path))
    with pytest.raises(WrongModelError, match=r"dit\.safetensors.*unexpected tensor 'blocks\.0\.self_attn\.q\.weight'"):
        load_image_encoder(path, "cpu", torch.float32)
    with pytest.raises(WrongModelError, match="unexpected tensor 'vision_model.extra'"):
        image_encoder_layout(["vision_model.embeddings.patch_embedding.weight", "vision_model.extra"], "x")


def test_wrong_shapes_and_integer_tensors_are_refused_before_reading_data(tmp_path, tiny, monkeypatch):
    hf, _ = tiny
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    bad_shape = dict(sd, **{"vision_model.encoder.layers.1.self_attn.k_proj.weight": torch.zeros(64, 32)})
    bad_dtype = dict(sd, **{"vision_model.encoder.layers.0.mlp.fc2.bias": torch.zeros(64, dtype=torch.int32)})
    save_file(bad_shape, str(tmp_path / "shape.safetensors"))
    save_file(bad_dtype, str(tmp_path / "dtype.safetensors"))

    def no_read(self, name):
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(LazyStateDict, "__getitem__", no_read)
    with pytest.raises(WrongModelError, match=r"k_proj\.weight' has shape \(64, 32\)"):
        load_image_encoder(tmp_path / "shape.safetensors", "cpu", torch.float32)
    with pytest.raises(WrongModelError, match="dtype I32"):
        load_image_encoder(tmp_path / "dtype.safetensors", "cpu", torch.float32)
