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
    assert status.startswith("Done") and str(seed_used) in status
    assert "<" not in status and ">" not in status  # the API's status is plain text, not the page's HTML
    assert side["layout"] == {"world_size": 1, "cfg_size": 1, "ring_size": 1, "ulysses_size": 1}


@pytest.mark.parametrize(
    ("values", "field", "allowed"),
    [
        ({"frame_num": 80}, "frame_num", "4n+1"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 10_000}, "prompt", "at most 2000 characters"),
        ({"size": "100*100"}, "size", "multiples of 16"),
        ({"sample_steps": 0}, "sample_steps", "between 1 and 200"),
        ({"base_seed": -7}, "base_seed", "between -1 and"),
        ({"ulysses_size": 3}, "ulysses_size", "ulysses_size=3 does not divide the model's 4 attention heads"),
        ({"ring_size": 2}, "layout", "the product must equal the number of ranks. Valid for 1 rank and 4 heads"),
        ({"cfg_size": 3}, "cfg_size", "between 1 and 2"),
        ({"offload_percent": 1.5}, "offload_percent", "must be between 0 and 1, got 1.5"),
        ({"blocks_to_swap": 999}, "blocks_to_swap", "must be between 0 and 3, got 999"),
    ],
    ids=["frames_80", "empty_prompt", "prompt_10000_chars", "size_not_multiple_of_16", "steps_0", "seed_-7",
         "ulysses_3_does_not_divide_the_heads", "ring_2_on_1_rank", "cfg_3", "offload_1.5", "swap_over_the_blocks"],
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
                                                1, 1, 1, 0.0, 0, 0.0, None, ""]})
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
                                                                1, 1, 1, 1, 0.0, 0, 0.0, None, ""],
                                                       "fn_index": fn_index, "session_hash": "third"})
    assert r.status_code == 503 and "Queue is full" in r.json()["detail"], r.text
    with pytest.raises(Exception, match="Queue is full"):
        client(app).predict(prompt="refused too", api_name="/generate", **SMALL)
    assert running.result(timeout=120)[4].startswith("Done") and waiting.result(timeout=120)[4].startswith("Done")  # both complete


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
              "batch_size": 1, "ulysses_size": 4, "ring_size": 1, "cfg_size": 1, "offload_percent": 0.0,
              "blocks_to_swap": 0, "teacache": 0.0}
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


def test_layout_sliders_on_4_ranks_follow_each_other_and_flag_what_cannot_run(fake_14b_server):
    """World 4, 40 heads: moving one size adjusts the others so that cfg × ring × ulysses = 4; Ulysses 3 (does
    not divide 4 ranks nor 40 heads) stays as moved and the note says why."""
    from ui_parts import adjust_layout, check_layout_sizes

    st = fake_14b_server.state
    assert adjust_layout(st, "ulysses", 2, 1, 1) == (2, 2, 1)
    assert adjust_layout(st, "ulysses", 1, 1, 1) == (1, 4, 1)
    assert adjust_layout(st, "ring", 4, 2, 1) == (2, 2, 1)
    assert adjust_layout(st, "cfg", 4, 1, 2) == (2, 1, 2)  # Ulysses 4 does not fit 2 ranks: the largest that does
    assert adjust_layout(st, "cfg", 1, 2, 2) == (1, 2, 2)
    assert adjust_layout(st, "ulysses", 3, 1, 1) == (3, 1, 1)  # nothing fixes it: flagged
    valid = {(u, r, c) for u in range(1, 5) for r in range(1, 5) for c in (1, 2)
             if check_layout_sizes(st, u, r, c)[0] is not None}
    assert valid == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)}
    lay, note = check_layout_sizes(st, 2, 2, 1)
    assert str(lay) == "ulysses 2 × ring 2"
    assert note == "Runs ulysses 2 × ring 2 on 4 ranks · context parallel on (ulysses × ring = 4)"
    lay, note = check_layout_sizes(st, 3, 1, 1)
    assert lay is None and note.startswith("Not valid: ulysses_size=3 does not divide the model's 40 attention heads")
    assert "Valid for 4 ranks: Ulysses 4 or Ulysses 2 × Ring 2 or Ring 4" in note


