"""The image branch of the Wan2.1 DiT (I2V-14B-480P/720P, FLF2V-14B), official key layout.

  * `ImageEmbedding` (`img_emb`): CLIP ViT-H/14 tokens (B, n, 1280) → context rows (B, n, dim):
    LayerNorm → Linear → GELU (exact) → Linear → LayerNorm (`img_emb.proj.0/1/3/4`); FLF2V first adds
    `img_emb.emb_pos` (1, 514, 1280) to the two images' tokens seen as one row of 514.
  * `ImageCrossAttention` (each block's `cross_attn`): the context is [image tokens, text_len text tokens];
    out = o(attn(q, k(text), v(text)) + attn(q, norm_k_img(k_img(image)), v_img(image))). Both attentions
    go through the one `attn_fn` (parallel/ replaces it; the keys are never sharded).
Conventions of `WanDiT.forward(..., clip_fea, y)` live in `prepare_image_inputs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import DiTConfig
from engine.dit import RMSNorm, WanAttention
from engine.fused import rms_norm_rope


class ImageEmbedding(nn.Module):
    """Official MLPProj: (B, n, image_dim) CLIP tokens → (B, n, dim); the LayerNorms (and emb_pos) in fp32."""

    def __init__(self, image_dim: int, dim: int, pos_len: int = 0) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_dim), nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, dim),
            nn.LayerNorm(dim),
        )
        if pos_len:
            self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, image_dim))

    def forward(self, clip_fea: Tensor, dtype: torch.dtype) -> Tensor:
        norm_in, fc1, _, fc2, norm_out = self.proj
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):
            x = x + self.emb_pos.float()  # (B, 514, image_dim)
        h = F.layer_norm(x, norm_in.normalized_shape, norm_in.weight.float(), norm_in.bias.float(), norm_in.eps)
        h = fc2(F.gelu(fc1(h.to(fc1.weight.dtype))))  # (B, n, dim)
        h = F.layer_norm(h.float(), norm_out.normalized_shape, norm_out.weight.float(), norm_out.bias.float(),
                         norm_out.eps)
        return h.to(dtype)


class ImageCrossAttention(WanAttention):
    """Cross-attention over [image tokens, text tokens]: the last `text_len` context rows are the text."""

    def __init__(self, dim: int, num_heads: int, eps: float, text_len: int) -> None:
        super().__init__(dim, num_heads, eps)
        self.text_len = text_len
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: Tensor, context: Tensor | None = None, rope: Tensor | None = None) -> Tensor:
        if context is None or rope is not None:
            raise ValueError("the image cross-attention takes a context and no RoPE")
        n = self.num_heads
        n_img = context.shape[1] - self.text_len  # the official split: what precedes the text is the image
        img, txt = context[:, :n_img], context[:, n_img:]  # (B, n_img, dim), (B, text_len, dim)
        q = rms_norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps, None, n)  # (B, L, heads, head_dim)
        k = rms_norm_rope(self.k(txt), self.norm_k.weight, self.norm_k.eps, None, n)  # (B, text_len, heads, hd)
        v = self.v(txt).unflatten(-1, (n, -1))
        k_img = rms_norm_rope(self.k_img(img), self.norm_k_img.weight, self.norm_k_img.eps, None, n)
        v_img = self.v_img(img).unflatten(-1, (n, -1))  # (B, n_img, heads, head_dim)
        out = self.attn_fn(q, k, v) + self.attn_fn(q, k_img, v_img)  # (B, L, heads, head_dim)
        return self.o(out.flatten(2))


def prepare_image_inputs(cfg: DiTConfig, x: Tensor, clip_fea: Tensor | None, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Check the image inputs and return (x with y on channels, clip tokens (B, image_tokens, image_dim)).

    `y` (B, 20, F', H', W'): 4 mask + 16 VAE latent channels, concatenated after x's 16 noise channels.
    `clip_fea`: (B, 257, 1280) per video for I2V; (B, 514, 1280) for FLF2V (first frame's 257 tokens, then
    the last's), or the official per-image form (2·B, 257, 1280), images of one video consecutive.
    A T2V model takes neither; an image model needs both.
    """
    if not cfg.has_image_branch:
        if clip_fea is not None or y is not None:
            raise ValueError("this text-to-video model has no image branch: clip_fea and y are not accepted")
        return x, None
    if clip_fea is None or y is None:
        raise ValueError(f"the {cfg.model_type} model needs both clip_fea and y")
    b = x.shape[0]
    if y.dim() != 5 or y.shape[0] != b or y.shape[2:] != x.shape[2:] or x.shape[1] + y.shape[1] != cfg.in_dim:
        raise ValueError(f"y has shape {tuple(y.shape)}; expected ({b}, {cfg.in_dim - x.shape[1]}, "
                         f"{', '.join(map(str, x.shape[2:]))}) for x of shape {tuple(x.shape)}")
    want = cfg.image_tokens
    if clip_fea.dim() != 3 or clip_fea.shape[-1] != cfg.image_dim or clip_fea.shape[0] * clip_fea.shape[1] != b * want:
        raise ValueError(f"clip_fea has shape {tuple(clip_fea.shape)}; expected ({b}, {want}, {cfg.image_dim})")
    clip = clip_fea.reshape(b, want, cfg.image_dim)  # FLF2V (2B, 257, C) → (B, 514, C), as the official view
    x = torch.cat([x.float(), y.to(x.device, torch.float32)], dim=1)  # (B, in_dim, F', H', W')
    return x, clip
