"""Image-to-video conditioning equals the official pipelines' construction (size rule, bicubic resize, mask, y)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.i2v import (
    I2VSize,
    conditioning_video,
    fit_last_frame,
    i2v_condition,
    i2v_mask,
    i2v_shift,
    i2v_size,
)


def official_lat(area: int, h: int, w: int) -> tuple[int, int]:
    """wan/image2video.py's arithmetic, with numpy as there."""
    aspect = h / w
    return (round(np.sqrt(area * aspect) // 8 // 2 * 2), round(np.sqrt(area / aspect) // 8 // 2 * 2))


def official_mask(frames: int, lat_h: int, lat_w: int, flf: bool) -> torch.Tensor:
    msk = torch.ones(1, frames, lat_h, lat_w)
    if flf:
        msk[:, 1:-1] = 0
    else:
        msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


@pytest.mark.parametrize("area, h, w", [(832 * 480, 720, 1280), (832 * 480, 1280, 720), (1280 * 720, 1024, 1024),
                                        (832 * 480, 333, 517), (1280 * 720, 3000, 200), (64 * 64, 64, 64)])
def test_size_rule_is_the_official_one(area, h, w):
    size = i2v_size(area, h, w)
    assert (size.lat_h, size.lat_w) == official_lat(area, h, w)
    assert size.height == 8 * size.lat_h and size.width == 8 * size.lat_w
    assert size.lat_h % 2 == 0 and size.lat_w % 2 == 0


def test_a_16_9_image_at_the_480p_area_gives_832_by_464():
    assert (i2v_size(832 * 480, 720, 1280).width, i2v_size(832 * 480, 720, 1280).height) == (832, 464)


def test_a_sliver_of_an_image_is_refused_naming_its_size():
    with pytest.raises(ValueError, match=r"an image of 4000×16 at an area of 4096 pixels gives a latent grid of"):
        i2v_size(64 * 64, 16, 4000)


@pytest.mark.parametrize("frames, flf", [(1, False), (5, False), (81, False), (5, True), (81, True)])
def test_mask_is_the_official_one(frames, flf):
    assert torch.equal(i2v_mask(frames, 6, 10, flf), official_mask(frames, 6, 10, flf))


def test_conditioning_video_is_first_image_then_zeros_and_the_last_for_flf2v():
    g = torch.Generator().manual_seed(0)
    first, last = torch.rand(3, 40, 60, generator=g) * 2 - 1, torch.rand(3, 40, 60, generator=g) * 2 - 1
    size = I2VSize(4, 6)
    v = conditioning_video(first, 9, size)
    ref = F.interpolate(first[None], size=(32, 48), mode="bicubic").transpose(0, 1)
    assert v.shape == (3, 9, 32, 48) and torch.equal(v[:, :1], ref) and not v[:, 1:].any()
    v2 = conditioning_video(first, 9, size, last)
    assert torch.equal(v2[:, -1:], F.interpolate(last[None], size=(32, 48), mode="bicubic").transpose(0, 1))
    assert not v2[:, 1:-1].any()


def test_a_last_frame_of_another_size_is_scaled_to_cover_and_centre_cropped():
    last = torch.arange(3 * 20 * 40, dtype=torch.float32).view(3, 20, 40)
    out = fit_last_frame(last, 30, 30)  # scale 1.5 → 30×60, crop the middle 30 columns
    assert out.shape == (3, 30, 30)
    scaled = F.interpolate(last[None], size=(30, 60), mode="bicubic")[0]
    assert torch.equal(out, scaled[:, :, 15:45])
    assert fit_last_frame(last, 20, 40) is last


def test_y_is_mask_then_vae_latents(tiny_model_dir):
    from engine.loading import load_vae
    from engine.model_files import find_model_files

    vae = load_vae(find_model_files(tiny_model_dir).vae, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    first = torch.rand(3, 50, 70, generator=g) * 2 - 1
    size = i2v_size(64 * 48, 50, 70)
    y = i2v_condition(vae, first, 9, size)
    f_lat = (9 - 1) // 4 + 1
    assert y.shape == (20, f_lat, size.lat_h, size.lat_w)
    assert torch.equal(y[:4], official_mask(9, size.lat_h, size.lat_w, False))
    with torch.no_grad():
        lat = vae.encode(conditioning_video(first, 9, size)[None])[0]
    assert torch.equal(y[4:], lat)
    with pytest.raises(ValueError, match=r"frame_num must be 4n\+1 \(at least 5\), got 1"):
        i2v_condition(vae, first, 1, size, last=first)


def test_official_default_shift():
    assert i2v_shift(832, 480) == i2v_shift(480, 832) == 3.0 and i2v_shift(1280, 720) == 5.0
    assert math.isclose(i2v_shift(1024, 1024), 5.0)
