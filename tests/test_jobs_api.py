"""The jobs API against the real server (issue 19): a 2-rank CPU gang started by `./launch.sh --nproc 2`
(torchrun, restarts allowed), the tiny random-weight model, a plain HTTP client (httpx).

One gang for the module, `--api_key` set; the crash test comes last (it restarts the gang: a new rank 0, a new
port, the same job store). Figures are printed and kept in test-artifacts/jobs-api.json."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.reliability_util import start_gang, wait_for
from tests.ui_server import ROOT

pytestmark = pytest.mark.multirank

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUICK = {"size": "64*64", "frame_num": 5, "sample_steps": 2}  # about a second on 2 CPU cores
LONG = {"size": "208*144", "frame_num": 5, "sample_steps": 200}  # far longer than any test waits for it
QUEUE_SIZE = 3


def record(name: str, **figures) -> None:
    figures = {"test": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    print(f"\nFIGURES {json.dumps(figures, default=str)}")
    out = ROOT / "test-artifacts" / "jobs-api.json"
    out.parent.mkdir(exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[name] = figures
    out.write_text(json.dumps(data, indent=1, default=str))


@pytest.fixture(scope="module")
def gang(tmp_path_factory, tiny_model_dir):
    g = start_gang(tmp_path_factory.mktemp("jobs-api"), tiny_model_dir, "--api_key", KEY, "--queue_size",
                   str(QUEUE_SIZE), "--heartbeat_timeout", "30", auth=False)
    try:
        yield g.wait_ready()
    finally:
        g.stop()


def api(gang, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, gang.url + path, headers={**AUTH, **kwargs.pop("headers", {})}, timeout=30, **kwargs)


def post(gang, **body) -> dict:
    r = api(gang, "POST", "/v1/videos", json={"prompt": "a red fox in the snow", **body})
    assert r.status_code == 200, r.text
    return r.json()


def job(gang, video_id: str) -> dict:
    r = api(gang, "GET", f"/v1/videos/{video_id}")
    assert r.status_code == 200, r.text
    return r.json()


def until(gang, video_id: str, predicate, timeout: float = 120, what: str = "the job") -> dict:
    def check() -> dict | None:
        j = job(gang, video_id)
        return j if predicate(j) else None

    return wait_for(check, timeout, 0.05, what)


def ended(j: dict) -> bool:
    return j["status"] in ("completed", "failed", "cancelled")


def metrics(gang) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client: 'name{label="v"}' → value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = api(gang, "GET", "/metrics")
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def assert_mp4(gang, video_id: str) -> bytes:
    r = api(gang, "GET", f"/v1/videos/{video_id}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text[:300]
    assert r.content[4:8] == b"ftyp", r.content[:16]  # an ISO media file: its first box is ftyp
    return r.content


# -- the endpoints ----------------------------------------------------------------------------------------------
def test_without_the_key_every_v1_call_and_metrics_answer_401_and_healthz_stays_open(gang):
    for method, path in (("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/metrics"),
                         ("GET", "/v1/videos/video_" + "0" * 32 + "/content")):
        for headers in ({}, {"Authorization": "Bearer not-the-key"}):
            r = httpx.request(method, gang.url + path, headers=headers, json={"prompt": "x"}, timeout=30)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
            assert "missing or wrong API key" in r.json()["error"]["message"]
    assert httpx.get(gang.url + "/healthz", timeout=30).status_code == 200
    assert api(gang, "GET", "/v1/videos").json()["object"] == "list"


def test_a_job_is_queued_runs_and_its_content_is_the_mp4_and_the_metrics_count_it(gang):
    before = metrics(gang)
    created = post(gang, seed=11, **QUICK)
    assert created["status"] == "queued" and created["object"] == "video" and created["id"].startswith("video_")
    assert (created["size"], created["frame_num"], created["steps_total"], created["progress"]) == ("64*64", 5, 2, 0)
    done = until(gang, created["id"], ended)
    assert done["status"] == "completed", done
    assert (done["progress"], done["steps_done"], done["seed"], done["attempts"], done["videos"]) == (100, 2, 11, 1, 1)
    assert done["started_at"] >= done["created_at"] and done["completed_at"] >= done["started_at"]
    assert done["timings"]["run_s"] > 0 and done["timings"]["stages"]["denoise_s"] > 0
    assert done["content_url"] == f"/v1/videos/{created['id']}/content"
    assert_mp4(gang, created["id"])
    listed = api(gang, "GET", "/v1/videos", params={"limit": 1}).json()
    assert listed["data"][0]["id"] == created["id"] and listed["first_id"] == created["id"]
    after = metrics(gang)
    assert after["wan_videos_completed_total"] == before["wan_videos_completed_total"] + 1
    assert after["wan_request_duration_seconds_count"] == before["wan_request_duration_seconds_count"] + 1
    assert after['wan_request_duration_seconds_bucket{le="+Inf"}'] == after["wan_request_duration_seconds_count"]
    assert after["wan_step_seconds_count"] > before["wan_step_seconds_count"]
    assert after["wan_queue_depth"] == 0 and after["wan_gang_restarts_total"] == 0
    assert after['wan_gpu_memory_peak_bytes{rank="0"}'] > 0 and 'wan_gpu_memory_peak_bytes{rank="1"}' in after
    assert after['wan_videos_failed_total{reason="rank_failed"}'] == 0


def test_the_pages_file_route_serves_neither_the_job_store_nor_the_jobs_inputs(gang):
    from tests.reliability_util import raw_get

    outputs = gang.outputs.resolve()
    (outputs / "jobs" / "video_probe").mkdir(parents=True, exist_ok=True)
    (outputs / "jobs" / "video_probe" / "image").write_bytes(b"PRIVATE-INPUT")
    for target in (outputs / "jobs.sqlite", outputs / "jobs.sqlite-wal", outputs / "jobs" / "video_probe" / "image"):
        for prefix in ("/gradio_api/file=", "/gradio_api/file/"):
            status, body = raw_get(gang.port, f"{prefix}{target}")
            assert status in (403, 404) and b"SQLite" not in body and b"PRIVATE" not in body, (target, status)


def test_bad_fields_are_refused_with_the_field_and_the_allowed_values(gang):
    cases = [
        ({"frame_num": 80}, 422, "frame_num", "frame_num: must be 4n+1 between 1 and 241 (e.g. 17, 33, 81), got 80"),
        ({"ring_size": 1, "ulysses_size": 1, "cfg_size": 1}, 422, "layout",
         "layout: cfg_size 1 × ring_size 1 × ulysses_size 1 = 1, but the world size is 2"),
        ({"ulysses_size": 3}, 422, "ulysses_size", "ulysses_size: ulysses_size=3 does not divide the model's 4 attention heads"),
        ({"size": "100*100"}, 422, "size", "size: the tiny"),
        ({"image": "not base64!"}, 422, "image", "image: must be a PNG, JPEG or WebP image as a base64 string (at most "
                                                 "20 MB); this is not valid base64"),
        ({"steps": 3}, 422, "steps", "steps: unknown field; the fields are prompt, negative_prompt, size, "),
    ]
    for body, status, field, message in cases:
        r = api(gang, "POST", "/v1/videos", json={"prompt": "a cat", **QUICK, **body})
        assert r.status_code == status and r.json()["error"]["field"] == field, r.text
        assert r.json()["error"]["message"].startswith(message), r.text
    r = api(gang, "POST", "/v1/videos", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the request body is not valid JSON")
    r = api(gang, "POST", "/v1/videos", content=b'{"prompt": "' + b"x" * 2**21 + b'"}')
    assert r.status_code == 413 and r.json()["error"]["message"] == "the request body is over 1024 KiB"
    assert api(gang, "GET", "/v1/videos/video_nope").status_code == 404


def test_a_full_queue_answers_429_with_retry_after_and_cancel_works_queued_and_running(gang):
    before = metrics(gang)
    running = post(gang, seed=1, **LONG)
    until(gang, running["id"], lambda j: j["status"] == "in_progress" and j["steps_done"] >= 1, what="denoising")
    waiting = [post(gang, seed=2 + i, **QUICK) for i in range(QUEUE_SIZE)]
    assert [job(gang, w["id"])["queue_position"] for w in waiting] == [0, 1, 2]
    r = api(gang, "POST", "/v1/videos", json={"prompt": "one too many", **QUICK})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    assert r.json()["error"]["message"].startswith(f"the queue is full ({QUEUE_SIZE} jobs waiting); try again in ")
    assert metrics(gang)["wan_queue_depth"] == QUEUE_SIZE
    dropped = api(gang, "DELETE", f"/v1/videos/{waiting[1]['id']}").json()
    assert dropped["status"] == "cancelled" and dropped["started_at"] is None
    assert [job(gang, w["id"])["queue_position"] for w in (waiting[0], waiting[2])] == [0, 1]
    stopping = api(gang, "DELETE", f"/v1/videos/{running['id']}").json()
    assert stopping["cancel_requested"] is True and stopping["status"] in ("in_progress", "cancelled")
    stopped = until(gang, running["id"], ended, what="the cancel at the next step")
    assert stopped["status"] == "cancelled" and 1 <= stopped["steps_done"] < LONG["sample_steps"], stopped
    assert api(gang, "GET", f"/v1/videos/{running['id']}/content").status_code == 409
    first, last = (until(gang, w["id"], ended) for w in (waiting[0], waiting[2]))
    assert first["status"] == last["status"] == "completed" and last["started_at"] >= first["completed_at"]
    assert job(gang, waiting[1]["id"])["status"] == "cancelled"  # never ran
    assert metrics(gang)["wan_videos_cancelled_total"] == before["wan_videos_cancelled_total"] + 2
    purged = api(gang, "DELETE", f"/v1/videos/{first['id']}", params={"purge": "true"}).json()
    assert purged == {"id": first["id"], "object": "video.deleted", "deleted": True, "files": 2}
    assert api(gang, "GET", f"/v1/videos/{first['id']}").status_code == 404


def test_the_page_and_the_api_share_one_queue_in_one_order(gang):
    """An API job runs; the page's request and then another API job wait behind it, in the order they came."""
    from gradio_client import Client

    running = post(gang, seed=21, **{**QUICK, "sample_steps": 12})
    until(gang, running["id"], lambda j: j["status"] != "queued", what="the first job to start")
    page = Client(gang.url, verbose=False, download_files=False).submit(
        prompt="from the page", base_seed=22, api_name="/generate", **QUICK)
    page_job = wait_for(lambda: next((j for j in api(gang, "GET", "/v1/videos").json()["data"]
                                      if j["source"] == "page" and j["prompt"] == "from the page"), None),
                        60, 0.05, "the page's job in the store")
    after = post(gang, seed=23, **QUICK)
    if job(gang, running["id"])["status"] == "in_progress":  # still running: both wait, the page's first
        assert job(gang, page_job["id"])["queue_position"] == 0 and job(gang, after["id"])["queue_position"] == 1
    video, *_, status = page.result(timeout=120)
    assert status.startswith("Done"), status
    jobs = [until(gang, i, ended) for i in (running["id"], page_job["id"], after["id"])]
    assert [j["status"] for j in jobs] == ["completed"] * 3
    assert jobs[1]["started_at"] >= jobs[0]["completed_at"] and jobs[2]["started_at"] >= jobs[1]["completed_at"]
    assert jobs[1]["seed"] == 22
    assert_mp4(gang, page_job["id"])  # the page's video, through the API too


