"""The typed run config and its command line: defaults < preset file < CLI flags (< per-request UI values)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import Any

TASKS = ("t2v-14B", "t2v-1.3B")
ATTENTION_BACKENDS = ("auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "flash_attn_2", "flash_attn_3", "flash_attn_4", "sage",
                      "math")


@dataclass
class RunConfig:
    """Every setting of a run, typed. Field names are the CLI flags (and the preset keys)."""

    # model files
    task: str | None = None
    ckpt_dir: str | None = None
    model_dir: str = "models"
    dit: str | None = None
    t5: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # request defaults (generate.py flags)
    prompt: str | None = None
    negative_prompt: str = ""
    size: str | None = None
    frame_num: int | None = None  # None: the model's default (81; 17 for the tiny model)
    sample_steps: int | None = None
    sample_shift: float | None = None
    sample_guide_scale: float | None = None
    sample_solver: str = "unipc"
    sample_timesteps: str | None = None  # e.g. "1000,750,500,250" (a preset may give a list): few-step distilled
    lora: tuple[str, ...] = ()  # PATH[:STRENGTH], repeatable; a bare name is looked up in model_dir/loras
    base_seed: int = -1
    batch_size: int = 1
    save_file: str | None = None
    save_latents: str | None = None
    outputs_dir: str = "outputs"
    # layout
    world_size: int | None = None
    use_context_parallel: bool = True
    ulysses_size: int | None = None
    ring_size: int | None = None
    cfg_size: int = 1
    sp_backend: str = "native"
    dist_timeout: float = 600.0
    heartbeat_timeout: float = 60.0  # a rank or node silent this long ends the gang (torchrun restarts it)
    fault_grace: float = 30.0  # after a rank failed inside a request, how long the others may stay in it
    # sharding
    use_fsdp: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    # memory
    preset: str | None = None
    offload_percent: float = 0.0
    blocks_to_swap: int = 0
    t5_cpu: bool = False
    offload_model: bool = False
    vae_tiling: bool = False
    teacache: float = 0.0
    teacache_cache_device: str = "gpu"
    # speed
    compile: bool = False
    compile_backend: str = "inductor"
    attention: str = "auto"
    # serving
    share: bool = False
    auth: str | None = None
    auth_file: str | None = None
    listen: str = "127.0.0.1"
    port: int = 7860
    queue_size: int = 8
    log_level: str = "INFO"
    cli_keys: tuple[str, ...] = ()  # which fields the command line set (not a flag)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


_BOOL_FLAGS = {f.name for f in fields(RunConfig) if f.type in ("bool", bool)}
_CHOICES = {
    "task": TASKS,
    "sample_solver": ("unipc", "euler", "dpm++"),
    "sp_backend": ("native", "xfuser"),
    "teacache_cache_device": ("cpu", "gpu", "offload_device", "main_device"),
    "attention": ATTENTION_BACKENDS,
    "dtype": ("auto", "bf16", "fp16", "fp32"),
}
_HELP = {
    "task": "model size the checkpoint must be (default: inferred from the file)",
    "ckpt_dir": "official Wan2.1 or diffusers checkpoint folder",
    "model_dir": "folder with diffusion_models/, text_encoders/, vae/ (ComfyUI layout)",
    "dit": "DiT file name in model_dir/diffusion_models (or a path)",
    "t5": "text encoder file name in model_dir/text_encoders (or a path)",
    "vae": "VAE file name in model_dir/vae (or a path)",
    "size": "W*H, e.g. 832*480",
    "frame_num": "number of frames, 4n+1",
    "base_seed": "seed; -1 picks a random one",
    "save_file": "mp4 path of a headless run (default: a generated name in outputs_dir)",
    "save_latents": "also write the final latents (before the VAE) to this safetensors file",
    "preset": "preset name in presets/ or a JSON path (values the flags do not set)",
    "offload_percent": "fraction (0-1) of the non-swapped DiT weights kept in host memory; higher saves more GPU memory",
    "blocks_to_swap": "number of DiT blocks streamed from host memory",
    "listen": "bind address; --listen alone means 0.0.0.0",
    "port": "web UI port; 0 = any free port (the one bound is printed: 'Wan2.1 web UI listening on http://HOST:PORT')",
    "sample_timesteps": "explicit timesteps before the shift, e.g. 1000,750,500,250 (4-step distilled sampling; "
                        "sample_steps becomes their count, the solver euler)",
    "lora": "LoRA file PATH[:STRENGTH] (strength -4 to 4, default 1), repeatable; a name alone is looked up in "
            "model_dir/loras; the default LoRAs of every request",
    "fault_grace": "seconds the other ranks may stay inside a request after one rank failed in it (stuck in a "
                   "collective with it) before the gang aborts its communicators and exits for torchrun to restart it",
}


def _flag_type(f: dataclasses.Field) -> Any:
    t = str(f.type)
    if "int" in t and "float" not in t:
        return int
    if "float" in t:
        return float
    return str


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; every flag also has its hyphenated alias; unset flags stay unset."""
    p = argparse.ArgumentParser(
        prog="app.py",
        description="Wan2.1 text-to-video: Gradio UI on rank 0, or a headless run with --prompt.",
        argument_default=argparse.SUPPRESS,
    )
    for f in fields(RunConfig):
        if f.name == "cli_keys":
            continue
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_ = _HELP.get(f.name, "") + f" (default: {f.default})"
        if f.name in _BOOL_FLAGS:
            p.add_argument(*names, dest=f.name, nargs="?", const=True, type=_str2bool, help=help_)
        elif f.name == "lora":
            p.add_argument(*names, dest=f.name, action="append", help=help_)
        elif f.name == "listen":
            p.add_argument(*names, dest=f.name, nargs="?", const="0.0.0.0", help=help_)
        else:
            p.add_argument(*names, dest=f.name, type=_flag_type(f), choices=_CHOICES.get(f.name), help=help_)
    return p


def cli_overrides(argv: list[str] | None) -> dict[str, Any]:
    """Only the flags given on the command line (so a preset can fill the rest)."""
    return vars(build_parser().parse_args(argv))


def merge_config(preset: dict[str, Any] | None, cli: dict[str, Any]) -> RunConfig:
    """defaults < preset < CLI."""
    known = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in (preset or {}).items() if k in known}
    values.update(cli)
    if isinstance(values.get("lora"), str):
        values["lora"] = (values["lora"],)
    values["lora"] = tuple(values.get("lora") or ())
    ts = values.get("sample_timesteps")
    if isinstance(ts, (list, tuple)):
        values["sample_timesteps"] = ",".join(str(t) for t in ts)
    values["cli_keys"] = tuple(sorted(cli))
    return RunConfig(**values)
