"""Wan2.1 text-to-video: the Gradio UI on rank 0, or a headless run with --prompt.

Started by `./launch.sh` (torchrun, one rank per GPU). Never calls torch.distributed itself: everything
about ranks goes through parallel/serve.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

from engine.cli import USAGE, RunConfig, check_config, cli_overrides, headless_request, merge_config
from engine.request import RequestError

log = logging.getLogger("wan.app")


def load_config(argv: list[str] | None) -> RunConfig:
    """defaults < preset < CLI, checked (a RequestError names the flag) before anything is loaded."""
    cli = cli_overrides(argv)
    preset = None
    if cli.get("preset") and cli["preset"] != "auto":  # auto is resolved once the GPUs are known
        from presets import load_preset

        preset = load_preset(cli["preset"])
    cfg = merge_config(preset, cli)
    from engine.request import parse_timesteps

    parse_timesteps(cfg.sample_timesteps)  # a bad list stops every rank before loading
    check_config(cfg)  # the request rules (frame_num 4n+1, ...) on the request defaults
    if cfg.lora:
        from engine.lora import cli_loras

        cli_loras(cfg.lora, cfg.model_dir)  # a missing file or a bad strength stops every rank before loading
    return cfg


def flag_error(exc: Exception) -> str:
    """An argparse-style message: 'app.py: error: --frame_num: must be 4n+1 ...' (the flag named when known)."""
    text = f"--{exc}" if isinstance(exc, RequestError) and not str(exc).startswith("-") else str(exc)
    return f"usage: {USAGE}\napp.py: error: {text}"


def main(argv: list[str] | None = None) -> int:
    try:  # before torch is imported: a bad flag costs a fraction of a second, not a model load
        cfg = load_config(argv)
        if cfg.prompt is None:
            parse_auth(cfg)  # a bad --auth / --auth_file stops every rank before the models load
            cfg = cfg.replace(api_key=read_api_key(cfg))  # --api_key_file read once, here
    except (ValueError, OSError) as exc:
        print(flag_error(exc), file=sys.stderr)
        return 2
    if os.environ.get("WAN_CHECK_FLAGS") == "1":  # ./launch.sh checks the flags once before starting torchrun
        return 0
    from parallel.runtime import LaunchError
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
            serve_ui(server, cfg)
            return 0
        server.worker_loop()
        return 0
    finally:
        server.shutdown()


def parse_auth(cfg: RunConfig) -> list[tuple[str, str]]:
    """Logins from --auth user:pass[,user:pass] and --auth_file (one user:pass a line; # comments)."""
    entries = [("--auth", item) for item in (cfg.auth or "").split(",") if item.strip()]
    if cfg.auth_file:
        lines = Path(cfg.auth_file).read_text(encoding="utf-8").splitlines()
        entries += [(f"--auth_file line {i}", ln) for i, ln in enumerate(lines, 1) if ln.strip() and not ln.startswith("#")]
    logins = []
    for where, item in entries:
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{where}: expected user:password, got {item.strip()[:40]!r}")
        logins.append((user, password))
    return logins


def read_api_key(cfg: RunConfig) -> str | None:
    """The key of the /v1/ API and /metrics: --api_key, or the first line of --api_key_file (# comments)."""
    if cfg.api_key is not None and cfg.api_key_file:
        raise ValueError("--api_key and --api_key_file: give one of them, not both")
    where, key = "--api_key", cfg.api_key
    if cfg.api_key_file:
        where = "--api_key_file"
        try:
            lines = Path(cfg.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: cannot read {cfg.api_key_file}: {getattr(exc, 'strerror', None) or exc}") from None
        key = next((ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    if key is None:
        return None
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{where}: the key must be printable ASCII without spaces, at least one character")
    if len(key) < 16:
        log.warning("%s: a key of %d characters is easy to guess; use 16 or more", where, len(key))
    return key


def resolve_auth(cfg: RunConfig) -> list[tuple[str, str]] | None:
    """The logins the UI requires; a share link always gets one (a random password, printed, if none given)."""
    logins = parse_auth(cfg)
    if cfg.share and not logins:
        logins = [("wan", secrets.token_urlsafe(12))]
        print(f"--share without --auth: log in with user 'wan' and password '{logins[0][1]}'", flush=True)
        log.warning("share link: a random password was generated and printed on the terminal")
    if not logins and cfg.listen not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --auth: anyone who can reach this port can use the GPUs", cfg.listen)
    return logins or None


def _gradio_env(cfg: RunConfig) -> None:
    """Keep Gradio's file cache inside outputs_dir (nothing written or served elsewhere); no telemetry.
    Set before gradio is imported: some of its modules read these at import time."""
    from engine.cli import upload_dir

    os.environ["GRADIO_TEMP_DIR"] = str(upload_dir(cfg))
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def build_ui(server, cfg: RunConfig):
    """The Gradio Blocks of the web UI (rank 0 only: the first import of gradio happens here)."""
    _gradio_env(cfg)
    import ui

    return ui.build_ui(server, cfg)


def serve_ui(server, cfg: RunConfig) -> None:
    """Serve the UI until stopped (Ctrl-C)."""
    auth = resolve_auth(cfg)
    _gradio_env(cfg)
    import ui

    ui.serve_ui(server, cfg, auth)


def headless(server, cfg: RunConfig) -> int:
    """One request from the command line, through the same Dispatcher the UI uses."""
    raw = headless_request(cfg)
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
    import faulthandler

    faulthandler.enable()  # a crash in native code still prints where every thread was
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from parallel.runtime import exit_process

        exit_process(code)
    sys.exit(code)
