"""The typed run config and its command line: defaults < preset file < CLI flags (< per-request UI values)."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

TASKS = ("t2v-14B", "t2v-1.3B", "i2v-14B", "flf2v-14B")
ATTENTION_BACKENDS = ("auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "flash_attn_2", "flash_attn_3", "flash_attn_4", "sage",
                      "fp8", "int8_qk", "math")
QUANTIZE = ("none", "fp8")


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
    clip: str | None = None  # image-to-video: the CLIP image encoder file
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # request defaults (generate.py flags)
    prompt: str | None = None
    negative_prompt: str = ""
    image: str | None = None  # image-to-video: the first frame (official flag; --first_frame for FLF2V)
    first_frame: str | None = None
    last_frame: str | None = None
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
    attention_exact_steps: int = 5  # 8-bit attention: the exact kernel on the first and last N steps
    quantize: str = "none"  # fp8: the DiT's block Linears in float8_e4m3fn (parallel/quantize.py)
    fp8_keep_blocks: str = "1,1"  # FIRST,LAST blocks kept in bf16 under --quantize fp8
    # serving
    share: bool = False
    auth: str | None = None
    auth_file: str | None = None
    listen: str = "127.0.0.1"
    port: int = 7860
    queue_size: int = 8
    api_key: str | None = field(default=None, repr=False)  # the /v1/ jobs API and /metrics need it (a secret)
    api_key_file: str | None = None
    api_open: bool = False  # serve /v1/ and /metrics without a key on a non-loopback address
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
    "quantize": QUANTIZE,
    "dtype": ("auto", "bf16", "fp16", "fp32"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# flag groups of --help, in order: (title, description, field names)
GROUPS: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("model files", "which weights are loaded (none found in model_dir: the embedded tiny model, random weights)",
     ("model_dir", "ckpt_dir", "dit", "t5", "vae", "clip", "tokenizer", "task", "dtype", "lora")),
    ("request defaults", "the start-up values of every request; the page and the /generate API change them per "
     "request (as they do ulysses_size, ring_size, cfg_size, offload_percent, blocks_to_swap). --prompt runs one "
     "request headless and exits",
     ("prompt", "negative_prompt", "image", "first_frame", "last_frame", "size", "frame_num", "sample_steps",
      "sample_shift", "sample_guide_scale",
      "sample_solver", "sample_timesteps", "base_seed", "batch_size", "save_file", "save_latents", "outputs_dir")),
    ("parallel layout", "how the ranks split the work; cfg_size x ring_size x ulysses_size = ranks, and Ulysses "
     "must divide the heads (14B: 40, 1.3B: 12)",
     ("world_size", "use_context_parallel", "ulysses_size", "ring_size", "cfg_size", "sp_backend", "use_fsdp",
      "dit_fsdp", "t5_fsdp")),
    ("memory", "where the weights live; a preset sets several at once (flags win over it)",
     ("preset", "offload_percent", "blocks_to_swap", "t5_cpu", "offload_model", "vae_tiling")),
    ("speed", None, ("attention", "attention_exact_steps", "quantize", "fp8_keep_blocks", "compile", "compile_backend",
                     "teacache", "teacache_cache_device")),
    ("serving and UI", "the Gradio page on rank 0 (without --prompt)",
     ("listen", "port", "share", "auth", "auth_file", "queue_size", "api_key", "api_key_file", "api_open",
      "log_level")),
    ("reliability", "when a stuck or dead rank ends the gang (torchrun then restarts it)",
     ("dist_timeout", "heartbeat_timeout", "fault_grace")),
)
# flags a user may know under another name (the guide's preset keys)
_ALIASES = {"teacache_cache_device": ("--cache_device",)}
_METAVAR = {"size": "W*H", "model_dir": "DIR", "ckpt_dir": "DIR", "outputs_dir": "DIR", "dit": "FILE", "t5": "FILE",
            "vae": "FILE", "clip": "FILE", "image": "PATH", "first_frame": "PATH", "last_frame": "PATH",
            "tokenizer": "PATH", "save_file": "PATH", "save_latents": "PATH", "lora": "PATH[:STRENGTH]",
            "prompt": "TEXT", "negative_prompt": "TEXT", "sample_timesteps": "T1,T2,...", "preset": "NAME|FILE",
            "auth": "USER:PASS[,...]", "auth_file": "FILE", "api_key": "KEY", "api_key_file": "FILE",
            "listen": "HOST", "log_level": "LEVEL",
            "compile_backend": "NAME", "fp8_keep_blocks": "FIRST,LAST"}
# what every flag does (its allowed values in words where they are not a choice list)
_HELP = {
    "task": "the model the checkpoint must be (text-, image- or first-last-frame-to-video, and its size); a file of "
            "another kind or size is refused; with no weights, the embedded tiny model of that kind",
    "ckpt_dir": "an official Wan-AI/Wan2.1-T2V, -I2V or -FLF2V download or a diffusers folder (instead of model_dir's "
                "files)",
    "model_dir": "folder with diffusion_models/, text_encoders/, vae/, clip_vision/ (ComfyUI layout) and loras/",
    "dit": "DiT file name in model_dir/diffusion_models, or a path",
    "t5": "text encoder file name in model_dir/text_encoders, or a path",
    "vae": "VAE file name in model_dir/vae, or a path",
    "clip": "image-to-video: CLIP image encoder file name in model_dir/clip_vision, or a path",
    "tokenizer": "umt5 tokenizer folder or tokenizer.json",
    "dtype": "weights and compute precision",
    "prompt": "run headless: generate this prompt once, save the video and exit (no web page)",
    "negative_prompt": "negative prompt; empty = the official Chinese one (of the model's task)",
    "image": "image-to-video (--task i2v-14B): the first frame, a PNG, JPEG or WebP file (headless runs)",
    "first_frame": "first-last-frame-to-video (--task flf2v-14B): the first frame (headless runs; = --image)",
    "last_frame": "first-last-frame-to-video (--task flf2v-14B): the last frame (headless runs)",
    "size": "video W*H (real models: their trained sizes, 14B 1280*720, 720*1280, 832*480, 480*832; 1.3B "
            "832*480, 480*832; the tiny model: any multiples of 16); image-to-video: the area, the shape follows the "
            "image's aspect ratio",
    "frame_num": "frames, 4n+1 between 1 and 241 (e.g. 17, 33, 81)",
    "sample_steps": "denoising steps, 1 to 200",
    "sample_shift": "noise-schedule shift, greater than 0 and at most 20",
    "sample_guide_scale": "classifier-free guidance scale, 0 to 20 (1 = one forward per step)",
    "sample_solver": "sampler; flow UniPC reproduces the official timesteps",
    "sample_timesteps": "explicit timesteps before the shift, strictly decreasing in (0, 1000], e.g. 1000,750,500,250 "
                        "(few-step distilled sampling; sample_steps becomes their count, the solver euler)",
    "lora": "LoRA file PATH[:STRENGTH] (strength -4 to 4, default 1), repeatable; a name alone is looked up in "
            "model_dir/loras; the default LoRAs of every request",
    "base_seed": "seed, -1 to 4294967295; -1 picks a random one (the seed used is in the sidecar)",
    "batch_size": "videos per request, 1 to 8 (consecutive seeds, one batched forward)",
    "save_file": "mp4 path of a headless run; a .json sidecar of the same stem is written next to it",
    "save_latents": "also write the final latents (before the VAE) to this safetensors file",
    "outputs_dir": "folder of the generated videos (and of the page's file cache)",
    "world_size": "number of ranks the preset/config expects, at least 1; a mismatch with the running ranks stops "
                  "(the launcher's --nproc sets how many run)",
    "use_context_parallel": "split the sequence over the ranks (false: every rank computes all of it, more memory)",
    "ulysses_size": "Ulysses (all-to-all head split) degree, at least 1",
    "ring_size": "Ring attention degree, at least 1",
    "cfg_size": "CFG parallel: 2 runs the conditional and unconditional branches on two halves of the ranks; 1 or 2",
    "sp_backend": "who does the distributed attention (xfuser needs a GPU and the xfuser package)",
    "use_fsdp": "FSDP2 sharding of the DiT and T5 over the ranks (= --dit_fsdp --t5_fsdp)",
    "dit_fsdp": "FSDP2 sharding of the DiT only",
    "t5_fsdp": "FSDP2 sharding of the text encoder only",
    "preset": "memory/speed preset: a name in presets/ (max_speed, balanced, low_vram, single_gpu, 8gpu_distributed, "
              "distilled_4step, fp8_24gb, fp8_speed, auto) or a JSON path; flags given win over it",
    "offload_percent": "fraction 0 to 1 of the non-swapped DiT weights kept in pinned host memory; higher saves more "
                       "GPU memory",
    "blocks_to_swap": "last N DiT blocks streamed from pinned host memory one block ahead, 0 to the model's blocks "
                      "(14B: 40, 1.3B: 30; more means all)",
    "t5_cpu": "run the text encoder on the CPU",
    "offload_model": "move T5 and the DiT off the GPU while not in use (official flag)",
    "vae_tiling": "spatially tiled VAE decode (exact, bounded memory)",
    "teacache": "TeaCache threshold, 0 to 10; 0 = off (14B: 0.15-0.3; 1.3B: 0.05-0.08)",
    "teacache_cache_device": "where TeaCache keeps its residual (offload_device = cpu, main_device = gpu)",
    "compile": "regional torch.compile, per block (the first request of a shape compiles for about a minute)",
    "compile_backend": "torch.compile backend",
    "attention": "local attention kernel (auto: FlashAttention-4 on Hopper/Blackwell when installed, else cuDNN; fp8 "
                 "and int8_qk: 8-bit attention on Ada/Hopper GPUs, faster and less exact: int8 QK with fp8 or bf16 PV)",
    "attention_exact_steps": "with 8-bit attention (fp8, int8_qk), the first and last N denoising steps use the exact "
                             "kernel (quality guard); 0 or more",
    "quantize": "fp8: the DiT's block Linear layers in float8_e4m3fn with per-channel scales and fp8 GEMMs "
                "(sm89+ GPUs; upcast per layer elsewhere): about half the DiT memory, faster, less exact; fixed at "
                "start-up (a change needs a restart)",
    "fp8_keep_blocks": "with --quantize fp8, how many blocks FIRST,LAST at each end stay in bf16, two integers >= 0",
    "share": "also serve a public Gradio share link (always behind a login)",
    "auth": "web UI logins user:password, comma-separated",
    "auth_file": "file of user:password logins, one a line (# comments)",
    "listen": "bind address; --listen alone means 0.0.0.0 (the whole network)",
    "port": "web UI port, 0 to 65535; 0 = any free port (printed: 'Wan2.1 web UI listening on http://HOST:PORT')",
    "queue_size": "requests that may wait for the GPUs, at least 1; more are refused with 'Queue is full' (the page) "
                  "or 429 (the /v1/videos API)",
    "api_key": "the key every /v1/ (jobs API) and /metrics call must send as 'Authorization: Bearer KEY' "
               "(printable ASCII, no spaces); the page's login is separate",
    "api_key_file": "file holding the API key on its first line (# comments), read once at start",
    "api_open": "serve /v1/ and /metrics without a key on a non-loopback --listen or a --share link (otherwise "
                "they answer 403 there)",
    "log_level": "log verbosity: DEBUG, INFO, WARNING, ERROR or CRITICAL",
    "dist_timeout": "seconds a compute collective may take before it fails, greater than 0",
    "heartbeat_timeout": "seconds a rank or node may stay silent before the whole gang exits, greater than 0",
    "fault_grace": "seconds the other ranks may stay inside a request after one rank failed in it (stuck in a "
                   "collective with it) before the gang aborts and exits for torchrun to restart it; 0 or more",
}
# defaults whose value alone says little
_DEFAULT_TEXT = {
    "task": "inferred from the file's shapes",
    "ckpt_dir": "none: model_dir's files",
    "dit": "the file matching the task", "t5": "the one in model_dir/text_encoders", "vae": "the one in model_dir/vae",
    "clip": "the one in model_dir/clip_vision (image-to-video models only)",
    "image": "none", "first_frame": "none", "last_frame": "none",
    "tokenizer": "next to the text encoder",
    "dtype": "auto: bf16 on CUDA, fp32 on the CPU",
    "prompt": "none: serve the web page",
    "negative_prompt": "the official one",
    "size": "the model's first size: 1280*720 (14B), 832*480 (1.3B), 256*256 (tiny)",
    "frame_num": "81; 17 for the tiny model",
    "sample_steps": "50; I2V: 40",
    "sample_shift": "5.0; 1.3B: 8.0; I2V: 3.0 at 832*480 and 480*832; FLF2V: 16.0",
    "sample_guide_scale": "5.0; 1.3B: 6.0",
    "sample_timesteps": "none: the solver's own grid",
    "lora": "none",
    "save_file": "a generated name in outputs_dir",
    "save_latents": "not written",
    "world_size": "the running ranks",
    "ulysses_size": "GPUs per node, as far as the heads allow",
    "ring_size": "the rest of the ranks",
    "preset": "none",
    "auth": "no login; with --share a random password, printed",
    "auth_file": "none",
    "api_key": "none: /v1/ and /metrics open on loopback only",
    "api_key_file": "none",
}

LAUNCHER_HELP = """\
launcher flags (./launch.sh only; everything else goes to app.py):
  test [PYTEST ARGS]      run the tests on the CPU instead, e.g. ./launch.sh test tests/test_engine.py
                          (the browser tests need Chromium at /usr/bin/chromium: apt-get install chromium)
  --nproc N               ranks on this machine (default: the visible GPUs, 1 without GPUs)
  --no-venv               use the current python3 instead of .venv (also LAUNCH_NO_VENV=1)
  --nnodes N              machines in the gang (default: 1)
  --node_rank K           this machine's index, 0 to N-1 (static rendezvous at --master_addr)
  --master_addr HOST      node 0's address (default: 127.0.0.1)
  --master_port PORT      node 0's rendezvous port (default: 29500)
  --rdzv_endpoint H:P     elastic rendezvous instead: any start order, nodes waited for up to
                          LAUNCH_JOIN_TIMEOUT seconds (default: 600)
  --max_restarts N        how often torchrun restarts a failed gang (default: 3; LAUNCH_MAX_RESTARTS)
