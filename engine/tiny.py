"""The embedded default model: a tiny Wan with RANDOM weights, written to disk in the ComfyUI layout.

It exists so that the app, the tests and the parallel runtime work on any machine before the user has
downloaded real weights. Its outputs are noise. It is generated deterministically, by whichever process
gets there first, into a temporary folder that is renamed into place, so concurrent ranks never read a
half-written file; it is then loaded through the normal loader like a user's files.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from engine.config import DIT_CONFIGS

log = logging.getLogger("wan.tiny")

TINY_VERSION = "v2"
TINY_VAE_DIM = 16
TINY_T5 = {"vocab_size": 2048, "d_model": 64, "num_layers": 2, "num_heads": 4, "d_kv": 16, "d_ff": 128}
DIT_FILE = "wan2.1_t2v_tiny_random.safetensors"
TINY_KINDS = {"t2v": "tiny", "i2v": "tiny-i2v", "flf2v": "tiny-flf2v"}  # model type → its tiny DiT config
TINY_IMAGE_VERSION = "v1"
CLIP_FILE = "clip_vision_tiny_random.safetensors"
T5_FILE = "umt5_tiny_random.safetensors"
VAE_FILE = "wan_2.1_vae_tiny_random.safetensors"
RANDOM_FILES_NOTICE = (
    "{path} holds RANDOM weights (marked random_weights in its metadata: written by the tiny-model or benchmark "
    "generators): everything runs at this model's real size, but its videos are noise."
)
RANDOM_WEIGHTS_NOTICE = (
    "No Wan2.1 weights were found, so the embedded TINY model with RANDOM weights is loaded: "
    "it exercises every part of the app, but its videos are noise. Put real weights in models/ "
    "(see README: Model files) to generate real videos."
)


def random_value(name: str, shape: tuple[int, ...], generator: torch.Generator, device: str | torch.device = "cpu") -> torch.Tensor:
    """One well-scaled random float32 tensor: norms near 1, weights ~ N(0, 1/fan_in), the rest small."""
    leaf = name.rsplit(".", 1)[-1]
    r = torch.randn(shape, generator=generator, device=device)
    if "norm" in name or leaf == "gamma" or name.endswith("layer_norm.weight"):
        return 1.0 + 0.1 * r
    if len(shape) >= 2 and leaf != "modulation":
        return r / math.sqrt(math.prod(shape[1:]))
    return 0.1 * r


def random_weights(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic, well-scaled random values for every tensor of a (meta) module's state dict."""
    g = torch.Generator().manual_seed(seed)
    return {name: random_value(name, tuple(t.shape), g).contiguous() for name, t in module.state_dict().items()}


def _tiny_t5_state_dict() -> dict[str, torch.Tensor]:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        **TINY_T5, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
        relative_attention_max_distance=128, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
    )
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    sd = random_weights(model, seed=2)
    sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    sd["shared.weight"] = sd["shared.weight"] * 4.0  # T5 embeddings are not scaled down by fan-in
    return sd


def _tiny_dit_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """Random DiT weights whose timestep embedding behaves like a trained one: it leans on the low
    frequencies and carries a large constant part, so consecutive steps' embeddings differ by a few
    percent (as in the real models) and TeaCache has something realistic to decide on."""
    sd = random_weights(dit, seed=1)
    decay = torch.exp(-torch.arange(128, dtype=torch.float32) / 8.0)
    sd["time_embedding.0.weight"] = sd["time_embedding.0.weight"] * torch.cat([decay, decay])
    sd["time_embedding.2.bias"] = 2.0 * torch.randn(sd["time_embedding.2.bias"].shape, generator=torch.Generator().manual_seed(4))
    return sd


def dit_file(kind: str) -> str:
    """The tiny DiT's file name for a model type (t2v, i2v, flf2v)."""
    return DIT_FILE.replace("_t2v_", f"_{kind}_")


def write_tiny_model(root: Path, kind: str = "t2v") -> None:
    """Write the tiny model's files under root in the seed's layout (deterministic); the image-to-video kinds
    also get a tiny CLIP image encoder in clip_vision/ (ComfyUI's layout)."""
    from engine.dit import WanDiT
    from engine.text_encoder import build_tiny_tokenizer
    from engine.vae import WanVAE

    with torch.device("meta"):
        dit = WanDiT(DIT_CONFIGS[TINY_KINDS[kind]])
        vae = WanVAE(dim=TINY_VAE_DIM, z_dim=16)
    (root / "diffusion_models").mkdir(parents=True)
    (root / "text_encoders").mkdir()
    (root / "vae").mkdir()
    meta = {"random_weights": "true", "note": "embedded tiny Wan2.1 with random weights; outputs are noise"}
    if kind != "t2v":
        from engine.clip import TINY_IMAGE_CLIP, write_random_image_encoder

        write_random_image_encoder(root / "clip_vision" / CLIP_FILE, TINY_IMAGE_CLIP, seed=5)
    save_file(_tiny_dit_state_dict(dit), root / "diffusion_models" / dit_file(kind), metadata=meta)
    save_file(_tiny_t5_state_dict(), root / "text_encoders" / T5_FILE, metadata=meta)
    build_tiny_tokenizer(root / "text_encoders" / "tokenizer", vocab_size=TINY_T5["vocab_size"])
    save_file(random_weights(vae, seed=3), root / "vae" / VAE_FILE, metadata=meta)
    (root / "README.txt").write_text(RANDOM_WEIGHTS_NOTICE + "\n")


def default_tiny_dir(model_dir: str | Path, kind: str = "t2v") -> Path:
    """Where the tiny model lives: $WAN_TINY_DIR, else a hidden folder inside model_dir (one per model type)."""
    env = os.environ.get("WAN_TINY_DIR")
    name = f".tiny-random-{TINY_VERSION}" if kind == "t2v" else f".tiny-random-{kind}-{TINY_IMAGE_VERSION}"
    if env:
        return Path(env) if kind == "t2v" else Path(env).with_name(Path(env).name + f"-{kind}")
    return Path(model_dir) / name


def ensure_tiny_model(root: str | Path, kind: str = "t2v") -> Path:
    """Generate the tiny model at root unless it is already there; safe when many processes race."""
    if kind not in TINY_KINDS:
        raise ValueError(f"no tiny model of type {kind!r} (types: {', '.join(TINY_KINDS)})")
    what = "the embedded tiny random-weight model" + ("" if kind == "t2v" else f" ({kind})")
    return write_atomically(root, lambda folder: write_tiny_model(folder, kind), what, f"vae/{VAE_FILE}")


def write_atomically(root: str | Path, write, what: str, marker: str) -> Path:
    """`write(folder)` into a temporary folder renamed to root, unless root/marker (its last file) exists:
    concurrent writers never expose a half-written model, and the first rename wins."""
    root = Path(root)
    if (root / marker).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, root)  # atomic; fails if another process renamed its copy first
            log.info("wrote %s to %s", what, root)
        except OSError:
            if not (root / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
