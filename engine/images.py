"""Conditioning images from users (image-to-video): hostile input, checked before anything else sees it.

Only PNG, JPEG and WebP; at most MAX_IMAGE_BYTES and MAX_IMAGE_SIDE pixels a side; Pillow's decompression-bomb
guard at MAX_IMAGE_PIXELS; the header is checked first, then the whole image decoded (a truncated file fails
there). Every refusal is a RequestError naming the image's field and the limit, never a traceback. A path is
accepted only inside the folders the caller allows (the server's upload folder); anything else is refused.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from engine.request import RequestError

if TYPE_CHECKING:  # torch is imported where a tensor is made: the CLI's early checks decode images without it
    from torch import Tensor

MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE  # Pillow raises past 2× this; we refuse past it
MIN_IMAGE_SIDE = 16
FORMATS = ("PNG", "JPEG", "WEBP")


def _limit_text() -> str:
    return (f"a PNG, JPEG or WebP image of at most {MAX_IMAGE_BYTES // 2**20} MB and {MAX_IMAGE_SIDE} pixels a side "
            f"(at least {MIN_IMAGE_SIDE})")


def read_image_bytes(source: bytes | str | Path, field: str, allowed_dirs: tuple[Path, ...] = ()) -> bytes:
    """The bytes of an uploaded image: `bytes` as given, or a file that must lie inside `allowed_dirs`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        if not str(source).strip():
            raise RequestError(field, f"must be {_limit_text()}; got an empty value")
        if "\x00" in str(source):  # no file has such a name (Path.resolve would raise ValueError)
            raise RequestError(field, f"must be uploaded image data, not a path on the server ({_limit_text()})")
        try:
            path = Path(source).resolve(strict=True)
        except (OSError, RuntimeError):
            raise RequestError(field, f"the uploaded file is missing (it must be {_limit_text()})") from None
        roots = [Path(d).resolve() for d in allowed_dirs]
        if not any(path.is_relative_to(r) for r in roots):
            raise RequestError(field, f"must be uploaded image data, not a path on the server ({_limit_text()})")
        if not path.is_file():
            raise RequestError(field, f"the uploaded file is missing (it must be {_limit_text()})")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise RequestError(field, f"is {path.stat().st_size / 2**20:.1f} MB; the limit is {MAX_IMAGE_BYTES // 2**20} MB")
        data = path.read_bytes()
    else:
        raise RequestError(field, f"must be {_limit_text()}; got {type(source).__name__}")
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(field, f"is {len(data) / 2**20:.1f} MB; the limit is {MAX_IMAGE_BYTES // 2**20} MB")
    if not data:
        raise RequestError(field, f"is empty; it must be {_limit_text()}")
    return data


def decode_image(data: bytes, field: str):
    """Checked bytes → an RGB PIL image (alpha composited on black as PIL's convert does)."""
    from PIL import Image, UnidentifiedImageError

    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
                    fmt, (w, h) = probe.format, probe.size
                    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
                        raise RequestError(field, f"is {w}×{h} pixels; it must be {_limit_text()}")
                    probe.verify()  # structure and checksums, without decoding the pixels
                with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                    img.load()  # the whole image: a truncated file fails here
                    rgb = img.convert("RGB")
            except RequestError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise RequestError(field, f"decodes to more than {MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?); "
                                          f"it must be {_limit_text()}") from None
            except UnidentifiedImageError:
                raise RequestError(field, f"is not an image this server reads; it must be {_limit_text()}") from None
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise RequestError(field, f"could not be decoded ({str(exc)[:80] or type(exc).__name__}: a truncated or "
                                          f"damaged file?); it must be {_limit_text()}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    if fmt not in FORMATS:  # pragma: no cover - Image.open(formats=...) already refused it
        raise RequestError(field, f"is a {fmt} file; it must be {_limit_text()}")
    return rgb


def load_image(source: bytes | str | Path, field: str, allowed_dirs: tuple[Path, ...] = ()):
    """An uploaded image, checked and decoded: RGB PIL image."""
    return decode_image(read_image_bytes(source, field, allowed_dirs), field)


def image_tensor(img) -> Tensor:
    """RGB PIL image → (3, H, W) float32 in [-1, 1] (the official `to_tensor().sub_(0.5).div_(0.5)`)."""
    import numpy as np
    import torch

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)
