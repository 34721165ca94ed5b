"""fp8 (float8_e4m3fn) weights and activations for the DiT's Linear layers.

Weights: one fp32 scale per output channel (row), w ≈ w8 · scale[:, None]. Activations: one fp32 scale per
token (row of the (tokens, features) matrix), made by the kernel that produces the activation (the fused
LayerNorm+modulate / residual+norm / GELU kernels of engine.fused) and passed on as an `Fp8Act`.
On CUDA sm89+ with bf16 activations an `Fp8Linear` runs `torch._scaled_mm` (fp8 × fp8 → bf16 with the two
scale vectors applied in the epilogue); elsewhere (CPU, tests, fp16/fp32 runs) it dequantizes the weight and
the activation and runs the matmul in the activation dtype, so every test of the model can run it.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
AMAX_FLOOR = 1e-12  # a row of zeros gets this amax (scale ≈ 2e-15): it stays zeros


class Fp8Act(NamedTuple):
    """A quantized activation: data (..., D) float8_e4m3fn, scale (..., 1) float32 per token, and the
    dtype the unquantized activation had (the matmul's output dtype)."""

    data: Tensor
    scale: Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return (self.data.float() * self.scale).to(dtype or self.dtype)


def quantize_rows(x: Tensor, dtype: torch.dtype | None = None) -> Fp8Act:
    """Per-row (per-token) e4m3 quantization over the last dim, in torch: scale = amax/448, data =
    round(x · 448/amax) (round to nearest even, as torch's cast and the GPU's cvt.rn do). The reference
    of the fused kernels; `dtype` is recorded as the activation dtype (default x's)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)  # (..., 1)
    data = (xf * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8Act(data, amax / FP8_MAX, dtype or x.dtype)


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) weight → (w8 (out, in) float8_e4m3fn, scale (out,) float32): one scale per output channel."""
    q = quantize_rows(w)
    return q.data, q.scale.view(-1)


def dequantize_weight(w8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """w8 · scale[:, None] in `dtype` (computed in fp32)."""
    return (w8.float() * scale.float()[:, None]).to(dtype)


def load_fp8_weight(view, name: str, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(w8, per-channel scale) of weight `name` of a checkpoint view, on `device`: a float8_e4m3fn tensor is kept
    as stored (its ComfyUI per-tensor `scale_weight`, or 1, repeated per channel: no upcast, no re-rounding);
    any other dtype (bf16/fp16/fp32, e5m2) is quantized per output channel on `device`, one tensor at a time."""
    raw, comfy_scale = view.read_stored(name)
    rows = raw.shape[0]
    if raw.dtype == FP8:
        scale = comfy_scale.float().reshape(-1) if comfy_scale is not None else torch.ones(1)
        if scale.numel() not in (1, rows):
            raise ValueError(f"{name}: scale_weight has {scale.numel()} values; expected 1 or {rows}")
        return raw.to(device), scale.expand(rows).contiguous().to(device)
    w = raw.to(device=device, dtype=torch.float32)
    if comfy_scale is not None:  # an e5m2 file with a scale
        w = w * comfy_scale.to(device=device, dtype=torch.float32)
    return quantize_weight(w)


def scaled_mm_ok(device: torch.device) -> bool:
    """fp8 tensor-core GEMMs (`torch._scaled_mm`, row-wise scales): CUDA with compute capability 8.9 or more."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


_FAST_ACCUM = os.environ.get("WAN_FP8_FAST_ACCUM", "0") == "1"


class Fp8Linear(nn.Linear):
    """A Linear with a float8_e4m3fn weight and per-output-channel fp32 `weight_scale` (state-dict names
    `weight`, `weight_scale`, `bias`). Input: a Tensor (quantized per token here) or an `Fp8Act` made by the
    preceding fused kernel; output in the activation dtype (`act_dtype` for an Fp8Act)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.act_dtype = in_features, out_features, act_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=act_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, act_dtype: torch.dtype | None = None) -> Fp8Linear:
        """Quantize a Linear (any float dtype, meta too): weight per output channel, bias kept in act_dtype."""
        w = linear.weight
        act = act_dtype or (w.dtype if w.dtype != FP8 else torch.bfloat16)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, act, device="meta")
        if w.is_meta:
            return new
        w8, scale = quantize_weight(w)
        new.weight = nn.Parameter(w8, requires_grad=False)
        new.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(act), requires_grad=False)
        return new

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.act_dtype)

    def forward(self, x: Tensor | Fp8Act) -> Tensor:
        q = x if isinstance(x, Fp8Act) else quantize_activation(x)
        lead = q.data.shape[:-1]
        if q.data.is_cuda and q.dtype == torch.bfloat16 and scaled_mm_ok(q.data.device):
            a = q.data.reshape(-1, self.in_features)  # (tokens, in)
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            out = torch._scaled_mm(a, self.weight.t(), scale_a=q.scale.reshape(-1, 1).float(),
                                   scale_b=self.weight_scale.view(1, -1), bias=bias, out_dtype=torch.bfloat16,
                                   use_fast_accum=_FAST_ACCUM)
            return out.view(*lead, self.out_features)
        bias = None if self.bias is None else self.bias.to(q.dtype)
        return F.linear(q.dequantize(), self.dequantized_weight(q.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-channel, act {self.act_dtype}"


def quantize_activation(x: Tensor) -> Fp8Act:
    """Per-token quantization of a standalone activation (the attention output before `o`, the text
    context before cross-attention k/v): one Triton pass on CUDA, torch elsewhere."""
    from engine.fused import quantize_rows_fused

    return quantize_rows_fused(x)


def prequantize(layer: nn.Module, x: Tensor | Fp8Act) -> Tensor | Fp8Act:
    """x quantized once when `layer` is an Fp8Linear (so q/k/v, or k/v, share one quantization), else x."""
    if isinstance(layer, Fp8Linear) and not isinstance(x, Fp8Act):
        return quantize_activation(x)
    return x


def act_dtype(layer: nn.Module) -> torch.dtype:
    """The activation (matmul output) dtype of a Linear or Fp8Linear."""
    return layer.act_dtype if isinstance(layer, Fp8Linear) else layer.weight.dtype


def is_fp8(layer: nn.Module) -> bool:
    return isinstance(layer, Fp8Linear)


def fp8_weight_bytes(model: nn.Module) -> int:
    """Bytes of every Fp8Linear's weight, scale and bias."""
    return sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, Fp8Linear)
               for p in m.parameters())