environment: WAN_VENV (the venv, default .venv), PYTHON (the python that creates it); MASTER_ADDR,
MASTER_PORT, NCCL_* and TORCH_* are passed through. Every app flag also takes a hyphenated spelling
(--sample-steps)."""

USAGE = """./launch.sh [launcher flags] [app flags]     (all visible GPUs, through torchrun)
       ./launch.sh test [pytest args]
       python app.py [app flags]                    (one process, in the venv)"""


def _default_text(f: dataclasses.Field) -> str:
    if f.name in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[f.name]
    if f.name in _BOOL_FLAGS:
        return "true" if f.default else "false"
    return str(f.default) if f.default != "" else "empty"


def flag_help(name: str) -> str:
    """The --help line of one flag: what it does, its allowed values and its default."""
    f = _FIELDS[name]
    allowed = ""
    if name in _CHOICES:
        allowed = f"; one of {', '.join(_CHOICES[name])}"
    elif name in _BOOL_FLAGS:
        allowed = "; true or false (alone: true)"
    return f"{_HELP[name]}{allowed} (default: {_default_text(f)})".replace("%", "%%")


_FIELDS = {f.name: f for f in fields(RunConfig) if f.name != "cli_keys"}


def _choice_metavar(name: str) -> str:
    """A metavar from a field name: attention → ATTENTION, sample_solver → SOLVER."""
    return name.rsplit("_", 1)[-1].upper() if name != "teacache_cache_device" else "DEVICE"


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
    """The argparse parser, flags grouped as in GROUPS; every flag also has a hyphenated alias (not listed);
    unset flags stay unset (so a preset can fill them)."""
    p = argparse.ArgumentParser(
        prog="app.py",
        usage=USAGE,
        description=textwrap.fill("Wan2.1 text-to-video: a Gradio page on rank 0 driving every GPU, or one headless "
                                  "run with --prompt. Settings: defaults < --preset < flags (< the page's or the "
                                  "API's per-request values).", 78),
        epilog=LAUNCHER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    for title, description, names in GROUPS:
        g = p.add_argument_group(title, textwrap.fill(description, 78) if description else None)
        for name in names:
            _add_flag(g, _FIELDS[name], [f"--{name}", *_ALIASES.get(name, ())], flag_help(name))
            if "_" in name:
                _add_flag(g, _FIELDS[name], [f"--{name.replace('_', '-')}"], argparse.SUPPRESS)
    return p


def _add_flag(g: argparse._ActionsContainer, f: dataclasses.Field, names: list[str], help_: str) -> None:
    metavar = _METAVAR.get(f.name)
    if f.name in _BOOL_FLAGS:
        g.add_argument(*names, dest=f.name, nargs="?", const=True, type=_str2bool, metavar="BOOL", help=help_)
    elif f.name == "lora":
        g.add_argument(*names, dest=f.name, action="append", metavar=metavar, help=help_)
    elif f.name == "listen":
        g.add_argument(*names, dest=f.name, nargs="?", const="0.0.0.0", metavar=metavar, help=help_)
    else:
        t = _flag_type(f)
        choices = _CHOICES.get(f.name)
        if metavar is None:
            metavar = _choice_metavar(f.name) if choices else {int: "N", float: "X"}.get(t, "TEXT")
        g.add_argument(*names, dest=f.name, type=t, choices=choices, metavar=metavar, help=help_)


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


# ----------------------------------------------------------------------------------------------------
# early checks: the same rules the server applies to requests, before torch or any file is loaded
# ----------------------------------------------------------------------------------------------------
FP8_FSDP_REFUSAL = ("fp8 cannot be combined with FSDP of the DiT (--use_fsdp / --dit_fsdp): sharding float8 "
                    "parameters with FSDP2 is not supported here. The fp8 14B DiT (about 14 GiB) fits whole on each "
                    "GPU: drop --dit_fsdp (--t5_fsdp alone is fine), or run bf16 with FSDP")
_REQUEST_KEYS = ("prompt", "negative_prompt", "frame_num", "sample_steps", "sample_shift", "sample_guide_scale",
                 "base_seed", "batch_size", "ulysses_size", "ring_size", "cfg_size", "teacache", "offload_percent",
                 "sample_timesteps")
_MAX_SIDE = 1920


def check_config(cfg: RunConfig) -> None:
    """Refuse values no model could take, with a RequestError naming the flag (field) and the allowed values.

    Runs on the merged config (defaults < preset < CLI), before torch.distributed or any file is loaded; the
    checks that need the model (its sizes, heads, block count) follow once its file has been opened."""
    from engine.request import RequestError, RequestLimits, _number, parse_size, validate_request

    for name, allowed in _CHOICES.items():  # a preset's values did not go through argparse
        value = getattr(cfg, name)
        if value is not None and value not in allowed:
            raise RequestError(name, f"must be one of {', '.join(allowed)}, got {str(value)[:40]!r}")
    if str(cfg.log_level).upper() not in LOG_LEVELS:
        raise RequestError("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {str(cfg.log_level)[:40]!r}")
    if cfg.size is not None:
        try:
            parse_size(cfg.size, RequestLimits(model="any", sizes=(), any_multiple_of_16=True, max_side=_MAX_SIDE))
        except RequestError:
            raise RequestError("size", f"must be W*H with W and H multiples of 16 between 16 and {_MAX_SIDE} "
                                       f"(14B: 1280*720, 720*1280, 832*480, 480*832; 1.3B: 832*480, 480*832; the "
                                       f"tiny model: any), got {str(cfg.size)[:40]!r}") from None
    defaults: dict[str, Any] = {k: getattr(cfg, k) for k in _REQUEST_KEYS if getattr(cfg, k) is not None}
    defaults.setdefault("prompt", "x")  # the page's requests bring their own prompt
    defaults["size"] = "16*16"  # checked above
    defaults["sample_solver"] = ("euler" if cfg.sample_timesteps and "sample_solver" not in cfg.cli_keys
                                 else cfg.sample_solver)  # as engine.factory.model_info sets it
    raw = {**headless_request(cfg), "size": None} if cfg.prompt is not None else {}
    if cfg.image and cfg.first_frame:
        raise RequestError("first_frame", "give the first frame once: --image or --first_frame (the same flag)")
    if cfg.last_frame and not (cfg.image or cfg.first_frame):
        raise RequestError("last_frame", "needs the first frame too (--first_frame PATH)")
    from engine.images import decode_image

    for name in IMAGE_FIELDS:  # every image flag is read and decoded now (a missing or damaged file stops here)
        if raw.get(name) is not None:
            decode_image(raw.pop(name), _image_flag(cfg, name))
    validate_request(raw, RequestLimits(model="any", sizes=(), any_multiple_of_16=True), defaults)
    _at_least("blocks_to_swap", cfg.blocks_to_swap, 0, integer=True)
    _at_least("attention_exact_steps", cfg.attention_exact_steps, 0, integer=True)
    if cfg.quantize == "fp8":
        try:
            keep_blocks(cfg.fp8_keep_blocks)
        except ValueError as exc:
            raise RequestError("fp8_keep_blocks", str(exc).split(" ", 1)[1]) from None
        if cfg.use_fsdp or cfg.dit_fsdp:
            raise RequestError("quantize", FP8_FSDP_REFUSAL)
    if cfg.world_size is not None:
        _at_least("world_size", cfg.world_size, 1, integer=True)
    _number("port", cfg.port, 0, 65535, integer=True)
    _at_least("queue_size", cfg.queue_size, 1, integer=True)
    _at_least("dist_timeout", cfg.dist_timeout, 0, integer=False, lo_open=True)
    _at_least("heartbeat_timeout", cfg.heartbeat_timeout, 0, integer=False, lo_open=True)
    _at_least("fault_grace", cfg.fault_grace, 0, integer=False)


def keep_blocks(text: str) -> tuple[int, int]:
    """--fp8_keep_blocks 'FIRST,LAST' → (first, last); ValueError naming the flag otherwise (torch-free)."""
    try:
        first, last = (int(p) for p in str(text).split(","))
        if first < 0 or last < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"fp8_keep_blocks must be FIRST,LAST with two integers >= 0 (blocks kept in bf16 at each "
                         f"end), got {str(text)[:40]!r}") from None
    return first, last


def _at_least(name: str, value: Any, lo: float, integer: bool, lo_open: bool = False) -> None:
    """`value` a number ≥ lo (> lo with lo_open), else a RequestError naming the field."""
    from engine.request import RequestError, _number

    try:
        _number(name, value, lo, 1e12, integer=integer, lo_open=lo_open)
    except RequestError:
        kind = "an integer" if integer else "a number"
        bound = "greater than" if lo_open else "at least"
        raise RequestError(name, f"must be {kind} {bound} {lo:g}, got {str(value)[:40]}") from None


def headless_request(cfg: RunConfig) -> dict[str, Any]:
    """The raw request of a headless run (--prompt): the request flags, as the server validates them."""
    raw = {k: getattr(cfg, k) for k in ("prompt", "negative_prompt", "size", "frame_num", "sample_steps",
                                        "sample_shift", "sample_guide_scale", "sample_solver", "base_seed",
                                        "batch_size", "ulysses_size", "ring_size", "cfg_size", "teacache")}
    if cfg.sample_timesteps and "sample_solver" not in cfg.cli_keys and cfg.sample_solver == "unipc":
        raw["sample_solver"] = None  # explicit timesteps take the distilled Euler update unless a solver was asked
    for name in IMAGE_FIELDS:
        path = (cfg.image or cfg.first_frame) if name == "image" else cfg.last_frame
        if path:
            raw[name] = read_image_file(path, _image_flag(cfg, name))
    return raw


IMAGE_FIELDS = ("image", "last_frame")  # the request fields of the image flags


def upload_dir(cfg: RunConfig) -> Path:
    """The one folder the page's uploads land in (Gradio's file cache inside outputs_dir); a request may name an
    image by path only inside it, and the page deletes each upload once its request is over."""
    return Path(cfg.outputs_dir).resolve() / ".gradio-cache"


def _image_flag(cfg: RunConfig, name: str) -> str:
    """The flag a request's image field came from (for messages)."""
    return name if name == "last_frame" else "first_frame" if cfg.first_frame else "image"


def read_image_file(path: str, flag: str) -> bytes:
    """The bytes of an image named on the command line (the user's own file: any path), size-checked."""
    from engine.request import RequestError

    max_bytes = 20 * 2**20  # engine.images.MAX_IMAGE_BYTES (that module imports PIL)
    p = Path(path).expanduser()
    if not p.is_file():
        raise RequestError(flag, f"{path}: no such file (a PNG, JPEG or WebP image)")
    if p.stat().st_size > max_bytes:
        raise RequestError(flag, f"{path} is {p.stat().st_size / 2**20:.1f} MB; the limit is {max_bytes // 2**20} MB")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise RequestError(flag, f"{path}: cannot be read ({exc.strerror or exc})") from None