def test_generate_refuses_an_invalid_layout_naming_the_field(fake_14b_server):
    import gradio as gr

    from engine.request import RequestError
    from ui import Controller

    with pytest.raises(RequestError) as err:  # what the dispatcher says for raw sizes
        fake_14b_server.dispatcher.validate({"prompt": "a cat", "size": "832*480", "ulysses_size": 3, "ring_size": 1})
    assert err.value.field == "layout"
    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    with pytest.raises(gr.Error) as err:
        ctl.raw_request(**form(ulysses_size=3))
    assert err.value.title == "Invalid ulysses_size"
    assert err.value.message.startswith("ulysses_size: ulysses_size=3 does not divide the model's 40 attention heads")
    with pytest.raises(gr.Error) as err:
        ctl.raw_request(**form(ulysses_size=2, ring_size=1))
    assert err.value.message.startswith("layout: cfg_size 1 × ring_size 1 × ulysses_size 2 = 2, but the world size is 4")
    with pytest.raises(gr.Error) as err:
        ctl.raw_request(**form(blocks_to_swap=41))
    assert err.value.message == "blocks_to_swap: must be between 0 and 40, got 41"
    raw = ctl.raw_request(**form(ulysses_size=1, ring_size=2, cfg_size=2, offload_percent=0.25, blocks_to_swap=20))
    assert (raw["ulysses_size"], raw["ring_size"], raw["cfg_size"]) == (1, 2, 2)
    assert (raw["offload_percent"], raw["blocks_to_swap"]) == (0.25, 20)  # passed through to the dispatcher
    req = ctl.dispatcher.validate(raw)
    assert (req.offload_percent, req.blocks_to_swap) == (0.25, 20)
    raw = ctl.raw_request(**form(ulysses_size="2", ring_size=2.0, cfg_size=" 1 ", offload_percent="0.5"))
    assert (raw["ulysses_size"], raw["ring_size"], raw["cfg_size"], raw["offload_percent"]) == (2, 2, 1, 0.5)
    assert all(type(raw[k]) is int for k in ("ulysses_size", "ring_size", "cfg_size"))  # numbers for layout_for


def test_an_error_sets_the_status_line_to_the_error(fake_14b_server):
    import gradio as gr

    from ui import Controller

    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    outs = []
    with pytest.raises(gr.Error):
        for out in ctl.generate(**form(frame_num=80), request=SimpleNamespace(session_hash="s")):
            outs.append(out)
    assert outs[-1][-1].startswith("Error: frame_num: must be 4n+1")

    def submit(raw, progress=None, **_):
        raise RuntimeError("CUDA out of memory\nmore")

    fake_14b_server.dispatcher.submit = submit
    outs = []
    with pytest.raises(gr.Error):
        for out in ctl.generate(**form(), request=SimpleNamespace(session_hash="s")):
            outs.append(out)
    assert outs[-1][-1] == "Error: generation failed: RuntimeError: CUDA out of memory"


