"""Image-to-video conditioning as the official I2V / FLF2V pipelines build it (wan/image2video.py,
wan/first_last_frame2video.py): the output size from the image's aspect ratio and the requested area, the
bicubic resize, the 4-channel mask, and `y` = cat(mask, VAE latents of [image, zeros…(, last image)]).

Shapes: images (3, H, W) in [-1, 1]; latents (16, F', h, w) with F' = (F − 1)/4 + 1, h = H/8, w = W/8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

VAE_STRIDE = (4, 8, 8)
PATCH = (1, 2, 2)
# official sampling defaults (generate.py): I2V 40 steps, shift 3.0 at 480p (5.0 otherwise), guidance 5;
# FLF2V 50 steps, shift 16, guidance 5
I2V_DEFAULTS = {"sample_steps": 40, "sample_shift": 5.0, "sample_guide_scale": 5.0}
I2V_480P_SHIFT = 3.0
FLF2V_DEFAULTS = {"sample_steps": 50, "sample_shift": 16.0, "sample_guide_scale": 5.0}


def i2v_shift(width: int, height: int) -> float:
    """The official I2V default shift for a requested size: 3.0 at 832*480 / 480*832, else 5.0 (the same rule as
    engine.request.validate_request's, which stays torch-free)."""
    return I2V_480P_SHIFT if {width, height} == {832, 480} else I2V_DEFAULTS["sample_shift"]


@dataclass(frozen=True)
class I2VSize:
    """The latent grid an image gets: lat_h × lat_w (multiples of the patch), the pixel size 8× that."""

    lat_h: int
    lat_w: int

    @property
    def height(self) -> int:
        return self.lat_h * VAE_STRIDE[1]

    @property
    def width(self) -> int:
        return self.lat_w * VAE_STRIDE[2]


def i2v_size(area: int, image_h: int, image_w: int) -> I2VSize:
    """The official rule: aspect = h/w of the image, lat_h = round(√(area·aspect) // 8 // 2 · 2), likewise lat_w."""
    aspect = image_h / image_w
    lat_h = round(math.sqrt(area * aspect) // VAE_STRIDE[1] // PATCH[1] * PATCH[1])
    lat_w = round(math.sqrt(area / aspect) // VAE_STRIDE[2] // PATCH[2] * PATCH[2])
    if lat_h < PATCH[1] or lat_w < PATCH[2]:
        raise ValueError(f"an image of {image_w}×{image_h} at an area of {area} pixels gives a latent grid of "
                         f"{lat_w}×{lat_h}; it must be at least 2×2")
    return I2VSize(lat_h, lat_w)


def resize_bicubic(img: Tensor, height: int, width: int) -> Tensor:
    """(3, H, W) → (3, height, width), bicubic as the official `F.interpolate(img[None], mode='bicubic')`."""
    return F.interpolate(img[None], size=(height, width), mode="bicubic")[0]


def fit_last_frame(last: Tensor, first_h: int, first_w: int) -> Tensor:
    """A last frame of another size scaled (bicubic) to cover the first frame's size, then centre-cropped to it.
    (The official FLF2V code means this but crops an unscaled, axis-swapped size; the result is then resized to
    the output size anyway. Here the intended cover-and-crop is done, the same for equal aspect ratios.)"""
    h, w = last.shape[1:]
    if (h, w) == (first_h, first_w):
        return last
    scale = max(first_h / h, first_w / w)
    sh, sw = max(first_h, round(h * scale)), max(first_w, round(w * scale))
    scaled = resize_bicubic(last, sh, sw)
    top, left = (sh - first_h) // 2, (sw - first_w) // 2
    return scaled[:, top : top + first_h, left : left + first_w]


def i2v_mask(frames: int, lat_h: int, lat_w: int, last: bool = False, device=None) -> Tensor:
    """The 4-channel mask (4, F', lat_h, lat_w): 1 where a frame is given (the first; FLF2V also the last)."""
    msk = torch.ones(1, frames, lat_h, lat_w, device=device)
    msk[:, 1:-1 if last else None] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)  # (1, F + 3, h, w)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)  # (1, F', 4, h, w)
    return msk.transpose(1, 2)[0]  # (4, F', h, w)


def conditioning_video(first: Tensor, frames: int, size: I2VSize, last: Tensor | None = None) -> Tensor:
    """(3, F, H, W): the first image resized to the output size, zeros, and (FLF2V) the last image."""
    h, w = size.height, size.width
    a = resize_bicubic(first, h, w)[:, None]  # (3, 1, h, w)
    if last is None:
        return torch.cat([a, torch.zeros(3, frames - 1, h, w, dtype=a.dtype, device=a.device)], dim=1)
    b = resize_bicubic(fit_last_frame(last, *first.shape[1:]), h, w)[:, None]
    return torch.cat([a, torch.zeros(3, frames - 2, h, w, dtype=a.dtype, device=a.device), b], dim=1)


@torch.no_grad()
def i2v_condition(vae, first: Tensor, frames: int, size: I2VSize, last: Tensor | None = None) -> Tensor:
    """y (20, F', lat_h, lat_w) = cat(mask, VAE.encode(conditioning video)) for one video."""
    least = 1 if last is None else 5  # first and last frame need at least one frame between them
    if frames < least or (frames - 1) % VAE_STRIDE[0]:
        raise ValueError(f"frame_num must be 4n+1 (at least {least}), got {frames}")
    video = conditioning_video(first.float(), frames, size, None if last is None else last.float())
    w = next(vae.parameters())
    lat = vae.encode(video[None].to(w.device, w.dtype)).float()[0]  # (16, F', h, w)
    msk = i2v_mask(frames, size.lat_h, size.lat_w, last is not None, device=lat.device)
    return torch.cat([msk, lat])
