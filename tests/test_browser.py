"""The web page in a real browser: Debian's Chromium driven by Playwright, against the real app (tiny model,
CPU). Screenshots go to test-artifacts/. If Chromium cannot start, these tests fail: they never skip."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.ui_server import ROOT, SMALL, running_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import Error, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
                    "the browser tests need it")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as exc:
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {exc}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    with running_app(tmp_path_factory.mktemp("browser"), tiny_model_dir, "--queue_size", "1") as running:
        yield running


@pytest.fixture
def page(browser, request):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1500})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    yield pg
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    ctx.close()


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#generate")
    page.wait_for_function("document.querySelector('#history') !== null")


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's / number box's input and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def set_size(page, size: str) -> None:
    box = page.locator("#size input").first
    box.click()
    page.get_by_role("option", name=size, exact=True).click()


def fill_small_request(page, prompt: str, steps: int = SMALL["sample_steps"]) -> None:
    page.locator("#prompt textarea").fill(prompt)
    set_size(page, SMALL["size"])
    set_number(page, "frames", SMALL["frame_num"])
    set_number(page, "steps", steps)


def status_text(page) -> str:
    """The status line next to Generate (a read-only textbox: plain text, as the API gets it)."""
    return page.locator("#status textarea").input_value()


def wait_status(page, pattern: str, timeout_ms: int = TIMEOUT_MS) -> str:
    page.wait_for_function(
        "([p]) => new RegExp(p).test(document.querySelector('#status textarea').value)", arg=[pattern],
        timeout=timeout_ms)
    return status_text(page)


def number(page, elem_id: str) -> float:
    """A slider's value, from its number box."""
    return float(page.locator(f"#{elem_id} input[type=number]").first.input_value())


def wait_number(page, elem_id: str, value: float) -> None:
    page.wait_for_function(
        "([id, v]) => parseFloat(document.querySelector('#' + id + ' input[type=number]').value) === v",
        arg=[elem_id, value])


def move_slider(page, elem_id: str, steps: int) -> None:
    """Move a slider as a user does: focus its range input and press the arrow keys."""
    handle = page.locator(f"#{elem_id} input[type=range]").first
    handle.focus()
    for _ in range(abs(steps)):
        handle.press("ArrowRight" if steps > 0 else "ArrowLeft")


def pick_cfg(page, value: int) -> None:
    page.locator("#cfg label").filter(has_text=re.compile(rf"^\s*{value}\s*$")).click()


def layout_sizes(page) -> tuple[int, int, int]:
    cfg = page.evaluate("() => [...document.querySelectorAll('#cfg input[type=radio]')].find(i => i.checked)"
                        ".closest('label').innerText")
    return int(number(page, "ulysses")), int(number(page, "ring")), int(cfg.strip())


def wait_note(page, text: str) -> str:
    page.wait_for_function("([t]) => document.querySelector('#layout-note').innerText.includes(t)", arg=[text])
    return page.locator("#layout-note").inner_text()


def playable_video(page) -> dict:
    """Wait until the result <video> has a source the browser decoded (metadata + a frame), return its state."""
    page.wait_for_function(
        "() => { const v = document.querySelector('#result-video video');"
        " return v && v.currentSrc && v.readyState >= 2 && v.videoWidth > 0 && !v.error; }")
    return page.evaluate(
        "() => { const v = document.querySelector('#result-video video');"
        " return {src: v.currentSrc, width: v.videoWidth, height: v.videoHeight, duration: v.duration}; }")


