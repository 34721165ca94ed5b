"""LoRA: key formats, validation (exact messages), merged application on plain, block-swapped, compiled and
FSDP-sharded models; outputs equal an independent float32 merge and diffusers' own LoRA loading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import ModelNotFoundError, UnsafePickleError
from engine.dit import WanDiT
from engine.lora import LoraError, list_loras, parse_key, parse_lora_arg, read_lora, resolve_lora
from engine.request import RequestError
from parallel.lora import apply_loras, lora_state
from tests.conftest import rel_err
from tests.lora_util import (
    BLOCKS,
    SMALL,
    TOP,
    diffusers_with_loras,
    fresh,
    lora_b,
    reference,
    run,
    run_diffusers,
    spec,
    with_i2v,
    write,
)
from tests.weights import random_state_dict


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = WanDiT(SMALL)
    return random_state_dict(model, seed=1)


# ----------------------------------------------------------------------------------------------------
# key formats
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, module, part", [
    ("diffusion_model.blocks.0.self_attn.q.lora_down.weight", "blocks.0.self_attn.q", "down"),
    ("model.diffusion_model.blocks.1.cross_attn.o.lora_up.weight", "blocks.1.cross_attn.o", "up"),
    ("blocks.3.ffn.0.lora_A.weight", "blocks.3.ffn.0", "down"),
    ("lora_unet_blocks_12_cross_attn_k_img.alpha", "blocks.12.cross_attn.k_img", "alpha"),
    ("lora_unet__blocks_1_ffn_2.lora_up.weight", "blocks.1.ffn.2", "up"),
    ("lora_unet_blocks_0_ffn.0.lora_down.weight", "blocks.0.ffn.0", "down"),
    ("lora_unet_text_embedding_0.lora_down.weight", "text_embedding.0", "down"),
    ("transformer.blocks.0.attn1.to_out.0.lora_B.weight", "blocks.0.self_attn.o", "up"),
    ("transformer.blocks.2.attn2.add_v_proj.lora_A.weight", "blocks.2.cross_attn.v_img", "down"),
    ("transformer.blocks.2.ffn.net.0.proj.lora_A.weight", "blocks.2.ffn.0", "down"),
    ("transformer.condition_embedder.time_proj.lora_A.weight", "time_projection.1", "down"),
    ("transformer.condition_embedder.text_embedder.linear_2.lora_B.weight", "text_embedding.2", "up"),
    ("transformer.proj_out.lora_B.bias", "head.head", "up_bias"),
    ("transformer.patch_embedding.lora_A.weight", "patch_embedding", "down"),
    ("base_model.model.blocks.0.attn2.to_k.lora_A.default.weight", "blocks.0.cross_attn.k", "down"),
    ("pipe.dit.blocks.0.self_attn.q.lora_B.weight", "blocks.0.self_attn.q", "up"),
    ("diffusion_model.blocks.0.norm3.diff", "blocks.0.norm3", "diff"),
    ("diffusion_model.blocks.0.modulation.diff", "blocks.0.modulation", "diff"),
    ("diffusion_model.head.head.diff_b", "head.head", "diff_b"),
    ("diffusion_model.img_emb.proj.1.lora_up.weight", "img_emb.proj.1", "up"),
    ("lora_transformer_blocks_0_attn1_to_q.lora_down.weight", "blocks.0.self_attn.q", "down"),
])
def test_keys_of_every_format_map_to_official_names(key, module, part):
    info = parse_key(key)
    assert (info.module, info.part) == (module, part)


@pytest.mark.parametrize("key", ["lora_te_text_model_encoder_layers_0_q.lora_down.weight", "blocks.0.self_attn.q.weight",
                                 "diffusion_model.blocks.0.self_attn.qq.lora_down.weight", "foo.alpha"])
def test_keys_of_no_dit_layer_are_not_matched(key):
    assert parse_key(key) is None


# ----------------------------------------------------------------------------------------------------
# exactness: every format, two LoRAs at once, strengths switched, one removed, all removed
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["official", "official_ab", "bare", "kohya", "diffusers", "peft"])
def test_two_loras_equal_an_independent_fp32_merge_and_switch_without_reload(base_sd, tmp_path, fmt):
    alpha = None if fmt == "peft" else 8.0
    a = spec(base_sd, 3, BLOCKS + TOP, rank=4, alpha=alpha)
    b = lora_b(base_sd)
    pa, pb = write(a, fmt, tmp_path / "a.safetensors"), write(b, "official", tmp_path / "b.safetensors")
    n_i2v = with_i2v(pb)
    model = fresh(base_sd)
    base_out = run(model)
    summary = apply_loras(model, [(pa, 0.8), (pb, -0.5)])
    assert rel_err(run(model), run(reference(base_sd, [(a, 0.8), (b, -0.5)]))) < 2e-6
    ra, rb = summary.loras
    assert (ra.tensors, ra.skipped, ra.unmatched, ra.rank) == (len(BLOCKS + TOP), 0, 0, 4)
    assert ra.format.split("/")[0] == {"official_ab": "official", "bare": "official", "peft": "diffusers"}.get(fmt, fmt)
    assert (rb.skipped, rb.tensors, rb.strength) == (n_i2v, 10, -0.5)
    assert (summary.changed, summary.restored) == (26 + 7, 0)  # a's 26 weights, b's 7 others (3 are shared)
    # new strengths: only the tensors whose strengths changed are re-merged, from the pristine copies
    summary = apply_loras(model, [(pa, 0.3), (pb, 1.2)])
    assert rel_err(run(model), run(reference(base_sd, [(a, 0.3), (b, 1.2)]))) < 2e-6
    same = apply_loras(model, [(pa, 0.3), (pb, 1.2)])
    assert same.changed == same.restored == 0
    summary = apply_loras(model, [(pa, 0.3)])  # remove b: its own 7 tensors restored, the 3 shared ones re-merged
    assert (summary.changed, summary.restored) == (3, 7)
    assert rel_err(run(model), run(reference(base_sd, [(a, 0.3)]))) < 2e-6
    apply_loras(model, [])
    assert torch.equal(run(model), base_out), "removing every LoRA must restore the base weights bit for bit"
    assert not lora_state(model).originals


def test_bf16_weights_are_merged_in_fp32_then_cast(base_sd, tmp_path):
    a = spec(base_sd, 3, ["blocks.0.ffn.0"], rank=8, alpha=4.0)
    p = write(a, "official", tmp_path / "a.safetensors")
    model = fresh(base_sd).to(torch.bfloat16)
    w0 = model.blocks[0].ffn[0].weight.detach().clone()
    apply_loras(model, [(p, 0.75)])
    down, up, alpha = a["pairs"]["blocks.0.ffn.0"]
    want = (w0.float() + 0.75 * (alpha / 8) * (up @ down)).to(torch.bfloat16)
    assert torch.equal(model.blocks[0].ffn[0].weight, want)
    apply_loras(model, [])
    assert torch.equal(model.blocks[0].ffn[0].weight, w0)


def test_keys_of_no_layer_beside_good_ones_are_counted(base_sd, tmp_path, caplog):
    from safetensors.torch import load_file

    p = write(spec(base_sd, 3, BLOCKS[:2]), "official", tmp_path / "a.safetensors")
    t = load_file(str(p))
    t["lora_te_text_model_encoder_layers_0_q.lora_down.weight"] = torch.ones(2, 8)
    save_file(t, str(p))
    with caplog.at_level("WARNING", logger="wan.lora"):
        summary = apply_loras(fresh(base_sd), [(p, 1.0)])
    assert (summary.loras[0].unmatched, summary.loras[0].tensors) == (1, 2)
    assert f"LoRA {p}: 1 keys name no layer of the Wan2.1 DiT and are ignored (e.g. " \
           "lora_te_text_model_encoder_layers_0_q.lora_down.weight)" in caplog.text


def test_a_bad_file_leaves_the_previous_set_in_place(base_sd, tmp_path):
    a = write(spec(base_sd, 3, BLOCKS), "official", tmp_path / "a.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.full((4, 256), float("nan")),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(256, 4)}, str(bad))
    model = fresh(base_sd)
    apply_loras(model, [(a, 1.0)])
    before = run(model)
    with pytest.raises(LoraError, match="contains NaN or infinite values"):
        apply_loras(model, [(a, 0.5), (bad, 1.0)])
    assert torch.equal(run(model), before)


# ----------------------------------------------------------------------------------------------------
# parity with diffusers' own LoRA loading (WanPipeline.load_lora_weights + set_adapters)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["official", "official_ab", "kohya", "diffusers"])
def test_matches_diffusers_lora_loading(base_sd, tmp_path, fmt):
    # what diffusers' Wan converters read: musubi needs every block's attention and FFN with alphas; the official
    # converter takes no alpha outside the blocks, drops norm differences and ignores weight .diff
    a = spec(base_sd, 3, BLOCKS, rank=4, alpha=8.0)
    b = spec(base_sd, 4, ["time_projection.1", "head.head", *(m for m in BLOCKS if "ffn" in m or "self_attn" in m)],
             rank=2, alpha=None, biases=["blocks.0.self_attn.q.bias", "blocks.1.ffn.0.bias"])
    pa = write(a, fmt, tmp_path / "a.safetensors")
    pb = write(b, "diffusers" if fmt == "diffusers" else "official", tmp_path / "b.safetensors")
    loras = [(pa, 0.7), (pb, 1.3)]
    ours = fresh(base_sd)
    apply_loras(ours, loras)
    ref = diffusers_with_loras(base_sd, loras)
    assert rel_err(run(ours), run_diffusers(ref)) < 2e-5
    assert rel_err(run(ours), run(fresh(base_sd))) > 1e-3, "the LoRAs must change the output"


# ----------------------------------------------------------------------------------------------------
# refusals, with the exact messages
# ----------------------------------------------------------------------------------------------------
def shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_lora_for_another_model_size_is_refused_naming_file_tensor_and_shapes(base_sd, tmp_path):
    p = tmp_path / "big.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(5120, 4)}, str(p))
    with pytest.raises(LoraError) as e:
        read_lora(p, shapes(base_sd))
    assert str(e.value) == (f"{p} does not fit this model (made for another model size?): tensor "
                            "'diffusion_model.blocks.0.self_attn.q.lora_down.weight' has shape (4, 5120) but the "
                            "model's 'blocks.0.self_attn.q.weight' is (256, 256)")
    deep = tmp_path / "deep.safetensors"
    save_file({"blocks.7.ffn.0.diff_b": torch.ones(512)}, str(deep))
    with pytest.raises(LoraError) as e:
        read_lora(deep, shapes(base_sd))
    assert str(e.value) == (f"{deep} was made for another model size: tensor 'blocks.7.ffn.0.diff_b' is for block 7 "
                            "but this model has 2 blocks")


def test_a_file_none_of_whose_keys_match_is_refused_naming_some_keys(base_sd, tmp_path):
    p = tmp_path / "sdxl.safetensors"
    save_file({f"lora_te_text_model_encoder_layers_{i}_q.lora_down.weight": torch.ones(2, 8) for i in range(5)}, str(p))
    with pytest.raises(LoraError) as e:
        read_lora(p, shapes(base_sd))
    assert str(e.value) == (f"{p} is not a LoRA for the Wan2.1 DiT: none of its 5 keys match a layer (e.g. "
                            "'lora_te_text_model_encoder_layers_0_q.lora_down.weight', "
                            "'lora_te_text_model_encoder_layers_1_q.lora_down.weight', "
                            "'lora_te_text_model_encoder_layers_2_q.lora_down.weight')")


def test_image_branch_keys_are_counted_as_skipped_on_a_t2v_model(base_sd, tmp_path, caplog):
    only = tmp_path / "i2v_only.safetensors"
    save_file({}, str(only))
    n = with_i2v(only)
    with pytest.raises(LoraError) as e:
        read_lora(only, shapes(base_sd))
    assert str(e.value) == (f"{only} only changes layers this model lacks: its {n} keys are all for the image-to-video "
                            "branch (e.g. 'diffusion_model.blocks.0.cross_attn.k_img.alpha')")
    mixed = write(spec(base_sd, 3, BLOCKS), "official", tmp_path / "i2v.safetensors")
    assert with_i2v(mixed) == 12
    model = fresh(base_sd)
    with caplog.at_level("WARNING", logger="wan.lora"):
        first = apply_loras(model, [(mixed, 1.0)])
        second = apply_loras(model, [(mixed, 0.5)])
    assert first.loras[0].skipped == second.loras[0].skipped == 12
    assert first.to_dict()["loras"][0]["skipped"] == 12
    warnings = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert warnings == [f"LoRA {mixed}: 12 keys are for layers this model lacks (the image-to-video branch, e.g. "
                        "diffusion_model.blocks.0.cross_attn.k_img.alpha, diffusion_model.blocks.0.cross_attn.k_img."
                        "lora_down.weight, diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight): skipped"]


@pytest.mark.parametrize("tensors, message", [
    ({"blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 256, dtype=torch.int32),
      "blocks.0.self_attn.q.lora_up.weight": torch.ones(256, 4)},
     "{p}: tensor 'blocks.0.self_attn.q.lora_down.weight' has dtype torch.int32; LoRA tensors must be floating point"),
    ({"blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 256)},
     "{p}: 'blocks.0.self_attn.q.lora_down.weight' has no matching lora_up/lora_B tensor"),
    ({"blocks.0.self_attn.q.alpha": torch.tensor(1.0), "blocks.0.self_attn.k.lora_A.weight": torch.ones(1, 256),
      "blocks.0.self_attn.k.lora_B.weight": torch.ones(256, 1)},
     "{p}: 'blocks.0.self_attn.q.alpha' has no lora_down/lora_up tensors beside it"),
    ({"blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 256), "blocks.0.self_attn.q.lora_up.weight": torch.ones(256, 3)},
     "{p}: 'blocks.0.self_attn.q.lora_up.weight' has rank 3 but 'blocks.0.self_attn.q.lora_down.weight' has rank 4"),
    ({"blocks.0.self_attn.q.lora_down.weight": torch.ones(300, 256), "blocks.0.self_attn.q.lora_up.weight": torch.ones(256, 300)},
     "{p}: tensor 'blocks.0.self_attn.q.lora_down.weight' has rank 300; allowed 1 to 256 for 'blocks.0.self_attn.q.weight'"),
    ({"blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 256), "blocks.0.self_attn.q.lora_up.weight": torch.ones(256, 4),
      "blocks.0.self_attn.q.alpha": torch.ones(2)},
     "{p}: 'blocks.0.self_attn.q.alpha' has shape (2,); alpha is one number"),
    ({"blocks.0.norm3.diff": torch.ones(255)},
     "{p} does not fit this model (made for another model size?): tensor 'blocks.0.norm3.diff' has shape (255,) but "
     "the model's 'blocks.0.norm3.weight' is (256,)"),
    ({"blocks.0.self_attn.norm_q.diff_b": torch.ones(256)},
     "{p}: tensor 'blocks.0.self_attn.norm_q.diff_b' is for 'blocks.0.self_attn.norm_q.bias', which this model does not have"),
    ({"blocks.0.self_attn.q.hada_w1_a": torch.ones(2, 2)},
     "{p} is a LyCORIS LoHa file (tensor 'blocks.0.self_attn.q.hada_w1_a'); only plain LoRA (lora_down/lora_up, "
     "lora_A/lora_B) and full differences (.diff, .diff_b) are supported"),
    ({"blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 256), "blocks.0.self_attn.q.lora_up.weight": torch.ones(256, 4),
      "blocks.0.self_attn.q.dora_scale": torch.ones(256)},
     "{p} is a DoRA file (tensor 'blocks.0.self_attn.q.dora_scale'); only plain LoRA (lora_down/lora_up, "
     "lora_A/lora_B) and full differences (.diff, .diff_b) are supported"),
])
def test_hostile_or_broken_files_are_refused(base_sd, tmp_path, tensors, message):
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p))
    with pytest.raises(LoraError) as e:
        read_lora(p, shapes(base_sd))
    assert str(e.value) == message.format(p=p)


def test_size_and_count_limits_and_suffix(base_sd, tmp_path, monkeypatch):
    import engine.lora as lora

    p = write(spec(base_sd, 3, BLOCKS[:2]), "official", tmp_path / "a.safetensors")
    monkeypatch.setattr(lora, "MAX_LORA_BYTES", 1000)
    with pytest.raises(LoraError) as e:
        read_lora(p, shapes(base_sd))
    assert str(e.value) == f"{p} is {p.stat().st_size:,} bytes; LoRA files larger than 1,000 bytes are refused"
    monkeypatch.setattr(lora, "MAX_LORA_BYTES", 2**30)
    monkeypatch.setattr(lora, "MAX_LORA_TENSORS", 3)
    with pytest.raises(LoraError) as e:
        read_lora(p, shapes(base_sd))
    assert str(e.value) == f"{p} has 6 tensors; at most 3 are allowed in a LoRA"
    with pytest.raises(ModelNotFoundError) as e:
        read_lora(tmp_path / "none.safetensors", shapes(base_sd))
    assert str(e.value) == f"LoRA file not found: {tmp_path / 'none.safetensors'}"
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    with pytest.raises(LoraError) as e:
        read_lora(txt, shapes(base_sd))
    assert str(e.value) == f"{txt} is not a LoRA file: expected one of .safetensors, .pth, .pt, .ckpt, .bin"


def test_pth_lora_is_read_with_weights_only_or_refused(base_sd, tmp_path):
    a = spec(base_sd, 3, BLOCKS[:3])
    st = write(a, "official", tmp_path / "a.safetensors")
    from safetensors.torch import load_file

    pth = tmp_path / "a.ckpt"
    torch.save({"state_dict": load_file(str(st))}, str(pth))
    model = fresh(base_sd)
    apply_loras(model, [(pth, 0.9)])
    assert rel_err(run(model), run(reference(base_sd, [(a, 0.9)]))) < 2e-6
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(1), "cfg": Path("/tmp")}, str(evil))
    with pytest.raises(UnsafePickleError, match=f"^refusing to load {evil}: it is a pickle that needs unsafe loading"):
        read_lora(evil, shapes(base_sd))


# ----------------------------------------------------------------------------------------------------
# the --lora flag and the loras folder
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.8", ("style.safetensors", 0.8)),
    ("/m/loras/a:b.safetensors:-1.5", ("/m/loras/a:b.safetensors", -1.5)),
    ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", 1.0)),
    ("C:\\loras\\style.safetensors:4", ("C:\\loras\\style.safetensors", 4.0)),
    ("  x.safetensors:1e-1 ", ("x.safetensors", 0.1)),
])
def test_parse_lora_arg(text, expected):
    assert parse_lora_arg(text) == expected


@pytest.mark.parametrize("text, message", [
    ("x.safetensors:5", "lora: strength 5.0 is out of range; allowed -4 to 4"),
    ("x.safetensors:-4.5", "lora: strength -4.5 is out of range; allowed -4 to 4"),
    ("x.safetensors:nan", "lora: strength nan is out of range; allowed -4 to 4"),
    ("x.safetensors:abc", "lora: strength 'abc' of 'x.safetensors:abc' is not a number; expected PATH[:STRENGTH] with "
                          "STRENGTH from -4 to 4"),
    ("x.safetensors:", "lora: strength '' of 'x.safetensors:' is not a number; expected PATH[:STRENGTH] with "
                       "STRENGTH from -4 to 4"),
    ("", "lora: empty value; expected PATH[:STRENGTH]"),
])
def test_bad_lora_args_are_refused_naming_the_field(text, message):
    with pytest.raises(RequestError) as e:
        parse_lora_arg(text)
    assert str(e.value) == message and e.value.field == "lora"


def test_list_and_resolve_loras(tmp_path):
    assert list_loras(tmp_path) == []
    (tmp_path / "loras" / "sub").mkdir(parents=True)
    for name in ("b.safetensors", "a.safetensors", "sub/c.safetensors", "notes.txt"):
        (tmp_path / "loras" / name).write_bytes(b"x")
    assert list_loras(tmp_path) == ["a.safetensors", "b.safetensors", "sub/c.safetensors"]
    assert resolve_lora("sub/c.safetensors", tmp_path) == tmp_path / "loras" / "sub" / "c.safetensors"
    root = tmp_path / "loras"
    for bad in ("../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x.safetensors", ""):
        with pytest.raises(RequestError) as e:
            resolve_lora(bad, tmp_path)
        assert str(e.value) == f"lora: '{bad}' is not a file in {root}; pick one of the listed LoRAs"
    with pytest.raises(RequestError, match=f"^lora: no LoRA named 'zz.safetensors' in {root}$"):
        resolve_lora("zz.safetensors", tmp_path)


# ----------------------------------------------------------------------------------------------------
# block swap / offload, torch.compile, FSDP2
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("swap, percent", [(1, 0.0), (2, 0.0), (0, 0.5)])
def test_block_swapped_model_streams_the_merged_weights(base_sd, tmp_path, swap, percent):
    from parallel.offload import apply_offload, plan_offload

    a, b = spec(base_sd, 3, BLOCKS + TOP), lora_b(base_sd)
    pa, pb = write(a, "kohya", tmp_path / "a.safetensors"), write(b, "official", tmp_path / "b.safetensors")
    model = fresh(base_sd)
    streamer = apply_offload(model, plan_offload(model.blocks, swap, percent), torch.device("cpu"))
    run(model)  # leaves the first unit prefetched for the next forward: it must not be used stale
    apply_loras(model, [(pa, 1.0), (pb, 0.5)])
    assert not streamer.pending
    assert rel_err(run(model), run(reference(base_sd, [(a, 1.0), (b, 0.5)]))) < 2e-6
    apply_loras(model, [(pb, -1.0)])
    assert rel_err(run(model), run(reference(base_sd, [(b, -1.0)]))) < 2e-6
    apply_loras(model, [])
    assert torch.equal(run(model), run(fresh(base_sd)))


def test_compiled_blocks_do_not_recompile_when_loras_or_strengths_change(base_sd, tmp_path):
    from parallel.speed import apply_compile

    torch._dynamo.reset()
    a, b = spec(base_sd, 3, BLOCKS), lora_b(base_sd)
    pa, pb = write(a, "official", tmp_path / "a.safetensors"), write(b, "official", tmp_path / "b.safetensors")
    model = fresh(base_sd)
    apply_compile(model, "aot_eager")  # the graphs see weights as inputs, as inductor's do (no freezing)
    frames = torch._dynamo.utils.counters["frames"]
    apply_loras(model, [(pa, 1.0)])
    assert rel_err(run(model), run(reference(base_sd, [(a, 1.0)]))) < 2e-6
    compiled = frames["ok"]
    specs = {pa: a, pb: b}
    for loras in ([(pa, 0.2)], [(pa, 0.2), (pb, 2.0)], []):
        apply_loras(model, loras)
        assert rel_err(run(model), run(reference(base_sd, [(specs[p], s) for p, s in loras]))) < 2e-6
    assert compiled >= 1 and frames["ok"] == compiled, "a LoRA change recompiled a block"


def test_one_rank_fsdp_mesh_merges_into_the_shards_also_cpu_offloaded_ones(base_sd, tmp_path):
    import torch.distributed as dist

    from parallel.fsdp import apply_fsdp, flat_mesh

    a, b = spec(base_sd, 3, BLOCKS + TOP), lora_b(base_sd)
    pa, pb = write(a, "diffusers", tmp_path / "a.safetensors"), write(b, "official", tmp_path / "b.safetensors")
    assert not dist.is_initialized(), "an earlier test left a process group initialised in this process"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = fresh(base_sd)
        apply_fsdp(model, model.blocks, flat_mesh(torch.device("cpu"), 1), offload=[model.blocks[1]])
        run(model)
        apply_loras(model, [(pa, 0.6), (pb, 1.5)])
        assert rel_err(run(model), run(reference(base_sd, [(a, 0.6), (b, 1.5)]))) < 2e-6
        apply_loras(model, [(pb, 1.5)])
        assert rel_err(run(model), run(reference(base_sd, [(b, 1.5)]))) < 2e-6
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_two_rank_fsdp_gang_merges_each_ranks_rows(base_sd, tmp_path):
    import subprocess

    from tests.multirank import ROOT, gang_env

    a, b = spec(base_sd, 3, BLOCKS + TOP), lora_b(base_sd)
    pa, pb = write(a, "official", tmp_path / "a.safetensors"), write(b, "kohya", tmp_path / "b.safetensors")
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           str(ROOT / "tests" / "lora_ranks.py"), str(pa), str(pb), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=gang_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(str(out), weights_only=True)
    assert rel_err(got["merged"], run(reference(base_sd, [(a, 0.7), (b, -1.0)]))) < 2e-6
    assert rel_err(got["switched"], run(reference(base_sd, [(b, 0.25)]))) < 2e-6
    assert torch.equal(got["removed"], run(fresh(base_sd)))
