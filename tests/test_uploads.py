"""Image inputs of the page (issue 17): the Controller with an image-to-video model (the image boxes, the raw
request, the refusals' messages, the uploads deleted with the request), uploads.py's record of the uploads, and
the real tiny-I2V app's upload and file routes (413, 400, 403, not served back, results still served)."""

from __future__ import annotations

import http.client
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.reliability_util import TRACEBACK
from tests.ui_server import SMALL, running_app

LIMIT = "a PNG, JPEG or WebP image of at most 20 MB and 8192 pixels a side (at least 16)"


def png_bytes(w: int = 64, h: int = 48, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A small valid PNG whose header declares 30000×30000 pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    w = h = 30000
    rows = zlib.compress(b"\x00" * (1 + w) * 64)  # a few rows of a grey image; the rest is missing
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


# -- uploads.py ----------------------------------------------------------------------------------------------
def test_release_deletes_only_files_inside_the_upload_folder_and_counts_references(tmp_path):
    from uploads import Uploads

    folder, outside = tmp_path / "out" / ".gradio-cache", tmp_path / "elsewhere"
    (folder / "h1").mkdir(parents=True)
    outside.mkdir()
    keep = outside / "a.png"
    keep.write_bytes(b"x")
    link = folder / "h1" / "link.png"
    link.symlink_to(keep)
    up = folder / "h1" / "a.png"
    up.write_bytes(b"x")
    uploads = Uploads(folder, tmp_path / "out", enabled=True)
    assert uploads.release(str(keep), str(link), f"{folder}/../../elsewhere/a.png", "/etc/passwd", None, 7, {}) == []
    assert keep.exists() and link.is_symlink()  # nothing outside the folder, nor a link out of it
    assert uploads.add([str(up), str(up), str(keep)], "owner") == [up, up]  # the same bytes uploaded twice
    assert uploads.release(str(up)) == [] and up.exists()  # one upload still refers to it
    assert uploads.release(str(up)) == [up] and not up.exists()
    other = folder / "h2" / "b.png"
    other.parent.mkdir()
    other.write_bytes(b"y")
    assert uploads.release(str(other)) == [other] and not other.parent.exists()  # never recorded: deleted, its folder too
    assert folder.is_dir() and keep.exists()
    old = folder / "h3" / "c.png"
    old.parent.mkdir()
    old.write_bytes(b"z")
    uploads.add([old], "owner")
    assert uploads.purge(max_age_s=3600) == [] and uploads.purge(max_age_s=0) == [old]  # abandoned uploads go too


def test_may_serve_results_to_anyone_and_an_upload_only_to_its_uploader_as_an_image(tmp_path):
    from uploads import Uploads

    outputs = tmp_path / "out"
    folder = outputs / ".gradio-cache"
    (folder / "r").mkdir(parents=True)
    (outputs / "wan_1.mp4").write_bytes(b"video")
    (folder / "r" / "wan_1.mp4").write_bytes(b"video")  # Gradio's copy of a result
    (folder / "r" / "wan_2.mp4").write_bytes(b"other")  # no such result
    (folder / "u").mkdir()
    for name in ("in.png", "evil.html"):
        (folder / "u" / name).write_bytes(b"img")
    uploads = Uploads(folder, outputs, enabled=True)
    uploads.add([folder / "u" / "in.png", folder / "u" / "evil.html"], "alice")
    assert uploads.may_serve(str(folder / "r" / "wan_1.mp4"), None)
    assert uploads.may_serve(str(outputs / "wan_1.mp4"), None)  # outside the folder: Gradio's own rules
    assert not uploads.may_serve(str(folder / "r" / "wan_2.mp4"), None)
    assert not uploads.may_serve(str(folder / "u" / "in.png"), None)
    assert not uploads.may_serve(str(folder / "u" / "in.png"), "mallory")
    assert uploads.may_serve(str(folder / "u" / "in.png"), "alice")  # the uploader's own preview
    assert not uploads.may_serve(str(folder / "u" / "evil.html"), "alice")  # never as a page of this origin
    assert not uploads.may_serve(f"{folder}/r/../u/in.png", None)
    assert not uploads.may_serve(str(folder / "u" / "missing.png"), None)


def test_upload_path_takes_the_path_of_gradio_file_data():
    from uploads import upload_path

    assert upload_path({"path": "/x/a.png", "meta": {"_type": "gradio.FileData"}}) == "/x/a.png"
    assert upload_path(SimpleNamespace(path="/x/b.png")) == "/x/b.png"
    assert upload_path("/etc/passwd") == "/etc/passwd"
    assert upload_path({"a": 1}) == {"a": 1} and upload_path(None) is None and upload_path(3) == 3


# -- the Controller with an image-to-video model (nothing loaded) -------------------------------------------------
def fake_server(tmp_path: Path, images: int):
    """A rank-0 Server stand-in: the tiny I2V (images 1) or FLF2V (2) model's limits on one rank."""
    from engine.cli import RunConfig, upload_dir
    from engine.config import TINY_SIZES
    from engine.factory import ModelInfo
    from engine.request import RequestLimits
    from parallel.apply import ParallelState
    from parallel.layout import resolve_layout
    from parallel.runtime import Runtime
    from parallel.serve import Dispatcher

    cfg = RunConfig(outputs_dir=str(tmp_path / "outputs"))
    key = {0: "tiny", 1: "tiny-i2v", 2: "tiny-flf2v"}[images]
    rt = Runtime(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    limits = RequestLimits(model=key, sizes=TINY_SIZES, any_multiple_of_16=True, num_blocks=3, image_inputs=images,
                           upload_dirs=(str(upload_dir(cfg)),) if images else ())
    info = ModelInfo(key, SimpleNamespace(random_weights=True), 4, 3, torch.float32, limits,
                     {"size": "208*144", "frame_num": 5, "sample_steps": 2, "sample_shift": 5.0,
                      "sample_guide_scale": 5.0, "sample_solver": "unipc", "base_seed": -1, "batch_size": 1,
                      "negative_prompt": "", "teacache": 0.0})
    state = ParallelState(rt, info, SimpleNamespace(name="sdpa"), None, resolve_layout(1, 4, None, None))
    server = SimpleNamespace(rt=rt, state=state, cfg=cfg, last_memory=[])
    server.dispatcher = Dispatcher(server)
    return server


def upload(server, name: str = "in.png", data: bytes | None = None) -> Path:
    """A file where Gradio stores an upload: outputs/.gradio-cache/<hash>/<name>."""
    from engine.cli import upload_dir

    path = upload_dir(server.cfg) / os.urandom(8).hex() / name
    path.parent.mkdir(parents=True)
    path.write_bytes(png_bytes() if data is None else data)
    return path


FORM = {"prompt": "a cat", "negative_prompt": "", "size": "208*144", "frame_num": 5, "sample_steps": 2,
        "sample_guide_scale": 5.0, "sample_shift": 5.0, "base_seed": 1, "sample_solver": "unipc", "batch_size": 1,
        "ulysses_size": 1, "ring_size": 1, "cfg_size": 1, "offload_percent": 0.0, "blocks_to_swap": 0, "teacache": 0.0}


def run_generate(ctl, **values) -> list:
    """Every status line of Controller.generate (a refusal ends in gr.Error: swallowed here)."""
    import gradio as gr

    outs = []
    try:
        for out in ctl.generate(**{**FORM, **values}, request=SimpleNamespace(session_hash="s")):
            outs.append(out[-1])
    except gr.Error:
        pass
    return outs


@pytest.mark.parametrize("images, boxes", [(0, []), (1, ["image"]), (2, ["image", "last_frame"])],
                         ids=["t2v", "i2v", "flf2v"])
def test_the_page_has_image_boxes_only_for_image_models_and_generate_takes_them_by_name(tmp_path, monkeypatch,
                                                                                          images, boxes):
    from app import build_ui
    from ui import FORM_KEYS

    for name in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED"):
        monkeypatch.setenv(name, "")
    server = fake_server(tmp_path, images)
    demo = build_ui(server, server.cfg)
    comps = {c["props"].get("elem_id"): c for c in demo.config["components"] if c["props"].get("elem_id")}
    assert [k for k in ("image", "last_frame") if k in comps] == boxes
    for name in boxes:
        assert comps[name]["type"] == "image" and comps[name]["props"]["sources"] == ["upload", "clipboard"]
    assert ("image-note" in comps) == bool(images)
    if images:
        assert "shape follows the first frame's aspect ratio; Size gives its area" in comps["image-note"]["props"]["value"]
        assert "the area; the shape follows the image" in comps["size"]["props"]["info"]
    title = comps["title"]["props"]["value"]
    assert title.startswith({0: "## Wan2.1 text-to-video", 1: "## Wan2.1 image-to-video",
                             2: "## Wan2.1 first-last-frame-to-video"}[images])
    params = demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in params] == [*FORM_KEYS, *boxes]  # text-to-video: the 18 of before
    for p in params[len(FORM_KEYS):]:
        assert p["python_type"]["type"] == "filepath"  # gradio_client: handle_file(path)
    assert demo.controller.uploads.enabled == bool(images)


def test_raw_request_carries_the_uploaded_path_and_the_image_sets_the_shape(tmp_path):
    from ui import Controller

    server = fake_server(tmp_path, 1)
    ctl = Controller(server, server.cfg)
    path = upload(server)
    raw = ctl.raw_request(**FORM, image={"path": str(path), "meta": {"_type": "gradio.FileData"}})
    assert raw["image"] == str(path) and "last_frame" not in raw
    req = ctl.dispatcher.validate(raw)
    assert req.image[:8] == b"\x89PNG\r\n\x1a\n" and (req.width, req.height) == (192, 144)  # 4:3 at about 208*144
    server_t2v = fake_server(tmp_path / "t2v", 0)
    assert "image" not in Controller(server_t2v, server_t2v.cfg).raw_request(**FORM)  # as before


@pytest.mark.parametrize("value, message", [
    (None, "image: the tiny-i2v image-to-video model needs image (a PNG, JPEG or WebP image)"),
    ("/etc/passwd", f"image: must be uploaded image data, not a path on the server ({LIMIT})"),
    ("UPLOAD/" + "../" * 30 + "etc/passwd", f"image: must be uploaded image data, not a path on the server ({LIMIT})"),
    ("UPLOAD/gone.png", f"image: the uploaded file is missing (it must be {LIMIT})"),
    ("UPLOAD/x\x00.png", f"image: must be uploaded image data, not a path on the server ({LIMIT})"),
    (b"random", f"image: is not an image this server reads; it must be {LIMIT}"),
    (b"", f"image: is empty; it must be {LIMIT}"),
    (b"gif", f"image: is not an image this server reads; it must be {LIMIT}"),
    (b"truncated", "image: could not be decoded ("),
    (b"bomb", f"image: decodes to more than 67,108,864 pixels (a decompression bomb?); it must be {LIMIT}"),
    (12, f"image: must be {LIMIT}; got int"),
    ({"a": 1}, f"image: must be {LIMIT}; got dict"),
], ids=["missing", "system_path", "dotdot", "deleted_upload", "nul_in_path", "random_bytes", "empty", "gif", "truncated_png",
        "bomb", "int", "dict"])
def test_a_bad_image_is_refused_naming_the_field_and_the_limit_in_the_status_line(tmp_path, value, message):
    from engine.cli import upload_dir
    from ui import Controller

    server = fake_server(tmp_path, 1)
    ctl = Controller(server, server.cfg)
    server.dispatcher.submit = lambda *a, **k: pytest.fail("a refused request reached the gang")
    files = {b"random": os.urandom(2000), b"": b"", b"gif": b"GIF89a" + png_bytes()[8:],
             b"truncated": png_bytes(256, 256)[:3000], b"bomb": bomb_png()}
    if isinstance(value, bytes):
        value = str(upload(server, data=files[value]))
    elif isinstance(value, str):
        upload_dir(server.cfg).mkdir(parents=True, exist_ok=True)
        value = value.replace("UPLOAD", str(upload_dir(server.cfg)))
    outs = run_generate(ctl, image=value)
    assert outs[-1].startswith(f"Error: {message}"), outs
    assert not [p for p in upload_dir(server.cfg).rglob("*") if p.is_file()]  # the refused upload is gone too


def test_uploads_are_deleted_when_the_request_completes_fails_or_is_cancelled(tmp_path):
    from engine.pipeline import Cancelled
    from ui import Controller

    server = fake_server(tmp_path, 2)
    ctl = Controller(server, server.cfg)
    outside = tmp_path / "mine.png"
    outside.write_bytes(png_bytes())
    seen = []

    def ends(how):
        def submit(raw, progress=None, **_):
            seen.append((Path(raw["image"]).exists(), Path(raw["last_frame"]).exists()))
            if how == "fails":
                raise RuntimeError("rank 1 failed at step 1: boom")
            if how == "cancelled":
                raise Cancelled("cancelled at step 1")
            out = SimpleNamespace(videos=[tmp_path / "v.mp4"], sidecars=[], request=SimpleNamespace(base_seed=1),
                                  meta={"timings": {}, "image": {"size": "64*48", "sha256": "ab" * 32}})
            return out
        return submit

    for how, last in (("completes", "Done"), ("fails", "Error: generation failed"), ("cancelled", "Cancelled at step 1")):
        server.dispatcher.submit = ends(how)
        first, end = upload(server, "first.png"), upload(server, "last.png")
        outs = run_generate(ctl, image=str(first), last_frame={"path": str(end)})
        assert outs[-1].startswith(last), outs
        if how == "completes":
            assert "first frame 64*48 (sha256 abababababab…)" in outs[-1]
        assert seen[-1] == (True, True) and not first.exists() and not end.exists(), how
        assert not first.parent.exists()  # Gradio's hash folder goes with it
    server.dispatcher.submit = ends("completes")
    outs = run_generate(ctl, image=str(outside), last_frame=str(upload(server)))
    assert outs[-1].startswith("Error: image: must be uploaded image data, not a path on the server")
    assert outside.exists()  # never deleted: not an upload
    ctl.is_waiting = lambda session: True  # cancelled while waiting in the queue
    ctl.cancel(SimpleNamespace(session_hash="s"))
    first = upload(server)
    assert run_generate(ctl, image=str(first), last_frame=str(upload(server))) == ["Cancelled before it started."]
    assert not first.exists()


def test_the_status_line_and_history_name_the_conditioning_images(tmp_path):
    from ui_parts import done_text, history_items, image_text

    meta = {"image": {"sha256": "1a2b3c4d5e6f7a8b" * 4, "size": "400*300"},
            "last_frame": {"sha256": "ffee" * 16, "size": "300*400"}}
    assert image_text(meta) == "first frame 400*300 (sha256 1a2b3c4d5e6f…), last frame 300*400 (sha256 ffeeffeeffee…)"
    assert image_text({}) == ""
    out = SimpleNamespace(videos=["a.mp4"], request=SimpleNamespace(base_seed=7), meta={"timings": {}, **meta})
    assert done_text(out).endswith(" · seed 7 · first frame 400*300 (sha256 1a2b3c4d5e6f…), last frame 300*400 "
                                   "(sha256 ffeeffeeffee…)")
    (tmp_path / "wan_x.mp4").write_bytes(b"")
    (tmp_path / "wan_x.json").write_text(json.dumps({"prompt": "a cat", "seed": 3, "size": "192*144", "frame_num": 5,
                                                     **meta}))
    gallery, _ = history_items(tmp_path)
    assert gallery[0][1].endswith("· 192*144 · 5 frames · from a 400*300 image")


def test_show_history_says_which_image_made_the_video(tmp_path):
    from ui import Controller

    server = fake_server(tmp_path, 1)
    outputs = Path(server.cfg.outputs_dir)
    outputs.mkdir(parents=True)
    (outputs / "wan_x.mp4").write_bytes(b"")
    meta = {"prompt": "a cat", "seed": 3, "image": {"sha256": "ab" * 32, "size": "400*300"}}
    (outputs / "wan_x.json").write_text(json.dumps(meta))
    out = Controller(server, server.cfg).show_history([str(outputs / "wan_x.mp4")], SimpleNamespace(index=0))
    assert out[3]["image"] == meta["image"]  # the details show the sidecar's image
    assert out[4] == ("Showing wan_x.mp4 from the history; its settings are back in the form. It was made from the "
                      "first frame 400*300 (sha256 abababababab…); uploads are not kept: upload the image again.")


# -- the real tiny-I2V app ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def i2v_app(tmp_path_factory, tiny_model_dir):
    """app.py --task i2v-14B without weights: the embedded tiny I2V model (beside the tiny text-to-video one)."""
    with running_app(tmp_path_factory.mktemp("i2v_page"), tiny_model_dir, "--task", "i2v-14B") as running:
        running.uploads = running.outputs / ".gradio-cache"
        yield running


def uploaded_images(app) -> list[Path]:
    """Files in the upload folder that are not Gradio's copies of results (mp4 / json)."""
    return [p for p in app.uploads.rglob("*") if p.is_file() and p.suffix not in (".mp4", ".json")]


def post_upload(app, files, cookies=None) -> httpx.Response:
    return httpx.post(app.url + "/gradio_api/upload", files=files, cookies=cookies, timeout=60)


def test_i2v_api_generates_from_an_uploaded_image_and_deletes_the_upload(i2v_app, tmp_path):
    from gradio_client import Client, handle_file

    src = tmp_path / "wide.png"
    src.write_bytes(png_bytes(160, 120, seed=4))
    before = set(i2v_app.videos())
    video, files, seed, meta, status = Client(i2v_app.url, verbose=False, download_files=False).predict(
        prompt="a cat", image=handle_file(str(src)), api_name="/generate", **SMALL)
    (mp4,) = sorted(set(i2v_app.videos()) - before)
    side = json.loads(mp4.with_suffix(".json").read_text())
    assert side["image"]["size"] == "160*120" and meta["image"] == side["image"]
    assert side["size"] == "192*144"  # the image's 4:3 at the area of 208*144
    assert status.startswith("Done") and "first frame 160*120 (sha256 " in status
    assert uploaded_images(i2v_app) == []  # deleted with the job


def test_i2v_upload_route_refuses_big_bodies_many_files_and_other_content_types(i2v_app):
    from uploads import MAX_UPLOAD_BODY

    conn = http.client.HTTPConnection("127.0.0.1", int(i2v_app.url.rsplit(":", 1)[1]), timeout=30)
    conn.putrequest("POST", "/gradio_api/upload")  # declared too big: answered before a byte of it is sent
    conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
    conn.putheader("Content-Length", str(MAX_UPLOAD_BODY + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "at most 2 files of 20 MB" in json.loads(r.read())["detail"]
    conn.close()

    def chunks():  # no Content-Length (chunked): refused once the body grows past the limit
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(MAX_UPLOAD_BODY // 2**20 + 2):
            yield b"\0" * 2**20

    with _maybe_reset():
        r = httpx.post(i2v_app.url + "/gradio_api/upload", content=chunks(), timeout=60,
                       headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        assert r.status_code == 413, r.text
    big = post_upload(i2v_app, {"files": ("big.png", b"\0" * (20 * 2**20 + 1))})  # one file over 20 MB: Gradio's 413
    assert big.status_code == 413 and "maximum allowed size of 20971520 bytes" in big.text
    three = post_upload(i2v_app, [("files", (f"{i}.png", png_bytes(seed=i))) for i in range(3)])
    assert three.status_code == 400 and "this one has 3 parts" in three.json()["detail"]
    r = httpx.post(i2v_app.url + "/gradio_api/upload", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "multipart/form-data" in r.text
    two = post_upload(i2v_app, [("files", (f"{i}.png", png_bytes(seed=10 + i))) for i in range(2)])
    assert two.status_code == 200 and len(two.json()) == 2
    for p in two.json():
        assert Path(p).resolve().is_relative_to(i2v_app.uploads.resolve())  # stored in the server's own folder
    assert not any(TRACEBACK.search(x) for x in (big.text, three.text)) and "Traceback" not in i2v_app.log(100_000)


class _maybe_reset:
    """The server may answer 413 and close while the client still sends: a reset is an answer as good as 413."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError))


def test_uploads_are_not_served_to_other_clients_and_results_still_are(i2v_app, tmp_path):
    from gradio_client import Client, handle_file

    up = post_upload(i2v_app, {"files": ("secret.png", png_bytes(seed=21))})
    (path,) = up.json()
    assert "wan_uploader=" in up.headers["set-cookie"] and "HttpOnly" in up.headers["set-cookie"]
    for target in (f"/gradio_api/file={path}", f"/gradio_api/file/{path}", f"/gradio_api/file={Path(path).parent}/../"
                   f"{Path(path).parent.name}/{Path(path).name}"):
        r = httpx.get(i2v_app.url + target)
        assert r.status_code == 403 and r.json()["detail"] == "uploaded files are not served", target
    assert httpx.get(i2v_app.url + f"/gradio_api/file={path}", cookies=up.cookies).content == png_bytes(seed=21)
    html = post_upload(i2v_app, {"files": ("evil.html", b"<script>alert(1)</script>")}, cookies=up.cookies)
    (page,) = html.json()
    assert httpx.get(i2v_app.url + f"/gradio_api/file={page}", cookies=up.cookies).status_code == 403  # not even its uploader
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes(seed=22))
    video = Client(i2v_app.url, verbose=False, download_files=False).predict(
        prompt="served", image=handle_file(str(src)), api_name="/generate", **SMALL)[0]
    url = video["video"]["url"] if "video" in video else video["url"]
    r = httpx.get(url)
    assert r.status_code == 200 and r.content[4:8] == b"ftyp"  # a result is served from Gradio's copy


def test_the_api_refuses_file_data_outside_the_uploads_naming_the_image(i2v_app):
    from tests.reliability_util import QueueClient

    qc = QueueClient(i2v_app.url, login=False)
    try:
        data = ["a cat", "", "208*144", 5, 2, 5.0, 5.0, 1, "unipc", 1, None, None, None, None, None, 0.0, [], ""]
        answers = [qc.call([*data, {"path": p, "meta": {"_type": "gradio.FileData"}}])
                   for p in ("/etc/passwd", f"{i2v_app.uploads}/" + "../" * 30 + "etc/passwd")]
        answers.append(qc.call([*data, "/etc/passwd"]))
    finally:
        qc.close()
    assert [a.error for a in answers] == [f"image: must be uploaded image data, not a path on the server ({LIMIT})"] * 3
    assert not any(TRACEBACK.search(a.raw) or "root:x:0:0" in a.raw for a in answers)
    assert "Traceback" not in i2v_app.log(100_000)  # Gradio never saw them as files (uploads.GuardFileData)


def test_text_to_video_refuses_every_upload(tmp_path, tiny_model_dir):
    """Covered for the t2v app in test_ui (403); here: the refusal's words and that nothing is stored."""
    from engine.cli import RunConfig, upload_dir
    from uploads import GuardUploads, Uploads

    cfg = RunConfig(outputs_dir=str(tmp_path / "outputs"))
    sent = []

    async def app(scope, receive, send):
        sent.append(scope)

    async def call():
        answer = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            answer.append(message)

        guard = GuardUploads(app, Uploads(upload_dir(cfg), cfg.outputs_dir, enabled=False))
        await guard({"type": "http", "method": "POST", "path": "/gradio_api/upload", "headers": []}, receive, send)
        return answer

    import asyncio

    answer = asyncio.run(call())
    assert answer[0]["status"] == 403 and b"its model takes no images" in answer[1]["body"] and sent == []


def test_file_data_naming_no_upload_becomes_a_plain_value_before_gradio_sees_it(tmp_path):
    from uploads import Uploads, strip_file_data

    folder = tmp_path / "out" / ".gradio-cache"
    uploads = Uploads(folder, tmp_path / "out", enabled=True)
    fd = {"meta": {"_type": "gradio.FileData"}}
    ours = {"path": str(folder / "h" / "a.png"), **fd}
    data = ["a cat", {"path": "/etc/passwd", **fd}, ours, [{"path": "http://example.com/x.png", "url": "u", **fd}],
            {"path": 5, **fd}, {"path": "/etc/passwd"}]
    out, changed = strip_file_data(data, uploads)
    assert changed and out == ["a cat", "/etc/passwd", ours, ["http://example.com/x.png"], 5, {"path": "/etc/passwd"}]
    assert strip_file_data(["a cat", ours], uploads) == (["a cat", ours], False)


def test_flf2v_api_takes_first_and_last_frame_and_deletes_both(tmp_path, tiny_model_dir):
    from gradio_client import Client, handle_file

    first, last = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(png_bytes(160, 120, seed=31))
    last.write_bytes(png_bytes(120, 160, seed=32))  # another shape: fitted to the first frame's
    with running_app(tmp_path / "flf2v", tiny_model_dir, "--task", "flf2v-14B") as app:
        out = Client(app.url, verbose=False, download_files=False).predict(
            prompt="day turns to night", image=handle_file(str(first)), last_frame=handle_file(str(last)),
            api_name="/generate", **SMALL)
        side = json.loads(app.videos()[0].with_suffix(".json").read_text())
        left = [p for p in (app.outputs / ".gradio-cache").rglob("*.png")]
    assert out[4].startswith("Done") and "first frame 160*120" in out[4] and "last frame 120*160" in out[4]
    assert (side["image"]["size"], side["last_frame"]["size"], side["size"]) == ("160*120", "120*160", "192*144")
    assert left == []
