"""From a RunConfig: the model files (or the tiny model), dtype, limits and defaults that parallel/apply.py loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.cli import RunConfig
from engine.config import DIT_CONFIGS, SAMPLE_DEFAULTS, SUPPORTED_SIZES, TINY_SIZES
from engine.loading import open_dit
from engine.lora import cli_loras
from engine.model_files import ModelFiles, find_model_files
from engine.request import RequestLimits
from engine.tiny import RANDOM_FILES_NOTICE, RANDOM_WEIGHTS_NOTICE, default_tiny_dir, ensure_tiny_model

log = logging.getLogger("wan.factory")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto → bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_files(cfg: RunConfig) -> ModelFiles:
    """The user's model files, or the embedded tiny model when nothing is there and nothing was named."""
    files = find_model_files(cfg.model_dir, cfg.ckpt_dir, cfg.dit, cfg.t5, cfg.vae, cfg.tokenizer, cfg.task)
    if files is not None:
        if marked_random(files.dit):
            files.random_weights = True
            log.warning(RANDOM_FILES_NOTICE.format(path=files.dit))
        return files
    root = ensure_tiny_model(default_tiny_dir(cfg.model_dir))
    log.warning(RANDOM_WEIGHTS_NOTICE)
    files = find_model_files(root)
    files.random_weights = True
    return files


def marked_random(path: Path) -> bool:
    """True for files the tiny-model generator wrote (their safetensors metadata says random_weights)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("random_weights") == "true"
    except Exception:  # noqa: BLE001 - unreadable files are reported by the loader
        return False


@dataclass
class ModelInfo:
    """What the rest of the app needs to know about the loaded model."""

    key: str  # "14B", "1.3B", "tiny" or "custom"
    files: ModelFiles
    num_heads: int
    num_layers: int
    dtype: torch.dtype
    limits: RequestLimits
    defaults: dict = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        return self.files.random_weights


def model_info(files: ModelFiles, cfg: RunConfig, dtype: torch.dtype, count_tokens=None) -> ModelInfo:
    """Model key, sizes and defaults from the DiT's shapes (no weights read)."""
    _, dcfg = open_dit(files.dit)
    key = "tiny" if files.random_weights else dcfg.name
    if cfg.task:
        dcfg = DIT_CONFIGS[cfg.task.split("-", 1)[1]]  # the loader refuses a file of another size
        key = dcfg.name
    if key in SUPPORTED_SIZES:
        limits = RequestLimits(model=key, sizes=SUPPORTED_SIZES[key], count_tokens=count_tokens,
                               num_blocks=dcfg.num_layers, models_dir=cfg.model_dir)
    else:
        limits = RequestLimits(model=key, sizes=TINY_SIZES, any_multiple_of_16=True, count_tokens=count_tokens,
                               num_blocks=dcfg.num_layers, models_dir=cfg.model_dir)
    base = SAMPLE_DEFAULTS[key]
    defaults = {
        "size": cfg.size or limits.sizes[0],
        "frame_num": cfg.frame_num if cfg.frame_num is not None else base["frame_num"],
        "sample_steps": cfg.sample_steps if cfg.sample_steps is not None else base["sample_steps"],
        "sample_shift": cfg.sample_shift if cfg.sample_shift is not None else base["sample_shift"],
        "sample_guide_scale": cfg.sample_guide_scale if cfg.sample_guide_scale is not None else base["sample_guide_scale"],
        "sample_solver": "euler" if cfg.sample_timesteps and "sample_solver" not in cfg.cli_keys else cfg.sample_solver,
        "base_seed": cfg.base_seed,
        "batch_size": cfg.batch_size,
        "negative_prompt": cfg.negative_prompt,
        "teacache": cfg.teacache,
        "offload_percent": cfg.offload_percent,
        "blocks_to_swap": min(cfg.blocks_to_swap, dcfg.num_layers),  # more than the model has: all of them
        "sample_timesteps": cfg.sample_timesteps,
        "loras": cli_loras(cfg.lora, cfg.model_dir),
    }
    return ModelInfo(key, files, dcfg.num_heads, dcfg.num_layers, dtype, limits, defaults)
