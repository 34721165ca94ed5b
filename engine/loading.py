"""Public loading API: find model files in the user's layout and load DiT, VAE and text encoder.

Layouts: the official names (safetensors file, or a folder of shards with an index json), ComfyUI files
(with or without the `model.diffusion_model.` prefix, fp8 with or without `scale_weight`), and
diffusers-format folders. Modules are built on the meta device and filled tensor by tensor from
mmap'd files, converted to the run dtype on the fly (a model's `keep_fp32` tensors stay float32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from engine.checkpoint import (
    CheckpointView,
    ModelNotFoundError,
    WrongModelError,
    cast_to_run_dtype,
    load_into,
    open_checkpoint,
)
from engine.config import CLIP_DIM, CLIP_TOKENS, HEAD_DIM, PATCH, DiTConfig
from engine.dit import WanDiT

log = logging.getLogger("wan.loading")

COMFY_PREFIX = "model.diffusion_model."

# diffusers WanTransformer3DModel name → official name (applied in order; inverse of diffusers' converter)
_DIFFUSERS_DIT_RENAMES = (
    # the image branch first (its norm2 is img_emb's last LayerNorm, not a block's norm3)
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),  # diffusers' norm2 is the affine cross-attention norm (official norm3)
    ("proj_out", "head.head"),
)


def dit_name_from_diffusers(name: str) -> str:
    """Map one diffusers transformer tensor name to the official Wan name."""
    if name == "scale_shift_table":
        return "head.modulation"
    if name.endswith(".scale_shift_table"):
        return name.replace(".scale_shift_table", ".modulation")
    for old, new in _DIFFUSERS_DIT_RENAMES:
        name = name.replace(old, new)
    return name


def _dit_rename(keys: list[str]):
    diffusers = any(k.startswith("condition_embedder.") or k == "scale_shift_table" for k in keys)

    def rename(k: str) -> str:
        k = k[len(COMFY_PREFIX) :] if k.startswith(COMFY_PREFIX) else k
        return dit_name_from_diffusers(k) if diffusers else k

    return rename


def dit_model_type(view: CheckpointView, path: Path | str) -> tuple[str, int]:
    """("t2v" | "i2v" | "flf2v", CLIP token width) from the image-branch tensors the file holds."""
    if "img_emb.proj.1.weight" not in view:
        return "t2v", CLIP_DIM
    image_dim = view.shape("img_emb.proj.1.weight")[1]
    if "img_emb.emb_pos" not in view:
        return "i2v", image_dim
    pos = view.shape("img_emb.emb_pos")
    if pos[1:] != (2 * CLIP_TOKENS, image_dim):
        raise WrongModelError(f"{path}: img_emb.emb_pos has shape {pos}; a Wan2.1 FLF2V DiT has "
                              f"(1, {2 * CLIP_TOKENS}, {image_dim})")
    return "flf2v", image_dim


def dit_config_from_shapes(view: CheckpointView, path: Path | str) -> DiTConfig:
    """Infer dim, ffn, layers, text/freq dims and the model type (image branch) from tensor shapes
    (heads = dim/128)."""
    if "blocks.0.self_attn.q.weight" not in view:
        sample = next(iter(view), "<empty>")
        raise WrongModelError(
            f"{path} is not a Wan2.1 DiT: it has no 'blocks.0.self_attn.q.weight' tensor (first tensor: '{sample}')"
        )
    dim = view.shape("blocks.0.self_attn.q.weight")[0]
    if dim % HEAD_DIM:
        raise WrongModelError(f"{path}: dim {dim} is not a multiple of the head size {HEAD_DIM}")
    layers = 1 + max(int(k.split(".")[1]) for k in view if k.startswith("blocks."))
    model_type, image_dim = dit_model_type(view, path)
    return DiTConfig(
        dim=dim,
        ffn_dim=view.shape("blocks.0.ffn.0.weight")[0],
        num_layers=layers,
        freq_dim=view.shape("time_embedding.0.weight")[1],
        text_dim=view.shape("text_embedding.0.weight")[1],
        in_dim=view.shape("patch_embedding.weight")[1],
        out_dim=view.shape("head.head.weight")[0] // (PATCH[0] * PATCH[1] * PATCH[2]),
        model_type=model_type,
        image_dim=image_dim,
    )


def open_dit(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[CheckpointView, DiTConfig]:
    """Open a DiT checkpoint lazily in official names and infer its config (no data read)."""
    sd = open_checkpoint(path)
    view = CheckpointView(sd, _dit_rename(list(sd)), dtype)
    return view, dit_config_from_shapes(view, path)


def build_dit(cfg: DiTConfig, dtype: torch.dtype | None = None) -> WanDiT:
    """The DiT on the meta device (no memory), ready for `load_into` or sharding; with `dtype`, each tensor
    already has its run dtype (`dtype`, float32 for `WanDiT.keep_fp32`), as sharding must see it."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    return model if dtype is None else cast_to_run_dtype(model, dtype)


