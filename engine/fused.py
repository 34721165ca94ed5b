"""The DiT's elementwise hot path as single-pass kernels: one read and one write per tensor instead of
the 3-10 passes the plain torch ops take. Triton kernels on CUDA; the same math in torch elsewhere
(and in Triton's interpreter on the CPU for the tests: WAN_FUSED=interpret with TRITON_INTERPRET=1).

  modulate(x, shift, scale)            LayerNorm(x)·(1 + scale) + shift, fp32 in → matmul dtype out
  rms_norm_rope(x, weight, table, n)   RMSNorm over the full dim (fp32, fp32 weight), then 3D RoPE per head
                                       (none for cross-attention: table None) → (B, L, n, 128)
  gated_residual(x, y, gate)           x + y·gate in fp32
  residual_norm(x, y, gate, b, a, ...) x' = x + y·gate, then LayerNorm(x')·a + b (a = 1 + scale with
                                       one_plus): both outputs from one read of x and y
  quant=True (modulate, residual_norm)  the normed output as an fp8 `Fp8Act` (e4m3 + per-token scale,
                                       amax/448 over the row) for the Fp8Linear that follows: no extra pass
  gelu_quant(h)                        GELU(tanh) then per-token fp8 (between the FFN's two fp8 GEMMs)
  quantize_rows_fused(x)               per-row fp8 of any activation (attention output, text context, q/k)
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.fp8 import AMAX_FLOOR, FP8, FP8_MAX, Fp8Act, quantize_rows

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(x: Tensor) -> bool:
    """Triton on CUDA tensors (unless WAN_FUSED=0); on CPU only in interpreter mode (tests)."""
    mode = os.environ.get("WAN_FUSED", "1")
    if not _HAS_TRITON or mode == "0" or torch.compiler.is_compiling():
        return False  # under torch.compile inductor fuses the plain ops itself (and across them)
    return x.is_cuda or mode == "interpret"


if _HAS_TRITON:
    import triton
    import triton.language as tl

    FP8_MAX_C = tl.constexpr(FP8_MAX)
    AMAX_FLOOR_C = tl.constexpr(AMAX_FLOOR)

    @triton.jit
    def _store_row(ptr, s_ptr, row, offs, mask, y, QUANT: tl.constexpr):
        """Store one row (ptr: its start): in ptr's dtype, or (QUANT) as e4m3 of y·448/amax, with the
        row's scale amax/448 at s_ptr[row]."""
        if QUANT:
            amax = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0), AMAX_FLOOR_C)
            q = tl.clamp(y * (FP8_MAX_C / amax), -FP8_MAX_C, FP8_MAX_C)
            tl.store(ptr + offs, q.to(ptr.dtype.element_ty), mask=mask)
            tl.store(s_ptr + row, amax / FP8_MAX_C)
        else:
            tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, rows_per_batch, mod_stride, dim, eps,
                         ONE_PLUS: tl.constexpr, BLOCK: tl.constexpr, s_ptr=None, QUANT: tl.constexpr = False):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < dim
        x = tl.load(x_ptr + row.to(tl.int64) * dim + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / dim
        diff = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(diff * diff, axis=0) / dim + eps)
        b = row // rows_per_batch
        sc = tl.load(scale_ptr + b * mod_stride + offs, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + b * mod_stride + offs, mask=mask, other=0.0).to(tl.float32)
        y = diff * rstd * ((1.0 + sc) if ONE_PLUS else sc) + sh
        _store_row(out_ptr + row.to(tl.int64) * dim, s_ptr, row, offs, mask, y, QUANT)

    @triton.jit
    def _rms_rope_chunked_kernel(x_ptr, w_ptr, tab_ptr, out_ptr, tokens, eps, DIM: tl.constexpr,
                                 HEAD: tl.constexpr, CHUNK: tl.constexpr, HAS_ROPE: tl.constexpr):
        """RMSNorm over a row (weight of any dtype, applied in fp32), then RoPE per channel pair (HAS_ROPE), in
        CHUNK-pair pieces (no lanes padded to a power of two: 0.372 vs 0.419 ms for one padded row at
        32,760×5120 on H100): the sum of squares first, then each piece again (from L1/L2: a row is 10 KiB) to
        rotate and store."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * DIM
        pair = tl.arange(0, CHUNK)[:, None] * 2 + tl.arange(0, 2)[None, :]  # (CHUNK, 2)
        acc = tl.zeros([CHUNK, 2], dtype=tl.float32)
        for start in range(0, DIM, 2 * CHUNK):
            offs = start + pair
            v = tl.load(x_ptr + base + offs, mask=offs < DIM, other=0.0).to(tl.float32)
            acc += v * v
        rstd = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / DIM + eps)
        tok = (row % tokens).to(tl.int64)
        for start in range(0, DIM, 2 * CHUNK):
            offs = start + pair
            mask = offs < DIM
            x0, x1 = tl.split(tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
            w0, w1 = tl.split(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32))
            y0, y1 = x0 * rstd * w0, x1 * rstd * w1
            if HAS_ROPE:
                even = start + tl.arange(0, CHUNK) * 2
                pmask = even < DIM
                d = even % HEAD
                cos = tl.load(tab_ptr + tok * 2 * HEAD + d, mask=pmask, other=0.0)
                sin = tl.load(tab_ptr + tok * 2 * HEAD + HEAD + d + 1, mask=pmask, other=0.0)
                out = tl.join(y0 * cos - y1 * sin, y1 * cos + y0 * sin)  # (CHUNK, 2)
            else:
                out = tl.join(y0, y1)  # (CHUNK, 2)
            tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_residual_kernel(x_ptr, y_ptr, g_ptr, out_ptr, rows_per_batch, dim, HAS_GATE: tl.constexpr,
                               BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < dim
        base = row.to(tl.int64) * dim
        x = tl.load(x_ptr + base + col, mask=mask, other=0.0)
        y = tl.load(y_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(g_ptr + (row // rows_per_batch) * dim + col, mask=mask, other=0.0)
        tl.store(out_ptr + base + col, x + y, mask=mask)


    @triton.jit
    def _residual_norm_kernel(x_ptr, y_ptr, g_ptr, shift_ptr, scale_ptr, x_out_ptr, h_ptr, rows_per_batch,
                              mod_stride, dim, eps, HAS_GATE: tl.constexpr, ONE_PLUS: tl.constexpr,
                              BLOCK: tl.constexpr, s_ptr=None, QUANT: tl.constexpr = False):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < dim
        base = row.to(tl.int64) * dim
        b = row // rows_per_batch
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
        y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(g_ptr + b * dim + offs, mask=mask, other=0.0)
        x = x + y
        tl.store(x_out_ptr + base + offs, x, mask=mask)
        mean = tl.sum(x, axis=0) / dim
        diff = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(diff * diff, axis=0) / dim + eps)
        sc = tl.load(scale_ptr + b * mod_stride + offs, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + b * mod_stride + offs, mask=mask, other=0.0).to(tl.float32)
        h = diff * rstd * ((1.0 + sc) if ONE_PLUS else sc) + sh
        _store_row(h_ptr + base, s_ptr, row, offs, mask, h, QUANT)

    @triton.jit
    def _gelu_quant_kernel(x_ptr, out_ptr, s_ptr, dim, BLOCK: tl.constexpr):
        """GELU(tanh) of one row, then e4m3 with its per-row scale."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < dim
        x = tl.load(x_ptr + row.to(tl.int64) * dim + offs, mask=mask, other=0.0).to(tl.float32)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))  # 0.5·x·(1 + tanh(u))
        _store_row(out_ptr + row.to(tl.int64) * dim, s_ptr, row, offs, mask, y, True)

    @triton.jit
    def _quant_rows_kernel(x_ptr, out_ptr, s_ptr, rows, dim, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                           INT8: tl.constexpr):
        """ROWS rows per program, each quantized to e4m3 (INT8: to int8, rounded to nearest) with its own scale
        (rows of 128: the attention's q/k heads)."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        offs = tl.arange(0, BLOCK)
        mask = (r[:, None] < rows) & (offs[None, :] < dim)
        ptr = r[:, None].to(tl.int64) * dim + offs[None, :]
        x = tl.load(x_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR_C)  # (ROWS,)
        if INT8:
            inv = 127.0 / amax  # (ROWS,)
            q = tl.clamp(tl.floor(x * tl.expand_dims(inv, 1) + 0.5), -127.0, 127.0)
            tl.store(out_ptr + ptr, q.to(tl.int8), mask=mask)
            tl.store(s_ptr + r, amax / 127.0, mask=r < rows)
        else:
            inv = FP8_MAX_C / amax  # (ROWS,)
            q = tl.clamp(x * tl.expand_dims(inv, 1), -FP8_MAX_C, FP8_MAX_C)
            tl.store(out_ptr + ptr, q.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(s_ptr + r, amax / FP8_MAX_C, mask=r < rows)


def _block(dim: int) -> int:
    return 1 << (dim - 1).bit_length()


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, dtype: torch.dtype,
             quant: bool = False) -> Tensor | Fp8Act:
    """LayerNorm(x)·(1 + scale) + shift: x (B, L, D) fp32, shift/scale (B or 1, 1, D) fp32 → (B, L, D) dtype
    (quant: an Fp8Act, e4m3 with a per-token scale, made from the fp32 values)."""
    if not use_triton(x):
        if quant:
            return quantize_rows(torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale), dtype)
        h = F.layer_norm(x, (x.shape[-1],), eps=eps)
        return torch.addcmul(shift, h, 1 + scale, out=torch.empty(x.shape, dtype=dtype, device=x.device))
    b, n, d = x.shape
    x = x.contiguous()
    shift, scale = shift.float().contiguous(), scale.float().contiguous()
    out = torch.empty(x.shape, dtype=FP8 if quant else dtype, device=x.device)
    s = torch.empty((b, n, 1), dtype=torch.float32, device=x.device) if quant else None
    stride = d if shift.shape[0] > 1 else 0  # per-batch vectors, or one shared vector (affine LayerNorm)
    _modulate_kernel[(b * n,)](x, shift, scale, out, n, stride, d, eps, ONE_PLUS=True, BLOCK=_block(d), num_warps=16,
                               s_ptr=s, QUANT=quant)
    return Fp8Act(out, s, dtype) if quant else out


def affine_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """LayerNorm(x)·weight + bias (norm3 before cross-attention): fp32 in → matmul dtype out."""
    if not use_triton(x):
        return F.layer_norm(x, (x.shape[-1],), weight.float(), bias.float(), eps).to(dtype)
    b, n, d = x.shape
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    _modulate_kernel[(b * n,)](x, bias.float().contiguous(), weight.float().contiguous(), out, n, 0, d, eps,
                               ONE_PLUS=False, BLOCK=_block(d), num_warps=16)
    return out


def rms_norm_rope(x: Tensor, weight: Tensor, eps: float, table: Tensor | None, heads: int) -> Tensor:
    """RMSNorm over the full dim then RoPE per head, all in fp32 (weight of any dtype, fp32 as the model keeps
    it): x (B, L, D) → (B, L, heads, D/heads) in x's dtype.

    table (L, 2, head_dim): cos and ±sin per channel (engine.dit.rope_table); None = no rotation.
    """
    b, n, d = x.shape
    if not use_triton(x):
        y = F.rms_norm(x.float(), (d,), weight.float(), eps).view(b, n, heads, d // heads)  # fp32
        if table is None:
            return y.to(x.dtype)
        cos, sin = table[None, :, None, 0], table[None, :, None, 1]  # (1, L, 1, head_dim)
        swapped = y.view(b, n, heads, -1, 2).flip(-1).view(b, n, heads, d // heads)  # (x1, x0) per pair
        return torch.addcmul(y * cos, swapped, sin).to(x.dtype)
    x = x.contiguous()
    out = torch.empty_like(x)
    tab = x if table is None else table.float().contiguous()  # not read without RoPE
    _rms_rope_chunked_kernel[(b * n,)](x, weight.contiguous(), tab, out, n, eps, DIM=d, HEAD=d // heads, CHUNK=256,
                                       num_warps=4, HAS_ROPE=table is not None)
    return out.view(b, n, heads, d // heads)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    """x + y·gate (or x + y without a gate) in fp32: x (B, L, D) fp32, y (B, L, D) any dtype, gate (B, 1, D)."""
    if not use_triton(x):
        return torch.addcmul(x, y, gate) if gate is not None else torch.add(x, y)
    b, n, d = x.shape
    x, y = x.contiguous(), y.contiguous()
    g = gate.float().contiguous() if gate is not None else x
    out = torch.empty_like(x)
    blk = 1024
    _gated_residual_kernel[(b * n, triton.cdiv(d, blk))](x, y, g, out, n, d, HAS_GATE=gate is not None, BLOCK=blk,
                                                         num_warps=4)
    return out


def residual_norm(x: Tensor, y: Tensor, gate: Tensor | None, shift: Tensor, scale: Tensor, eps: float,
                  dtype: torch.dtype, one_plus: bool = True, quant: bool = False) -> tuple[Tensor, Tensor | Fp8Act]:
    """(x', h): x' = x + y·gate (fp32; no gate: x + y), h = LayerNorm(x')·(1 + scale) + shift in `dtype`
    (one_plus=False: LayerNorm(x')·scale + shift, an affine LayerNorm with weight=scale, bias=shift; quant: h
    as an Fp8Act). x (B, L, D) fp32, y (B, L, D), gate/shift/scale (B or 1, 1, D) or (D,). On CUDA one
    kernel: x and y are read once, where gated_residual followed by a norm reads x' again."""
    if not use_triton(x):
        x = gated_residual(x, y, gate)
        if quant:
            ln = F.layer_norm(x, (x.shape[-1],), eps=eps)
            return x, quantize_rows(torch.addcmul(shift.float(), ln, (1 + scale.float()) if one_plus else scale.float()), dtype)
        if one_plus:
            return x, modulate(x, shift, scale, eps, dtype)
        return x, affine_norm(x, scale, shift, eps, dtype)
    b, n, d = x.shape
    x, y = x.contiguous(), y.contiguous()
    g = gate.float().contiguous() if gate is not None else x
    shift, scale = shift.float().contiguous(), scale.float().contiguous()
    stride = d if shift.dim() == 3 and shift.shape[0] > 1 else 0  # per-batch vectors, or one shared vector
    x_out = torch.empty_like(x)
    h = torch.empty(x.shape, dtype=FP8 if quant else dtype, device=x.device)
    s = torch.empty((b, n, 1), dtype=torch.float32, device=x.device) if quant else None
    _residual_norm_kernel[(b * n,)](x, y, g, shift, scale, x_out, h, n, stride, d, eps, HAS_GATE=gate is not None,
                                    ONE_PLUS=one_plus, BLOCK=_block(d), num_warps=16, s_ptr=s, QUANT=quant)
    return x_out, (Fp8Act(h, s, dtype) if quant else h)


def gelu_quant(h: Tensor) -> Fp8Act:
    """GELU(tanh) of h (..., F) then per-token fp8: the FFN's hidden activation for its second fp8 GEMM."""
    if not use_triton(h):
        return quantize_rows(F.gelu(h.float(), approximate="tanh"), h.dtype)
    h = h.contiguous()
    d = h.shape[-1]
    rows = h.numel() // d
    out = torch.empty(h.shape, dtype=FP8, device=h.device)
    s = torch.empty((*h.shape[:-1], 1), dtype=torch.float32, device=h.device)
    _gelu_quant_kernel[(rows,)](h, out, s, d, BLOCK=_block(d), num_warps=16)
    return Fp8Act(out, s, h.dtype)


def quantize_rows_int8(x: Tensor) -> Fp8Act:
    """Per-row int8 in torch (scale amax/127, round half up): the attention's q/k reference."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    data = torch.floor(xf * (127.0 / amax) + 0.5).clamp(-127, 127).to(torch.int8)
    return Fp8Act(data, amax / 127.0, x.dtype)


def quantize_rows_fused(x: Tensor, int8: bool = False) -> Fp8Act:
    """Per-row fp8 (int8: int8) of x (..., D) in one pass (Triton on CUDA; torch elsewhere)."""
    if not use_triton(x):
        return quantize_rows_int8(x) if int8 else quantize_rows(x)
    x = x.contiguous()
    d = x.shape[-1]
    rows = x.numel() // d
    out = torch.empty(x.shape, dtype=torch.int8 if int8 else FP8, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    blk = _block(d)
    per = max(1, min(64, 4096 // blk))  # rows per program: 32 rows of 128 (q/k heads), 1 row of 5120
    _quant_rows_kernel[(triton.cdiv(rows, per),)](x, out, s, rows, d, ROWS=per, BLOCK=blk, INT8=int8,
                                                  num_warps=4 if blk <= 1024 else 16)
    return Fp8Act(out, s, x.dtype)
