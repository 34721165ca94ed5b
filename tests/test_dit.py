"""The DiT matches diffusers' WanTransformer3DModel and has the official key layout."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.checkpoint import cast_to_run_dtype
from engine.config import DIT_CONFIGS, DiTConfig
from engine.dit import WanDiT, rope_table
from engine.loading import build_dit
from tests.conftest import official_keys, rel_err
from tests.weights import random_state_dict

SMALL = DiTConfig(dim=256, ffn_dim=512, num_layers=2, text_dim=64)


def diffusers_model(cfg: DiTConfig, sd: dict[str, torch.Tensor]):
    """The same weights in diffusers' model, through diffusers' own official→diffusers converter."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    missing, unexpected = ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(sd)), strict=True)
    assert not missing and not unexpected
    return ref.eval()


@pytest.fixture(scope="module")
def pair():
    model = WanDiT(SMALL)
    sd = random_state_dict(model, seed=1)
    model.load_state_dict(sd)
    return model.eval(), diffusers_model(SMALL, sd)


@pytest.mark.parametrize("timesteps", [(999.0, 500.0), (92.0, 3.0)])
def test_forward_matches_diffusers_on_non_square_grid(pair, timesteps):
    ours, ref = pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 3, 12, 20, generator=g)  # grid (3, 6, 10): non-square
    t = torch.tensor(timesteps)
    ctx = torch.zeros(2, 512, 64)
    ctx[0, :7] = torch.randn(7, 64, generator=g)  # real tokens, zero rows beyond (as the pipeline pads)
    ctx[1, :30] = torch.randn(30, 64, generator=g)
    with torch.no_grad():
        a = ours(x, t, ctx[:, :30])  # our model pads to 512 itself
        b = ref(x, t, ctx, return_dict=False)[0]
    assert a.shape == (2, 16, 3, 12, 20)
    assert rel_err(a, b) < 1e-5


def test_forward_is_deterministic(pair):
    ours, _ = pair
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.equal(ours(x, t, ctx), ours(x, t, ctx))


@pytest.mark.parametrize("size", ["1.3B", "14B"])
def test_state_dict_matches_official_keys(size):
    expected = official_keys(f"keys_dit_{size}")
    model = build_dit(DIT_CONFIGS[size])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_official_param_counts():
    for size, n in (("1.3B", 1_418_996_800), ("14B", 14_288_491_584)):
        assert sum(p.numel() for p in build_dit(DIT_CONFIGS[size]).parameters()) == n


def test_rope_table_uses_per_axis_ladders_and_token_order():
    tab = rope_table((3, 4, 5), 128, torch.device("cpu"))  # (L, 2, 128): cos, ±sin per channel
    assert tab.shape == (60, 2, 128)
    assert torch.equal(tab[:, 0, 0::2], tab[:, 0, 1::2]) and torch.equal(tab[:, 1, 0::2], -tab[:, 1, 1::2])
    ang = torch.atan2(tab[:, 1, 1::2], tab[:, 0, 0::2]).double()  # (L, 64)
    # token (f=2, h=0, w=0): only the 22 time slots rotate, slot 1 at 2 * 10000^(-2/44)
    tok = 2 * 20
    assert torch.allclose(ang[tok, 1], torch.tensor(2 * 10000 ** (-2 / 44), dtype=torch.float64), atol=1e-6)
    assert torch.all(ang[tok, 22:] == 0)
    # token (0, 0, w=3): width slot j at 3 * 10000^(-2j/42)
    j = 5
    assert torch.allclose(ang[3, 43 + j], torch.tensor(3 * 10000 ** (-2 * j / 42), dtype=torch.float64), atol=1e-5)


def test_context_longer_than_512_is_refused(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="context has 513 tokens; at most 512"):
        ours(torch.randn(1, 16, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 513, 64))


@pytest.mark.parametrize("seed", [1, 2])
def test_bf16_forward_with_fp32_small_tensors_is_closer_to_fp32_than_all_bf16(seed):
    fp32 = WanDiT(SMALL)
    fp32.load_state_dict(random_state_dict(fp32, seed=seed))
    fp32.eval()
    new = cast_to_run_dtype(copy.deepcopy(fp32), torch.bfloat16)  # the loader's rule (WanDiT.keep_fp32)
    old = copy.deepcopy(fp32).to(torch.bfloat16)  # the old rule: every tensor bf16
    assert new.blocks[0].modulation.dtype == torch.float32 and new.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert new.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    x, t, ctx = torch.randn(2, 16, 3, 12, 20, generator=g), torch.tensor([999.0, 92.0]), torch.randn(2, 30, 64, generator=g)
    with torch.no_grad():
        ref, a, b = fp32(x, t, ctx), new(x, t, ctx), old(x, t, ctx)
    assert a.dtype == torch.float32
    assert rel_err(a, ref) < rel_err(b, ref), (rel_err(a, ref), rel_err(b, ref))


def test_rope_cache_keeps_only_the_latest_grid_and_clears():
    model = WanDiT(SMALL)
    cpu = torch.device("cpu")
    first = model.rope((2, 4, 5), cpu)
    assert model.rope((2, 4, 5), cpu) is first  # cached
    model.rope((3, 6, 10), cpu)  # another request size: the first table is dropped
    assert list(model._rope_cache) == [((3, 6, 10), "cpu")]
    assert model.rope((2, 4, 5), cpu) is not first
    model.clear_caches()
    assert not model._rope_cache
    with torch.no_grad():
        model(torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 64))
    assert list(model._rope_cache) == [((2, 4, 4), "cpu")]