def load_dit(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    expect: DiTConfig | None = None,
    host_names: set[str] | None = None,
    prepare: Callable[[WanDiT], object] | None = None,
) -> WanDiT:
    """Load a Wan2.1 DiT (T2V, I2V or FLF2V, from the shapes) from any supported layout:
    `model(x, t, context) -> velocity`, image models also `clip_fea=`, `y=`.

    Tensors are converted to `dtype`, except `WanDiT.keep_fp32` ones, which stay float32 in a bf16/fp16 run.
    Tensors named in `host_names` (offloaded weights) are loaded to host memory instead of `device`.
    `prepare(model)` changes the meta model first (parallel/quantize.apply_fp8: fp8 layers, then filled with
    fp8 weights read as stored or quantized tensor by tensor).
    """
    view, cfg = open_dit(path, dtype)
    model = build_dit(expect or cfg, dtype if prepare is not None else None)
    if prepare is not None:
        prepare(model)
    place = (lambda n: "cpu" if n in host_names else device) if host_names else None
    load_into(model, view, device, dtype, f"Wan2.1 DiT ({(expect or cfg).name})", path, place=place)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------
def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Load the Wan causal 3D VAE (official, ComfyUI or diffusers names): `.encode(video)`, `.decode(latents)`."""
    from engine.vae import WanVAE, is_diffusers_vae, vae_config_from_state_dict, vae_name_from_diffusers

    sd = open_checkpoint(path)
    rename = vae_name_from_diffusers if is_diffusers_vae(list(sd)) else (lambda k: k)
    view = CheckpointView(sd, rename, dtype)
    if "decoder.conv1.weight" not in view:
        raise WrongModelError(f"{path} is not a Wan2.1 VAE: it has no 'decoder.conv1.weight' tensor")
    cfg = vae_config_from_state_dict({k: _ShapeOnly(view.shape(k)) for k in view})
    with torch.device("meta"):
        vae = WanVAE(**cfg)
    load_into(vae, view, device, dtype, "Wan2.1 VAE", path)
    return vae.eval().requires_grad_(False)


class _ShapeOnly:
    """Stands in for a tensor where only `.shape` is needed (config inference without reading data)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = torch.Size(shape)

    def dim(self) -> int:
        return len(self.shape)


# ----------------------------------------------------------------------------------------------------
# text encoder
# ----------------------------------------------------------------------------------------------------
TOKENIZER_PLACES = ("tokenizer", "google/umt5-xxl", "umt5-xxl", "umt5_xxl_tokenizer", "tokenizer.json")


def find_tokenizer(t5_path: Path, tokenizer_path: str | Path | None) -> Path | None:
    """An explicit tokenizer path, else a tokenizer folder/json next to the T5 weights (None if none)."""
    if tokenizer_path:
        p = Path(tokenizer_path)
        if not p.exists():
            raise ModelNotFoundError(f"tokenizer not found: {p}")
        return p
    base = t5_path if t5_path.is_dir() else t5_path.parent
    for root in (base, base.parent):
        for name in TOKENIZER_PLACES:
            if (root / name).exists():
                return root / name
    return None


def open_text_encoder(path: str | Path, dtype: torch.dtype = torch.float32):
    """Open umt5 weights lazily in HF names (Wan `.pth` names mapped) and build the meta model."""
    from transformers import UMT5EncoderModel

    from engine.text_encoder import t5_config_from_state_dict, t5_key_wan_to_hf

    sd = open_checkpoint(path)
    if "shared.weight" not in sd and "token_embedding.weight" not in sd and "encoder.embed_tokens.weight" not in sd:
        raise WrongModelError(f"{path} is not a umt5 text encoder: it has no token embedding tensor")
    wan = "token_embedding.weight" in sd
    has_shared = "shared.weight" in sd or wan

    def rename(k: str) -> str | None:
        k = t5_key_wan_to_hf(k) if wan else k
        if k == "encoder.embed_tokens.weight":
            return None if has_shared else "shared.weight"  # tied to shared.weight
        return k

    view = CheckpointView(sd, rename, dtype)
    cfg = t5_config_from_state_dict({k: _ShapeOnly(view.shape(k)) for k in view})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    return sd, view, model


def _tie(model) -> None:
    model.encoder.embed_tokens.weight = model.shared.weight


def _tokenizer_for(path: Path, sd, tokenizer_path):
    from engine.text_encoder import load_tokenizer, spiece_model_bytes

    tok_path = find_tokenizer(path, tokenizer_path)
    spiece = spiece_model_bytes(sd) if "spiece_model" in sd else None
    if tok_path is None and spiece is None:
        base = path if path.is_dir() else path.parent
        raise ModelNotFoundError(
            f"no tokenizer for {path}: looked for {', '.join(TOKENIZER_PLACES)} in {base} and {base.parent}, and for a "
            "'spiece_model' tensor in the file. Put the google/umt5-xxl tokenizer folder there or pass --tokenizer PATH."
        )
    return load_tokenizer(tok_path, spiece=spiece)


def load_text_encoder(
    path: str | Path,
    tokenizer_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shard=None,
):
    """Load the umt5-xxl encoder (HF names or official Wan `.pth` names) and its tokenizer.

    `shard(model, view)` (from parallel/) may shard and fill the meta model instead of a plain load.
    """
    from engine.text_encoder import TextEncoder

    path = Path(path)
    sd, view, model = open_text_encoder(path, dtype)
    tokenizer = _tokenizer_for(path, sd, tokenizer_path)
    if shard is not None:
        shard(model, view)
    else:
        load_into(model, view, device, dtype, "umt5 text encoder", path, skip=("encoder.embed_tokens.weight",))
    _tie(model)
    return TextEncoder(model.eval().requires_grad_(False), tokenizer)
