"""Test helpers for engine/clip.py: a random transformers CLIP vision tower (the independent reference) and
converters, written here independently of the engine's name table, that save its weights in each layout."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from engine.clip import ClipVisionConfig


def hf_config(cfg: ClipVisionConfig, projection_dim: int = 32) -> CLIPVisionConfig:
    """The transformers config equivalent to `cfg`."""
    return CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                            hidden_act=cfg.activation, layer_norm_eps=cfg.eps, projection_dim=projection_dim)


@torch.no_grad()
def random_hf_model(cfg: ClipVisionConfig, seed: int = 0) -> CLIPVisionModelWithProjection:
    """A transformers CLIPVisionModelWithProjection with every tensor random (norms near 1, biases non-zero)."""
    model = CLIPVisionModelWithProjection(hf_config(cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        r = torch.randn(p.shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * r)
        elif p.ndim >= 2:
            p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
        else:
            p.copy_(0.1 * r)
    return model


def reference_model(hf: CLIPVisionModelWithProjection) -> CLIPVisionModel:
    """The same weights in a plain CLIPVisionModel (the reference forward)."""
    ref = CLIPVisionModel(hf.config).eval()
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("visual_projection.")}
    if not any(k.startswith("vision_model.") for k in ref.state_dict()):  # transformers 5 drops the prefix
        sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    ref.load_state_dict(sd, strict=True)
    return ref


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names → the official Wan `XLMRobertaCLIP` names (with a stand-in text tower)."""
    out: dict[str, torch.Tensor] = {}
    emb = "vision_model.embeddings."
    out["visual.patch_embedding.weight"] = sd[emb + "patch_embedding.weight"]
    out["visual.cls_embedding"] = sd[emb + "class_embedding"].view(1, 1, -1)
    out["visual.pos_embedding"] = sd[emb + "position_embedding.weight"][None]
    for p in ("weight", "bias"):
        out[f"visual.pre_norm.{p}"] = sd[f"vision_model.pre_layrnorm.{p}"]
        out[f"visual.post_norm.{p}"] = sd[f"vision_model.post_layernorm.{p}"]
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    for i in range(n):
        h, o = f"vision_model.encoder.layers.{i}.", f"visual.transformer.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.to_qkv.{p}"] = torch.cat([sd[h + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[o + f"attn.proj.{p}"] = sd[h + f"self_attn.out_proj.{p}"]
            out[o + f"norm1.{p}"] = sd[h + f"layer_norm1.{p}"]
            out[o + f"norm2.{p}"] = sd[h + f"layer_norm2.{p}"]
            out[o + f"mlp.0.{p}"] = sd[h + f"mlp.fc1.{p}"]
            out[o + f"mlp.2.{p}"] = sd[h + f"mlp.fc2.{p}"]
    out["visual.head"] = sd["visual_projection.weight"].T.contiguous()
    out["textual.token_embedding.weight"] = torch.randn(10, 8)
    out["textual.head.0.weight"] = torch.randn(8, 8)
    out["log_scale"] = torch.tensor(4.6)
    return out


def hf_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names → open_clip's own visual names (`conv1`, `resblocks`, `in_proj_weight`)."""
    off = hf_to_official(sd)
    out = {"visual.conv1.weight": off["visual.patch_embedding.weight"],
           "visual.class_embedding": off["visual.cls_embedding"].flatten(),
           "visual.positional_embedding": off["visual.pos_embedding"][0],
           "visual.proj": off["visual.head"], "logit_scale": off["log_scale"]}
    ren = {"pre_norm": "ln_pre", "post_norm": "ln_post"}
    blk = {"attn.to_qkv.weight": "attn.in_proj_weight", "attn.to_qkv.bias": "attn.in_proj_bias",
           "attn.proj": "attn.out_proj", "norm1": "ln_1", "norm2": "ln_2", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
    for k, v in off.items():
        parts = k.split(".")
        if parts[0] != "visual":
            continue
        if parts[1] in ren:
            out[f"visual.{ren[parts[1]]}.{parts[2]}"] = v
        elif parts[1] == "transformer":
            rest = ".".join(parts[3:])
            for a, b in blk.items():
                if rest.startswith(a):
                    out[f"visual.transformer.resblocks.{parts[2]}.{b}{rest[len(a):]}"] = v
                    break
    return out


def write_all_layouts(hf: CLIPVisionModelWithProjection, root: Path) -> dict[str, Path]:
    """The same weights as the official .pth, a ComfyUI clip_vision safetensors, a diffusers image_encoder/
    folder (save_pretrained) and an open_clip safetensors."""
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    paths = {"official": root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
             "comfyui": root / "clip_vision_h.safetensors", "diffusers": root / "image_encoder",
             "open_clip": root / "open_clip_vit_h.safetensors"}
    torch.save(hf_to_official(sd), paths["official"])
    n_pos = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    comfy = dict(sd, **{"vision_model.embeddings.position_ids": torch.arange(n_pos)[None]})  # older files have it
    save_file(comfy, str(paths["comfyui"]))
    hf.save_pretrained(paths["diffusers"])
    save_file(hf_to_open_clip(sd), str(paths["open_clip"]))
    return paths