def test_build_ui_for_14b_on_4_ranks_offers_its_sizes_sliders_and_start_up_facts_as_text(
        fake_14b_server, tmp_path, monkeypatch):
    from app import build_ui

    for name in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED"):  # build_ui sets them; restored afterwards
        monkeypatch.setenv(name, "")
    fake_14b_server.state.dit_fsdp = True
    cfg = fake_14b_server.cfg.replace(outputs_dir=str(tmp_path / "outputs"))
    demo = build_ui(fake_14b_server, cfg)
    assert Path(os.environ["GRADIO_TEMP_DIR"]) == (tmp_path / "outputs" / ".gradio-cache").resolve()
    comps = {c["props"].get("elem_id"): c for c in demo.config["components"] if c["props"].get("elem_id")}
    props = {k: c["props"] for k, c in comps.items()}
    assert [v for _, v in props["size"]["choices"]] == ["1280*720", "720*1280", "832*480", "480*832"]
    assert props["frames"]["step"] == 4 and props["frames"]["value"] == 81
    for elem_id, word, value, hi in (("ulysses", "Ulysses", 4, 4), ("ring", "Ring", 1, 4), ("offload", "offload", 0.0, 1),
                                     ("swap", "swap", 0, 40)):
        assert comps[elem_id]["type"] == "slider" and word in props[elem_id]["label"], elem_id
        assert (props[elem_id]["value"], props[elem_id]["maximum"]) == (value, hi), elem_id
        assert props[elem_id].get("interactive") is not False, elem_id
    assert props["offload"]["step"] == 0.05 and "whole blocks" in props["offload"]["info"]  # FSDP
    assert [v for _, v in props["cfg"]["choices"]] == [1, 2] and props["cfg"]["value"] == 1
    assert "Runs ulysses 4 × ring 1 on 4 ranks · context parallel on" in props["layout-note"]["value"]
    assert "random-weights-banner" not in json.dumps(demo.config, default=str)
    read_only = [c["props"]["label"] for c in demo.config["components"]
                 if c["type"] == "textbox" and c["props"].get("interactive") is False]
    assert sorted(read_only) == ["Seed used", "Status"]  # start-up facts are text in the cluster panel, not inputs
    cluster = props["cluster"]["value"]
    assert "<th>world size</th><td>4 ranks on 1 node</td>" in cluster
    assert "<th>context parallel (default layout)</th><td>on (ulysses × ring = 4)</td>" in cluster
    assert "blocks_to_swap 0 · offload_percent 0" in cluster and "True" not in cluster and "False" not in cluster
    presets = [v for _, v in props["preset"]["choices"]]
    assert "auto" in presets and "balanced" in presets
    api = [d for d in demo.config["dependencies"] if d.get("api_visibility", "public") == "public"]
    assert [d["api_name"] for d in api] == ["generate"]
    names = [p["parameter_name"] for p in demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]]
    assert names == ["prompt", "negative_prompt", "size", "frame_num", "sample_steps", "sample_guide_scale",
                     "sample_shift", "base_seed", "sample_solver", "batch_size", "ulysses_size", "ring_size",
                     "cfg_size", "offload_percent", "blocks_to_swap", "teacache", "loras", "sample_timesteps"]
    from tests.reliability_util import FIELDS
    from ui import FORM_KEYS

    assert tuple(names) == FORM_KEYS == FIELDS  # the fuzz attacks exactly the API's parameters, in its order


def test_one_rank_fixes_the_layout_sliders_with_a_note(fake_14b_server, tmp_path, monkeypatch):
    from app import build_ui
    from parallel.layout import resolve_layout
    from parallel.runtime import Runtime

    for name in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED"):
        monkeypatch.setenv(name, "")
    st = fake_14b_server.state
    st.rt = fake_14b_server.rt = Runtime(rank=0, world_size=1, local_rank=0, local_world_size=1,
                                         device=torch.device("cpu"))
    st.default_layout = resolve_layout(1, 40, None, None)
    demo = build_ui(fake_14b_server, fake_14b_server.cfg.replace(outputs_dir=str(tmp_path / "outputs")))
    props = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"] if c["props"].get("elem_id")}
    for elem_id in ("ulysses", "ring", "cfg"):
        assert props[elem_id]["interactive"] is False and props[elem_id]["value"] == 1, elem_id
    assert "1 rank: restart with ./launch.sh --nproc N for more" in props["layout-note"]["value"]
    assert "context parallel off" in props["layout-note"]["value"]
    assert props["offload"].get("interactive") is not False and "whole blocks" not in props["offload"]["info"]


