"""`--sp_backend xfuser`: xDiT's Ulysses × Ring attention (yunchang's LongContextAttention, the class that
xfuser's xFuserLongContextAttention extends) instead of ours, on CUDA only.

Guards for its known defects: it has no CPU path at all (refused with a clear message); its ring merge
with the TORCH_MATH / TORCH_CUDNN kernels uses an all-zero log-sum-exp (wrong output), so with Ring > 1
the kernel is FA (flash-attn installed) or TORCH_FLASH, never those; and it cannot mask padded keys, so a
forward whose token count does not divide by the ranks runs our native attention instead (logged once).
"""

from __future__ import annotations

import importlib.util
import logging

from torch import Tensor

from parallel.kernels import BackendUnavailable
from parallel.layout import LayoutGroups
from parallel.sequence import SequenceShards

log = logging.getLogger("wan.xfuser")


def _attn_type(ring: int, kernel_name: str):
    from yunchang.kernels import AttnType

    has_fa = importlib.util.find_spec("flash_attn_2_cuda") is not None  # FA2's extension (FA4 also ships flash_attn/)
    if kernel_name == "flash_attn_3" and importlib.util.find_spec("flash_attn_interface") is not None:
        return AttnType.FA3
    if has_fa and kernel_name in ("flash_attn_2", "auto"):
        return AttnType.FA
    if ring > 1:
        return AttnType.TORCH_FLASH  # returns a real log-sum-exp; MATH / CUDNN do not
    return AttnType.TORCH_CUDNN if kernel_name in ("auto", "sdpa_cudnn", "sdpa", "flash_attn_4") else AttnType.TORCH_FLASH


class XfuserAttention:
    """Self-attention through yunchang's LongContextAttention on this layout's groups."""

    def __init__(self, groups: LayoutGroups, shards: SequenceShards | None, fallback, kernel_name: str, device) -> None:
        if device.type != "cuda":
            raise BackendUnavailable(
                "sp_backend xfuser has no CPU path (xDiT's attention calls CUDA kernels only); use --sp_backend native"
            )
        if importlib.util.find_spec("yunchang") is None:
            raise BackendUnavailable("sp_backend xfuser needs the xfuser package (pip install xfuser, which brings yunchang)")
        from yunchang import LongContextAttention
        from yunchang.globals import PROCESS_GROUP

        PROCESS_GROUP.ULYSSES_PG = groups.ulysses_group
        PROCESS_GROUP.RING_PG = groups.ring_group
        self.attn = LongContextAttention(ring_impl_type="basic", attn_type=_attn_type(groups.layout.ring, kernel_name))
        self.shards, self.fallback, self.warned = shards, fallback, False
        self.name = f"xfuser/{self.attn.attn_type.value}"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.shards is not None and self.shards.length % self.shards.sp:
            if not self.warned:
                log.warning("%d tokens do not divide by %d ranks: xDiT's attention cannot mask padding, using the "
                            "native attention for this size", self.shards.length, self.shards.sp)
                self.warned = True
            return self.fallback(q, k, v)
        return self.attn(q, k, v, softmax_scale=q.shape[-1] ** -0.5)
