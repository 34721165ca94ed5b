"""Deterministic random weights for tests (never committed: generated at run time)."""

from __future__ import annotations

import math

import torch
from torch import nn


def random_state_dict(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Well-scaled random values for every tensor of a (possibly meta) module's state dict."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        shape = tuple(t.shape)
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            v = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight", ".gamma")) or "norm" in name and name.endswith("weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            v = 0.1 * torch.randn(shape, generator=g)
        out[name] = v.to(t.dtype if t.dtype.is_floating_point else torch.float32)
    return out