def test_preset_fills_request_controls_and_explains_start_up_ones(fake_14b_server):
    from ui import LAYOUT_KEYS, REQUEST_KEYS, Controller

    ctl = Controller(fake_14b_server, fake_14b_server.cfg)
    *values, note = ctl.apply_preset("8gpu_distributed")
    picked = dict(zip((*REQUEST_KEYS, *LAYOUT_KEYS), values))
    assert (picked["teacache"], picked["offload_percent"], picked["blocks_to_swap"]) == (0.2, 0.5, 10)
    assert "use_fsdp = true (now false)" in note and "offload_percent = 0.5" in note
    assert "True" not in note and "False" not in note
    assert "It is made for 8 ranks; this server runs 4 ranks" in note and "./launch.sh --nproc 8 --preset 8gpu_distributed" in note
    assert "does not fit this gang" in note  # ulysses 2 × ring 4 needs 8 ranks
    assert "Valid for 4 ranks" in note
    *values, note = ctl.apply_preset("auto")  # a stand-in server without model files: nothing to fill
    assert "auto" in note
    *values, note = ctl.apply_preset("(start-up settings)")
    picked = dict(zip((*REQUEST_KEYS, *LAYOUT_KEYS), values))
    assert (picked["ulysses_size"], picked["ring_size"], picked["cfg_size"], picked["blocks_to_swap"]) == (4, 1, 1, 0)


def test_history_item_restores_the_form_from_its_sidecar(fake_14b_server):
    from ui_parts import restored_form

    meta = {"prompt": "a fox", "negative_prompt": "blurry", "seed": 12, "batch_index": 2, "size": "832*480",
            "frame_num": 33, "steps": 20, "guidance": 4.5, "shift": 3.0, "solver": "euler", "batch_size": 3,
            "teacache": 0.1, "sample_timesteps": [],
            "layout": {"world_size": 4, "cfg_size": 2, "ring_size": 1, "ulysses_size": 2},
            "memory_mode": {"blocks_to_swap": 20, "offload_percent": 0.25, "replan_s": 1.5}}
    assert restored_form(meta, fake_14b_server.state) == {
        "prompt": "a fox", "negative_prompt": "blurry", "base_seed": 10, "size": "832*480", "frame_num": 33,
        "sample_steps": 20, "sample_guide_scale": 4.5, "sample_shift": 3.0, "sample_solver": "euler", "batch_size": 3,
        "teacache": 0.1, "sample_timesteps": "", "ulysses_size": 2, "ring_size": 1, "cfg_size": 2,
        "blocks_to_swap": 20, "offload_percent": 0.25}
    other_world = {**meta, "layout": {"world_size": 8, "cfg_size": 1, "ring_size": 4, "ulysses_size": 2}}
    assert "ulysses_size" not in restored_form(other_world, fake_14b_server.state)


def test_words_on_the_page_are_plain():
    from ui_parts import done_text, fmt_value, plural

    out = SimpleNamespace(videos=["a.mp4"], request=SimpleNamespace(base_seed=7),
                          meta={"timings": {"total_s": 3.0, "denoise_s": 2.0, "per_step_s": 1.0, "vae_decode_s": 1.0},
                                "memory_mode": {"blocks_to_swap": 20, "offload_percent": 0.0, "replan_s": 2.5}})
    assert done_text(out) == ("Done: 1 video in 3.0 s · denoise 2.0 s (1.00 s/step) · VAE decode 1.0 s · seed 7 · "
                              "blocks_to_swap 20, offload_percent 0 (weights re-planned in 2.5 s)")

    assert (plural(1, "rank"), plural(2, "rank")) == ("1 rank", "2 ranks")
    assert (fmt_value(True), fmt_value(False), fmt_value(0.0), fmt_value(0.25)) == ("true", "false", "0", "0.25")


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
    assert outs[-1][-1] == "Cancelled before it started." and calls == []
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
