"""Shared fixtures: small random Wan weights written in the layouts users bring."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


SHARED = ROOT.parent / "shared"  # the project's reference material, beside the checkout (CI has it too)


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    """name → shape from shared/reference/keys/<name>.tsv (the official checkpoints' tensors)."""
    out = {}
    for line in (SHARED / "reference" / "keys" / f"{name}.tsv").read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded tiny model, generated once per test session in a temp folder."""
    from engine.tiny import ensure_tiny_model

    d = tmp_path_factory.mktemp("tiny")
    return ensure_tiny_model(d / "tiny-random")
