"""Sequence-parallel self-attention on torch.distributed (gloo and NCCL alike): Ulysses all-to-all × Ring.

Ulysses: `all_to_all_single` trades the sequence split for a head split inside a node-sized group.
Ring: each rank keeps its queries and passes its key/value block around the ring with batched
point-to-point operations (`batch_isend_irecv`: the send and the receive of a step are posted together, so
NCCL cannot deadlock on their order); the partial results are merged with their log-sum-exp in fp32. Padded keys are excluded (they are
always a suffix of the last ring block), so any token count gives the result of one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.kernels import Kernel
from parallel.layout import LayoutGroups
from parallel.sequence import SequenceShards


def ulysses_gather_seq(x: Tensor, u: int, group) -> Tensor:
    """(B, n, H, D) local tokens, all heads → (B, u·n, H/u, D) the group's tokens, a slice of the heads."""
    b, n, h, d = x.shape
    send = x.reshape(b, n, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()  # (u, B, n, H/u, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] = rank i's tokens, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, u * n, h // u, d)


def ulysses_scatter_seq(x: Tensor, u: int, group) -> Tensor:
    """Inverse of ulysses_gather_seq: (B, u·n, H/u, D) → (B, n, H, D)."""
    b, un, hu, d = x.shape
    n = un // u
    send = x.reshape(b, u, n, hu, d).permute(1, 0, 2, 3, 4).contiguous()  # (u, B, n, H/u, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] = my tokens, rank i's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n, u * hu, d)


def ring_exchange(kv: Tensor, nxt: int, prv: int, group) -> tuple[Tensor, list]:
    """Post this rank's block to `nxt` and the receive of `prv`'s block as one batch; (incoming, works)."""
    incoming = torch.empty_like(kv)
    ops = [dist.P2POp(dist.isend, kv, nxt, group), dist.P2POp(dist.irecv, incoming, prv, group)]
    return incoming, dist.batch_isend_irecv(ops)


def merge_partial(out: Tensor | None, lse: Tensor | None, o: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two softmax-attention partial results by their log-sum-exp (fp32)."""
    o = o.float()
    if out is None:
        return o, s
    new = torch.logaddexp(lse, s)  # (B, H, L)
    out = out * torch.exp(lse - new)[..., None] + o * torch.exp(s - new)[..., None]
    return out, new


class USPAttention:
    """The DiT self-attention function under a layout: q/k/v (B, n, H, D) local tokens → (B, n, H, D)."""

    def __init__(self, groups: LayoutGroups, shards: SequenceShards, kernel: Kernel) -> None:
        self.g = groups
        self.shards = shards
        self.kernel = kernel
        self.u = groups.layout.ulysses
        self.r = groups.layout.ring

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.u > 1:
            q, k, v = (ulysses_gather_seq(t, self.u, self.g.ulysses_group) for t in (q, k, v))
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H', L', D)
        out = self._ring(qh, kh, vh) if self.r > 1 else self._local(qh, kh, vh)
        out = out.transpose(1, 2)  # (B, L', H', D)
        if self.u > 1:
            out = ulysses_scatter_seq(out.contiguous(), self.u, self.g.ulysses_group)
        return out

    def _local(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        valid = self.shards.valid_keys(0, k.shape[2])
        if valid < k.shape[2]:
            k, v = k[:, :, :valid], v[:, :, :valid]
        return self.kernel.attn(q, k, v)

    def _ring(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Pass (k, v) around the ring; block from ring rank j holds global keys [j·L', (j+1)·L')."""
        ranks, me, n = self.g.ring_ranks, self.g.ring_rank, self.r
        nxt, prv = ranks[(me + 1) % n], ranks[(me - 1) % n]
        kv = torch.stack([k, v]).contiguous()  # (2, B, H', L', D)
        out = lse = None
        for step in range(n):
            reqs: list = []
            if step < n - 1:
                incoming, reqs = ring_exchange(kv, nxt, prv, self.g.ring_group)
            block = (me - step) % n
            valid = self.shards.valid_keys(block, kv.shape[3])
            if valid > 0:
                o, s = self.kernel.attn_lse(q, kv[0][:, :, :valid], kv[1][:, :, :valid])
                out, lse = merge_partial(out, lse, o, s)
            for req in reqs:
                req.wait()
            if step < n - 1:
                kv = incoming
        return out.to(q.dtype)
