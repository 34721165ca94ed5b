"""`--quantize fp8`, applied to a built DiT from outside (meta before loading, or a loaded one in place).

Which layers: every Linear of the blocks (self- and cross-attention q/k/v/o, both FFN GEMMs: 98 % of the
14B's parameters) except those of the first `keep_first` and last `keep_last` blocks. The patch and text
embeddings, the time embedding and projection, the modulation tables, the norms and the head are never
quantized (small, and they condition every block). The default (1, 1) is the measured rule: benchmarks/
bench_fp8.py's `sensitivity` part quantizes one block at a time and measures the forward's error; the first
and last blocks give the largest errors (README "fp8"). xDiT keeps 10 + 10 blocks (half the model), which
keeps only half of the speed-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine.fp8 import Fp8Linear

log = logging.getLogger("wan.quantize")

QUANTIZE_CHOICES = ("none", "fp8")
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@dataclass(frozen=True)
class Fp8Rule:
    """Which blocks stay in bf16: the first `keep_first` and the last `keep_last`."""

    keep_first: int = 1
    keep_last: int = 1
    layers: tuple[str, ...] = BLOCK_LINEARS

    def blocks(self, n: int) -> list[int]:
        """Indices of the blocks whose Linears become fp8, of n blocks."""
        return [i for i in range(n) if self.keep_first <= i < n - self.keep_last]


def parse_keep_blocks(text: str) -> Fp8Rule:
    """'FIRST,LAST' (e.g. '1,1', '0,0', '10,10') → Fp8Rule; ValueError naming the flag otherwise."""
    from engine.cli import keep_blocks

    return Fp8Rule(*keep_blocks(text))


@torch.no_grad()
def apply_fp8(dit: nn.Module, rule: Fp8Rule | None = None) -> list[str]:
    """Replace the chosen Linears of dit.blocks by Fp8Linear (in place; meta modules stay meta, real weights
    are quantized per output channel and the high-precision copy is freed). Returns the replaced names."""
    rule = rule or Fp8Rule()
    done = []
    for i in rule.blocks(len(dit.blocks)):
        block = dit.blocks[i]
        for name in rule.layers:
            parent_name, _, leaf = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            lin = getattr(parent, leaf) if not isinstance(parent, nn.Sequential) else parent[int(leaf)]
            if isinstance(lin, Fp8Linear) or not isinstance(lin, nn.Linear):
                continue
            new = Fp8Linear.from_linear(lin)
            if isinstance(parent, nn.Sequential):
                parent[int(leaf)] = new
            else:
                setattr(parent, leaf, new)
            done.append(f"blocks.{i}.{name}")
    dit.fp8_rule = rule
    return done


def fp8_summary(dit: nn.Module) -> str:
    """One log line: how many layers are fp8, which blocks stay bf16, the weight bytes."""
    n = len(dit.blocks)
    rule = getattr(dit, "fp8_rule", Fp8Rule())
    kept = [i for i in range(n) if i not in rule.blocks(n)]
    total = sum(p.numel() * p.element_size() for p in dit.parameters())
    layers = sum(isinstance(m, Fp8Linear) for m in dit.modules())
    return (f"quantize fp8: {layers} Linear layers in float8_e4m3fn (per-channel scales, per-token activations); "
            f"blocks {kept} and the embeddings/head stay in 16/32-bit; DiT weights {total / 2**30:.2f} GiB")