def test_generate_from_the_browser_shows_progress_and_plays_the_video(page, app):
    open_page(page, app.url)
    assert "RANDOM weights" in page.locator("#random-weights-banner").inner_text()
    fill_small_request(page, "a lighthouse at dawn", steps=8)
    page.click("#generate")
    progress = wait_status(page, r"step \d+/8 · [\d.]+ s/step · ETA")
    assert re.search(r"step \d+/8", progress)
    done = wait_status(page, "^Done")
    video = playable_video(page)
    assert (video["width"], video["height"]) == (208, 144) and video["duration"] > 0
    assert "/gradio_api/file=" in video["src"] and video["src"].endswith(".mp4")
    seed = re.search(r"seed (\d+)", done).group(1)
    assert page.locator("#seed-used textarea, #seed-used input").first.input_value() == seed
    mp4 = next(p for p in app.videos() if f"_s{seed}_" in p.name)
    assert Path(video["src"]).name == mp4.name  # the file shown is the one written to outputs_dir
    page.get_by_role("tab", name="History").click()  # the gallery has it after the run, and after a reload
    page.wait_for_function("document.querySelectorAll('#history video, #history img').length >= 1")
    open_page(page, app.url)
    page.wait_for_function("document.querySelectorAll('#history video, #history img').length >= 1")
    thumb = page.locator("#history .thumbnail-item").first.bounding_box()
    gallery = page.locator("#history").bounding_box()
    assert thumb["width"] <= 220 and thumb["height"] <= 160 and thumb["width"] < gallery["width"] / 4, (thumb, gallery)
    assert page.locator("#prompt textarea").input_value() == ""  # a fresh page
    page.locator("#history .thumbnail-item").first.click()  # picking it shows it again, with its settings
    page.wait_for_function(f"() => document.querySelector('#seed-used textarea, #seed-used input').value === '{seed}'")
    assert Path(playable_video(page)["src"]).name == mp4.name
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a lighthouse at dawn'")
    assert status_text(page) == f"Showing {mp4.name} from the history; its settings are back in the form."
    assert (number(page, "frames"), number(page, "steps")) == (SMALL["frame_num"], 8)
    assert page.locator("#size input").first.input_value() == SMALL["size"]
    names = page.locator("#files .file-preview .filename").all_inner_texts()  # whole names, not ".mp" / ".jso"
    assert sorted(re.sub(r"\s+", "", n) for n in names) == sorted([mp4.name, mp4.with_suffix(".json").name]), names
    for cell in page.locator("#files .file-preview .filename").all():
        assert cell.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), cell.inner_text()


def test_preset_changes_the_controls_and_says_how_to_apply_start_up_settings(page, app):
    open_page(page, app.url)
    teacache = page.locator("#teacache input[type=number]").first
    assert float(teacache.input_value()) == 0.0
    page.locator("#preset input").first.click()
    page.get_by_role("option", name="balanced", exact=True).click()
    page.wait_for_function("() => parseFloat(document.querySelector('#teacache input[type=number]').value) === 0.2")
    note = page.locator("#preset-note").inner_text()
    assert "./launch.sh --preset balanced" in note and "offload_percent = 0.5" in note
    assert "True" not in note and "False" not in note
    wait_number(page, "offload", 0.5)  # the memory sliders follow the preset (swap: at most the model's 3 blocks)
    wait_number(page, "swap", 3)
    page.locator("#preset input").first.click()
    page.get_by_role("option", name="8gpu_distributed", exact=True).click()
    page.wait_for_function("() => document.querySelector('#preset-note').innerText.includes('--nproc 8')")
    note = page.locator("#preset-note").inner_text()
    assert "made for 8 ranks; this server runs 1 rank." in note and "Valid for 1 rank and 4 heads" in note, note
    assert layout_sizes(page) == (1, 1, 1)  # 2×4 does not fit 1 rank
    page.locator("#preset input").first.click()
    assert page.get_by_role("option", name="auto", exact=True).count() == 1  # presets/auto.py is on the menu


def test_cancel_stops_a_long_run_and_the_next_run_works(page, app):
    open_page(page, app.url)
    fill_small_request(page, "a very long film", steps=200)
    page.click("#generate")
    wait_status(page, r"step \d+/200 · ")
    page.click("#cancel")
    cancelled = wait_status(page, "^Cancelled at step")
    at = int(re.search(r"Cancelled at step (\d+) of 200", cancelled).group(1))
    assert 0 < at < 200
    page.wait_for_function("() => document.querySelector('#cancel').disabled")
    set_number(page, "steps", 2)
    page.click("#generate")
    wait_status(page, "^Done")
    assert playable_video(page)["width"] == 208


def test_waiting_request_shows_its_queue_position_and_a_full_queue_says_busy(page, app):
    """queue_size 1: with one request running, a page's request waits and shows its place in the queue; the
    next page is told the app is busy."""
    from gradio_client import Client
    from gradio_client.utils import Status

    running = Client(app.url, verbose=False, download_files=False).submit(
        prompt="running", api_name="/generate", **{**SMALL, "sample_steps": 10})
    deadline = time.monotonic() + 60
    while running.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.ITERATING):
        assert time.monotonic() < deadline, running.status()
        time.sleep(0.1)
    open_page(page, app.url)
    fill_small_request(page, "waits its turn")
    page.click("#generate")
    page.locator("#result-video").get_by_text(re.compile(r"queue: 1/1")).wait_for(timeout=30_000)
    second = page.context.new_page()
    open_page(second, app.url)
    second.locator("#prompt textarea").fill("one too many")
    second.click("#generate")
    second.get_by_text(re.compile("currently busy", re.I)).first.wait_for(timeout=30_000)
    second.screenshot(path=str(ARTIFACTS / "busy.png"), full_page=True)
    assert "Done" in running.result(timeout=120)[4]
    wait_status(page, "^Done")  # the waiting request ran after all


