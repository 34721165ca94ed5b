"""Independent from-scratch reference of the official Wan T5 (umt5) encoder math, on Wan-named weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_wan_t5(
    vocab: int, dim: int, layers: int, heads: int, d_ff: int, seed: int = 0, head_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic random fp32 weights in the official Wan T5 layout (names as in keys_t5.tsv)."""
    g = torch.Generator().manual_seed(seed)
    inner = heads * (head_dim or dim // heads)

    def w(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    sd = {"token_embedding.weight": w(vocab, dim, std=1.0)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1.0 + w(dim, std=0.1)
        for n in "qkv":
            sd[p + f"attn.{n}.weight"] = w(inner, dim, std=dim**-0.5)
        sd[p + "attn.o.weight"] = w(dim, inner, std=inner**-0.5)
        sd[p + "norm2.weight"] = 1.0 + w(dim, std=0.1)
        sd[p + "ffn.gate.0.weight"] = w(d_ff, dim, std=dim**-0.5)
        sd[p + "ffn.fc1.weight"] = w(d_ff, dim, std=dim**-0.5)
        sd[p + "ffn.fc2.weight"] = w(dim, d_ff, std=d_ff**-0.5)
        sd[p + "pos_embedding.embedding.weight"] = w(32, heads, std=0.5)
    sd["norm.weight"] = 1.0 + w(dim, std=0.1)
    return sd


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """T5 layer norm: scale only, no mean subtraction, statistics in fp32."""
    x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(weight.dtype)


def relative_buckets(length: int, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of every (query i, key j) pair: (L, L) int64."""
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    half = num_buckets // 2  # one half per direction
    exact = half // 2  # small distances get their own bucket
    dist = rel.abs()
    log_part = torch.log(dist.float() / exact) / math.log(max_dist / exact) * (half - exact)
    far = (exact + log_part.long()).clamp(max=half - 1)
    return torch.where(rel > 0, half, 0) + torch.where(dist < exact, dist, far)


def wan_t5_encode(
    sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """Official Wan T5Encoder forward: (B, L) ids and 0/1 mask → (B, L, dim)."""
    b, length = ids.shape
    x = sd["token_embedding.weight"][ids]  # (B, L, dim)
    buckets = relative_buckets(length)
    neg = torch.finfo(x.dtype).min
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_layers):
        p = f"blocks.{i}."
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]  # (1, heads, L, L)
        bias = bias.masked_fill(mask[:, None, None, :] == 0, neg)  # (B, heads, L, L)
        h = rms_norm(x, sd[p + "norm1.weight"])
        q, k, v = (
            F.linear(h, sd[p + f"attn.{n}.weight"]).view(b, length, heads, -1) for n in "qkv"
        )  # (B, L, H, d)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) + bias  # no 1/sqrt(d): T5 folds it into the init
        attn = scores.float().softmax(dim=-1).type_as(scores)
        o = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, length, -1)  # (B, L, H*d)
        x = x + F.linear(o, sd[p + "attn.o.weight"])
        h = rms_norm(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    return rms_norm(x, sd["norm.weight"])
