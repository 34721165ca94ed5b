"""Image-to-video through the real server: the embedded tiny I2V/FLF2V models, the official flags, the task's
defaults, and every layout / FSDP / block swap / offload / TeaCache / LoRA of a 2-rank gang equal to one process.

The images travel as the page's uploads do: files in the server's upload folder (outputs/.gradio-cache), named
by path in the request; the one-process reference runs the same requests in this process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.config import NEGATIVE_PROMPTS
from engine.request import RequestError
from tests.conftest import production_server, rel_err
from tests.multirank import ROOT, gang_env, latents, run_gang

BASE = {"prompt": "a cat walks on the grass", "size": "256*256", "frame_num": 9, "sample_steps": 3, "base_seed": 11}


def write_image(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory) -> Path:
    """The tiny I2V model in a models folder with one LoRA that touches the image branch (k_img) and a block."""
    from engine.tiny import ensure_tiny_model

    root = ensure_tiny_model(tmp_path_factory.mktemp("i2v") / "models", "i2v")
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name in ("blocks.0.cross_attn.k_img", "blocks.1.self_attn.q"):
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, 512, generator=g) * 0.05
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(512, 4, generator=g) * 0.05
    (root / "loras").mkdir(exist_ok=True)
    save_file(lora, str(root / "loras" / "img_branch.safetensors"))
    return root


def uploads(outputs: Path) -> dict[str, str]:
    """Two images in the server's upload folder: landscape 4:3 and portrait 3:4."""
    up = outputs / ".gradio-cache" / "up"
    return {"wide": str(write_image(up / "wide.png", 400, 300, 1)), "tall": str(write_image(up / "tall.png", 300, 400, 2))}


def requests(imgs: dict[str, str]) -> list[dict]:
    """The five requests every gang serves: plain, a LoRA, block swap + offload, TeaCache, a portrait image."""
    return [
        {**BASE, "image": imgs["wide"]},
        {**BASE, "image": imgs["wide"], "loras": [{"name": "img_branch.safetensors", "strength": 0.8}]},
        {**BASE, "image": imgs["wide"], "blocks_to_swap": 2, "offload_percent": 0.5},
        {**BASE, "image": imgs["wide"], "frame_num": 5, "sample_steps": 10, "teacache": 0.3},
        {**BASE, "image": imgs["tall"]},
    ]


@pytest.fixture(scope="module")
def reference(i2v_dir, tmp_path_factory):
    """Latents of the five requests in one process (and the sizes and skips they had)."""
    out = tmp_path_factory.mktemp("ref_out")
    server = production_server(i2v_dir, outputs_dir=str(out))
    got = []
    for raw in requests(uploads(out)):
        req = server.dispatcher.validate(raw).with_seed()
        res = server.execute(req, {"decode": False})
        got.append({"latents": res.latents, "size": req.size, "skipped": res.info["skipped_steps"],
                    "shift": req.sample_shift, "negative": req.negative_prompt})
    return got


def _gang(nproc, argv, layouts, i2v_dir, work: Path):
    imgs = uploads(work / "outputs")
    reqs = [{"raw": {**raw, **lay}, "save_latents": str(work / f"{i}.safetensors"), "decode": False}
            for i, (raw, lay) in enumerate(zip(requests(imgs), layouts))]
    results, log = run_gang(nproc, ["--dtype", "fp32", "--model_dir", str(i2v_dir), *argv], reqs, work, i2v_dir)
    assert [r["ok"] for r in results] == [True] * len(reqs), results
    return reqs, results, log


def _check(reqs, results, reference):
    for i, (req, res, ref) in enumerate(zip(reqs, results, reference)):
        err = rel_err(latents(req["save_latents"]), ref["latents"])
        assert err < 1e-5, f"request {i} ({req['raw']}): rel err {err:.2e}"
        assert res["meta"]["size"] == ref["size"]
        assert res["meta"]["skipped_steps"] == ref["skipped"]


