"""The web UI and its API: the real app in a subprocess (tiny model, CPU), driven with gradio_client and
plain HTTP; plus the UI's checks against a 14B / 4-rank configuration without loading anything."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from tests.ui_server import ROOT, SMALL, running_app

USER, PASSWORD = "tester", "s3cret-pass"


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    """One app for the module: login required, at most one request waiting."""
    with running_app(tmp_path_factory.mktemp("ui"), tiny_model_dir, "--auth", f"{USER}:{PASSWORD}",
                     "--queue_size", "1") as running:
        yield running


def client(app):
    from gradio_client import Client

    return Client(app.url, auth=(USER, PASSWORD), verbose=False, download_files=False)


@contextlib.contextmanager
def logged_in_http(app) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app.url, timeout=30) as http:
        r = http.post("/login", data={"username": USER, "password": PASSWORD})
        assert r.status_code == 200, r.text
        yield http


def video_path(value) -> str:
    """gradio_client's value for a Video output: a path/URL string or a {'video': ...} dict."""
    if isinstance(value, dict):
        value = value.get("video", value)
        if isinstance(value, dict):
            value = value.get("path") or value.get("url")
    return str(value)


# -- end to end ---------------------------------------------------------------------------------------------
def test_generate_api_returns_the_mp4_first_and_the_seed_used(app):
    from engine.video import probe_mp4

    before = set(app.videos())
    video, files, seed_used, meta, status = client(app).predict(
        prompt="a red fox in the snow", base_seed=-1, api_name="/generate", **SMALL)
    new = sorted(set(app.videos()) - before)
    assert len(new) == 1, app.log()
    mp4 = new[0]
    assert video_path(video).endswith(mp4.name)  # the first output is the mp4
    side = json.loads(mp4.with_suffix(".json").read_text())
    assert int(seed_used) >= 0 and side["seed"] == int(seed_used) == meta["seed"]  # -1 became a concrete, reported seed
    assert f"_s{seed_used}_" in mp4.name
    assert (side["size"], side["frame_num"], side["steps"]) == ("208*144", 5, 2)
    info = probe_mp4(mp4)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (208, 144, 5, "h264")
    assert "Done" in status and str(seed_used) in status


@pytest.mark.parametrize(
    ("values", "field", "allowed"),
    [
        ({"frame_num": 80}, "frame_num", "4n+1"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 10_000}, "prompt", "at most 2000 characters"),
        ({"size": "100*100"}, "size", "multiples of 16"),
        ({"sample_steps": 0}, "sample_steps", "between 1 and 200"),
        ({"base_seed": -7}, "base_seed", "between -1 and"),
        ({"layout": "ulysses 3 × ring 1"}, "layout", "must be one of: ulysses 1 × ring 1"),
    ],
    ids=["frames_80", "empty_prompt", "prompt_10000_chars", "size_not_multiple_of_16", "steps_0", "seed_-7",
         "layout_not_offered"],
)
def test_invalid_request_is_refused_with_the_field_and_allowed_values(app, values, field, allowed):
    from gradio_client.exceptions import AppError

    before = app.videos()
    args = {"prompt": "a cat", **SMALL, **values}
    with pytest.raises(AppError) as err:
        client(app).predict(api_name="/generate", **args)
    message = str(err.value)
    assert message.startswith(f"{field}:") and allowed in message, message
    assert "Traceback" not in message
    assert app.videos() == before  # nothing ran


def test_direct_post_to_the_run_route_is_refused(app):
    before = app.videos()
    with logged_in_http(app) as http:
        for route in ("/gradio_api/run/generate", "/gradio_api/api/generate"):
            r = http.post(route, json={"data": ["a cat", "", "208*144", 5, 2, 5.0, 5.0, 1, "unipc", 1,
                                                "ulysses 1 × ring 1", 0.0]})
            assert r.status_code == 404 and "join the queue" in r.json()["detail"], (route, r.text)
        assert http.post("/gradio_api/upload", files={"files": ("x.txt", b"x")}).status_code == 403
        assert "not enabled" in http.get("/monitoring").text
    assert app.videos() == before


