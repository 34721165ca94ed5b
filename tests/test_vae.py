"""Wan2.1 VAE: official key layout, parity with diffusers' AutoencoderKLWan, chunking, exact tiled decode."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from engine.vae import (
    VAE_MEAN,
    VAE_STD,
    WanVAE,
    is_diffusers_vae,
    latent_stats,
    split_spans,
    tail_halo,
    vae_config_from_state_dict,
    vae_name_from_diffusers,
    vae_state_dict_from_diffusers,
)
from tests.conftest import official_keys, rel_err
from tests.weights import random_state_dict

DIM = 16  # small width for parity tests; the structure (levels, blocks, temporal) is the official one


def build(seed: int = 0, **cfg) -> tuple[WanVAE, dict[str, torch.Tensor]]:
    """A WanVAE built on the meta device and filled with seeded, well-scaled random official weights."""
    with torch.device("meta"):
        vae = WanVAE(**cfg)
    sd = random_state_dict(vae, seed)
    vae.load_state_dict(sd, assign=True)
    return vae.eval().requires_grad_(False), sd


def video(frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random video (1, 3, F, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, frames, h // 4, w // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(frames, h, w), mode="trilinear")
    return x.clamp(-1, 1)


@pytest.fixture(scope="module")
def pair():
    """Our VAE and diffusers' AutoencoderKLWan holding the same random weights (via diffusers' converter)."""
    ours, sd = build(seed=0, dim=DIM)
    ref = AutoencoderKLWan(
        base_dim=DIM,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
    )
    ref.load_state_dict(convert_wan_vae_to_diffusers(sd), strict=True)
    return ours, ref.eval()


def stats(z_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = latent_stats(z_dim)
    return torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Key layout, configs, diffusers names
# ----------------------------------------------------------------------------------------------------
def test_meta_built_default_vae_has_exactly_the_official_keys_and_shapes():
    with torch.device("meta"):
        vae = WanVAE()
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert got == official_keys("keys_vae")
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert all(t.is_meta for t in vae.state_dict().values())
    assert len(list(vae.buffers())) == 0  # latent mean/std are constants, not state


def test_config_is_inferred_from_official_shapes():
    for cfg in (
        {},
        {"dim": 16},
        {"dim": 32, "z_dim": 4},
        {"dim": 8, "dim_mult": (1, 2, 2), "num_res_blocks": 1, "temporal_downsample": (True, False)},
    ):
        with torch.device("meta"):
            sd = WanVAE(**cfg).state_dict()
        full = {
            "dim": 96,
            "z_dim": 16,
            "dim_mult": (1, 2, 4, 4),
            "num_res_blocks": 2,
            "temporal_downsample": (False, True, True),
        }
        assert vae_config_from_state_dict(sd) == {**full, **cfg}
    with pytest.raises(ValueError, match="encoder.conv1.weight"):
        vae_config_from_state_dict({"decoder.conv1.weight": torch.empty(0)})


def test_diffusers_names_round_trip_to_official_names():
    with torch.device("meta"):
        official = WanVAE().state_dict()
        diffusers_names = set(AutoencoderKLWan().state_dict())
    converted = convert_wan_vae_to_diffusers(official)
    assert set(converted) == diffusers_names
    assert is_diffusers_vae(converted) and is_diffusers_vae(list(converted))
    assert not is_diffusers_vae(official)
    back = vae_state_dict_from_diffusers(converted)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in official.items()}
    assert all(vae_name_from_diffusers(d) == o for d, o in zip(converted, official))


def test_latent_stats_use_official_values_for_the_first_16_channels_and_identity_beyond():
    assert latent_stats(16) == (VAE_MEAN, VAE_STD)
    assert latent_stats(4) == (VAE_MEAN[:4], VAE_STD[:4])
    mean, std = latent_stats(20)
    assert mean == VAE_MEAN + [0.0] * 4 and std == VAE_STD + [1.0] * 4


# ----------------------------------------------------------------------------------------------------
# Numerics against diffusers
# ----------------------------------------------------------------------------------------------------
def test_encode_matches_diffusers_autoencoder(pair):
    ours, ref = pair
    x = video(9, 48, 64)  # non-square, 9 frames → 3 latent frames (chunks 1, 4, 4)
    with torch.no_grad():
        z = ours.encode(x)
        mean, std = stats()
        want = (ref.encode(x).latent_dist.mode() - mean) / std
    assert z.shape == (1, 16, 3, 6, 8)
    assert rel_err(z, want) < 1e-4


def test_decode_matches_diffusers_autoencoder(pair):
    ours, ref = pair
    z = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ours.decode(z)
        mean, std = stats()
        want = ref.decode(z * std + mean).sample  # diffusers decodes un-normalised latents
    assert out.shape == (1, 3, 9, 48, 64)
    assert (out.abs() < 1).float().mean() > 0.9  # the comparison is not dominated by the clamp
    assert rel_err(out, want) < 1e-4


def test_frame_counts_follow_the_causal_rule(pair):
    ours, _ = pair
    with torch.no_grad():
        for t, frames in ((1, 1), (2, 5), (3, 9)):
            z = torch.randn(1, 16, t, 4, 6)
            out = ours.decode(z)
            assert out.shape == (1, 3, frames, 32, 48)
            assert ours.encode(out).shape == z.shape
        with pytest.raises(ValueError, match="1\\+4k"):
            ours.encode(torch.zeros(1, 3, 8, 32, 48))
        with pytest.raises(ValueError, match="multiples of 8"):
            ours.encode(torch.zeros(1, 3, 5, 36, 48))


def test_two_decodes_are_bitwise_identical_and_leave_no_state(pair):
    ours, _ = pair
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        a = ours.decode(z)
        ours.encode(video(9, 32, 48))  # an unrelated call in between must not leak into the next decode
        b = ours.decode(z)
    assert torch.equal(a, b)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


# ----------------------------------------------------------------------------------------------------
# Tiled decode
# ----------------------------------------------------------------------------------------------------
def test_split_spans_cover_the_size_with_near_equal_tiles():
    assert split_spans(10, 4) == [(0, 3), (3, 6), (6, 10)]
    assert split_spans(8, 8) == [(0, 8)] and split_spans(5, 100) == [(0, 5)]
    assert tail_halo(2, 4) == 13 and tail_halo(1, 4) == 9


@pytest.mark.parametrize("num_res_blocks", [2, 1])
def test_tail_halo_is_the_measured_receptive_field_of_the_tail(num_res_blocks):
    vae, _ = build(seed=3, dim=4, num_res_blocks=num_res_blocks)
    feats = torch.randn(1, 16, 1, 28, 28).requires_grad_(True)  # one latent frame of tail input (C = 4·dim)
    out = vae.decode_tail(feats)  # (1, 3, 1, 224, 224)
    reach = []
    for py, px in ((112, 112), (119, 119)):  # an even and an odd output pixel inside latent pixel (14, 14)
        (grad,) = torch.autograd.grad(out[0, :, 0, py, px].sum(), feats, retain_graph=True)
        rows, cols = grad.abs().sum((0, 1, 2)).nonzero().unbind(1)
        reach += [
            14 - rows.min().item(),
            rows.max().item() - 14,
            14 - cols.min().item(),
            cols.max().item() - 14,
        ]
    assert max(reach) == vae.tail_halo == tail_halo(num_res_blocks, 4)


def test_tiled_decode_matches_untiled_on_a_non_square_frame():
    vae, _ = build(seed=4, dim=4, num_res_blocks=1)  # halo 9 latent px, so tiles really cut the frame
    z = torch.randn(1, 16, 2, 28, 36, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = vae.decode(z)
        tiled = vae.decode(z, tile=(10, 13))  # 3 × 3 tiles; neither size divides 28 × 36
        feats = vae.decode_middle(z)
        window = vae.decode_tail(feats, region=((12, 20), (5, 30))).clamp(-1, 1)  # a patch-parallel slice
    assert len(split_spans(28, 10)) == 3 and len(split_spans(36, 13)) == 3
    assert 12 + 2 * vae.tail_halo < 36  # a middle column tile with its halo is narrower than the frame
    assert tiled.shape == full.shape == (1, 3, 5, 224, 288)
    assert (tiled - full).abs().max() < 1e-3
    assert (window - full[..., 96:160, 40:240]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="outside"):
        vae.decode_tail(feats, region=((0, 29), (0, 36)))


def test_decode_runs_in_the_parameter_dtype():
    vae, _ = build(seed=6, dim=4)
    z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = vae.decode(z)
        got = vae.to(torch.bfloat16).decode(z)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel_err(got.float(), want) < 0.05
