"""The image encoder of Wan2.1 image-to-video: the visual tower of open-clip xlm-roberta-large-vit-huge-14.

As the official `CLIPModel.visual` (wan/modules/clip.py) uses it: images in [-1, 1] are resized to 224×224
(bicubic), mapped to [0, 1], normalised with the OpenAI CLIP mean/std, and the tokens after the 31st of the 32
blocks are returned (`use_31_block=True`: the last block, the final norm and the head are never run, so they
are not even loaded): (N, 257, 1280).

Loads three file layouts, recognised from the tensor names, into one module:
- "official": `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (`visual.*`, text tower ignored);
- "transformers": ComfyUI `clip_vision_h.safetensors` and a diffusers `image_encoder/` folder
  (`CLIPVisionModel(WithProjection)` names, `vision_model.*`);
- "open_clip": open_clip's own names (`visual.conv1`, `visual.transformer.resblocks.N`).
Files are hostile: every name, shape and dtype is checked before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.checkpoint import LazyStateDict, WrongModelError, open_checkpoint

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass(frozen=True)
class ClipVisionConfig:
    """Size of a ViT image tower; `layers` counts the file's blocks (the encoder runs `layers - 1`)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp: int = 5120
    eps: float = 1e-5
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or self.width % self.heads or self.layers < 2:
            raise ValueError(f"invalid CLIP vision config {self}: image_size must be a multiple of patch_size, "
                             "width of heads, and there must be at least 2 layers")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r} (supported: {', '.join(ACTIVATIONS)})")

    @property
    def tokens(self) -> int:
        """Patches + the class token (257 for ViT-H/14 at 224 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_H14 = ClipVisionConfig()
TINY_CLIP = ClipVisionConfig(image_size=28, patch_size=14, width=64, layers=4, heads=4, mlp=256)
# the embedded tiny image-to-video model's encoder: ViT-H/14's 257 tokens, narrow (64) and shallow
TINY_IMAGE_CLIP = ClipVisionConfig(image_size=224, patch_size=14, width=64, layers=3, heads=4, mlp=256)
# heads cannot be read from tensor shapes: the usual ViT widths (B, L, H, bigG) and the tiny one
KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16, TINY_CLIP.width: TINY_CLIP.heads}


# ----------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------
class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (as the official CLIP)."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, s, c = x.shape
        qkv = self.to_qkv(x).view(b, s, 3, self.heads, c // self.heads)  # (B, S, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, S, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, s, c))  # (B, S, width)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(cfg.width, eps=cfg.eps)
        self.attn = SelfAttention(cfg.width, cfg.heads)
        self.norm2 = LayerNorm32(cfg.width, eps=cfg.eps)
        act = nn.GELU() if cfg.activation == "gelu" else QuickGELU()
        self.mlp = nn.Sequential(nn.Linear(cfg.width, cfg.mlp), act, nn.Linear(cfg.mlp, cfg.width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """(N, 3, H, W) in [-1, 1] → (N, 3, size, size) float32: bicubic resize, to [0, 1], CLIP mean/std."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x * 0.5 + 0.5 - mean) / std


