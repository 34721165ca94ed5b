"""The image branch of the DiT (I2V, FLF2V): equal to diffusers' WanTransformer3DModel, official keys,
recognised from the shapes in every layout, keep_fp32, LoRA, and the parallel hooks (attn_fn, token split)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import WrongModelError, cast_to_run_dtype
from engine.config import CLIP_TOKENS, DIT_CONFIGS, DiTConfig
from engine.dit import WanDiT
from engine.loading import build_dit, load_dit, open_dit
from tests.conftest import official_keys, rel_err
from tests.test_dit import SMALL
from tests.weights import random_state_dict

I2V = dataclasses.replace(SMALL, in_dim=36, model_type="i2v")
FLF2V = dataclasses.replace(SMALL, in_dim=36, model_type="flf2v")
CFGS = {"i2v": I2V, "flf2v": FLF2V}


def image_state_dict(cfg: DiTConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random official-layout weights; img_emb's LayerNorms near 1 and a position table that matters."""
    with torch.device("meta"):
        meta = WanDiT(cfg)
    sd = random_state_dict(meta, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for k in ("img_emb.proj.0.weight", "img_emb.proj.4.weight"):
        sd[k] = 1.0 + 0.1 * torch.randn(sd[k].shape, generator=g)
    if "img_emb.emb_pos" in sd:
        sd["img_emb.emb_pos"] = 0.5 * torch.randn(sd["img_emb.emb_pos"].shape, generator=g)
    return sd


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own official→diffusers converter (it leaves FLF2V's emb_pos: renamed here)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out = convert_wan_transformer_to_diffusers(dict(sd))
    if "img_emb.emb_pos" in out:
        out["condition_embedder.image_embedder.pos_embed"] = out.pop("img_emb.emb_pos")
    return out


def diffusers_image_model(cfg: DiTConfig, sd: dict[str, torch.Tensor]):
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=128, in_channels=cfg.in_dim,
        out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=1280, added_kv_proj_dim=cfg.dim, pos_embed_seq_len=514 if cfg.model_type == "flf2v" else None,
    )
    missing, unexpected = ref.load_state_dict(to_diffusers(sd), strict=True)
    assert not missing and not unexpected
    return ref.eval()


def model(cfg: DiTConfig, sd: dict[str, torch.Tensor]) -> WanDiT:
    m = WanDiT(cfg)
    m.load_state_dict(sd)
    return m.eval().requires_grad_(False)


def inputs(cfg: DiTConfig, b: int = 2, grid: tuple[int, int, int] = (3, 12, 20), seed: int = 2):
    """x (B,16,…), t, text context (B,30,text_dim), clip_fea (B, image_tokens, image_dim), y (B,20,…)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, *grid, generator=g)
    y = torch.randn(b, 20, *grid, generator=g)
    clip = torch.randn(b, cfg.image_tokens, cfg.image_dim, generator=g)
    ctx = torch.randn(b, 30, cfg.text_dim, generator=g)
    t = torch.tensor([999.0, 92.0][:b])
    return x, t, ctx, clip, y


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def pair(request):
    cfg = CFGS[request.param]
    sd = image_state_dict(cfg)
    return cfg, sd, model(cfg, sd), diffusers_image_model(cfg, sd)


# ----------------------------------------------------------------------------------------------------
# the math
# ----------------------------------------------------------------------------------------------------
def test_forward_matches_diffusers(pair):
    cfg, _, ours, ref = pair
    x, t, ctx, clip, y = inputs(cfg)
    padded = torch.zeros(2, 512, cfg.text_dim)
    padded[:, :30] = ctx
    with torch.no_grad():
        a = ours(x, t, ctx, clip_fea=clip, y=y)
        img = clip if cfg.model_type == "i2v" else clip.view(4, CLIP_TOKENS, 1280)  # diffusers' FLF2V input form
        b = ref(torch.cat([x, y], 1), t, padded, encoder_hidden_states_image=img, return_dict=False)[0]
    assert a.shape == x.shape
    assert rel_err(a, b) < 1e-5


def test_image_inputs_change_the_output(pair):
    cfg, _, ours, _ = pair
    x, t, ctx, clip, y = inputs(cfg)
    with torch.no_grad():
        base = ours(x, t, ctx, clip_fea=clip, y=y)
        assert rel_err(ours(x, t, ctx, clip_fea=clip.flip(-1), y=y), base) > 1e-3
        if cfg.model_type == "flf2v":  # first and last frame swapped: emb_pos tells them apart
            swapped = clip.roll(CLIP_TOKENS, 1)
            assert rel_err(ours(x, t, ctx, clip_fea=swapped, y=y), base) > 1e-3
        assert rel_err(ours(x, t, ctx, clip_fea=clip, y=-y), base) > 1e-3


def test_flf2v_takes_the_official_per_image_clip_form():
    sd = image_state_dict(FLF2V)
    ours = model(FLF2V, sd)
    x, t, ctx, clip, y = inputs(FLF2V)
    with torch.no_grad():
        assert torch.equal(ours(x, t, ctx, clip_fea=clip, y=y), ours(x, t, ctx, clip_fea=clip.view(4, 257, 1280), y=y))


def test_batch_rows_are_independent(pair):
    cfg, _, ours, _ = pair
    x, t, ctx, clip, y = inputs(cfg)
    with torch.no_grad():
        both = ours(x, t, ctx, clip_fea=clip, y=y)
        one = ours(x[1:], t[1:], ctx[1:], clip_fea=clip[1:], y=y[1:])
    assert rel_err(both[1:], one) < 1e-6


def test_wrong_or_missing_image_inputs_are_refused():
    ours = model(I2V, image_state_dict(I2V))
    x, t, ctx, clip, y = inputs(I2V)
    with pytest.raises(ValueError, match="needs both clip_fea and y"):
        ours(x, t, ctx)
    with pytest.raises(ValueError, match="needs both clip_fea and y"):
        ours(x, t, ctx, clip_fea=clip)
    with pytest.raises(ValueError, match=r"y has shape \(2, 16, 3, 12, 20\); expected \(2, 20, 3, 12, 20\)"):
        ours(x, t, ctx, clip_fea=clip, y=y[:, :16])
    with pytest.raises(ValueError, match=r"clip_fea has shape \(2, 514, 1280\); expected \(2, 257, 1280\)"):
        ours(x, t, ctx, clip_fea=torch.cat([clip, clip], 1), y=y)
    t2v = WanDiT(SMALL)
    with pytest.raises(ValueError, match="no image branch"):
        t2v(x, t, ctx, clip_fea=clip, y=y)


def test_t2v_model_is_unchanged_and_has_no_image_branch():
    t2v = WanDiT(SMALL)
    names = list(t2v.state_dict())
    assert not any("img" in n for n in names)
    assert type(t2v.blocks[0].cross_attn).__name__ == "WanAttention"


# ----------------------------------------------------------------------------------------------------
# keys, configs, recognition
# ----------------------------------------------------------------------------------------------------
def image_keys(model_type: str) -> dict[str, tuple[int, ...]]:
    """The official I2V/FLF2V-14B tensors: the 14B ones, patch_embedding on 36 channels, the image branch."""
    keys = official_keys("keys_dit_14B")
    keys["patch_embedding.weight"] = (5120, 36, 1, 2, 2)
    for i in range(40):
        for p in ("k_img", "v_img"):
            keys[f"blocks.{i}.cross_attn.{p}.weight"], keys[f"blocks.{i}.cross_attn.{p}.bias"] = (5120, 5120), (5120,)
        keys[f"blocks.{i}.cross_attn.norm_k_img.weight"] = (5120,)
    for j, shape in ((0, (1280,)), (1, (1280, 1280)), (3, (5120, 1280)), (4, (5120,))):
        keys[f"img_emb.proj.{j}.weight"], keys[f"img_emb.proj.{j}.bias"] = shape, shape[:1]
    if model_type == "flf2v":
        keys["img_emb.emb_pos"] = (1, 514, 1280)
    return keys


@pytest.mark.parametrize("name", ["i2v-14B", "flf2v-14B"])
def test_14B_image_models_have_the_official_keys(name):
    cfg = DIT_CONFIGS[name]
    assert (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads, cfg.in_dim) == (5120, 13824, 40, 40, 36)
    assert cfg.name == name and DIT_CONFIGS["14B"].name == "14B"
    got = {k: tuple(v.shape) for k, v in build_dit(cfg).state_dict().items()}
    assert got == image_keys(cfg.model_type)


def write_layout(sd: dict[str, torch.Tensor], layout: str, root: Path) -> Path:
    """The weights as an official file, a ComfyUI file (prefixed) or a diffusers transformer folder."""
    if layout == "official":
        save_file(sd, str(root / "dit.safetensors"))
        return root / "dit.safetensors"
    if layout == "comfy":
        save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(root / "comfy.safetensors"))
        return root / "comfy.safetensors"
    folder = root / "transformer"
    folder.mkdir()
    save_file(to_diffusers(sd), str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.mark.parametrize("layout", ["official", "comfy", "diffusers"])
@pytest.mark.parametrize("name", ["tiny-i2v", "tiny-flf2v"])
def test_image_models_are_recognised_and_loaded_in_every_layout(name, layout, tmp_path):
    cfg = DIT_CONFIGS[name]
    sd = image_state_dict(cfg, seed=3)
    path = write_layout(sd, layout, tmp_path)
    _, found = open_dit(path)
    assert found == cfg and found.name == name
    loaded = load_dit(path)
    x, t, ctx, clip, y = inputs(cfg, b=1, grid=(2, 8, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx, clip_fea=clip, y=y), model(cfg, sd)(x, t, ctx, clip_fea=clip, y=y))


def test_t2v_file_is_still_t2v_and_refused_as_i2v(tmp_path):
    with torch.device("meta"):
        meta = WanDiT(DIT_CONFIGS["tiny"])
    save_file(random_state_dict(meta), str(tmp_path / "t2v.safetensors"))
    _, found = open_dit(tmp_path / "t2v.safetensors")
    assert found.model_type == "t2v" and found.name == "tiny"
    with pytest.raises(WrongModelError, match="patch_embedding.weight"):
        load_dit(tmp_path / "t2v.safetensors", expect=DIT_CONFIGS["tiny-i2v"])


# ----------------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------------
def test_bf16_keeps_the_image_norms_fp32_and_stays_close():
    sd = image_state_dict(FLF2V)
    fp32 = model(FLF2V, sd)
    bf16 = cast_to_run_dtype(copy.deepcopy(fp32), torch.bfloat16)
    dtypes = {n: p.dtype for n, p in bf16.named_parameters()}
    for n in ("img_emb.proj.0.weight", "img_emb.proj.4.bias", "img_emb.emb_pos", "blocks.0.cross_attn.norm_k_img.weight"):
        assert dtypes[n] == torch.float32, n
    for n in ("img_emb.proj.1.weight", "img_emb.proj.3.weight", "blocks.0.cross_attn.k_img.weight"):
        assert dtypes[n] == torch.bfloat16, n
    x, t, ctx, clip, y = inputs(FLF2V)
    with torch.no_grad():
        a, ref = bf16(x, t, ctx, clip_fea=clip, y=y), fp32(x, t, ctx, clip_fea=clip, y=y)
    assert a.dtype == torch.float32 and rel_err(a, ref) < 3e-2


# ----------------------------------------------------------------------------------------------------
# hooks of parallel/, LoRA
# ----------------------------------------------------------------------------------------------------
def test_image_cross_attention_goes_through_attn_fn():
    ours = model(I2V, image_state_dict(I2V))
    x, t, ctx, clip, y = inputs(I2V)
    with torch.no_grad():
        base = ours(x, t, ctx, clip_fea=clip, y=y)
    seen = []
    for block in ours.blocks:
        inner = block.cross_attn.attn_fn

        def counted(q, k, v, inner=inner):
            seen.append(k.shape[1])
            return inner(q, k, v)

        block.cross_attn.attn_fn = counted
    with torch.no_grad():
        assert torch.equal(ours(x, t, ctx, clip_fea=clip, y=y), base)
    assert seen == [512, 257] * I2V.num_layers  # text keys, then the 257 image keys, unsharded


def test_block_runner_sees_the_image_tokens_in_the_context():
    ours = model(FLF2V, image_state_dict(FLF2V))
    from engine.dit import run_blocks

    got = []

    def runner(m, x, e, e0, context, rope):
        got.append(context.shape)
        return run_blocks(m, x, e, e0, context, rope)

    ours.block_runner = runner
    x, t, ctx, clip, y = inputs(FLF2V)
    with torch.no_grad():
        ours(x, t, ctx, clip_fea=clip, y=y)
    assert got == [torch.Size([2, 514 + 512, FLF2V.dim])]


def test_i2v_lora_loads_its_image_branch_keys(tmp_path):
    from parallel.lora import apply_loras
    from tests.lora_util import spec, write

    sd = image_state_dict(I2V)
    modules = ["blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img", "img_emb.proj.1", "img_emb.proj.3",
               "blocks.0.cross_attn.q"]
    lo = spec(sd, 4, modules, rank=4, alpha=8.0, diffs=["blocks.1.cross_attn.norm_k_img.weight"],
              biases=["img_emb.proj.4.bias"])
    merged = {k: v.clone() for k, v in sd.items()}
    for m, (down, up, alpha) in lo["pairs"].items():
        merged[f"{m}.weight"] += 0.7 * alpha / down.shape[0] * (up @ down)
    for p, d in lo["diff"].items():
        merged[p] += 0.7 * d
    x, t, ctx, clip, y = inputs(I2V, b=1)
    with torch.no_grad():
        want = model(I2V, merged)(x, t, ctx, clip_fea=clip, y=y)
    for fmt in ("official", "diffusers"):
        ours = model(I2V, sd)
        summary = apply_loras(ours, [(write(lo, fmt, tmp_path / f"{fmt}.safetensors"), 0.7)])
        (rep,) = summary.loras
        assert (rep.skipped, rep.tensors) == (0, 7), fmt
        with torch.no_grad():
            assert rel_err(ours(x, t, ctx, clip_fea=clip, y=y), want) < 2e-6, fmt
    t2v = WanDiT(SMALL)  # the same file on a T2V model: only cross_attn.q is used, the rest reported skipped
    (rep,) = apply_loras(t2v, [(tmp_path / "official.safetensors", 0.7)]).loras
    assert rep.tensors == 1 and rep.skipped > 0


def _sp_rank(rank: int, world: int, init: str, sd, layout: dict, out: str) -> None:
    """One rank of the 2-rank test: the small FLF2V DiT under a sequence-parallel layout (gloo), its blocks
    and root (img_emb included) FSDP-sharded when `layout` says fsdp."""
    import torch.distributed as dist

    from parallel.apply import apply_layout
    from parallel.kernels import get_kernel
    from parallel.layout import MeshCache, ParallelLayout

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ours = model(FLF2V, sd)
        layout = dict(layout)
        if layout.pop("fsdp", False):
            from torch.distributed.tensor import DTensor

            from parallel.fsdp import apply_fsdp, flat_mesh

            apply_fsdp(ours, ours.blocks, flat_mesh(torch.device("cpu"), world))
            assert isinstance(ours.img_emb.proj[1].weight, DTensor)
            assert isinstance(ours.blocks[0].cross_attn.k_img.weight, DTensor)
        groups = MeshCache(world, rank).get(ParallelLayout(**layout))
        apply_layout(SimpleNamespace(dit=ours, guidance=None), groups, get_kernel("math", torch.device("cpu")))
        x, t, ctx, clip, y = inputs(FLF2V, grid=(3, 10, 18))  # 135 tokens: not a multiple of 2
        with torch.no_grad():
            res = ours(x, t, ctx, clip_fea=clip, y=y)
        if rank == 0:
            torch.save(res, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [{"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "fsdp": True}],
                         ids=["ulysses2", "ring2", "ulysses2-fsdp"])
def test_two_rank_sequence_parallel_matches_one_process(layout, tmp_path):
    import torch.multiprocessing as mp

    sd = image_state_dict(FLF2V)
    out = str(tmp_path / "out.pt")
    mp.spawn(_sp_rank, args=(2, f"file://{tmp_path / 'pg'}", sd, layout, out), nprocs=2, join=True)
    x, t, ctx, clip, y = inputs(FLF2V, grid=(3, 10, 18))
    with torch.no_grad():
        want = model(FLF2V, sd)(x, t, ctx, clip_fea=clip, y=y)
    assert rel_err(torch.load(out), want) < 1e-5


def test_regional_compile_of_image_blocks_matches_eager_without_graph_breaks():
    from torch._dynamo.utils import counters

    from parallel.speed import apply_compile

    ours = model(I2V, image_state_dict(I2V))
    x, t, ctx, clip, y = inputs(I2V, b=1, grid=(2, 8, 8))
    with torch.no_grad():
        want = ours(x, t, ctx, clip_fea=clip, y=y)
        torch._dynamo.reset()
        counters.clear()
        apply_compile(ours, "aot_eager")
        got = ours(x, t, ctx, clip_fea=clip, y=y)
    assert rel_err(got, want) < 1e-6
    assert counters["frames"]["ok"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])


def test_block_swap_and_teacache_wrap_the_image_model():
    from engine.teacache import TeaCache
    from parallel.offload import apply_offload, plan_offload

    ours = model(I2V, image_state_dict(I2V))
    x, t, ctx, clip, y = inputs(I2V, b=1, grid=(2, 8, 8))
    with torch.no_grad():
        want = ours(x, t, ctx, clip_fea=clip, y=y)
        apply_offload(ours, plan_offload(ours.blocks, 1, 0.5), torch.device("cpu"))
        assert torch.equal(ours(x, t, ctx, clip_fea=clip, y=y), want)  # streamed blocks, same math
        cache = TeaCache(ours.block_runner, threshold=1e9, coefficients=[0.0, 1.0])
        ours.block_runner = cache
        cache.begin(3)
        assert torch.equal(ours(x, t, ctx, clip_fea=clip, y=y), want)  # step 0 computes
        cache.set_position(1, "cond")
        skipped = ours(x, t, ctx, clip_fea=clip, y=y)  # same step input: the cached residual reproduces it
    assert cache.skipped == [(1, "cond")] and rel_err(skipped, want) < 1e-6
