"""Every checkpoint layout a user brings loads the same DiT; every file problem gives its message."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CorruptFileError, ModelNotFoundError, UnsafePickleError, WrongModelError
from engine.config import DiTConfig
from engine.loading import COMFY_PREFIX, load_dit, open_dit
from engine.model_files import find_model_files
from tests.test_dit import SMALL
from tests.weights import random_state_dict


@pytest.fixture(scope="module")
def official():
    from engine.dit import WanDiT

    return random_state_dict(WanDiT(SMALL), seed=3)


def loaded(path, dtype=torch.float32, **kw):
    return load_dit(path, "cpu", dtype, **kw).state_dict()


def assert_same(sd, ref):
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


def test_official_single_file(tmp_path, official):
    save_file(official, tmp_path / "wan.safetensors")
    assert_same(loaded(tmp_path / "wan.safetensors"), official)
    _, cfg = open_dit(tmp_path / "wan.safetensors")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads, cfg.text_dim, cfg.freq_dim) == (256, 512, 2, 2, 64, 256)


def test_official_sharded_folder_with_index(tmp_path, official):
    names = sorted(official)
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: official[k] for k in keys}, tmp_path / fname)
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(loaded(tmp_path), official)


def test_comfyui_prefixed_bf16_file(tmp_path, official):
    save_file({COMFY_PREFIX + k: v.to(torch.bfloat16) for k, v in official.items()}, tmp_path / "c.safetensors")
    sd = loaded(tmp_path / "c.safetensors", torch.bfloat16)
    assert_same(sd, {k: v.to(torch.bfloat16) for k, v in official.items()})
    assert {k for k, v in sd.items() if v.dtype == torch.float32} == FP32_NAMES  # bf16 values, kept in fp32


# The tensors of SMALL (2 blocks) that stay float32 in a bf16 run (WanDiT.keep_fp32), by name.
FP32_NAMES = {
    "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
    "time_projection.1.weight", "time_projection.1.bias", "head.modulation", "head.head.weight", "head.head.bias",
    *(f"blocks.{i}.{n}" for i in range(2) for n in (
        "modulation", "norm3.weight", "norm3.bias", "self_attn.norm_q.weight", "self_attn.norm_k.weight",
        "cross_attn.norm_q.weight", "cross_attn.norm_k.weight")),
}


def assert_run_dtypes(sd, official, dtype=torch.bfloat16):
    """Exactly FP32_NAMES are float32 with the file's values; every other tensor is `dtype`, rounded once."""
    assert {k for k, v in sd.items() if v.dtype == torch.float32} == FP32_NAMES
    assert {k for k, v in sd.items() if v.dtype == dtype} == set(official) - FP32_NAMES
    for k, v in official.items():
        assert torch.equal(sd[k], v if k in FP32_NAMES else v.to(dtype)), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_tensors_stay_fp32_in_a_16_bit_run(tmp_path, official, dtype):
    save_file(official, tmp_path / "wan.safetensors")
    assert_run_dtypes(loaded(tmp_path / "wan.safetensors", dtype), official, dtype)
    host = {"blocks.1.modulation", "blocks.1.ffn.0.weight"}  # block swap / offload: loaded to host memory
    assert_run_dtypes(loaded(tmp_path / "wan.safetensors", dtype, host_names=host), official, dtype)
    assert {v.dtype for v in loaded(tmp_path / "wan.safetensors").values()} == {torch.float32}


def test_fp8_file_upcasts_the_fp32_tensors_without_a_bf16_round_trip(tmp_path, official):
    fp8 = {k: v.to(torch.float8_e4m3fn) if k in ("blocks.0.modulation", "blocks.0.ffn.0.weight") else v
           for k, v in official.items()}
    save_file(fp8, tmp_path / "fp8.safetensors")
    sd = loaded(tmp_path / "fp8.safetensors", torch.bfloat16)
    assert sd["blocks.0.modulation"].dtype == torch.float32
    assert torch.equal(sd["blocks.0.modulation"], fp8["blocks.0.modulation"].float())
    assert torch.equal(sd["blocks.0.ffn.0.weight"], fp8["blocks.0.ffn.0.weight"].to(torch.bfloat16))