class WanImageEncoder(nn.Module):
    """The ViT visual tower, truncated after block `layers - 1` (Wan's `use_31_block=True`)."""

    def __init__(self, cfg: ClipVisionConfig = CLIP_H14) -> None:
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        # 1. patch & position embedding (+ class token), pre-norm
        self.patch_embedding = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, w))
        self.pos_embedding = nn.Parameter(torch.empty(1, cfg.tokens, w))
        self.pre_norm = LayerNorm32(w, eps=cfg.eps)
        # 2. blocks: all but the last
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers - 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def forward(self, pixels: Tensor) -> Tensor:
        """Normalised pixels (N, 3, S, S) → tokens after block `layers - 1` (N, tokens, width)."""
        x = self.patch_embedding(pixels.to(self.dtype))  # (N, width, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (N, patches, width)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)  # (N, tokens, width)
        x = self.pre_norm(x + self.pos_embedding)
        for block in self.blocks:
            x = block(x)
        return x

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [-1, 1] → CLIP tokens (N, 257, 1280) for ViT-H/14, in the run dtype."""
        return self(clip_preprocess(images.to(self.patch_embedding.weight.device), self.cfg.image_size))


# ----------------------------------------------------------------------------------------------------
# file layouts: my name → the file's name(s) per layout ({i}: block, {p}: weight or bias)
# ----------------------------------------------------------------------------------------------------
LAYOUTS = ("official", "transformers", "open_clip")
_BLOCK = {"official": "visual.transformer.{i}.", "transformers": "vision_model.encoder.layers.{i}.",
          "open_clip": "visual.transformer.resblocks.{i}."}
_TOP = {  # my name → (official, transformers, open_clip)
    "patch_embedding.weight": ("visual.patch_embedding.weight", "vision_model.embeddings.patch_embedding.weight",
                               "visual.conv1.weight"),
    "cls_embedding": ("visual.cls_embedding", "vision_model.embeddings.class_embedding", "visual.class_embedding"),
    "pos_embedding": ("visual.pos_embedding", "vision_model.embeddings.position_embedding.weight",
                      "visual.positional_embedding"),
    "pre_norm.{p}": ("visual.pre_norm.{p}", "vision_model.pre_layrnorm.{p}", "visual.ln_pre.{p}"),
}
_IN_BLOCK = {  # block-relative: my name → (official, transformers, open_clip); a tuple is concatenated on dim 0
    "norm1.{p}": ("norm1.{p}", "layer_norm1.{p}", "ln_1.{p}"),
    "attn.to_qkv.{p}": ("attn.to_qkv.{p}", ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
                        "attn.in_proj_{p}"),
    "attn.proj.{p}": ("attn.proj.{p}", "self_attn.out_proj.{p}", "attn.out_proj.{p}"),
    "norm2.{p}": ("norm2.{p}", "layer_norm2.{p}", "ln_2.{p}"),
    "mlp.0.{p}": ("mlp.0.{p}", "mlp.fc1.{p}", "mlp.c_fc.{p}"),
    "mlp.2.{p}": ("mlp.2.{p}", "mlp.fc2.{p}", "mlp.c_proj.{p}"),
}
_UNUSED = {  # accepted but never read: the last block's outputs' consumers, the text tower, projections
    "official": (r"visual\.post_norm\.(weight|bias)", r"visual\.head", r"textual\..+", r"log_scale"),
    "transformers": (r"vision_model\.embeddings\.position_ids", r"vision_model\.post_layernorm\.(weight|bias)",
                     r"visual_projection\.weight", r"text_model\..+", r"text_projection\.weight", r"logit_scale"),
    "open_clip": (r"visual\.ln_post\.(weight|bias)", r"visual\.proj", r"text\..+", r"logit_scale", r"attn_mask"),
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"}


def _accepted(layout: str) -> re.Pattern:
    j = LAYOUTS.index(layout)
    names = [v[j] for v in _TOP.values()]
    for v in _IN_BLOCK.values():
        src = v[j] if isinstance(v[j], tuple) else (v[j],)
        names += [_BLOCK[layout] + s for s in src]
    pats = [re.escape(n).replace(r"\{i\}", r"\d+").replace(r"\{p\}", "(weight|bias)") for n in names]
    return re.compile("|".join(f"(?:{p})" for p in pats + list(_UNUSED[layout])))


def image_encoder_layout(keys: Iterable[str], source: str | Path = "the checkpoint") -> str:
    """'official', 'transformers' or 'open_clip' from the tensor names; WrongModelError naming `source` and the
    first unexpected name for anything else."""
    keys = list(keys)
    patch_names = _TOP["patch_embedding.weight"]
    layouts = [lay for lay, name in zip(LAYOUTS, patch_names) if name in keys]
    patterns = [_accepted(lay) for lay in layouts[:1] or LAYOUTS]
    bad = next((k for k in keys if not any(p.fullmatch(k) for p in patterns)), None)
    if layouts and bad is None:
        return layouts[0]
    what = f"unexpected tensor '{bad}'" if bad else "it has no patch embedding tensor"
    raise WrongModelError(f"{source} is not a CLIP image encoder (official .pth, ComfyUI clip_vision or diffusers "
                          f"image_encoder layout): {what}")


def _names(layout: str, blocks: int) -> dict[str, tuple[str, ...]]:
    """my name → the file's source name(s) for a model that runs `blocks` blocks."""
    j = LAYOUTS.index(layout)
    out: dict[str, tuple[str, ...]] = {}
    for mine, v in _TOP.items():
        for p in ("weight", "bias") if "{p}" in mine else ("",):
            out[mine.format(p=p)] = (v[j].format(p=p),)
    for i in range(blocks):
        for mine, v in _IN_BLOCK.items():
            src = v[j] if isinstance(v[j], tuple) else (v[j],)
            for p in ("weight", "bias"):
                out[f"blocks.{i}." + mine.format(p=p)] = tuple(_BLOCK[layout].format(i=i) + s.format(p=p) for s in src)
    return out


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------
def _hints(path: Path, sd: LazyStateDict) -> dict:
    """heads / activation / eps from a diffusers config.json or our own safetensors metadata, validated."""
    hints: dict = {}
    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is not None and cfg_file.is_file():
        try:
            if cfg_file.stat().st_size > 1 << 20:
                raise ValueError("larger than 1 MiB")
            raw = json.loads(cfg_file.read_text())
            raw = raw.get("vision_config", raw) if isinstance(raw, dict) else None
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as exc:
            raise WrongModelError(f"{cfg_file} is not a readable config: {exc}") from exc
        hints = {"heads": raw.get("num_attention_heads"), "activation": raw.get("hidden_act"),
                 "eps": raw.get("layer_norm_eps")}
    elif sd.files[0].suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(sd.files[0]), framework="pt") as f:
            meta = f.metadata() or {}
        if str(meta.get("clip_heads", "")).isdigit():
            hints = {"heads": int(meta["clip_heads"])}
    hints = {k: v for k, v in hints.items() if v is not None}
    ok = {"heads": lambda v: isinstance(v, int) and v > 0, "activation": lambda v: v in ACTIVATIONS,
          "eps": lambda v: isinstance(v, float) and 0 < v < 1}
    for k, v in hints.items():
        if not ok[k](v):
            raise WrongModelError(f"{path}: unsupported CLIP vision setting {k}={v!r}")
    return hints