def test_image_to_video_takes_the_image_as_base64_and_keeps_it_in_the_jobs_folder(tmp_path, tiny_model_dir):
    """One process serving the embedded tiny I2V model: the image arrives as base64, is a file of the job (not in
    the database) until the job is purged, and conditions the video (its sidecar has the image's hash)."""
    import base64
    import hashlib
    import io

    import numpy as np
    from PIL import Image

    from engine.tiny import ensure_tiny_model
    from tests.ui_server import running_app

    models = ensure_tiny_model(tmp_path / "models", "i2v")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    with running_app(tmp_path / "app", tiny_model_dir, "--model_dir", str(models)) as app, \
            httpx.Client(base_url=app.url, timeout=60) as http:
        body = {"prompt": "a cat walks", "size": "64*64", "frame_num": 5, "sample_steps": 2, "seed": 3}
        r = http.post("/v1/videos", json=body)
        assert r.status_code == 422 and r.json()["error"]["field"] == "image", r.text
        assert "image-to-video model needs image" in r.json()["error"]["message"]
        created = http.post("/v1/videos", json={**body, "image": base64.b64encode(png).decode()}).json()
        folder = app.outputs / "jobs" / created["id"]
        assert (folder / "image").read_bytes() == png and created["request"]["image"] == "<image of this job>"
        done = wait_for(lambda: (j := http.get(f"/v1/videos/{created['id']}").json())["status"] != "queued"
                        and j["status"] != "in_progress" and j, 120, 0.1, "the I2V job")
        assert done["status"] == "completed", done
        assert png not in (app.outputs / "jobs.sqlite").read_bytes()
        video = http.get(f"/v1/videos/{created['id']}/content")
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        side = json.loads(next(app.outputs.glob("*.json")).read_text())
        normalised = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(normalised, format="PNG")
        assert side["image"]["sha256"] == hashlib.sha256(normalised.getvalue()).hexdigest()
        purged = http.delete(f"/v1/videos/{created['id']}", params={"purge": "true"}).json()
        assert purged["deleted"] is True and not folder.exists() and not list(app.outputs.glob("*.mp4"))