FSDP_SCRIPT = """
import sys, types
import torch, torch.distributed as dist
from engine.loading import build_dit, load_dit, open_dit
from parallel.apply import load_dit_placed
from parallel.fsdp import apply_fsdp, flat_mesh, load_sharded
from tests.test_dit import SMALL
from tests.test_loading import FP32_NAMES

folder, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
path = folder + "/wan.safetensors"
dist.init_process_group("gloo", rank=rank, world_size=world, init_method="file://" + folder + "/rdzv")
mesh = flat_mesh(torch.device("cpu"), world)
cfg = types.SimpleNamespace(task=None, blocks_to_swap=0, offload_percent=0.0)
rt = types.SimpleNamespace(device=torch.device("cpu"))
model = load_dit_placed(cfg, types.SimpleNamespace(dit=path), rt, torch.bfloat16, mesh)
fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
assert fp32 == FP32_NAMES, sorted(fp32 ^ FP32_NAMES)
assert {p.dtype for n, p in model.named_parameters() if n not in FP32_NAMES} == {torch.bfloat16}
plain = load_dit(path, "cpu", torch.bfloat16)
g = torch.Generator().manual_seed(0)
x, t, ctx = torch.randn(1, 16, 2, 8, 10, generator=g), torch.tensor([700.0]), torch.randn(1, 7, 64, generator=g)
with torch.no_grad():
    a, b = model(x, t, ctx), plain(x, t, ctx)
assert torch.equal(a, b), (a - b).abs().max()
uncast = build_dit(SMALL)  # sharded as built (fp32): refused, it would run the whole model in fp32
apply_fsdp(uncast, uncast.blocks, mesh)
try:
    load_sharded(uncast, open_dit(path, torch.bfloat16)[0], torch.device("cpu"), torch.bfloat16, "Wan2.1 DiT", path)
except RuntimeError as exc:
    assert "call cast_to_run_dtype before fully_shard" in str(exc), exc
else:
    raise AssertionError("an fp32-sharded model was filled for a bf16 run")
dist.destroy_process_group()
print("fsdp ok")
"""