def _config(sd: LazyStateDict, layout: str, path: Path, hints: dict) -> ClipVisionConfig:
    """The model size from the tensor shapes (heads from the hints or the usual width → heads table)."""
    names, keys = _names(layout, 1), set(sd)
    for need in (names["pos_embedding"][0], names["blocks.0.mlp.0.weight"][0]):
        if need not in keys:
            raise WrongModelError(f"{path} is not a complete CLIP image encoder: tensor '{need}' is missing")
    patch = sd.shape(names["patch_embedding.weight"][0])
    pos = sd.shape(names["pos_embedding"][0])
    if len(patch) != 4 or patch[1] != 3 or patch[2] != patch[3]:
        raise WrongModelError(f"{path}: the patch embedding has shape {patch}, not (width, 3, p, p)")
    width, p = patch[0], patch[2]
    grid = math.isqrt(max(pos[-2] - 1, 0)) if len(pos) >= 2 else 0
    if grid < 1 or grid * grid + 1 != pos[-2]:
        raise WrongModelError(f"{path}: the position embedding has shape {pos}, not 1 + a square grid of tokens")
    block_re = re.compile(re.escape(_BLOCK[layout]).replace(r"\{i\}", r"(\d+)") + r".*")
    found = {int(m.group(1)) for k in sd if (m := block_re.fullmatch(k))}
    layers = len(found)
    if found != set(range(layers)) or layers < 2:
        raise WrongModelError(f"{path}: CLIP blocks {sorted(found)[:8]}… are not 0..N-1 with N ≥ 2")
    heads = hints.get("heads", KNOWN_HEADS.get(width))
    if heads is None or width % heads:
        raise WrongModelError(f"{path}: cannot tell the number of attention heads of a CLIP of width {width}")
    mlp = sd.shape(names["blocks.0.mlp.0.weight"][0])[0]
    try:
        return ClipVisionConfig(grid * p, p, width, layers, heads, mlp, hints.get("eps", 1e-5),
                                hints.get("activation", "gelu"))
    except ValueError as exc:
        raise WrongModelError(f"{path}: {exc}") from exc


