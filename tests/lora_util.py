"""Helpers of the LoRA tests: LoRAs as plain specs in official names, written in every file format, and an
independent float32 merge to compare against (also used by tests/lora_ranks.py under torchrun)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.dit import WanDiT
from tests.test_dit import SMALL, diffusers_model

LAYERS = 2
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
BLOCKS = [f"blocks.{i}.{n}" for i in range(LAYERS) for n in BLOCK_LINEARS]
TOP = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"]


def fresh(sd: dict[str, torch.Tensor]) -> WanDiT:
    model = WanDiT(SMALL)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False)


def run(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 16, 2, 8, 12, generator=g), torch.randn(1, 7, 64, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), ctx)


def spec(sd, seed: int, modules, rank: int = 4, alpha: float | None = 8.0, diffs=(), biases=()) -> dict:
    """{'pairs': module → (down, up, alpha), 'diff': param → delta} in official names."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for m in modules:
        w = sd[f"{m}.weight"]
        down = torch.randn(rank, *w.shape[1:], generator=g) / math.sqrt(math.prod(w.shape[1:]))
        up = torch.randn(w.shape[0], rank, *[1] * (w.dim() - 2), generator=g) * 0.3
        pairs[m] = (down, up, alpha)
    diff = {p: 0.05 * torch.randn(sd[p].shape, generator=g) for p in (*diffs, *biases)}
    return {"pairs": pairs, "diff": diff}


def reference(sd, loras: list[tuple[dict, float]]) -> WanDiT:
    """The merged checkpoint, computed directly in float32: W + s·(alpha/rank)·up@down, W + s·diff."""
    out = {k: v.clone() for k, v in sd.items()}
    for lo, s in loras:
        for m, (down, up, alpha) in lo["pairs"].items():
            w = out[f"{m}.weight"]
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            w += s * scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
        for p, d in lo["diff"].items():
            out[p] += s * d
    return fresh(out)


def diffusers_name(module: str) -> str:
    """The diffusers module name, from diffusers' own official→diffusers converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    (key,) = convert_wan_transformer_to_diffusers({f"{module}.weight": torch.zeros(1)})
    return key.removesuffix(".weight")


def write(lo: dict, fmt: str, path: Path) -> Path:
    """Write a spec in one of the file formats users bring."""
    t: dict[str, torch.Tensor] = {}
    meta = None
    for m, (down, up, alpha) in lo["pairs"].items():
        if fmt in ("official", "official_ab", "bare", "kohya"):
            name = {"kohya": "lora_unet_" + m.replace(".", "_"), "bare": m}.get(fmt, f"diffusion_model.{m}")
            d, u = ("lora_A.weight", "lora_B.weight") if fmt == "official_ab" else ("lora_down.weight", "lora_up.weight")
            t[f"{name}.{d}"], t[f"{name}.{u}"] = down, up
            if alpha is not None:
                t[f"{name}.alpha"] = torch.tensor(alpha)
        else:  # diffusers names; alpha through diffusers' adapter metadata; peft: base_model.model. and .default
            name = diffusers_name(m)
            pre, mid = ("transformer.", "") if fmt == "diffusers" else ("base_model.model.", ".default")
            t[f"{pre}{name}.lora_A{mid}.weight"], t[f"{pre}{name}.lora_B{mid}.weight"] = down, up
            if alpha is not None:
                targets = sorted({diffusers_name(k) for k in lo["pairs"]})
                meta = {"lora_adapter_metadata": json.dumps({"transformer.r": down.shape[0], "transformer.lora_alpha": alpha,
                                                             "transformer.target_modules": targets})}
    for p, d in lo["diff"].items():
        module, leaf = p.rsplit(".", 1) if p.endswith((".weight", ".bias")) else (p, "weight")
        if fmt in ("diffusers", "peft") and leaf == "bias" and module in lo["pairs"]:  # PEFT's lora_bias
            t[f"{'transformer.' if fmt == 'diffusers' else 'base_model.model.'}{diffusers_name(module)}.lora_B"
              f"{'' if fmt == 'diffusers' else '.default'}.bias"] = d
        else:
            t[f"diffusion_model.{module}.{'diff_b' if leaf == 'bias' else 'diff'}"] = d
    save_file(t, str(path), metadata=meta)
    return path


def lora_b(sd) -> dict:
    """The second LoRA of the tests: a few pairs (a Conv3d too), full differences of norms, modulation, biases,
    and of a weight that also has a low-rank pair (head.head)."""
    return spec(sd, 9, ["blocks.0.self_attn.q", "blocks.1.ffn.2", "patch_embedding", "head.head"], rank=3, alpha=None,
                diffs=["blocks.0.norm3.weight", "blocks.1.self_attn.norm_q.weight", "blocks.0.modulation", "head.modulation",
                       "head.head.weight"],
                biases=["blocks.0.self_attn.q.bias", "blocks.1.ffn.0.bias"])


def with_i2v(path: Path, n_blocks: int = LAYERS) -> int:
    """Add an I2V LoRA's image-branch keys (k_img/v_img pairs with alpha) to a file; returns how many."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    for i in range(n_blocks):
        for o in ("k_img", "v_img"):
            t[f"diffusion_model.blocks.{i}.cross_attn.{o}.lora_down.weight"] = torch.ones(2, 256)
            t[f"diffusion_model.blocks.{i}.cross_attn.{o}.lora_up.weight"] = torch.ones(256, 2)
            t[f"diffusion_model.blocks.{i}.cross_attn.{o}.alpha"] = torch.tensor(2.0)
    save_file(t, str(path))
    return 6 * n_blocks



def diffusers_with_loras(sd, loras: list[tuple[Path, float]]):
    import peft  # noqa: F401 - diffusers' LoRA loading needs it (requirements-test.txt)
    from diffusers import WanPipeline

    ref = diffusers_model(SMALL, sd)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=ref)
    names = [f"l{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name, low_cpu_mem_usage=False)
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    return ref


def run_diffusers(ref) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 16, 2, 8, 12, generator=g), torch.randn(1, 7, 64, generator=g)
    ctx = torch.nn.functional.pad(ctx, (0, 0, 0, 512 - 7))
    with torch.no_grad():
        return ref(x, torch.tensor([700.0]), ctx, return_dict=False)[0]