def test_fsdp_shards_each_tensor_in_its_run_dtype(tmp_path, official):
    """Two gloo ranks: mixed-dtype shards (bf16 and the fp32 small tensors) gather to the plain bf16 model."""
    import subprocess
    import sys

    from tests.multirank import ROOT, gang_env

    save_file(official, tmp_path / "wan.safetensors")
    env = {**gang_env(), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", FSDP_SCRIPT, str(tmp_path), str(r), "2"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert "fsdp ok" in out


def test_diffusers_transformer_folder(tmp_path, official):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(convert_wan_transformer_to_diffusers(dict(official)), folder / "diffusion_pytorch_model.safetensors")
    assert_same(loaded(folder), official)


def test_official_pth_with_weights_only(tmp_path, official):
    torch.save(official, tmp_path / "wan.pth")
    assert_same(loaded(tmp_path / "wan.pth"), official)


@pytest.mark.parametrize("scaled", [False, True])
def test_comfyui_fp8_file_is_upcast(tmp_path, official, scaled):
    fp8 = {}
    expect = {}
    for k, v in official.items():
        if v.dim() == 2 and "blocks" in k:
            scale = torch.tensor([v.abs().max().item() / 448.0]) if scaled else torch.tensor([1.0])
            q = (v / scale).to(torch.float8_e4m3fn)
            fp8[k] = q
            expect[k] = q.float() * scale
            if scaled:
                fp8[k.rsplit(".", 1)[0] + ".scale_weight"] = scale
        else:
            fp8[k] = v
            expect[k] = v
    if scaled:
        fp8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(fp8, tmp_path / "fp8.safetensors")
    sd = loaded(tmp_path / "fp8.safetensors")
    for k in expect:
        assert torch.allclose(sd[k], expect[k], rtol=1e-6, atol=0), k
    assert rel_to(sd, official) < 0.1  # fp8 is coarse but close


def rel_to(sd, ref):
    num = sum((sd[k] - ref[k]).double().pow(2).sum() for k in ref)
    den = sum(ref[k].double().pow(2).sum() for k in ref)
    return (num / den).sqrt().item()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model file not found: .*nope.safetensors"):
        load_dit(tmp_path / "nope.safetensors")


def test_missing_parts_list_every_place_searched(tmp_path, official):
    (tmp_path / "diffusion_models").mkdir()
    save_file(official, tmp_path / "diffusion_models" / "wan.safetensors")
    with pytest.raises(ModelNotFoundError) as e:
        find_model_files(tmp_path)
    msg = str(e.value)
    assert "missing model files: text encoder, VAE" in msg
    for place in ("diffusion_models", "text_encoders", "vae"):
        assert f"{tmp_path}/{place}/*" in msg


def test_nothing_there_means_tiny_model(tmp_path):
    assert find_model_files(tmp_path / "empty") is None


def test_wrong_model_names_first_mismatching_tensor(tmp_path, official):
    save_file(official, tmp_path / "wan.safetensors")
    other = DiTConfig(dim=128, ffn_dim=512, num_layers=2, text_dim=64)
    with pytest.raises(WrongModelError) as e:
        load_dit(tmp_path / "wan.safetensors", expect=other)
    assert str(e.value) == (
        f"{tmp_path / 'wan.safetensors'} does not match the Wan2.1 DiT (custom): tensor 'patch_embedding.weight' "
        "has shape (256, 16, 1, 2, 2) in the file but the model expects (128, 16, 1, 2, 2)"
    )


def test_a_vae_file_is_not_a_dit(tmp_path):
    save_file({"decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(WrongModelError, match="is not a Wan2.1 DiT: it has no 'blocks.0.self_attn.q.weight' tensor"):
        load_dit(tmp_path / "vae.safetensors")


def test_truncated_file_is_reported(tmp_path, official):
    p = tmp_path / "wan.safetensors"
    save_file(official, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="is truncated: it has .* bytes but its header describes"):
        load_dit(p)


def test_garbage_file_is_reported(tmp_path):
    p = tmp_path / "wan.safetensors"
    p.write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(CorruptFileError, match="is not a readable safetensors file"):
        load_dit(p)


class Evil:
    """Any non-tensor object makes a pickle need unsafe loading."""


def test_unsafe_pickle_is_refused(tmp_path, official):
    p = tmp_path / "evil.pth"
    torch.save({"weights": official, "obj": Evil()}, p)
    with pytest.raises(UnsafePickleError, match="refusing to load .*evil.pth: it is a pickle that needs unsafe loading"):
        load_dit(p)


def test_several_dit_files_default_choice_is_logged(tmp_path, official, caplog):
    for d in ("diffusion_models", "text_encoders", "vae"):
        (tmp_path / d).mkdir()
    for name in ("wan2.1_t2v_1.3B_bf16.safetensors", "wan2.1_t2v_14B_bf16.safetensors"):
        save_file(official, tmp_path / "diffusion_models" / name)
    (tmp_path / "text_encoders" / "umt5_xxl_fp16.safetensors").write_bytes(b"")
    (tmp_path / "vae" / "wan_2.1_vae.safetensors").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="wan.models"):
        files = find_model_files(tmp_path)
    assert files.dit.name == "wan2.1_t2v_14B_bf16.safetensors"
    assert "several DiT files" in caplog.text and "pick another with --dit NAME" in caplog.text
    files = find_model_files(tmp_path, dit="wan2.1_t2v_1.3B_bf16")
    assert files.dit.name == "wan2.1_t2v_1.3B_bf16.safetensors"
    with pytest.raises(ModelNotFoundError, match="--dit nope: no such file"):
        find_model_files(tmp_path, dit="nope")
