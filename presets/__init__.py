"""Memory-mode presets: JSON files (with // comments allowed, like the user's guide) → RunConfig values."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

log = logging.getLogger("wan.presets")

PRESET_DIR = Path(__file__).resolve().parent
# spellings used by the guide / ComfyUI nodes → our field names
ALIASES = {
    "cache_device": "teacache_cache_device",
    "backend": "compile_backend",
    "torch_compile": "compile",
    "tea_cache": "teacache",
    "teacache_threshold": "teacache",
    "attention_mode": "attention",
    "vram_management": "offload_percent",
}
IGNORED = {"rank", "description", "name", "notes"}


def strip_json_comments(text: str) -> str:
    """Remove // and /* */ comments outside strings."""
    out, i, n, in_str = [], 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            out.append(c)
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        else:
            out.append(c)
        i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))  # tolerate trailing commas


def available_presets() -> list[str]:
    """Names of the presets shipped in presets/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json" and p.exists():
        return p
    q = PRESET_DIR / f"{name_or_path}.json"
    if q.exists():
        return q
    raise FileNotFoundError(
        f"preset {name_or_path!r} not found: it is neither a JSON file nor one of {', '.join(available_presets())}"
    )


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset's settings as RunConfig field names (unknown keys are an error naming the key)."""
    from engine.cli import RunConfig

    path = preset_path(name_or_path)
    try:
        raw = json.loads(strip_json_comments(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ValueError(f"preset {path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"preset {path}: expected a JSON object of settings")
    known = {f.name for f in fields(RunConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in IGNORED:
            continue
        name = ALIASES.get(key, key)
        if name not in known:
            raise ValueError(f"preset {path}: unknown setting {key!r}")
        if name == "teacache" and isinstance(value, bool):
            value = 0.2 if value else 0.0  # "TEA cache: enabled" → the 14B field threshold
        if name == "teacache_cache_device" and value == "offload_device":
            value = "cpu"
        elif name == "teacache_cache_device" and value == "main_device":
            value = "gpu"
        out[name] = value
    return out