def load_image_encoder(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float16) -> WanImageEncoder:
    """Load any of the three layouts (file or diffusers folder) into a WanImageEncoder of the file's size."""
    path = Path(path)
    sd = open_checkpoint(path)
    layout = image_encoder_layout(sd, path)
    cfg = _config(sd, layout, path, _hints(path, sd))
    with torch.device("meta"):
        model = WanImageEncoder(cfg)
    names, keys = _names(layout, cfg.layers - 1), set(sd)  # (`in sd` would read the tensor)
    expected = model.state_dict()
    for mine, t in expected.items():  # names, shapes and dtypes first: no data is read from a wrong file
        src = names[mine]
        want = (t.shape[0] // len(src), *t.shape[1:]) if len(src) > 1 else tuple(t.shape)
        for s in src:
            if s not in keys:
                raise WrongModelError(f"{path} is not a complete CLIP image encoder: tensor '{s}' is missing")
            shape = tuple(sd.shape(s))
            if shape not in (want, tuple(d for d in want if d != 1)):  # cls/pos may lack the leading 1s
                raise WrongModelError(f"{path}: tensor '{s}' has shape {shape}, the model expects {want}")
            if sd.dtype_name(s) not in FLOAT_DTYPES:
                raise WrongModelError(f"{path}: tensor '{s}' has dtype {sd.dtype_name(s)}; only 16/32/64-bit floats")
    new_sd = {}
    for mine, t in expected.items():
        parts = [sd[s] for s in names[mine]]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        new_sd[mine] = value.reshape(t.shape).to(device=device, dtype=dtype)
    model.load_state_dict(new_sd, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# a random-weight file for the embedded tiny image-to-video model
# ----------------------------------------------------------------------------------------------------
def transformers_shapes(cfg: ClipVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers CLIPVisionModel of this size (the ComfyUI clip_vision layout)."""
    w = cfg.width
    shapes = {"vision_model.embeddings.class_embedding": (w,),
              "vision_model.embeddings.patch_embedding.weight": (w, 3, cfg.patch_size, cfg.patch_size),
              "vision_model.embeddings.position_embedding.weight": (cfg.tokens, w),
              "vision_model.pre_layrnorm.weight": (w,), "vision_model.pre_layrnorm.bias": (w,)}
    for i in range(cfg.layers):
        b = f"vision_model.encoder.layers.{i}."
        for name, out, inp in (("self_attn.q_proj", w, w), ("self_attn.k_proj", w, w), ("self_attn.v_proj", w, w),
                               ("self_attn.out_proj", w, w), ("mlp.fc1", cfg.mlp, w), ("mlp.fc2", w, cfg.mlp)):
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = (out, inp), (out,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = (w,), (w,)
    shapes["vision_model.post_layernorm.weight"] = shapes["vision_model.post_layernorm.bias"] = (w,)
    return shapes


def write_random_image_encoder(path: Path, cfg: ClipVisionConfig = TINY_CLIP, seed: int = 0) -> Path:
    """Write a deterministic random CLIP vision tower (ComfyUI layout, marked random_weights) to `path`."""
    from safetensors.torch import save_file

    from engine.tiny import random_value

    g = torch.Generator().manual_seed(seed)
    sd = {n: random_value(n, s, g).contiguous() for n, s in transformers_shapes(cfg).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "random_weights": "true", "clip_heads": str(cfg.heads)})
    return path
