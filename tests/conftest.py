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


SHARED = ROOT.parent / "shared"  # the project's reference material, beside the checkout
DATA = Path(__file__).resolve().parent / "data"  # copies of the files the tests read, for clones without it


def reference_file(relative: str) -> Path:
    """A file of shared/ (e.g. 'reference/keys/keys_vae.tsv'), or its copy in tests/data when shared/ is absent;
    where both exist they must be identical (the copy may not drift)."""
    original, copy = SHARED / relative, DATA / Path(relative).relative_to(Path(relative).parts[0])
    if original.exists():
        assert copy.read_bytes() == original.read_bytes(), f"tests/data copy of {relative} differs from shared/"
        return original
    return copy


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    """name → shape from shared/reference/keys/<name>.tsv (the official checkpoints' tensors)."""
    out = {}
    for line in reference_file(f"reference/keys/{name}.tsv").read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def production_server(model_dir: Path, **flags):
    """This process's parallel.serve.Server for the model in model_dir, assembled as a one-process server
    does it: a RunConfig, parallel.runtime.Runtime(), preflight + parallel.apply.build_parallel_pipeline
    (parallel/startup.py start_server). `server.execute(request, {"decode": False})` runs a request."""
    from engine.cli import RunConfig
    from parallel.apply import build_parallel_pipeline
    from parallel.runtime import Runtime
    from parallel.serve import Server
    from parallel.startup import preflight

    cfg, rt = RunConfig(model_dir=str(model_dir), **{"dtype": "fp32", **flags}), Runtime()
    pipe, state = build_parallel_pipeline(cfg, rt, preflight(cfg, rt))
    return Server(cfg, rt, pipe, state)


def production_pipeline(model_dir: Path, **flags):
    """(pipe, state) of `production_server`, with the start-up layout applied as before every request
    (parallel/serve.py Server.execute), for tests that call pipe.generate themselves."""
    from parallel.apply import apply_layout

    server = production_server(model_dir, **flags)
    state = server.state
    apply_layout(server.pipe, state.meshes.get(state.default_layout), state.kernel, state.sp_backend)
    return server.pipe, state


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded tiny model, generated once per test session in a temp folder."""
    from engine.tiny import ensure_tiny_model

    d = tmp_path_factory.mktemp("tiny")
    return ensure_tiny_model(d / "tiny-random")