def in_viewport(page, selector: str) -> bool:
    """Whether the element's whole box lies inside the window (no scrolling needed to see it)."""
    box = page.locator(selector).first.bounding_box()
    view = page.viewport_size
    return (box is not None and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= view["width"]
            and box["y"] + box["height"] <= view["height"])


def test_at_1440x900_prompt_generate_video_and_progress_are_in_view_without_scrolling(browser, app):
    """A laptop window: the prompt, Generate, the status line and the video are on screen at once, and stay
    there after Generate (nothing scrolls the progress away)."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        open_page(page, app.url)
        for selector in ("#prompt textarea", "#generate", "#status", "#result-video"):
            assert in_viewport(page, selector), selector
        assert status_text(page) == "Ready."
        for elem_id in ("ulysses", "ring"):  # one rank: the layout is fixed, and the page says how to get more
            assert page.locator(f"#{elem_id} input[type=range]").first.is_disabled(), elem_id
        assert "1 rank: restart with ./launch.sh --nproc N for more" in page.locator("#layout-note").inner_text()
        assert "context parallel off" in page.locator("#layout-note").inner_text()
        fill_small_request(page, "stays in view", steps=6)
        page.click("#generate")
        wait_status(page, r"step \d+/6 · ")
        assert page.evaluate("window.scrollY") == 0
        for selector in ("#generate", "#status", "#result-video"):
            assert in_viewport(page, selector), selector
        wait_status(page, "^Done")
        assert page.evaluate("window.scrollY") == 0 and in_viewport(page, "#status")
        set_number(page, "frames", 80)  # refused: the status line says so too, not "Ready." or "Done"
        page.click("#generate")
        error = wait_status(page, "^Error")
        assert error.startswith("Error: frame_num: must be 4n+1"), error
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "viewport_1440x900.png"))
        ctx.close()


def test_two_rank_gang_serves_the_page_and_generates(browser, tmp_path, tiny_model_dir):
    """./launch.sh --nproc 2 (torchrun, gloo on CPU): rank 0's page generates with Ulysses over both ranks;
    the layout sliders follow each other (world 2: (2,1,1), (1,2,1), (1,1,2)), flag and refuse an invalid
    combination, and a request with another offload / block swap records them in its sidecar."""
    with running_app(tmp_path, tiny_model_dir, nproc=2) as gang:
        ctx = browser.new_context(viewport={"width": 1400, "height": 1500})
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            open_page(page, gang.url)
            assert "2 ranks" in page.locator("h2").first.inner_text()
            assert layout_sizes(page) == (2, 1, 1)
            assert "Runs ulysses 2 × ring 1 on 2 ranks · context parallel on" in page.locator("#layout-note").inner_text()
            fill_small_request(page, "two ranks, one video")
            page.click("#generate")
            wait_status(page, "^Done")
            assert playable_video(page)["width"] == 208
            page.get_by_role("tab", name="Cluster").click()
            page.wait_for_function("document.querySelectorAll('#cluster .wan-mem').length === 2")
            cluster = page.locator("#cluster").inner_text()
            assert "rank 1 · cpu" in cluster and "Setup complete: FSDP=false, Context Parallel=true" in cluster
            assert re.search(r"context parallel \(default layout\)\s+on \(ulysses × ring = 2\)", cluster), cluster

            move_slider(page, "ring", +1)  # ring 2: Ulysses follows to 1
            wait_number(page, "ulysses", 1)
            assert layout_sizes(page) == (1, 2, 1)
            wait_note(page, "Runs ulysses 1 × ring 2 on 2 ranks · context parallel on")
            move_slider(page, "ulysses", +1)  # Ulysses 2: ring follows to 1
            wait_number(page, "ring", 1)
            assert layout_sizes(page) == (2, 1, 1)
            pick_cfg(page, 2)  # CFG parallel takes both ranks: Ulysses and ring go to 1
            wait_number(page, "ulysses", 1)
            assert layout_sizes(page) == (1, 1, 2)
            wait_note(page, "Runs cfg 2 × ulysses 1 × ring 1 on 2 ranks · context parallel off")
            move_slider(page, "ulysses", +1)  # Ulysses 2 with cfg 2 needs 4 ranks: flagged, not adjusted
            note = wait_note(page, "Not valid")
            assert "the product must equal the number of ranks" in note and layout_sizes(page) == (2, 1, 2)
            before = set(gang.videos())
            page.click("#generate")
            error = wait_status(page, "^Error")
            assert error.startswith("Error: layout: cfg_size 2 × ring_size 1 × ulysses_size 2 = 4, but the world size is 2")
            page.get_by_text(re.compile("cfg_size 2 × ring_size 1 × ulysses_size 2 = 4")).first.wait_for()  # the modal
            assert set(gang.videos()) == before  # refused: nothing ran

            move_slider(page, "ulysses", -1)  # valid again: (1, 1, 2)
            wait_note(page, "Runs cfg 2")
            move_slider(page, "offload", +5)  # 0 → 0.25 in steps of 0.05
            wait_number(page, "offload", 0.25)
            move_slider(page, "swap", +2)
            wait_number(page, "swap", 2)
            page.locator("#prompt textarea").fill("cfg over two ranks, blocks swapped")
            page.click("#generate")
            wait_status(page, "^Done")
            (mp4,) = sorted(set(gang.videos()) - before)
            side = json.loads(mp4.with_suffix(".json").read_text())
            assert side["layout"] == {"world_size": 2, "cfg_size": 2, "ring_size": 1, "ulysses_size": 1}
            mode = side["memory_mode"]  # both ranks re-planned their weights for this request
            assert (mode["blocks_to_swap"], mode["offload_percent"]) == (2, 0.25) and mode["host_gib"] > 0
            assert mode["replan_s"] > 0
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "test_two_rank_gang_serves_the_page_and_generates.png"),
                            full_page=True)
            ctx.close()
        assert "Initialized distributed environment with 2 processes" in gang.log(200_000)


def test_a_lora_chosen_on_the_page_with_a_strength_is_applied_and_recorded(browser, tmp_path, tiny_model_dir):
    """The LoRA accordion lists models/loras; choosing one shows its strength slider; the sidecar records both."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from engine.tiny import DIT_FILE

    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    with safe_open(str(tiny_model_dir / "diffusion_models" / DIT_FILE), "pt") as f:
        out_f, in_f = f.get_slice("blocks.0.self_attn.q.weight").get_shape()
    g = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, in_f, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(out_f, 2, generator=g) * 0.1},
              str(models / "loras" / "style.safetensors"))
    with running_app(tmp_path / "app", tiny_model_dir, "--model_dir", str(models)) as app:
        ctx = browser.new_context(viewport={"width": 1440, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            open_page(page, app.url)
            page.get_by_role("button", name=re.compile("^LoRAs")).first.click()
            page.locator("#lora-names input").first.click()
            page.get_by_role("option", name="style.safetensors", exact=True).click()
            page.locator("#lora-strength-0").wait_for(state="visible")
            assert "Strength of style.safetensors" in page.locator("#lora-strength-0").inner_text()
            assert not page.locator("#lora-strength-1").is_visible()
            set_number(page, "lora-strength-0", 0.5)
            fill_small_request(page, "a fox with a style", steps=1)
            page.click("#generate")
            wait_status(page, "^Done")
            (mp4,) = app.videos()
            side = json.loads(mp4.with_suffix(".json").read_text())
            (used,) = side["loras"]["loras"]
            assert (used["name"], used["strength"], used["tensors"]) == ("style.safetensors", 0.5, 1)
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "test_lora_chosen_on_the_page.png"), full_page=True)
            ctx.close()


