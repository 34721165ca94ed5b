"""Output files: uint8 frames, browser-playable H.264 mp4, probing, generated names, JSON sidecars, history."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FPS = 16
CRF_QUALITY = 8  # imageio quality 8 -> libx264 -crf 10, as the official cache_video(quality=8)


def video_to_uint8(video: Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3): (x + 1) / 2, clamp, x255, round."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, F, H, W) video, got shape {tuple(video.shape)}")
    x = ((video.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


@contextlib.contextmanager
def _atomic_target(path: Path, suffix: str) -> Iterator[Path]:
    """Yield a hidden temp path beside `path`; rename it onto `path` on success, delete it on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_mp4(frames_uint8: np.ndarray, path: str | os.PathLike, fps: int = FPS) -> None:
    """Write (F, H, W, 3) uint8 frames as H.264/yuv420p mp4 with +faststart, atomically."""
    import imageio_ffmpeg  # imported here: only writing and probing need the ffmpeg binary

    frames = np.asarray(frames_uint8)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected non-empty uint8 frames of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p H.264 needs an even width and height, got {w}x{h}")
    with _atomic_target(Path(path), ".mp4") as tmp:
        gen = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=CRF_QUALITY, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart"],
        )
        gen.send(None)
        try:
            for f in frames:
                gen.send(np.ascontiguousarray(f))
        finally:
            gen.close()


def _split_top(s: str) -> list[str]:
    """Split an ffmpeg stream description at commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


def probe_mp4(path: str | os.PathLike) -> dict:
    """frames, width, height, codec, pix_fmt, fps of a video, from the bundled ffmpeg (no ffprobe)."""
    import imageio_ffmpeg  # imported here: only writing and probing need the ffmpeg binary

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path],
                          capture_output=True, text=True, errors="replace")
    line = next((ln for ln in proc.stderr.splitlines() if "Stream #" in ln and "Video:" in ln), None)
    if line is None:
        raise ValueError(f"no video stream found in {path}: {proc.stderr.strip()[-300:]}")
    parts = _split_top(line.split("Video:", 1)[1])
    size = next((m for p in parts if (m := re.match(r"(\d+)x(\d+)", p))), None)
    if size is None:
        raise ValueError(f"cannot parse the video stream of {path}: {line.strip()}")
    fps = next((float(p.split()[0]) for p in parts if p.endswith(" fps")), None)
    frames, _secs = imageio_ffmpeg.count_frames_and_secs(path)
    return {
        "frames": int(frames), "width": int(size.group(1)), "height": int(size.group(2)),
        "codec": parts[0].split()[0], "pix_fmt": parts[1].split("(")[0].strip(), "fps": fps,
    }


def new_output_stem(outputs_dir: Path, seed: int) -> Path:
    """A fresh collision-free `wan_YYYYmmdd-HHMMSS_s<seed>_<hex6>` path (no suffix) inside outputs_dir."""
    outputs_dir = Path(outputs_dir)
    outputs_dir.mkdir(parents=True, exist_ok=True)
    while True:
        stem = outputs_dir / f"wan_{time.strftime('%Y%m%d-%H%M%S')}_s{int(seed)}_{secrets.token_hex(3)}"
        if not any(stem.with_name(stem.name + ext).exists() for ext in (".mp4", ".json")):
            return stem


def resolve_save_path(save_file: str | None, outputs_dir: Path, seed: int) -> Path:
    """The user's --save_file (`.mp4` appended unless it already ends in .mp4), else a generated name."""
    if save_file:
        p = Path(save_file).expanduser()
        if p.suffix.lower() != ".mp4":
            p = p.with_name(p.name + ".mp4")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    stem = new_output_stem(outputs_dir, seed)
    return stem.with_name(stem.name + ".mp4")


def sidecar_path(mp4_path: str | os.PathLike) -> Path:
    """The JSON metadata file beside a video: fox.mp4 -> fox.json."""
    return Path(mp4_path).with_suffix(".json")


def write_sidecar(mp4_path: str | os.PathLike, meta: dict) -> Path:
    """Atomically write `meta` as UTF-8 JSON beside the video; returns the sidecar path."""
    path = sidecar_path(mp4_path)
    text = json.dumps(meta, ensure_ascii=False, indent=2)
    with _atomic_target(path, ".json") as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path


def read_sidecar(path: str | os.PathLike) -> dict:
    """Read a sidecar, given either its .json path or the video's path."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        p = sidecar_path(p)
    return json.loads(p.read_text(encoding="utf-8"))


def list_history(outputs_dir: str | os.PathLike) -> list[dict]:
    """Videos in outputs_dir that have a readable sidecar, newest first: {video, sidecar, name, mtime, meta}."""
    d = Path(outputs_dir)
    if not d.is_dir():
        return []
    items = []
    for mp4 in d.glob("*.mp4"):
        side = sidecar_path(mp4)
        if mp4.name.startswith(".") or not side.is_file():
            continue
        try:
            meta = read_sidecar(side)
            mtime = mp4.stat().st_mtime
        except (OSError, ValueError):
            continue  # half-deleted or corrupt entry: leave it out of the gallery
        items.append({"video": str(mp4), "sidecar": str(side), "name": mp4.stem, "mtime": mtime, "meta": meta})
    items.sort(key=lambda it: (it["mtime"], it["name"]), reverse=True)
    return items
