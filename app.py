"""Wan2.1 text-to-video: the Gradio UI on rank 0, or a headless run with --prompt.

Started by `./launch.sh` (torchrun, one rank per GPU). Never calls torch.distributed itself: everything
about ranks goes through parallel/serve.py.
"""

from __future__ import annotations

import logging
import sys

from engine.cli import RunConfig, cli_overrides, merge_config
from engine.request import RequestError

log = logging.getLogger("wan.app")


def load_config(argv: list[str] | None) -> RunConfig:
    """defaults < preset < CLI."""
    cli = cli_overrides(argv)
    preset = None
    if cli.get("preset"):
        from presets import load_preset

        preset = load_preset(cli["preset"])
    return merge_config(preset, cli)


def setup_logging(level: str, rank: int = 0) -> None:
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr, force=True)


def main(argv: list[str] | None = None) -> int:
    from parallel.runtime import LaunchError

    try:
        cfg = load_config(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from parallel.serve import start_server

    try:
        server = start_server(cfg)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if server.is_rank0 and cfg.prompt is not None:
            return headless(server, cfg)
        if server.is_rank0:
            from ui import serve_ui

            serve_ui(server, cfg)
            return 0
        server.worker_loop()
        return 0
    finally:
        server.shutdown()


def headless(server, cfg: RunConfig) -> int:
    """One request from the command line, through the same Dispatcher the UI uses."""
    raw = {k: getattr(cfg, k) for k in ("prompt", "negative_prompt", "size", "frame_num", "sample_steps",
                                        "sample_shift", "sample_guide_scale", "sample_solver", "base_seed",
                                        "batch_size", "ulysses_size", "ring_size", "cfg_size", "teacache")}
    try:
        out = server.dispatcher.submit(raw, save_file=cfg.save_file, save_latents=cfg.save_latents)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failed request: report it, exit non-zero
        log.error("generation failed: %s", exc)
        return 1
    for path in out.videos:
        print(f"Saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
