"""Split the DiT's token sequence over the sequence-parallel ranks and gather it back.

The sequence is padded to a multiple of the SP degree; chunk c holds global tokens
[c·n, (c+1)·n). Chunks are numbered ring-major, Ulysses-minor, so after the Ulysses all-to-all each
rank of a ring holds one contiguous block of keys and padding is always a suffix of the last block.
RoPE is sliced the same way, so every token is rotated by its global position.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from parallel.layout import LayoutGroups


class SequenceShards:
    """A TokenLayout for the DiT: split before the blocks, gather after the head."""

    def __init__(self, groups: LayoutGroups) -> None:
        self.groups = groups
        self.sp = groups.layout.sp
        self.length = 0  # real token count of the current forward
        self.chunk = 0  # tokens per rank (padded)

    def split(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, D), (L, 64, 2) → this rank's (B, n, D), (n, 64, 2) with n = ceil(L / sp)."""
        self.length = x.shape[1]
        self.chunk = -(-self.length // self.sp)
        pad = self.chunk * self.sp - self.length
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            rope = F.pad(rope, (0, 0, 0, 0, 0, pad))
        i = self.groups.sp_rank
        sl = slice(i * self.chunk, (i + 1) * self.chunk)
        return x[:, sl].contiguous(), rope[sl].contiguous()

    def gather(self, x: Tensor) -> Tensor:
        """This rank's (B, n, C) → everyone's (B, L, C), in global order, padding dropped."""
        if self.sp == 1:
            return x[:, : self.length]
        parts = [torch.empty_like(x) for _ in range(self.sp)]
        dist.all_gather(parts, x.contiguous(), group=self.groups.sp_group)
        # the sp group lists ranks in (ring, ulysses) order = chunk order
        return torch.cat(parts, dim=1)[:, : self.length]

    def valid_keys(self, block: int, block_len: int) -> int:
        """How many keys of ring block `block` (each block_len long after Ulysses) are real tokens."""
        return max(0, min(block_len, self.length - block * block_len))
