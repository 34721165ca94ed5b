"""Wan2.1 causal 3D VAE in the official key layout: chunked, cached encode/decode and exact tiled decode.

Time is causal: every 3-tap temporal conv sees the two input frames before the current chunk, kept in
a per-call `Cache` (module → its last input frames), so a video is processed chunk by chunk exactly as
the official code does (encode: frames 1, 4, 4, …; decode: one latent frame at a time, which gives
1 frame for the first latent and 4 for each later one). A cache lives for one call only.

Decode is split in two stages so that memory can be bounded and work shared across ranks:
`decode_middle` (post-quant conv, conv1, middle block with global per-frame attention) runs untiled at
latent resolution; `decode_tail` (upsample levels + head, convolutions only) can run on any spatial
region, computed from a slice widened by `tail_halo` latent pixels and cropped, which is exact.
Spatially tiled decode and a patch-parallel decode (one region per rank) are both built on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Latent normalisation of the official Wan2.1 VAE (z_dim 16): z = (mu - mean) / std.
VAE_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
VAE_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip

DEFAULT_TILE = (64, 64)  # tile core in latent pixels (512×512 px): 720p (90×160 latent) → 2×3 tiles
Cache = dict  # nn.Module → Tensor (its last input frames) or True (first chunk seen); one per pass


def latent_stats(z_dim: int) -> tuple[list[float], list[float]]:
    """Per-channel latent (mean, std): the official values for channels 0..15, mean 0 / std 1 beyond.

    A VAE with z_dim 16 (the official one, or a tiny test VAE) uses the official values; a smaller
    z_dim uses the first z_dim of them; channels past the 16th (only in test VAEs) are not rescaled.
    """
    mean = [VAE_MEAN[c] if c < len(VAE_MEAN) else 0.0 for c in range(z_dim)]
    std = [VAE_STD[c] if c < len(VAE_STD) else 1.0 for c in range(z_dim)]
    return mean, std


def tail_halo(num_res_blocks: int = 2, levels: int = 4) -> int:
    """Spatial receptive radius of the decoder tail (upsample levels + head), in latent pixels.

    Walk back from one output pixel: the head conv adds 1 px; a level's residual blocks add
    2·(num_res_blocks + 1) px (two 3×3 convs each) at that level's resolution; a level entered through
    an upsampler adds 1 px for the upsampler's 3×3 conv, then nearest ×2 maps a radius r to ceil(r/2)
    on the coarser grid (RMS norms and temporal convs are per pixel). Default (2 blocks, 4 levels):
    1 + 6 = 7, +1 = 8 → 4;  4 + 6 = 10, +1 = 11 → 6;  6 + 6 = 12, +1 = 13 → 7;  7 + 6 = 13 latent px.
    """
    r = 1
    for level in reversed(range(levels)):
        r += 2 * (num_res_blocks + 1)
        if level > 0:
            r = math.ceil((r + 1) / 2)
    return r


def split_spans(size: int, tile: int) -> list[tuple[int, int]]:
    """Split [0, size) into ceil(size / tile) contiguous, near-equal spans (start, end)."""
    n = max(1, math.ceil(size / tile))
    edges = [i * size // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------
class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (2·pad_t frames in front), the front frames taken from a cache."""

    def __init__(
        self, cin: int, cout: int, kernel: int | tuple, stride: int | tuple = 1, padding: int | tuple = 0
    ) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.t_pad, self.hw_pad = 2 * pt, (pw, pw, ph, ph)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        """x (B, C, T, H, W) → (B, C', T', H', W'); with a cache, continues the previous chunk."""
        front = self.t_pad
        if cache is not None and front:
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev, x], 2)  # (B, C, cached + T, H, W)
                front -= prev.shape[2]
            cache[self] = x[:, :, -self.t_pad :].clone()
        return super().forward(F.pad(x, (*self.hw_pad, front, 0)))


