"""Patch-parallel VAE decode: every rank decodes a horizontal slice of the video.

The decoder's middle block attends over each whole latent frame, so every rank runs it on the full
latent (it is cheap: latent resolution). The later stages are convolutions only: each rank decodes its
rows from the middle features widened by the exact receptive-field halo (`WanVAE.tail_halo`), so the
slices are exactly the rows of a one-rank decode; rank 0 gathers them. Memory per rank ≈ 1/world of
the decode's peak, which is the VRAM peak of small models. With `--vae_tiling` each rank decodes its
slice tile by tile (`WanVAE.decode_tiles`, exact as well), bounding the peak further.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from engine.vae import split_spans


def decode_rows(vae, latents: Tensor, part: int, parts: int,
                tile: bool | int | tuple[int, int] = False) -> tuple[Tensor, tuple[int, int]]:
    """This part's rows of the decoded video: (B, 3, F, 8·rows, W), clamped, and its latent row span.

    tile: as in `WanVAE.decode` (False: the slice in one piece; True or a size: tile by tile)."""
    feats = vae.decode_middle(latents)  # (B, C, T, h, w)
    spans = split_spans(feats.shape[3], -(-feats.shape[3] // parts))
    spans += [(spans[-1][1], spans[-1][1])] * (parts - len(spans))  # fewer rows than ranks: empty parts
    r0, r1 = spans[part]
    if r1 == r0:
        return feats.new_zeros(0), (r0, r1)
    if tile:
        video = vae.decode_tiles(feats, tile, rows=(r0, r1))
    else:
        video = vae.decode_tail(feats, ((r0, r1), (0, feats.shape[4])))
    return video.clamp_(-1, 1), (r0, r1)


def parallel_decode(vae, latents: Tensor, rank: int, world: int, gather: Callable[[object], list | None],
                    before_gather: Callable[[], None] | None = None,
                    tile: bool | int | tuple[int, int] = False) -> Tensor | None:
    """Decode across `world` ranks; the whole video (B, 3, F, H, W) on rank 0, None elsewhere.

    `gather(obj)` collects every rank's object on rank 0 (the runtime's control-group gather);
    `before_gather()` runs once the local slice is done (the serving loop's status agreement); `tile`
    decodes each rank's slice tile by tile (`--vae_tiling`). The slices travel in the VAE's dtype (half
    the bytes for bf16) and the video comes back in at least float32.
    """
    part, span = decode_rows(vae, latents, rank, world, tile)
    if before_gather is not None:
        before_gather()
    got = gather((span, part.cpu()))
    if got is None:
        return None
    video = torch.cat([p for (r0, r1), p in sorted(got, key=lambda s: s[0][0]) if r1 > r0], dim=3)
    return video.to(torch.promote_types(video.dtype, torch.float32))
