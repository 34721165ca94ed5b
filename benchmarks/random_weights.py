"""Random weights of the real shapes written as model files, so the real loaders, FSDP's sharded loading and
the serving path run on a machine without checkpoints. Values follow engine.tiny.random_value, are made on
the GPU when there is one and streamed to disk tensor by tensor (host memory stays small).

    write_model_dir(Path("/tmp/wan21_random_14B"), "14B")  # models/-style folder: DiT, umt5-xxl, VAE, tokenizer
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import torch

DIT_FILE = "wan2.1_t2v_{key}_random_bf16.safetensors"
T5_FILE = "umt5_xxl_random_bf16.safetensors"
VAE_FILE = "wan_2.1_vae_random_bf16.safetensors"
NOTE = {"note": "random weights of the real shapes, for benchmarks; outputs are noise"}


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                             device: str | None = None, metadata: dict[str, str] | None = None) -> None:
    """A bf16 safetensors file of random values for `shapes` (name → shape), written tensor by tensor."""
    from engine.tiny import random_value

    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(dev).manual_seed(seed)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape in shapes.items():
            v = random_value(name, tuple(shape), g, dev).to(torch.bfloat16)
            fh.write(v.view(torch.int16).cpu().numpy().data)  # no extra host copy


def dit_shapes(key: str) -> dict[str, tuple[int, ...]]:
    """Official tensor names and shapes of a Wan2.1 DiT size ("14B", "1.3B", "tiny")."""
    from engine.config import DIT_CONFIGS
    from engine.loading import build_dit

    return {n: tuple(t.shape) for n, t in build_dit(DIT_CONFIGS[key]).state_dict().items()}


def t5_shapes(t5: dict | None = None) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of a umt5 encoder (default umt5-xxl; embed_tokens is tied to shared)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from engine.config import UMT5_XXL

    cfg = UMT5Config(**(t5 or UMT5_XXL), relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n != "encoder.embed_tokens.weight"}


def vae_shapes(dim: int = 96) -> dict[str, tuple[int, ...]]:
    """Official names and shapes of the Wan2.1 VAE (dim 96; smaller for tests)."""
    from engine.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(dim=dim)
    return {n: tuple(t.shape) for n, t in vae.state_dict().items()}


def write_model_dir(root: Path, key: str, seed: int = 0, t5: dict | None = None, vae_dim: int = 96) -> Path:
    """root/{diffusion_models,text_encoders,vae}/ with random real-shape files and a tokenizer (skipped when
    already there; written into a temporary folder renamed into place, so readers never see half a file)."""
    from engine.text_encoder import build_tiny_tokenizer
    from engine.tiny import write_atomically

    def write(tmp: Path) -> None:
        for sub in ("diffusion_models", "text_encoders", "vae"):
            (tmp / sub).mkdir()
        write_random_safetensors(tmp / "diffusion_models" / DIT_FILE.format(key=key), dit_shapes(key), seed, metadata=NOTE)
        write_random_safetensors(tmp / "text_encoders" / T5_FILE, t5_shapes(t5), seed + 1, metadata=NOTE)
        build_tiny_tokenizer(tmp / "text_encoders" / "tokenizer")  # ids < 2048: valid for any vocabulary
        write_random_safetensors(tmp / "vae" / VAE_FILE, vae_shapes(vae_dim), seed + 2, metadata=NOTE)

    return write_atomically(root, write, f"random {key} model files", f"vae/{VAE_FILE}")


def wait_for_model_dir(root: Path, timeout_s: float = 1800.0) -> Path:
    """Wait until another process (this node's local rank 0) has written root."""
    t0 = time.monotonic()
    while not (Path(root) / "vae" / VAE_FILE).exists():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{root} was not written within {timeout_s:.0f} s")
        time.sleep(1.0)
    return Path(root)
