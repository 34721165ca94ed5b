"""Start-up of a rank: join the gang, check every node's model files, resolve `--preset auto`, load and
place the models, and return this rank's Server."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli import RunConfig
from parallel.apply import build_parallel_pipeline
from parallel.runtime import LaunchError, Runtime, init_runtime, setup_logging, shutdown_runtime

if TYPE_CHECKING:
    from parallel.serve import Server

log = logging.getLogger("wan.serve")


def fingerprint(path: Path) -> tuple:
    """Cheap identity of a model file or folder: names, sizes, and a hash of each file's first and last MiB."""
    import hashlib

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        h = hashlib.sha256()
        size = f.stat().st_size
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
            if size > 2**21:
                fh.seek(size - 2**20)
                h.update(fh.read())
        out.append((f.name, size, h.hexdigest()[:16]))
    return tuple(out)


def preflight(cfg: RunConfig, rt: Runtime):
    """Every rank finds and fingerprints its own model files (each node reads its own --model_dir); a file
    missing or different on any node stops every rank at once, with a message naming the node and file."""
    from engine.checkpoint import ModelFileError
    from engine.factory import resolve_files

    files, status = None, None
    try:
        files = resolve_files(cfg)
        parts = {"DiT": files.dit, "text encoder": files.t5, "VAE": files.vae}
        status = ("ok", {k: (str(v), fingerprint(Path(v))) for k, v in parts.items()})
    except (ModelFileError, OSError) as exc:
        status = ("error", str(exc))
    everyone = rt.all_gather_object((rt.node, rt.host, status))
    for node, host, (kind, detail) in everyone:
        if kind == "error":
            raise LaunchError(f"node {node} ({host}): {detail}")
    _, _, (_, ref) = everyone[0]
    for node, host, (_, mine) in everyone:
        for part, (path, fp) in mine.items():
            if fp != ref[part][1]:
                raise LaunchError(
                    f"node {node} ({host}) has a different {part} file than node 0: {path} "
                    f"({sum(f[1] for f in fp):,} bytes) vs node 0's {ref[part][0]} ({sum(f[1] for f in ref[part][1]):,} bytes); "
                    "every node must hold the same model files"
                )
    return files


def resolve_auto(cfg: RunConfig, rt: Runtime, files=None) -> RunConfig:
    """`--preset auto`: memory settings from the smallest free GPU memory and the model size (flags win)."""
    import math

    from engine.factory import resolve_files
    from engine.loading import build_dit, open_dit
    from presets.auto import auto_settings, free_memory_gib

    files = files or resolve_files(cfg)
    _, dcfg = open_dit(files.dit)
    dit_gib = sum(p.numel() for p in build_dit(dcfg).parameters()) * (2 if rt.device.type == "cuda" else 4) / 2**30
    from engine.checkpoint import open_checkpoint

    t5 = open_checkpoint(files.t5)
    t5_gib = sum(math.prod(t5.shape(k)) for k in t5 if k != "spiece_model") * 2 / 2**30
    free = min(rt.all_gather_object(free_memory_gib(rt.device)))
    import torch

    fp8_ok = rt.device.type == "cuda" and torch.cuda.get_device_capability(rt.device) >= (8, 9)
    chosen = auto_settings(rt.world_size, free, dit_gib, t5_gib, dcfg.num_layers, dcfg.dim, fp8_ok=fp8_ok)
    chosen = {k: v for k, v in chosen.items() if k not in cfg.cli_keys}
    if rt.rank == 0:
        log.info("preset auto: %.1f GiB free on the smallest GPU, DiT %.1f GiB, T5 %.1f GiB → %s",
                 min(free, 1e6), dit_gib, t5_gib, chosen)
    return cfg.replace(**chosen)


def start_server(cfg: RunConfig) -> Server:
    """Join the gang, load every model, and return this rank's Server."""
    import os

    setup_logging(cfg.log_level, int(os.environ.get("RANK", "0")))
    rt = init_runtime(cfg.dist_timeout)
    if rt.distributed:
        from parallel.runtime import Heartbeat

        rt.heartbeat = Heartbeat(rt, timeout=cfg.heartbeat_timeout)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and rt.rank == 0:
        log.warning("the gang was restarted after a failure (restart %d of at most %s); serving again",
                    restarts, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
    if cfg.world_size is not None and cfg.world_size != rt.world_size:
        raise LaunchError(
            f"the preset/config asks for world_size {cfg.world_size} but {rt.world_size} process(es) are running: "
            f"start with ./launch.sh --nproc {cfg.world_size}, or change world_size to {rt.world_size}"
        )
    from engine.checkpoint import ModelFileError

    try:
        files = preflight(cfg, rt)
        if cfg.preset == "auto":
            cfg = resolve_auto(cfg, rt, files)
        pipe, state = build_parallel_pipeline(cfg, rt, files)
    except (ModelFileError, ValueError) as exc:  # bad files, layouts, backends: a message, not a traceback
        shutdown_runtime(rt)
        raise LaunchError(str(exc)) from exc
    rt.barrier()
    from parallel.serve import Server

    return Server(cfg, rt, pipe, state)