def test_every_route_needs_the_login(app):
    r = httpx.post(app.url + "/gradio_api/queue/join", json={"data": ["a cat"], "fn_index": 0, "session_hash": "x"})
    assert r.status_code == 401
    from gradio_client import Client

    with pytest.raises(Exception, match="(?i)login|auth|401"):
        Client(app.url, auth=(USER, "wrong"), verbose=False)


def test_full_queue_answers_busy(app):
    """queue_size 1: one request runs, one waits, the next is turned away with 'busy' / 'queue is full'."""
    from gradio_client.utils import Status

    running = client(app).submit(prompt="runs", api_name="/generate", **{**SMALL, "sample_steps": 6})
    waiting = None
    deadline = time.monotonic() + 60
    while running.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.ITERATING):
        assert time.monotonic() < deadline and not running.done(), running.status()
        time.sleep(0.1)
    waiting = client(app).submit(prompt="waits", api_name="/generate", **SMALL)
    while waiting.status().code != Status.IN_QUEUE:
        assert time.monotonic() < deadline and not waiting.done(), waiting.status()
        time.sleep(0.1)
    fn_index = next(d["id"] for d in client(app).config["dependencies"] if d.get("api_name") == "generate")
    with logged_in_http(app) as http:
        r = http.post("/gradio_api/queue/join", json={"data": ["refused", "", "208*144", 5, 2, 5.0, 5.0, -1, "unipc",
                                                                1, "ulysses 1 × ring 1", 0.0],
                                                       "fn_index": fn_index, "session_hash": "third"})
    assert r.status_code == 503 and "Queue is full" in r.json()["detail"], r.text
    with pytest.raises(Exception, match="Queue is full"):
        client(app).predict(prompt="refused too", api_name="/generate", **SMALL)
    assert "Done" in running.result(timeout=120)[4] and "Done" in waiting.result(timeout=120)[4]  # both complete


# -- the UI's checks against a real-model, 4-rank configuration (nothing loaded) ---------------------------------
@pytest.fixture
def fake_14b_server():
    """A rank-0 Server stand-in: 14B (40 heads) on 4 ranks, the real Dispatcher.validate and layout logic."""
    from engine.cli import RunConfig
    from engine.config import SUPPORTED_SIZES
    from engine.factory import ModelInfo
    from engine.request import RequestLimits
    from parallel.apply import ParallelState
    from parallel.layout import resolve_layout
    from parallel.runtime import Runtime
    from parallel.serve import Dispatcher

    rt = Runtime(rank=0, world_size=4, local_rank=0, local_world_size=4, device=torch.device("cpu"))
    info = ModelInfo("14B", SimpleNamespace(random_weights=False), 40, 40, torch.bfloat16,
                     RequestLimits(model="14B", sizes=SUPPORTED_SIZES["14B"]),
                     {"size": "1280*720", "frame_num": 81, "sample_steps": 50, "sample_shift": 5.0,
                      "sample_guide_scale": 5.0, "sample_solver": "unipc", "base_seed": -1, "batch_size": 1,
                      "negative_prompt": "", "teacache": 0.0})
    state = ParallelState(rt, info, SimpleNamespace(name="sdpa"), None, resolve_layout(4, 40, None, None),
                          startup_log=["Setup complete: FSDP=true, Context Parallel=true"])
    server = SimpleNamespace(rt=rt, state=state, cfg=RunConfig(), last_memory=[])
    server.dispatcher = Dispatcher(server)
    return server


def form(**changes):
    values = {"prompt": "a cat", "negative_prompt": "", "size": "832*480", "frame_num": 81, "sample_steps": 50,
              "sample_guide_scale": 5.0, "sample_shift": 5.0, "base_seed": -1, "sample_solver": "unipc",
              "batch_size": 1, "layout": "ulysses 4 × ring 1", "teacache": 0.0}
    return {**values, **changes}


def test_size_not_in_the_real_models_list_names_the_allowed_sizes(fake_14b_server):
    import gradio as gr

    from ui import Controller

    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    assert ctl.raw_request(**form())["size"] == "832*480"
    with pytest.raises(gr.Error) as err:
        ctl.raw_request(**form(size="1024*1024"))
    assert err.value.message == ("size: 1024*1024 is not supported by the 14B model; "
                                 "choose one of 1280*720, 720*1280, 832*480, 480*832")


