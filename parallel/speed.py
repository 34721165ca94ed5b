"""Speed knobs applied from outside the model: regional torch.compile (one compiled graph per block)."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("wan.speed")


def apply_compile(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """Compile each transformer block in place (regional compilation: one graph compiled once, reused
    by every block of the same shape, so start-up stays short). Works under FSDP2 (its hooks stay
    outside the graph), sequence parallel (collectives break the graph) and block swap."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("apply_compile expects a model with .blocks")
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=False)
    log.info("torch.compile (%s) applied to %d blocks", backend, len(blocks))
    return model