def test_an_image_uploaded_on_the_i2v_page_becomes_the_video_and_is_deleted_after(browser, tmp_path, tiny_model_dir):
    """--task i2v-14B (the tiny I2V model): the page has a First frame box; a PNG dropped there shows as its
    preview (served back to this browser only), Generate makes a video in the image's aspect ratio, the status
    line names the image, and the upload is deleted with the request (the box empties)."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "landscape.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(src)
    with running_app(tmp_path / "app", tiny_model_dir, "--task", "i2v-14B") as app:
        ctx = browser.new_context(viewport={"width": 1440, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            open_page(page, app.url)
            assert "image-to-video" in page.locator("h2").first.inner_text()
            assert page.locator("#last_frame").count() == 0  # I2V: one image
            assert "Size gives its area" in page.locator("#image-note").inner_text()
            page.locator("#image input[type=file]").set_input_files(str(src))
            page.wait_for_function("() => { const i = document.querySelector('#image img');"
                                   " return i && i.complete && i.naturalWidth === 160; }")
            fill_small_request(page, "a picture comes alive")
            page.click("#generate")
            done = wait_status(page, "^Done")
            assert "first frame 160*120 (sha256 " in done, done
            video = playable_video(page)
            assert (video["width"], video["height"]) == (192, 144)  # 4:3 like the image, at the area of 208*144
            page.wait_for_function("() => !document.querySelector('#image img')")  # the upload is gone
            uploads = app.outputs / ".gradio-cache"
            assert [p for p in uploads.rglob("*.png")] == []
            side = json.loads(next(iter(app.videos())).with_suffix(".json").read_text())
            assert side["image"]["size"] == "160*120"
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "test_i2v_page.png"), full_page=True)
            ctx.close()
