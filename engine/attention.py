"""The default attention kernel of the single-process model (parallel/usp.py supplies the others)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dense_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Exact softmax attention, scale 1/sqrt(head_dim): (B, L, heads, D) q/k/v → (B, L, heads, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, L, D)
    return out.transpose(1, 2)