def test_reference_requests_take_the_image_size_and_the_i2v_defaults(reference):
    assert [r["size"] for r in reference] == ["288*208", "288*208", "288*208", "288*208", "208*288"]
    assert reference[3]["skipped"], "TeaCache at 0.3 over 10 steps should skip some forwards"
    assert reference[0]["negative"] == NEGATIVE_PROMPTS["i2v"]
    assert rel_err(reference[1]["latents"], reference[0]["latents"]) > 1e-4, "the LoRA changed nothing"
    assert rel_err(reference[2]["latents"], reference[0]["latents"]) == 0, "block swap + offload must be exact"


@pytest.mark.multirank
@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_two_rank_gang_serves_image_to_video_in_every_layout_like_one_process(reference, i2v_dir, tmp_path, fsdp):
    u2, r2, cfg2 = {"ulysses_size": 2, "ring_size": 1}, {"ulysses_size": 1, "ring_size": 2}, {"cfg_size": 2, "ulysses_size": 1}
    layouts = [u2, r2, cfg2, u2, r2]
    reqs, results, log = _gang(2, ["--dit_fsdp", "--t5_fsdp"] if fsdp else [], layouts, i2v_dir, tmp_path)
    _check(reqs, results, reference)
    assert ("Applied FSDP to model (DiT and T5, 2 shards)" in log) == fsdp
    assert results[1]["meta"]["loras"]["loras"][0]["name"].startswith("img_branch")
    assert results[0]["meta"]["image"]["size"] == "400*300" and results[4]["meta"]["image"]["size"] == "300*400"


def test_i2v_compiled_equals_eager(i2v_dir, tmp_path):
    out = tmp_path / "out"
    imgs = uploads(out)
    raw = {**BASE, "image": imgs["wide"], "frame_num": 5, "sample_steps": 2}
    eager = production_server(i2v_dir, outputs_dir=str(out))
    want = eager.execute(eager.dispatcher.validate(raw).with_seed(), {"decode": False}).latents
    compiled = production_server(i2v_dir, outputs_dir=str(out), compile=True)
    got = compiled.execute(compiled.dispatcher.validate(raw).with_seed(), {"decode": False}).latents
    assert rel_err(got, want) < 1e-5


@pytest.fixture(scope="module")
def flf2v_dir(tmp_path_factory) -> Path:
    from engine.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("flf2v") / "models", "flf2v")


@pytest.mark.multirank
def test_first_last_frame_gang_ulysses2_equals_one_process(flf2v_dir, tmp_path):
    work = tmp_path / "gang"
    imgs = uploads(work / "outputs")
    raw = {**BASE, "image": imgs["wide"], "last_frame": imgs["tall"]}  # the last frame is covered + cropped
    one = production_server(flf2v_dir, outputs_dir=str(work / "outputs"))
    req = one.dispatcher.validate(raw).with_seed()
    want = one.execute(req, {"decode": False}).latents
    reqs = [{"raw": {**raw, "ulysses_size": 2}, "save_latents": str(work / "u2.safetensors"), "decode": False}]
    results, _ = run_gang(2, ["--dtype", "fp32", "--model_dir", str(flf2v_dir)], reqs, work, flf2v_dir)
    assert results[0]["ok"], results
    assert rel_err(latents(reqs[0]["save_latents"]), want) < 1e-5
    meta = results[0]["meta"]
    assert meta["model_size"] == "tiny-flf2v" and meta["negative_prompt"] == NEGATIVE_PROMPTS["flf2v"]
    assert set(meta) >= {"image", "last_frame"}


def test_requests_are_refused_without_an_image_or_with_one_too_many(i2v_dir, tmp_path):
    server = production_server(i2v_dir, outputs_dir=str(tmp_path))
    imgs = uploads(tmp_path)
    with pytest.raises(RequestError, match="image: the tiny-i2v image-to-video model needs image"):
        server.dispatcher.validate(dict(BASE))
    with pytest.raises(RequestError, match="last_frame: this server runs an image-to-video"):
        server.dispatcher.validate({**BASE, "image": imgs["wide"], "last_frame": imgs["tall"]})
    outside = write_image(tmp_path.parent / "outside.png", 64, 64, 3)
    with pytest.raises(RequestError, match="image: must be uploaded image data, not a path on the server"):
        server.dispatcher.validate({**BASE, "image": str(outside)})