def test_layouts_offered_on_4_ranks_are_exactly_the_valid_ones_and_ulysses_3_is_refused(fake_14b_server):
    import gradio as gr

    from engine.request import RequestError
    from ui import Controller, layout_options

    offered = layout_options(fake_14b_server.state)
    assert set(offered.values()) == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)}
    assert all(u * r * c == 4 and 40 % u == 0 for u, r, c in offered.values())
    with pytest.raises(RequestError) as err:  # what an API caller sending raw sizes gets
        fake_14b_server.dispatcher.validate({"prompt": "a cat", "size": "832*480", "ulysses_size": 3, "ring_size": 1})
    assert err.value.field == "layout"
    assert "ulysses_size=3 does not divide the model's 40 attention heads" in str(err.value)
    assert "Valid for 4 ranks: Ulysses 4 or Ulysses 2 × Ring 2 or Ring 4" in str(err.value)
    with pytest.raises(gr.Error) as err:
        Controller(fake_14b_server, fake_14b_server.cfg).raw_request(**form(layout="ulysses 3 × ring 1"))
    assert err.value.message == ("layout: must be one of: ulysses 4 × ring 1; ulysses 2 × ring 2; ulysses 1 × ring 4; "
                                 "cfg 2 × ulysses 2 × ring 1; cfg 2 × ulysses 1 × ring 2; got 'ulysses 3 × ring 1'")


def test_build_ui_for_14b_on_4_ranks_offers_its_sizes_layouts_and_read_only_start_up_settings(
        fake_14b_server, tmp_path, monkeypatch):
    from app import build_ui

    for name in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED"):  # build_ui sets them; restored afterwards
        monkeypatch.setenv(name, "")
    cfg = fake_14b_server.cfg.replace(outputs_dir=str(tmp_path / "outputs"))
    demo = build_ui(fake_14b_server, cfg)
    assert Path(os.environ["GRADIO_TEMP_DIR"]) == (tmp_path / "outputs" / ".gradio-cache").resolve()
    props = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"] if c["props"].get("elem_id")}
    assert [v for _, v in props["size"]["choices"]] == ["1280*720", "720*1280", "832*480", "480*832"]
    assert props["layout"]["value"] == "ulysses 4 × ring 1" and len(props["layout"]["choices"]) == 5
    assert props["frames"]["step"] == 4 and props["frames"]["value"] == 81
    assert "random-weights-banner" not in json.dumps(demo.config, default=str)
    read_only = {c["props"]["label"]: c["props"] for c in demo.config["components"]
                 if c["type"] == "textbox" and c["props"].get("interactive") is False}
    assert read_only["offload_percent"]["value"] == "0.0" and "--offload_percent" in read_only["offload_percent"]["info"]
    assert read_only["World size (ranks)"]["value"] == "4" and "--nproc" in read_only["World size (ranks)"]["info"]
    api = [d["api_name"] for d in demo.config["dependencies"] if d.get("api_visibility", "public") == "public"]
    assert api == ["generate"]


def test_preset_fills_request_controls_and_explains_start_up_ones(fake_14b_server):
    from ui import Controller

    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    out = ctl.apply_preset("8gpu_distributed")
    *values, note = out
    assert values[9] == 0.2  # teacache
    assert "use_fsdp = True (now False)" in note and "offload_percent = 0.5" in note
    assert "It is made for 8 ranks; this server runs 4" in note and "./launch.sh --nproc 8 --preset 8gpu_distributed" in note
    assert "does not fit this gang" in note  # ulysses 2 × ring 4 needs 8 ranks


# -- serving flags --------------------------------------------------------------------------------------------
def test_share_without_auth_generates_and_prints_a_random_password(capsys):
    from app import load_config, resolve_auth

    logins = resolve_auth(load_config(["--share"]))
    assert len(logins) == 1 and logins[0][0] == "wan" and len(logins[0][1]) >= 12
    assert logins[0][1] in capsys.readouterr().out
    assert resolve_auth(load_config(["--share"]))[0][1] != logins[0][1]


