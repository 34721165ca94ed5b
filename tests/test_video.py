"""Output files: uint8 conversion, H.264 mp4 round trip, probe, atomic writes, names, sidecars, history."""

from __future__ import annotations

import json
import os
import re

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from engine import video as V

F, H, W = 17, 144, 208
NAME_RE = re.compile(r"wan_\d{8}-\d{6}_s42_[0-9a-f]{6}")


def synthetic_video(frames: int = F, h: int = H, w: int = W) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1]: a colour gradient with a bright square moving diagonally."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    v = torch.stack([xx, yy, -0.5 * (xx + yy)]).unsqueeze(1).repeat(1, frames, 1, 1).clone()
    for f in range(frames):
        y0, x0 = 8 + 4 * f, 10 + 8 * f
        v[:, f, y0:y0 + 32, x0:x0 + 32] = torch.tensor([1.0, 0.9, -0.8]).view(3, 1, 1)
    return v


def decode(path) -> np.ndarray:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    return np.stack([np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen])


def test_video_to_uint8_maps_range_layout_and_clamps():
    v = torch.zeros(3, 2, 2, 4)
    v[0, 0, 0, 0], v[1, 0, 0, 1], v[2, 1, 1, 3], v[0, 1, 0, 2] = -1.0, 1.0, 3.0, -7.0
    u = V.video_to_uint8(v)
    assert u.dtype == np.uint8 and u.shape == (2, 2, 4, 3)
    assert u[0, 0, 0, 0] == 0 and u[0, 0, 1, 1] == 255 and u[1, 1, 3, 2] == 255 and u[1, 0, 2, 0] == 0
    assert u[0, 1, 1, 1] == 128  # 0 -> 127.5 -> rounds to 128
    with pytest.raises(ValueError):
        V.video_to_uint8(torch.zeros(4, 1, 2, 2))


def test_mp4_round_trip_probe_and_decode(tmp_path):
    frames = V.video_to_uint8(synthetic_video())
    out = tmp_path / "clip.mp4"
    V.write_mp4(frames, out)
    info = V.probe_mp4(out)
    assert info == {"frames": 17, "width": 208, "height": 144, "codec": "h264", "pix_fmt": "yuv420p", "fps": 16.0}
    back = decode(out)
    assert back.shape == frames.shape
    assert np.abs(back.astype(np.float32) - frames.astype(np.float32)).mean() < 8
    # the moving square is really there in the decoded frames (frame 10: square at y 48..80, x 90..122)
    assert back[10, 60:70, 100:110, 0].mean() > 240 and back[0, 60:70, 100:110, 0].mean() < 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"], "atomic write left temp files"


def test_faststart_puts_moov_before_mdat(tmp_path):
    out = tmp_path / "fs.mp4"
    V.write_mp4(V.video_to_uint8(synthetic_video(frames=5)), out)
    data = out.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_size_not_multiple_of_16_is_not_rescaled_and_odd_size_is_rejected(tmp_path):
    out = tmp_path / "odd16.mp4"
    V.write_mp4(V.video_to_uint8(synthetic_video(frames=3, h=134, w=202)), out, fps=8)
    info = V.probe_mp4(out)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (202, 134, 3, 8.0)
    with pytest.raises(ValueError, match="even"):
        V.write_mp4(np.zeros((2, 11, 16, 3), np.uint8), tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()


def test_failed_write_leaves_no_temp_and_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise RuntimeError("encoder died")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken)
    with pytest.raises(RuntimeError):
        V.write_mp4(np.zeros((2, 16, 16, 3), np.uint8), out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_sidecar_path_rule_and_unicode_round_trip(tmp_path):
    assert V.sidecar_path("out/fox.mp4").as_posix() == "out/fox.json"
    assert V.sidecar_path(tmp_path / "a.b.mp4") == tmp_path / "a.b.json"
    meta = {"prompt": "一只狐狸在雪地里奔跑 🦊, café", "seed": 42, "steps": 50, "shift": 5.0}
    mp4 = tmp_path / "fox.mp4"
    side = V.write_sidecar(mp4, meta)
    assert side == tmp_path / "fox.json"
    text = side.read_text(encoding="utf-8")
    assert "一只狐狸" in text and "\\u" not in text and '\n  "seed": 42' in text
    assert V.read_sidecar(side) == meta and V.read_sidecar(mp4) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.json"]


def test_generated_names_have_no_prompt_text_and_do_not_collide(tmp_path):
    a, b = V.new_output_stem(tmp_path, 42), V.new_output_stem(tmp_path, 42)
    assert a.parent == tmp_path and b.parent == tmp_path and a != b
    assert NAME_RE.fullmatch(a.name) and NAME_RE.fullmatch(b.name)
    p = V.resolve_save_path(None, tmp_path / "outputs", 42)
    assert p.parent == tmp_path / "outputs" and p.suffix == ".mp4" and NAME_RE.fullmatch(p.stem)


def test_generated_name_skips_an_existing_file(tmp_path, monkeypatch):
    tokens = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(V.secrets, "token_hex", lambda n: next(tokens))
    monkeypatch.setattr(V.time, "strftime", lambda fmt: "20261124-083100")
    first = V.new_output_stem(tmp_path, 42)
    assert first.name == "wan_20261124-083100_s42_aaaaaa"
    (tmp_path / (first.name + ".json")).write_text("{}")
    assert V.new_output_stem(tmp_path, 42).name == "wan_20261124-083100_s42_bbbbbb"


def test_resolve_save_path_appends_mp4_and_creates_parents(tmp_path):
    p = V.resolve_save_path(str(tmp_path / "deep" / "dir" / "fox"), tmp_path / "outputs", 1)
    assert p == tmp_path / "deep" / "dir" / "fox.mp4" and p.parent.is_dir()
    q = V.resolve_save_path(str(tmp_path / "x" / "fox.mp4"), tmp_path / "outputs", 1)
    assert q == tmp_path / "x" / "fox.mp4" and q.parent.is_dir()
    assert V.resolve_save_path(str(tmp_path / "run.1"), tmp_path, 1).name == "run.1.mp4"
    assert not (tmp_path / "outputs").exists()  # a user path never touches the outputs dir


def test_list_history_newest_first_only_with_sidecars(tmp_path):
    for i, name in enumerate(["old", "new", "mid"]):
        mp4 = tmp_path / f"{name}.mp4"
        mp4.write_bytes(b"x")
        V.write_sidecar(mp4, {"prompt": name})
        t = {"old": 1000, "mid": 2000, "new": 3000}[name] + i
        os.utime(mp4, (t, t))
    (tmp_path / "orphan.mp4").write_bytes(b"x")  # no sidecar
    (tmp_path / "broken.mp4").write_bytes(b"x")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    hist = V.list_history(tmp_path)
    assert [h["name"] for h in hist] == ["new", "mid", "old"]
    assert hist[0]["meta"] == {"prompt": "new"} and hist[0]["video"] == str(tmp_path / "new.mp4")
    assert hist[0]["sidecar"] == str(tmp_path / "new.json")
    json.dumps(hist)  # serialisable for the UI
    assert V.list_history(tmp_path / "missing") == []
