"""Uploaded conditioning images are hostile: only PNG/JPEG/WebP within the limits, every refusal names the field."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from engine.images import MAX_IMAGE_BYTES, image_tensor, load_image
from engine.request import RequestError

LIMIT = "a PNG, JPEG or WebP image of at most 20 MB and 8192 pixels a side (at least 16)"


def encoded(fmt: str, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 100, 50) if mode == "RGB" else (200, 100, 50, 128)).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w×h pixels, with a few compressed rows of data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * w) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_read_as_rgb(fmt):
    img = load_image(encoded(fmt), "image")
    assert img.mode == "RGB" and img.size == (40, 30)
    t = image_tensor(img)
    assert t.shape == (3, 30, 40) and t.dtype == torch.float32 and -1 <= t.min() <= t.max() <= 1


def test_an_rgba_png_becomes_rgb():
    assert load_image(encoded("PNG", mode="RGBA"), "image").mode == "RGB"


def test_pixel_values_map_to_minus_one_one_like_the_official_to_tensor():
    t = image_tensor(load_image(encoded("PNG"), "image"))
    assert torch.allclose(t[:, 0, 0], torch.tensor([200, 100, 50]) / 255 * 2 - 1)


@pytest.mark.parametrize("data, message", [
    (b"not an image at all", f"image: is not an image this server reads; it must be {LIMIT}"),
    (encoded("GIF"), f"image: is not an image this server reads; it must be {LIMIT}"),
    (encoded("BMP"), f"image: is not an image this server reads; it must be {LIMIT}"),
    (b"", f"image: is empty; it must be {LIMIT}"),
    (png_header_only(20000, 20000),  # Pillow's own guard fires while reading the header
     f"image: decodes to more than 67,108,864 pixels (a decompression bomb?); it must be {LIMIT}"),
    (png_header_only(9000, 100), f"image: is 9000×100 pixels; it must be {LIMIT}"),
    (encoded("PNG", size=(8, 8)), f"image: is 8×8 pixels; it must be {LIMIT}"),
])
def test_what_is_not_an_allowed_image_is_refused_naming_the_field_and_the_limit(data, message):
    with pytest.raises(RequestError) as err:
        load_image(data, "image")
    assert str(err.value) == message and err.value.field == "image"


def test_a_truncated_file_is_refused():
    data = encoded("PNG", size=(300, 200))
    with pytest.raises(RequestError, match=r"^last_frame: could not be decoded \(.*\); it must be a PNG"):
        load_image(data[: len(data) // 2], "last_frame")


def test_too_many_bytes_are_refused_before_decoding():
    with pytest.raises(RequestError, match=r"^image: is 20.0 MB; the limit is 20 MB$"):
        load_image(b"\x89PNG" + b"\0" * MAX_IMAGE_BYTES, "image")


def test_paths_only_inside_the_upload_folder(tmp_path):
    uploads, elsewhere = tmp_path / "uploads", tmp_path / "elsewhere"
    uploads.mkdir()
    elsewhere.mkdir()
    (uploads / "a.png").write_bytes(encoded("PNG"))
    (elsewhere / "b.png").write_bytes(encoded("PNG"))
    assert load_image(uploads / "a.png", "image", (uploads,)).size == (40, 30)
    with pytest.raises(RequestError, match="^image: must be uploaded image data, not a path on the server"):
        load_image(elsewhere / "b.png", "image", (uploads,))
    with pytest.raises(RequestError, match="^image: must be uploaded image data, not a path on the server"):
        load_image("/etc/passwd", "image", (uploads,))
    with pytest.raises(RequestError, match="^image: must be uploaded image data, not a path"):
        load_image(uploads / ".." / "elsewhere" / "b.png", "image", (uploads,))
    with pytest.raises(RequestError, match="^image: the uploaded file is missing"):
        load_image(uploads / "gone.png", "image", (uploads,))
    (uploads / "link.png").symlink_to(elsewhere / "b.png")
    with pytest.raises(RequestError, match="^image: must be uploaded image data, not a path"):
        load_image(uploads / "link.png", "image", (uploads,))
    with pytest.raises(RequestError, match="^image: must be a PNG, JPEG or WebP image .*; got int"):
        load_image(7, "image")


# -- the request's image fields ------------------------------------------------------------------------------
def _limits(inputs: int):
    from engine.config import TINY_SIZES
    from engine.request import RequestLimits

    return RequestLimits(model="tiny", sizes=TINY_SIZES, any_multiple_of_16=True, image_inputs=inputs)


def test_an_image_to_video_request_takes_its_size_from_the_image_and_the_area():
    from engine.request import validate_request

    req = validate_request({"prompt": "a fox", "size": "832*480", "frame_num": 5, "image": encoded("PNG", (1280, 720))},
                           _limits(1))
    assert (req.width, req.height) == (832, 464) and req.last_frame is None
    assert Image.open(io.BytesIO(req.image)).format == "PNG"


def test_image_fields_are_required_or_refused_by_the_model_kind():
    from engine.request import validate_request

    base = {"prompt": "a fox", "size": "64*64", "frame_num": 5}
    with pytest.raises(RequestError, match="^image: this server runs a text-to-video model of size tiny; it takes no image$"):
        validate_request({**base, "image": encoded("PNG")}, _limits(0))
    with pytest.raises(RequestError, match="^image: the tiny image-to-video model needs image"):
        validate_request(base, _limits(1))
    with pytest.raises(RequestError, match="^last_frame: this server runs an image-to-video .one image. model"):
        validate_request({**base, "image": encoded("PNG"), "last_frame": encoded("PNG")}, _limits(1))
    with pytest.raises(RequestError, match="^last_frame: the tiny image-to-video model needs last_frame"):
        validate_request({**base, "image": encoded("PNG")}, _limits(2))
    with pytest.raises(RequestError, match="^last_frame: is not an image this server reads"):
        validate_request({**base, "image": encoded("PNG"), "last_frame": b"junk"}, _limits(2))
    with pytest.raises(RequestError, match="^frame_num: first-last-frame video needs at least 5 frames"):
        validate_request({**base, "frame_num": 1, "image": encoded("PNG"), "last_frame": encoded("PNG")}, _limits(2))
    both = validate_request({**base, "image": encoded("PNG"), "last_frame": encoded("JPEG", (80, 40))}, _limits(2))
    assert both.image and both.last_frame