def test_i2v_14b_defaults_follow_the_official_config():
    """40 steps; shift 3.0 at 832*480 / 480*832 and 5.0 at 720p unless given; the I2V negative prompt."""
    from engine.request import RequestLimits, validate_request

    limits = RequestLimits(model="i2v-14B", shift_by_size=True, default_negative=NEGATIVE_PROMPTS["i2v"])
    defaults = {"sample_steps": 40, "sample_shift": None}
    base = {"prompt": "x", "frame_num": 81}
    assert validate_request({**base, "size": "832*480"}, limits, defaults).sample_shift == 3.0
    assert validate_request({**base, "size": "480*832"}, limits, defaults).sample_shift == 3.0
    r720 = validate_request({**base, "size": "1280*720"}, limits, defaults)
    assert (r720.sample_shift, r720.sample_steps) == (5.0, 40)
    assert validate_request({**base, "size": "832*480", "sample_shift": 7}, limits, defaults).sample_shift == 7.0
    assert r720.negative_prompt == "镜头晃动，" + NEGATIVE_PROMPTS["t2v"]
    assert NEGATIVE_PROMPTS["flf2v"] == "镜头切换，" + NEGATIVE_PROMPTS["i2v"]


def test_headless_official_flags_run_the_embedded_tiny_i2v_model(tmp_path):
    """`--task i2v-14B --image PATH` with no weights: the embedded tiny I2V model, a video and its sidecar."""
    img = write_image(tmp_path / "in" / "first.jpg", 320, 240, 4)
    save = tmp_path / "out" / "v.mp4"
    cmd = [sys.executable, "app.py", "--task", "i2v-14B", "--image", str(img), "--prompt", "a cat",
           "--model_dir", str(tmp_path / "models"), "--frame_num", "5", "--sample_steps", "2", "--save_file", str(save)]
    proc = subprocess.run(cmd, cwd=ROOT, env=gang_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--task i2v-14B: no weights found, so the embedded tiny-i2v model (random weights) stands in" in proc.stderr
    meta = json.loads(save.with_suffix(".json").read_text())
    assert (meta["model_size"], meta["size"], meta["image"]["size"]) == ("tiny-i2v", "288*208", "320*240")
    assert save.read_bytes()[4:8] == b"ftyp"
    shutil.rmtree(tmp_path / "models")


@pytest.mark.parametrize(("argv", "message"), [
    (["--image", "/nonexistent/a.png"], "app.py: error: --image: /nonexistent/a.png: no such file"),
    (["--image", "{png}", "--first_frame", "{png}"], "--first_frame: give the first frame once"),
    (["--last_frame", "{png}"], "--last_frame: needs the first frame too (--first_frame PATH)"),
    (["--image", "{txt}"], "--image: is not an image this server reads; it must be a PNG, JPEG or WebP image"),
])
def test_bad_image_flags_stop_before_anything_loads(tmp_path, argv, message):
    png, txt = write_image(tmp_path / "a.png", 32, 32, 0), tmp_path / "a.txt"
    txt.write_text("not an image")
    argv = [a.format(png=png, txt=txt) for a in argv]
    proc = subprocess.run([sys.executable, "app.py", "--task", "i2v-14B", "--prompt", "x", *argv], cwd=ROOT,
                          env={**gang_env(), "WAN_CHECK_FLAGS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_teacache_coefficients_of_the_image_models_follow_the_area():
    from engine.teacache import COEFFICIENTS, coefficients_for

    assert coefficients_for("i2v-14B", 832 * 480) == COEFFICIENTS["i2v-14B-480P"]
    assert coefficients_for("i2v-14B", 1280 * 720) == COEFFICIENTS["i2v-14B-720P"]
    assert coefficients_for("flf2v-14B", 832 * 480) == COEFFICIENTS["i2v-14B-720P"]
    assert coefficients_for("14B", 832 * 480) == COEFFICIENTS["14B"]
