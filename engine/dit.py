"""Wan2.1 DiT (text-to-video; the image branch of I2V/FLF2V in engine/dit_image.py), official key layout,
written once without any parallel code.

Hooks that `parallel/` (and the step cache) use without touching this file's math:
  * `WanAttention.attn_fn`: the attention kernel, (B, L, heads, head_dim) q/k/v → same shape.
  * `WanDiT.tokens`: how the token sequence is split before the blocks and gathered after them
    (identity here; sequence parallel splits it and rotates each shard by its global positions).
  * `WanDiT.block_runner`: runs the block stack (plain loop here; the step cache may skip it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import dense_attention
from engine.config import PATCH, DiTConfig
from engine.fp8 import Fp8Act, act_dtype, is_fp8, prequantize
from engine.fused import affine_norm, gated_residual, gelu_quant, modulate, residual_norm, rms_norm_rope

AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------------
def timestep_sinusoid(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal timestep features, cos first, computed in float64 → (B, dim) float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(t.to(torch.float64), freqs)  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def linear_fp32(x: Tensor, layer: nn.Linear) -> Tensor:
    """A small Linear evaluated in float32 whatever the weights' dtype (time embedding, modulation)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class RMSNorm(nn.Module):
    """RMS norm over the last dim in fp32 (fp32 weight), output in the input's dtype. The attention fuses it
    with RoPE (engine.fused.rms_norm_rope); this module holds the weight under its official name."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNormAffine(nn.Module):
    """Affine LayerNorm (norm3 before cross-attention), in float32, official key names."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return affine_norm(x, self.weight, self.bias, self.eps, torch.float32)


# ----------------------------------------------------------------------------------------------------
# 3D RoPE
# ----------------------------------------------------------------------------------------------------
def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of head_dim given to (time, height, width): 128 → (44, 42, 42)."""
    d = head_dim // 6
    return head_dim - 4 * d, 2 * d, 2 * d


def rope_table(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> Tensor:
    """Rotation table of every token, tokens in (f, h, w) order → (L, 2, head_dim) float32: row 0 is cos and
    row 1 is ±sin per channel, so that rope(x) = x·cos + pairswap(x)·(±sin) rotates pairs (x[2j], x[2j+1])."""
    f, h, w = grid
    angles = []
    for n, axis_dim, shape in zip((f, h, w), rope_axis_dims(head_dim), ((f, 1, 1), (1, h, 1), (1, 1, w))):
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        a = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)  # (n, axis_dim/2)
        angles.append(a.view(*shape, -1).expand(f, h, w, -1))
    ang = torch.cat(angles, dim=-1).reshape(f * h * w, head_dim // 2)  # (L, 64), float64
    cos = ang.cos().repeat_interleave(2, dim=-1)  # (L, 128): cos_j at channels 2j and 2j+1
    sin = torch.stack([-ang.sin(), ang.sin()], dim=-1).flatten(1)  # (L, 128): -sin_j at 2j, +sin_j at 2j+1
    return torch.stack([cos, sin], dim=1).float()  # (L, 2, 128)


# ----------------------------------------------------------------------------------------------------
# attention and blocks
# ----------------------------------------------------------------------------------------------------
class WanAttention(nn.Module):
    """q/k/v/o projections with RMS qk-norm over the full dim; RoPE for self-attention only."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.attn_fn: AttnFn = dense_attention

    def forward(self, x: Tensor | Fp8Act, context: Tensor | None = None, rope: Tensor | None = None) -> Tensor:
        # fp8 layers (parallel/quantize.py): x may arrive quantized from the fused norm; the text context is
        # quantized once for k and v
        x = prequantize(self.q, x)
        src = x if context is None else prequantize(self.k, context)
        n = self.num_heads
        q = rms_norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps, rope, n)  # (B, L, heads, head_dim)
        k = rms_norm_rope(self.k(src), self.norm_k.weight, self.norm_k.eps, rope, n)  # (B, Lk, heads, head_dim)
        v = self.v(src).unflatten(-1, (n, -1))  # (B, Lk, heads, head_dim)
        out = self.attn_fn(q, k, v)  # (B, L, heads, head_dim)
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN; fp32 residual."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNormAffine(cfg.dim, cfg.eps)
        if cfg.has_image_branch:  # context = [image tokens, text tokens]; k_img / v_img / norm_k_img
            from engine.dit_image import ImageCrossAttention  # (it imports this module)

            self.cross_attn: WanAttention = ImageCrossAttention(cfg.dim, cfg.num_heads, cfg.eps, cfg.text_len)
        else:
            self.cross_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rope: Tensor) -> Tensor:
        dtype = act_dtype(self.ffn[0])
        mod = self.modulation.float() + e0  # (B, 6, dim) float32
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unsqueeze(2).unbind(1)  # each (B, 1, dim)
        # with fp8 layers each norm also emits its output quantized per token (quant=...) for the GEMM after it
        h = modulate(x, shift_sa, scale_sa, self.eps, dtype, quant=is_fp8(self.self_attn.q))
        y = self.self_attn(h, rope=rope)
        # fp32 residual += attn · gate, then norm3 (affine LayerNorm) of the new residual, in one pass
        x, h = residual_norm(x, y, gate_sa, self.norm3.bias, self.norm3.weight, self.eps, dtype, one_plus=False,
                             quant=is_fp8(self.cross_attn.q))
        # += cross-attention (no gate), then the FFN's modulated LayerNorm
        x, h = residual_norm(x, self.cross_attn(h, context=context), None, shift_ff, scale_ff, self.eps, dtype,
                             quant=is_fp8(self.ffn[0]))
        return gated_residual(x, self.feed_forward(h), gate_ff)

    def feed_forward(self, h: Tensor | Fp8Act) -> Tensor:
        """Linear → GELU(tanh) → Linear; on CUDA the GELU runs in the first GEMM's epilogue (cuBLASLt), or
        with fp8 layers in the kernel that quantizes the hidden activation for the second GEMM."""
        fc1, fc2 = self.ffn[0], self.ffn[2]
        if is_fp8(fc1) or is_fp8(fc2):
            hidden = fc1(h if is_fp8(fc1) or not isinstance(h, Fp8Act) else h.dequantize())  # (B, L, ffn)
            return fc2(gelu_quant(hidden)) if is_fp8(fc2) else fc2(F.gelu(hidden, approximate="tanh"))
        if h.is_cuda:
            flat = torch._addmm_activation(fc1.bias, h.reshape(-1, h.shape[-1]), fc1.weight.t(), use_gelu=True)
            hidden = flat.view(*h.shape[:-1], -1)  # (B, L, ffn)
        else:
            hidden = F.gelu(fc1(h), approximate="tanh")
        return fc2(hidden)