class RMSNorm(nn.Module):
    """normalize(x over channels) · sqrt(C) · gamma (fp32 normalisation for half-precision inputs)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = F.normalize(x.float() if x.element_size() < 4 else x, dim=1).to(x.dtype)
        return y * self.scale * self.gamma


class Resample(nn.Module):
    """Spatial ×2 up/down sampling per frame, plus a causal temporal ×2 for the '3d' modes."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            if self not in cache:  # first chunk: its single frame is not doubled in time
                cache[self] = True
            else:
                x = self.time_conv(x, cache).view(b, 2, c, t, h, w)  # (B, 2, C, T, H, W)
                x = x.permute(0, 2, 3, 1, 4, 5).reshape(
                    b, c, 2 * t, h, w
                )  # (B, C, 2T, H, W), pairs interleaved
        t = x.shape[2]
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B·T, C', H', W')
        x = y.view(b, t, *y.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:  # the first chunk's frame passes; later: stride 2 over [last frame, chunk]
                x = self.time_conv(torch.cat([prev, x], 2))  # (B, C, T/2, H', W')
        return x


class ResidualBlock(nn.Module):
    """x + (norm → SiLU → conv3 → norm → SiLU → conv3)(x), with a 1×1×1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # indices match the official names (residual.0/2/3/6); slot 5 is the official (inference-off) dropout
        self.residual = nn.Sequential(
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        return run(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, C, H, W)
        qkv = self.to_qkv(self.norm(y)).view(b * t, 3, c, h * w).transpose(2, 3)  # (B·T, 3, HW, C)
        q, k, v = qkv.unsqueeze(2).unbind(1)  # each (B·T, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B·T, 1, HW, C)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))  # (B·T, C, H, W)
        return x + y.view(b, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)


def run(layers: Iterable[nn.Module], x: Tensor, cache: Cache) -> Tensor:
    """Apply layers in order, handing the cache to those that keep time state."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1))


class Encoder(nn.Module):
    """Video (B, 3, T, H, W) → moments (B, 2·z, T', H/8, W/8), one chunk at a time."""

    def __init__(
        self, dim: int, z2: int, dim_mult: Sequence[int], num_res_blocks: int, temporal: Sequence[bool]
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if temporal[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z2)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        return run([self.conv1, *self.downsamples, *self.middle, *self.head], x, cache)


class Decoder(nn.Module):
    """Latents → video, as two stages: `middle_stage` (global attention) and `tail_stage` (convs only)."""

    def __init__(
        self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int, temporal: Sequence[bool]
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin  # the previous level's upsampler halves the width
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(dim_mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(dims[-1], 3)

    def middle_stage(self, x: Tensor, cache: Cache) -> Tensor:
        """(B, z, t, h, w) → (B, C, t, h, w) at latent resolution."""
        return run([self.conv1, *self.middle], x, cache)

    def tail_stage(self, x: Tensor, cache: Cache) -> Tensor:
        """(B, C, t, h, w) → (B, 3, t', 8h, 8w); every op is local in space (see `tail_halo`)."""
        return run([*self.upsamples, *self.head], x, cache)


# ----------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------
class WanVAE(nn.Module):
    """Wan2.1 causal video VAE (official names): `encode(video) -> latents`, `decode(latents) -> video`."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: Sequence[bool] = (False, True, True),
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder(dim, z_dim, dim_mult, num_res_blocks, tuple(reversed(temporal_downsample)))
        self.mean, self.std = latent_stats(z_dim)  # plain lists: never in the state dict
        self.spatial_factor = 2 ** (len(dim_mult) - 1)
        self.temporal_factor = 2 ** sum(bool(t) for t in temporal_downsample)
        self.tail_halo = tail_halo(num_res_blocks, len(dim_mult))

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Latent mean and std as (1, z, 1, 1, 1) tensors on like's device and dtype."""
        mean, std = (torch.tensor(v, device=like.device, dtype=like.dtype) for v in (self.mean, self.std))
        return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)  # (1, z, 1, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype: inputs are cast to it and outputs come back in it."""
        return next(self.parameters()).dtype

    def encode(self, video: Tensor) -> Tensor:
        """Video (B, 3, 1+4k, H, W) in [-1, 1] → normalised latents (mu - mean)/std, (B, z, 1+k, H/8, W/8)."""
        b, c, f, h, w = video.shape
        tf, s = self.temporal_factor, self.spatial_factor
        if c != 3 or (f - 1) % tf or h % s or w % s:
            raise ValueError(
                f"encode needs (B, 3, 1+{tf}k, H, W) with H, W multiples of {s}; got {tuple(video.shape)}"
            )
        x = video.to(self.dtype)
        cache: Cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, i : i + tf] for i in range(1, f, tf)]  # frames 1, 4, 4, …
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], 2)  # (B, 2z, 1+k, H/8, W/8)
        mu = self.conv1(out)[:, : self.z_dim]  # (B, z, 1+k, H/8, W/8)
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode(self, latents: Tensor, tile: bool | int | tuple[int, int] = False) -> Tensor:
        """Normalised latents (B, z, T, h, w) → video (B, 3, 1+4(T-1), 8h, 8w) clamped to [-1, 1].

        tile: False/None = untiled; True = `DEFAULT_TILE`; an int or (rows, cols) = the tile core size in
        latent pixels. Tiled decode bounds memory and equals the untiled result (exact halo).
        """
        feats = self.decode_middle(latents)
        if not tile:
            return self.decode_tail(feats).clamp_(-1, 1)
        return self.decode_tiles(feats, tile).clamp_(-1, 1)

    def decode_tiles(self, feats: Tensor, tile: bool | int | tuple[int, int], rows: tuple[int, int] | None = None) -> Tensor:
        """Stage 2 tile by tile: the latent rows [r0, r1) (default: all) of the video, every column, unclamped.

        tile: True = `DEFAULT_TILE`, an int or (rows, cols) = the tile core in latent pixels. Each tile is one
        `decode_tail` call (exact halo), so the result equals `decode_tail(feats, ((r0, r1), (0, w)))`.
        """
        th, tw = DEFAULT_TILE if tile is True else (tile, tile) if isinstance(tile, int) else tile
        if th < 1 or tw < 1:
            raise ValueError(f"tile sizes must be >= 1 latent pixel, got {tile}")
        r0, r1 = rows or (0, feats.shape[3])
        out = self._new_video(feats, r1 - r0, feats.shape[4])
        s = self.spatial_factor
        for a0, a1 in split_spans(r1 - r0, th):
            for c0, c1 in split_spans(feats.shape[4], tw):
                self.decode_tail(feats, ((r0 + a0, r0 + a1), (c0, c1)), out=out[..., s * a0 : s * a1, s * c0 : s * c1])
        return out

    def decode_middle(self, latents: Tensor) -> Tensor:
        """Stage 1, untiled: normalised latents (B, z, T, h, w) → middle features (B, C, T, h, w)."""
        mean, std = self._stats(latents.to(self.dtype))
        x = self.conv2(latents.to(self.dtype) * std + mean)  # (B, z, T, h, w)
        cache: Cache = {}
        first = self.decoder.middle_stage(x[:, :, :1], cache)  # (B, C, 1, h, w)
        out = first.new_empty(first.shape[0], first.shape[1], x.shape[2], *first.shape[3:])  # (B, C, T, h, w)
        out[:, :, :1] = first
        for i in range(1, x.shape[2]):
            out[:, :, i : i + 1] = self.decoder.middle_stage(x[:, :, i : i + 1], cache)
        return out

    def decode_tail(
        self,
        feats: Tensor,
        region: tuple[tuple[int, int], tuple[int, int]] | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Stage 2: middle features (B, C, T, h, w) → video (B, 3, 1+4(T-1), 8·rows, 8·cols), unclamped.

        region = ((r0, r1), (c0, c1)) in latent pixels selects an output window; it is computed from
        features widened by `tail_halo` on each side (clipped at the frame edge) and cropped, so it
        equals that window of the full decode. Each call runs the whole time sequence with its own
        cache. `out` (optional) receives the result in place. This is the unit of tiled decode and of a
        patch-parallel decode (each rank decodes its own rows after a replicated `decode_middle`).
        """
        h, w = feats.shape[3:]
        (r0, r1), (c0, c1) = region or ((0, h), (0, w))
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise ValueError(f"region {region} is outside the {h}×{w} latent frame")
        a0, a1 = max(0, r0 - self.tail_halo), min(h, r1 + self.tail_halo)
        b0, b1 = max(0, c0 - self.tail_halo), min(w, c1 + self.tail_halo)
        s = self.spatial_factor
        if out is None:
            out = self._new_video(feats, r1 - r0, c1 - c0)
        cache: Cache = {}
        f = 0
        for i in range(feats.shape[2]):
            x = feats[:, :, i : i + 1, a0:a1, b0:b1]  # (B, C, 1, a1-a0, b1-b0): one latent frame + halo
            y = self.decoder.tail_stage(x, cache)  # (B, 3, n, 8(a1-a0), 8(b1-b0)), n = 1 then 4
            n = y.shape[2]
            out[:, :, f : f + n] = y[..., s * (r0 - a0) : s * (r1 - a0), s * (c0 - b0) : s * (c1 - b0)]
            f += n
        return out

    def _new_video(self, feats: Tensor, rows: int, cols: int) -> Tensor:
        b, _, t = feats.shape[:3]
        frames, s = 1 + self.temporal_factor * (t - 1), self.spatial_factor
        return feats.new_empty(b, 3, frames, s * rows, s * cols)  # (B, 3, F, 8·rows, 8·cols)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: config inference and diffusers names
# ----------------------------------------------------------------------------------------------------
def vae_config_from_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
    """`WanVAE(**cfg)` arguments inferred from official names and shapes (values need only `.shape`)."""
    for key in ("encoder.conv1.weight", "conv2.weight", "encoder.downsamples.0.residual.6.weight"):
        if key not in sd:
            raise ValueError(f"not a Wan2.1 VAE state dict in official names: no '{key}' tensor")
    dim = sd["encoder.conv1.weight"].shape[0]
    blocks = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    resamples = [i for i in blocks if f"encoder.downsamples.{i}.resample.1.weight" in sd]
    num_res_blocks = resamples[0] if resamples else len(blocks)
    levels = len(resamples) + 1
    dim_mult = tuple(
        sd[f"encoder.downsamples.{lvl * (num_res_blocks + 1)}.residual.6.weight"].shape[0] // dim
        for lvl in range(levels)
    )
    temporal = tuple(f"encoder.downsamples.{i}.time_conv.weight" in sd for i in resamples)
    return {
        "dim": dim,
        "z_dim": sd["conv2.weight"].shape[0],
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temporal_downsample": temporal,
    }


_DIFFUSERS_PREFIXES = (
    "encoder.down_blocks.",
    "decoder.up_blocks.",
    "encoder.conv_in.",
    "decoder.conv_in.",
    "quant_conv.",
)
# diffusers module name → official (inside encoder/decoder); top level: quant_conv/post_quant_conv.
_DIFFUSERS_MODULES = {
    "norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
    "conv_shortcut": "shortcut", "conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2",
}  # fmt: skip
_DIFFUSERS_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}


def is_diffusers_vae(sd: Iterable[str]) -> bool:
    """True if the tensor names (a state dict or its keys) are diffusers `AutoencoderKLWan` names."""
    return any(k.startswith(_DIFFUSERS_PREFIXES) for k in sd)


def vae_name_from_diffusers(name: str, num_res_blocks: int = 2) -> str:
    """Map one diffusers `AutoencoderKLWan` tensor name to the official Wan2.1 VAE name."""
    *path, module, leaf = name.split(".")
    module = (_DIFFUSERS_MODULES if path else _DIFFUSERS_TOP).get(module, module)
    p = ".".join(path)
    step = num_res_blocks + 2  # a decoder level: num_res_blocks + 1 residual blocks, then its upsampler
    p = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"middle.{2 * int(m[1])}", p)
    p = p.replace("mid_block.attentions.0", "middle.1").replace("down_blocks.", "downsamples.")
    p = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"upsamples.{int(m[1]) * step + int(m[2])}", p)
    p = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"upsamples.{int(m[1]) * step + step - 1}", p)
    return ".".join(x for x in (p, module, leaf) if x)


def vae_state_dict_from_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a diffusers `AutoencoderKLWan` state dict to official names (inverts diffusers' converter)."""
    idx = [int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.\d+\.resnets\.(\d+)\.", k))]
    num_res_blocks = max(idx) if idx else 2
    return {vae_name_from_diffusers(k, num_res_blocks): v for k, v in sd.items()}