# -- crash and resume (last: it restarts the gang) ----------------------------------------------------------------
def test_sigkill_of_rank0_while_a_job_runs_with_two_queued_all_three_complete_after_the_restart(gang):
    running = post(gang, seed=31, **{**LONG, "sample_steps": 16})
    queued = [post(gang, seed=32, **QUICK), post(gang, seed=33, **QUICK)]
    ids = [running["id"], *(q["id"] for q in queued)]
    until(gang, running["id"], lambda j: j["status"] == "in_progress" and j["steps_done"] >= 2, what="denoising")
    old = gang.rank_pids()
    restarts = gang.log(0).count("the gang was restarted after a failure")
    t_kill = time.monotonic()
    os.kill(old[0], signal.SIGKILL)  # rank 0: the web server, the job store's writer, the queue's worker
    wait_for(lambda: set(gang.rank_pids().values()).isdisjoint(old.values()) and len(gang.rank_pids()) == 2,
             120, 0.1, "a new gang")
    wait_for(lambda: gang.serving(), 120, 0.1, "the new rank 0 to serve")
    serving_s = time.monotonic() - t_kill
    resumed = until(gang, running["id"], ended, timeout=180, what="the interrupted job, run again")
    resumed_s = time.monotonic() - t_kill
    jobs = [resumed, *(until(gang, i, ended, timeout=120) for i in ids[1:])]
    all_s = time.monotonic() - t_kill
    record("crash_rank0_resume", serving_again_s=round(serving_s, 1), interrupted_job_completed_s=round(resumed_s, 1),
           all_three_completed_s=round(all_s, 1), interrupted_job_run_s=resumed["timings"].get("run_s"),
           attempts=[j["attempts"] for j in jobs])
    assert [j["status"] for j in jobs] == ["completed"] * 3, jobs
    assert [j["attempts"] for j in jobs] == [2, 1, 1]  # the interrupted one ran again; the queued ones once
    assert jobs[1]["started_at"] >= jobs[0]["completed_at"] and jobs[2]["started_at"] >= jobs[1]["completed_at"]
    assert [j["seed"] for j in jobs] == [31, 32, 33]
    for i in ids:
        assert_mp4(gang, i)
    assert gang.log(0).count("the gang was restarted after a failure") == restarts + 1
    m = metrics(gang)
    assert m["wan_gang_restarts_total"] == 1 and m["wan_videos_completed_total"] == 3  # counted by the new rank 0
    assert "queued again at the head (attempt 2 of 2 next)" in gang.log(0)