class Head(nn.Module):
    """Output head: LayerNorm modulated by the time embedding `e` (not e0), then Linear → 64 per token."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(PATCH))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)  # each (B, 1, dim)
        return self.head(modulate(x, shift, scale, self.eps, self.head.weight.dtype)).float()


# ----------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------
class TokenLayout(Protocol):
    """How the (B, L, dim) token sequence and its RoPE table are laid out over ranks."""

    def split(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]: ...

    def gather(self, x: Tensor) -> Tensor: ...


class LocalTokens:
    """All tokens on this process (no sequence parallelism)."""

    def split(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        return x, rope

    def gather(self, x: Tensor) -> Tensor:
        return x


def run_blocks(model: WanDiT, x: Tensor, e: Tensor, e0: Tensor, context: Tensor, rope: Tensor) -> Tensor:
    """The plain block loop (the step cache replaces this runner to skip it on some steps)."""
    for block in model.blocks:
        x = block(x, e0, context, rope)
    return x


class WanDiT(nn.Module):
    """Wan2.1 DiT: `model(x (B,16,F',H/8,W/8), t (B,), context (B,L<=512,text_dim)) -> velocity (B,16,…)`;
    an image model (cfg.model_type i2v/flf2v) also takes `clip_fea=` and `y=` (engine.dit_image)."""

    # How the model may be split (diffusers-style class data used by parallel/).
    _repeated_blocks = ("WanBlock",)
    # Tensors kept in float32 whatever the run dtype (engine.checkpoint.run_dtype; every loader honours it),
    # as the official code runs them under float32 autocast with fp32 weights: the timestep MLPs, the
    # modulation tables, the norm weights and the output head (~1.3% of the parameters of 14B). Patterns
    # match whole dotted components of a parameter name.
    keep_fp32: ClassVar[tuple[str, ...]] = (
        "time_embedding", "time_projection", "modulation", "norm3", "norm_q", "norm_k", "head.head",
        # the image branch: its LayerNorms (fp32 in the official and diffusers models), FLF2V's position
        # table (added to the fp32 CLIP tokens) and the image keys' RMS norm
        "img_emb.proj.0", "img_emb.proj.4", "img_emb.emb_pos", "norm_k_img",
        # the per-output-channel scales of fp8 layers (parallel/quantize.py)
        "weight_scale",
    )
    # How many RoPE tables (one per (grid, device)) are kept, least recently used evicted: a request uses one grid.
    rope_cache_size: ClassVar[int] = 1

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=PATCH, stride=PATCH)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.has_image_branch:
            from engine.dit_image import ImageEmbedding

            self.img_emb = ImageEmbedding(cfg.image_dim, d, cfg.image_tokens if cfg.model_type == "flf2v" else 0)
        self.tokens: TokenLayout = LocalTokens()
        self.block_runner: Callable[..., Tensor] = run_blocks
        self._rope_cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @property
    def dtype(self) -> torch.dtype:
        """The run (matmul) dtype: that of the patch embedding (some small tensors stay fp32: keep_fp32)."""
        return self.patch_embedding.weight.dtype

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Tensor:
        """The (L, 2, 128) RoPE table for a latent grid, cached per (grid, device), least recent evicted."""
        key = (grid, str(device))
        table = self._rope_cache.pop(key, None)
        if table is None:
            while len(self._rope_cache) >= max(self.rope_cache_size, 1):
                self._rope_cache.popitem(last=False)  # drop the old table before making the new one
            table = rope_table(grid, self.cfg.head_dim, device)
        self._rope_cache[key] = table  # most recent last
        return table

    def clear_caches(self) -> None:
        """Drop the cached RoPE tables (the serving loop's cleanup after a failed request)."""
        self._rope_cache.clear()

    def time_embed(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """e (B, dim) and e0 (B, 6, dim), both float32."""
        lin1, _, lin2 = self.time_embedding
        e = linear_fp32(F.silu(linear_fp32(timestep_sinusoid(t, self.cfg.freq_dim), lin1)), lin2)
        e0 = linear_fp32(F.silu(e), self.time_projection[1]).unflatten(1, (6, self.cfg.dim))  # (B, 6, dim)
        return e, e0

    def embed_text(self, context: Tensor) -> Tensor:
        """(B, L<=text_len, text_dim) → zero-padded to text_len rows → (B, text_len, dim); pads are not masked."""
        pad = self.cfg.text_len - context.shape[1]
        if pad < 0:
            raise ValueError(f"context has {context.shape[1]} tokens; at most {self.cfg.text_len} are allowed")
        context = F.pad(context.to(self.dtype), (0, 0, 0, pad))
        return self.text_embedding(context)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
        # 0. image models: y joins x on channels, the CLIP tokens are checked (engine.dit_image)
        clip = None
        if self.cfg.has_image_branch or clip_fea is not None or y is not None:
            from engine.dit_image import prepare_image_inputs

            x, clip = prepare_image_inputs(self.cfg, x, clip_fea, y)
        # 1. patchify: (B, C, F', H', W') → (B, L, dim), tokens in (frame, row, col) order
        b, _, f, h, w = x.shape
        grid = (f // PATCH[0], h // PATCH[1], w // PATCH[2])
        tokens = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2)  # (B, L, dim)
        tokens = tokens.to(torch.float32, memory_format=torch.contiguous_format)  # the fp32 residual stream
        # 2. conditions: timestep embeddings (fp32) and text embedding
        e, e0 = self.time_embed(t)
        ctx = self.embed_text(context)
        if clip is not None:  # image tokens first: (B, image_tokens + text_len, dim)
            ctx = torch.cat([self.img_emb(clip, ctx.dtype), ctx], dim=1)
        # 3. blocks, on this rank's share of the tokens (RoPE by global position)
        tokens, rope = self.tokens.split(tokens, self.rope(grid, x.device))
        tokens = self.block_runner(self, tokens, e, e0, ctx, rope)
        # 4. head on the local tokens, then gather and unpatchify
        out = self.tokens.gather(self.head(tokens, e))  # (B, L, 64)
        return unpatchify(out, grid, self.cfg.out_dim)


def unpatchify(out: Tensor, grid: tuple[int, int, int], channels: int) -> Tensor:
    """(B, L, pt·ph·pw·C) with C fastest → (B, C, F', H', W')."""
    b = out.shape[0]
    f, h, w = grid
    pt, ph, pw = PATCH
    out = out.view(b, f, h, w, pt, ph, pw, channels)  # (B, f, h, w, pt, ph, pw, C)
    out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
    return out.reshape(b, channels, f * pt, h * ph, w * pw)