def test_auth_and_auth_file_give_the_logins(tmp_path):
    from app import load_config, resolve_auth

    f = tmp_path / "logins.txt"
    f.write_text("# team\nalice:wonder\n\nbob:builder:2\n")
    assert resolve_auth(load_config(["--auth", "me:pw", "--auth_file", str(f), "--share"])) == [
        ("me", "pw"), ("alice", "wonder"), ("bob", "builder:2")]
    assert resolve_auth(load_config([])) is None  # local use without --auth: no login
    f.write_text("alice\n")
    with pytest.raises(ValueError, match="--auth_file line 1: expected user:password"):
        resolve_auth(load_config(["--auth_file", str(f)]))


def test_bad_auth_stops_before_loading_the_model(tmp_path):
    r = subprocess.run([sys.executable, "app.py", "--auth", "nopassword", "--model_dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--auth: expected user:password" in r.stderr
    assert not any(tmp_path.iterdir())  # the tiny model was not even generated


def test_workers_never_import_gradio():
    code = ("import sys, app, parallel.serve, parallel.apply, engine.pipeline; "
            "assert 'gradio' not in sys.modules, 'gradio imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cancel_of_a_waiting_request_drops_it_when_its_turn_comes(fake_14b_server):
    """Cancel before the request started: it ends 'cancelled' without reaching the dispatcher."""
    from ui import Controller

    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    calls = []
    fake_14b_server.dispatcher.submit = lambda *a, **k: calls.append(a)
    req = SimpleNamespace(session_hash="s1")
    ctl.cancel(req)  # nothing waiting: no effect
    assert "s1" not in ctl._cancel_queued
    ctl.is_waiting = lambda session: session == "s1"
    ctl.cancel(req)
    outs = list(ctl.generate(**form(), request=req))
    assert "Cancelled before it started" in outs[-1][-1] and calls == []
    assert "s1" not in ctl._cancel_queued  # a later request of the session runs


def test_cancel_from_another_session_leaves_the_running_request_alone(fake_14b_server):
    from ui import Controller, Job

    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    cancels = []
    fake_14b_server.dispatcher.cancel = lambda: cancels.append(1)
    ctl.job = Job("owner", {})
    ctl.cancel(SimpleNamespace(session_hash="intruder"))
    assert cancels == [] and not ctl.job.cancel_requested
    ctl.cancel(SimpleNamespace(session_hash="owner"))
    assert cancels == [1] and ctl.job.cancel_requested


def test_cancel_of_the_running_request_stops_it_at_a_step_boundary(fake_14b_server):
    """The running job's owner cancels: dispatcher.cancel() is called, the page says where it stopped."""
    from engine.pipeline import Cancelled
    from ui import Controller

    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    stop = threading.Event()

    def submit(raw, progress=None, **_):
        for step in range(1, 50):
            if stop.is_set():
                raise Cancelled(f"cancelled at step {step}")
            progress(step, 50, 0.1 * step)
            time.sleep(0.02)
        raise AssertionError("not cancelled")

    fake_14b_server.dispatcher.submit = submit
    fake_14b_server.dispatcher.cancel = stop.set
    req = SimpleNamespace(session_hash="owner")
    outs = []
    for out in ctl.generate(**form(), request=req):
        outs.append(out)
        if "step 3/50" in out[-1]:
            ctl.cancel(req)
    assert "s/step" in outs[2][-1] and "ETA" in outs[2][-1]
    assert "Cancelled at step 4 of 50" in outs[-1][-1] and ctl.job is None


def test_history_gallery_is_read_from_outputs_dir_so_it_survives_a_restart(app, fake_14b_server):
    """A fresh process (here: a new Controller) lists the app's earlier generations, newest first."""
    from ui import Controller

    client(app).predict(prompt="remember me", api_name="/generate", **SMALL)
    fake_14b_server.cfg = fake_14b_server.cfg.replace(outputs_dir=str(app.outputs))
    gallery, paths, cluster = Controller(fake_14b_server, fake_14b_server.cfg).panels()
    on_disk = sorted(app.videos(), key=lambda p: p.stat().st_mtime, reverse=True)
    assert paths == [str(p) for p in on_disk] and len(paths) >= 1
    assert "remember me" in gallery[0][1] and "208*144" in gallery[0][1]
    assert "Memory per rank" in cluster


# -- LoRAs through the page's API ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_app(tmp_path_factory, tiny_model_dir):
    """An app whose model_dir holds loras/tiny_style.safetensors, a LoRA made for the tiny DiT's shapes."""
    from safetensors.torch import load_file

    from engine.tiny import DIT_FILE
    from tests.lora_util import spec, write

    tmp = tmp_path_factory.mktemp("ui_lora")
    (tmp / "models" / "loras").mkdir(parents=True)
    sd = load_file(str(tiny_model_dir / "diffusion_models" / DIT_FILE))
    write(spec(sd, 7, ["blocks.0.self_attn.q", "blocks.0.ffn.0"]), "official",
          tmp / "models" / "loras" / "tiny_style.safetensors")
    with running_app(tmp, tiny_model_dir, "--auth", f"{USER}:{PASSWORD}", "--model_dir", str(tmp / "models")) as running:
        running.models = tmp / "models"
        yield running


def test_generate_api_takes_loras_and_the_sidecar_records_them(lora_app):
    before = set(lora_app.videos())
    client(lora_app).predict(prompt="a styled fox", base_seed=1, api_name="/generate",
                             loras=[{"name": "tiny_style.safetensors", "strength": 0.5}], **SMALL)
    (mp4,) = sorted(set(lora_app.videos()) - before)
    side = json.loads(mp4.with_suffix(".json").read_text())["loras"]
    assert [(r["name"], r["strength"], r["format"], r["tensors"], r["skipped"], r["unmatched"])
            for r in side["loras"]] == [("tiny_style.safetensors", 0.5, "official", 2, 0, 0)]
    assert side["changed"] == 2


def test_unknown_lora_name_is_refused_with_the_exact_message(lora_app):
    from gradio_client.exceptions import AppError

    before = lora_app.videos()
    with pytest.raises(AppError) as err:
        client(lora_app).predict(prompt="a cat", api_name="/generate", loras=[{"name": "nope.safetensors"}], **SMALL)
    assert str(err.value) == f"loras: no LoRA named 'nope.safetensors' in {lora_app.models / 'loras'}"
    assert lora_app.videos() == before


def test_page_lora_picks_become_the_request_field():
    from ui import LORA_SLOTS, chosen_loras, lora_slots

    assert chosen_loras(None, 1.0, 1.0, 1.0, 1.0) is None
    assert chosen_loras(["a.safetensors", "b.safetensors"], 0.5, -1.0, 1.0, 1.0) == [
        {"name": "a.safetensors", "strength": 0.5}, {"name": "b.safetensors", "strength": -1.0}]
    slots = lora_slots(["a.safetensors"])
    assert len(slots) == LORA_SLOTS and slots[0]["visible"] and slots[0]["label"] == "Strength of a.safetensors"
    assert not any(s["visible"] for s in slots[1:])


def test_page_timesteps_apply_while_steps_match_and_the_distilled_preset_fills_them(fake_14b_server):
    from ui import REQUEST_KEYS, Controller

    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    raw = ctl.raw_request(**form(sample_steps=4, sample_solver="euler", sample_guide_scale=1.0),
                          sample_timesteps="1000,750,500,250")
    assert raw["sample_timesteps"] == (1000, 750, 500, 250)
    assert ctl.dispatcher.validate(raw).sample_timesteps == (1000, 750, 500, 250)
    assert ctl.raw_request(**form(), sample_timesteps="1000,750,500,250")["sample_timesteps"] is None  # Steps 50 wins
    *values, note = ctl.apply_preset("distilled_4step")
    picked = dict(zip(REQUEST_KEYS, values))
    assert (picked["sample_steps"], picked["sample_shift"], picked["sample_guide_scale"], picked["sample_solver"],
            picked["sample_timesteps"]) == (4, 5, 1, "euler", "1000,750,500,250")
    assert note == ("**distilled_4step** filled: sample_steps = 4, sample_guide_scale = 1, sample_shift = 5, "
                    "sample_solver = euler, sample_timesteps = 1000,750,500,250.")
