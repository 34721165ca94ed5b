"""From a RunConfig: the model files (or the tiny model), dtype, limits and defaults that parallel/apply.py loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.cli import RunConfig, upload_dir
from engine.config import (
    DIT_CONFIGS,
    NEGATIVE_PROMPTS,
    SAMPLE_DEFAULTS,
    SUPPORTED_SIZES,
    TINY_SIZES,
    DiTConfig,
)
from engine.loading import open_dit
from engine.lora import cli_loras
from engine.model_files import ModelFiles, find_model_files
from engine.request import RequestLimits
from engine.tiny import (
    RANDOM_FILES_NOTICE,
    RANDOM_WEIGHTS_NOTICE,
    TINY_KINDS,
    default_tiny_dir,
    ensure_tiny_model,
)

log = logging.getLogger("wan.factory")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto → bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# --task → the DiT config its file must have
TASK_CONFIGS = {"t2v-14B": "14B", "t2v-1.3B": "1.3B", "i2v-14B": "i2v-14B", "flf2v-14B": "flf2v-14B"}


def task_kind(task: str | None) -> str:
    """The model type a --task names: t2v (also without a task), i2v or flf2v."""
    return (task or "t2v").split("-", 1)[0]


def task_config(cfg: RunConfig, files: ModelFiles) -> DiTConfig | None:
    """The DiT config --task demands of the file (None: no task, or the embedded tiny model stands in for it)."""
    if not cfg.task or files.embedded:
        return None
    return DIT_CONFIGS[TASK_CONFIGS[cfg.task]]


def resolve_files(cfg: RunConfig) -> ModelFiles:
    """The user's model files, or the embedded tiny model (of the task's type) when nothing is there and nothing
    was named."""
    files = find_model_files(cfg.model_dir, cfg.ckpt_dir, cfg.dit, cfg.t5, cfg.vae, cfg.tokenizer, cfg.task, cfg.clip)
    if files is not None:
        if marked_random(files.dit):
            files.random_weights = True
            log.warning(RANDOM_FILES_NOTICE.format(path=files.dit))
        return files
    kind = task_kind(cfg.task)
    root = ensure_tiny_model(default_tiny_dir(cfg.model_dir, kind), kind)
    log.warning(RANDOM_WEIGHTS_NOTICE)
    if cfg.task:
        log.warning("--task %s: no weights found, so the embedded %s model (random weights) stands in for it",
                    cfg.task, TINY_KINDS[kind])
    files = find_model_files(root)
    files.random_weights = files.embedded = True
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
    key = TINY_KINDS[dcfg.model_type] if files.random_weights else dcfg.name
    if task_config(cfg, files) is not None:
        dcfg = task_config(cfg, files)  # the loader refuses a file of another size
        key = dcfg.name
    images = {"t2v": 0, "i2v": 1, "flf2v": 2}[dcfg.model_type]
    common = {"count_tokens": count_tokens, "num_blocks": dcfg.num_layers, "models_dir": cfg.model_dir,
              "image_inputs": images, "default_negative": NEGATIVE_PROMPTS[dcfg.model_type],
              "shift_by_size": key == "i2v-14B", "upload_dirs": (str(upload_dir(cfg)),) if images else ()}
    if key in SUPPORTED_SIZES:
        limits = RequestLimits(model=key, sizes=SUPPORTED_SIZES[key], **common)
    else:
        limits = RequestLimits(model=key, sizes=TINY_SIZES, any_multiple_of_16=True, **common)
    base = SAMPLE_DEFAULTS[key]
    shift = cfg.sample_shift if cfg.sample_shift is not None else None if limits.shift_by_size else base["sample_shift"]
    defaults = {
        "size": cfg.size or limits.sizes[0],
        "frame_num": cfg.frame_num if cfg.frame_num is not None else base["frame_num"],
        "sample_steps": cfg.sample_steps if cfg.sample_steps is not None else base["sample_steps"],
        "sample_shift": shift,  # None (I2V): 3.0 at 480p, 5.0 at 720p, chosen with each request's size
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
