"""The job store, the job queue and the /v1/videos routes without a gang (issue 19): SQLite rows and their
recovery after a restart, the queue's order, cancel and failure handling with a stand-in Dispatcher, and the
routes through starlette's test client (the page's validation messages, auth, the loopback rule, /metrics).
The real 2-rank gang: tests/test_jobs_api.py."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.pipeline import Cancelled
from parallel.job_queue import JobQueue, QueueFull, failure_reason, gang_failing
from parallel.jobs import MAX_ATTEMPTS, RESTARTED_TWICE, JobStore, is_job_id
from parallel.serve import RankFailed
from tests.test_ui import fake_14b_server, form  # noqa: F401 - the fixture: the real Dispatcher.validate, 14B, 4 ranks

KEY = "k" * 24


def wait_for(predicate, timeout: float = 10, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


# -- the store ------------------------------------------------------------------------------------------------
def test_store_is_sqlite_in_wal_mode_and_a_job_is_committed_when_add_returns(tmp_path):
    store = JobStore(tmp_path / "outputs")
    job = store.add({"prompt": "a fox", "sample_steps": 4}, "api", 4)
    assert is_job_id(job["id"]) and job["status"] == "queued" and job["position"] == 0 and job["attempts"] == 0
    other = sqlite3.connect(tmp_path / "outputs" / "jobs.sqlite")  # another connection sees it at once
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT status, source FROM jobs WHERE id = ?", (job["id"],)).fetchone() == ("queued", "api")
    assert json.loads(other.execute("SELECT request FROM jobs").fetchone()[0])["prompt"] == "a fox"


def test_jobs_are_claimed_oldest_first_and_queue_positions_count_the_jobs_ahead(tmp_path):
    store = JobStore(tmp_path)
    ids = [store.add({"prompt": f"p{i}"}, "api")["id"] for i in range(3)]
    assert [store.get(i)["position"] for i in ids] == [0, 1, 2]
    assert store.claim_next()["id"] == ids[0]
    assert store.get(ids[0])["position"] is None and store.get(ids[0])["attempts"] == 1
    assert [store.get(i)["position"] for i in ids[1:]] == [0, 1]
    assert store.cancel_queued(ids[1]) and not store.cancel_queued(ids[1])
    assert store.get(ids[2])["position"] == 0 and store.claim_next()["id"] == ids[2]
    assert store.claim_next() is None
    page, more = store.list_jobs(limit=2)
    assert [j["id"] for j in page] == [ids[2], ids[1]] and more
    page, more = store.list_jobs(limit=2, after=ids[1])
    assert [j["id"] for j in page] == [ids[0]] and not more
    assert [j["id"] for j in store.list_jobs(order="asc", status="cancelled")[0]] == [ids[1]]


def test_after_a_restart_the_running_job_goes_back_to_the_head_and_fails_after_two_starts(tmp_path):
    store = JobStore(tmp_path)
    a, b, c = (store.add({"prompt": p}, "api")["id"] for p in "abc")
    assert store.claim_next()["id"] == a  # running when the gang died
    store.close()
    store = JobStore(tmp_path)  # the next gang's rank 0
    (recovered,) = store.recover()
    assert recovered["id"] == a and recovered["status"] == "queued" and recovered["attempts"] == 1
    assert [store.get(i)["position"] for i in (a, b, c)] == [0, 1, 2]  # the order is kept
    assert store.claim_next()["id"] == a  # attempt 2 ... and the gang dies again
    (recovered,) = JobStore(tmp_path).recover()
    assert MAX_ATTEMPTS == 2 and recovered["status"] == "failed" and recovered["reason"] == "restarted"
    assert recovered["error"] == RESTARTED_TWICE == "the gang restarted 2 times while running this job"
    assert store.claim_next()["id"] == b


def test_a_cancel_asked_before_the_crash_is_honoured_after_it(tmp_path):
    store = JobStore(tmp_path)
    job_id = store.add({"prompt": "x"}, "api")["id"]
    store.claim_next()
    store.request_cancel(job_id)
    assert JobStore(tmp_path).recover()[0]["status"] == "cancelled"


def test_gang_restarts_are_counted_from_torchruns_restart_count_across_torchrun_runs(tmp_path):
    store = JobStore(tmp_path)
    assert store.count_restarts(0) == 0
    assert store.count_restarts(1) == 1  # torchrun restarted the gang
    assert store.count_restarts(3) == 3  # two more (one of them died while loading, before serving)
    assert store.count_restarts(0) == 3  # a new torchrun (the service restarted): counts from 0 again
    assert JobStore(tmp_path).count_restarts(1) == 4


def test_images_are_files_in_the_jobs_folder_and_go_with_the_job(tmp_path):
    store = JobStore(tmp_path / "outputs")
    job = store.add({"prompt": "x"}, "api", images={"image": b"\x89PNG-bytes"})
    folder = tmp_path / "outputs" / "jobs" / job["id"]
    assert (folder / "image").read_bytes() == b"\x89PNG-bytes"
    assert b"PNG-bytes" not in (tmp_path / "outputs" / "jobs.sqlite").read_bytes()  # not inside the row
    assert store.request_of(job) == {"prompt": "x", "image": b"\x89PNG-bytes"}
    mp4 = tmp_path / "outputs" / "a.mp4"
    mp4.write_bytes(b"mp4")
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"keep")
    assert store.delete(job["id"]) == []  # not finished: nothing removed
    store.finish(job["id"], "completed", outputs=[str(mp4), str(outside)])
    assert store.delete(job["id"]) == [str(mp4)]
    assert not folder.exists() and not mp4.exists() and outside.exists() and store.get(job["id"]) is None
    assert str(tmp_path / "outputs" / "jobs.sqlite") in store.private_paths()


# -- the queue, with a stand-in Dispatcher --------------------------------------------------------------------
class FakeDispatcher:
    """submit() runs `steps` steps of `step_s` each, honouring cancel at step boundaries; `fail` raises instead."""

    def __init__(self, steps: int = 3, step_s: float = 0.0) -> None:
        self.steps, self.step_s = steps, step_s
        self.cancel_event = threading.Event()
        self.busy = False
        self.ran: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: BaseException | None = None

    def submit(self, raw, progress=None, **_):
        self.busy = True
        try:
            self.ran.append(raw["prompt"])
            self.gate.wait(30)
            if self.fail is not None:
                raise self.fail
            for step in range(1, self.steps + 1):
                if self.cancel_event.is_set():
                    self.cancel_event.clear()
                    raise Cancelled(f"cancelled at step {step - 1}")
                time.sleep(self.step_s)
                if progress is not None:
                    progress(step, self.steps, step * self.step_s)
            req = SimpleNamespace(base_seed=7, sample_steps=self.steps)
            return SimpleNamespace(request=req, videos=[], sidecars=[], meta={"timings": {"denoise_s": 0.1}},
                                   memory=[{"rank": 0, "peak_gib": 1.0}])
        finally:
            self.busy = False

    def cancel(self) -> None:
        if self.busy:
            self.cancel_event.set()


def queue_for(tmp_path, dispatcher, queue_size: int = 8, failed=None) -> JobQueue:
    cfg = SimpleNamespace(heartbeat_timeout=0.1, fault_grace=0.0, outputs_dir=str(tmp_path))
    server = SimpleNamespace(dispatcher=dispatcher, failed=failed, cfg=cfg, last_memory=[])
    q = JobQueue(server, JobStore(tmp_path), queue_size)
    q.start()
    return q


def test_the_queue_runs_jobs_in_order_and_records_results(tmp_path):
    d = FakeDispatcher()
    d.gate.clear()
    q = queue_for(tmp_path, d)
    ids = [q.enqueue({"prompt": p}, "api", 3)["id"] for p in ("a", "b", "c")]
    d.gate.set()
    wait_for(lambda: all(q.view(i)["status"] == "completed" for i in ids), what="three jobs")
    assert d.ran == ["a", "b", "c"]
    done = q.view(ids[0])
    assert (done["attempts"], done["seed"], done["steps_done"], done["timings"]) == (1, 7, 3, {"denoise_s": 0.1})
    text = q.metrics.exposition().decode()
    assert "wan_videos_completed_total 3.0" in text and 'wan_gpu_memory_peak_bytes{rank="0"} 1.073741824e+09' in text


def test_a_full_queue_refuses_with_a_retry_after_and_the_page_is_not_refused(tmp_path):
    d = FakeDispatcher()
    d.gate.clear()
    q = queue_for(tmp_path, d, queue_size=2)
    q.enqueue({"prompt": "running"}, "api")
    wait_for(lambda: d.ran, what="the first job to start")
    q.enqueue({"prompt": "w1"}, "api")
    q.enqueue({"prompt": "w2"}, "api")
    with pytest.raises(QueueFull) as err:
        q.enqueue({"prompt": "w3"}, "api")
    assert err.value.retry_after == 30 and str(err.value) == "the queue is full (2 jobs waiting); try again in 30 s"
    page_id, future = q.submit({"prompt": "page", "sample_steps": 3})  # Gradio's own queue bounds the page
    assert q.view(page_id)["source"] == "page" and q.view(page_id)["position"] == 2
    d.gate.set()
    assert future.result(timeout=10).request.base_seed == 7
    assert d.ran == ["running", "w1", "w2", "page"]  # one queue, one order
    assert q.retry_after() >= 1


def test_cancel_drops_a_queued_job_and_stops_the_running_one_at_the_next_step(tmp_path):
    d = FakeDispatcher(steps=500, step_s=0.01)
    q = queue_for(tmp_path, d)
    running = q.enqueue({"prompt": "long"}, "api", 500)["id"]
    waiting = q.enqueue({"prompt": "waiting"}, "api", 500)["id"]
    wait_for(lambda: q.view(running)["steps_done"] >= 2, what="the first job to step")
    assert q.cancel(waiting)["status"] == "cancelled"
    view = q.cancel(running)
    assert view["status"] in ("in_progress", "cancelled") and view["cancel_requested"]  # cancelled at the next step
    ended = wait_for(lambda: (j := q.view(running))["status"] == "cancelled" and j, what="the cancel")
    assert 2 <= ended["steps_done"] < 500
    assert d.ran == ["long"]  # the cancelled queued job never reached the gang
    assert "wan_videos_cancelled_total 2.0" in q.metrics.exposition().decode()


def test_the_jobs_own_failure_fails_it_and_a_failing_gang_leaves_it_for_the_next_gang(tmp_path):
    d = FakeDispatcher()
    q = queue_for(tmp_path, d)
    d.fail = RankFailed(1, 2, "out of GPU memory (832*480, 81 frames, batch 1): use fewer frames")
    failed = q.enqueue({"prompt": "oom"}, "api")["id"]
    job = wait_for(lambda: (j := q.view(failed))["status"] == "failed" and j, what="the failure")
    assert job["error"] == "rank 1 failed at step 2: out of GPU memory (832*480, 81 frames, batch 1): use fewer frames"
    assert job["reason"] == "out_of_memory"
    assert 'wan_videos_failed_total{reason="out_of_memory"} 1.0' in q.metrics.exposition().decode()
    # a rank gone under the job: it stays in_progress while the gang ends (server.failed), for the next gang
    d.fail = RankFailed(0, 3, "DistBackendError: [Gloo] Connection closed by peer [127.0.0.1]:4242")
    lost = q.enqueue({"prompt": "lost"}, "api")["id"]
    wait_for(lambda: len(d.ran) == 2, what="the second job to start")
    q.server.failed = "a rank of the gang stopped answering the heartbeat"
    time.sleep(0.8)
    assert q.view(lost)["status"] == "in_progress"
    assert JobStore(tmp_path).recover()[0]["status"] == "queued"  # what the next gang does with it


def test_a_page_upload_named_by_path_is_copied_into_the_job_and_other_paths_are_refused(tmp_path):
    from engine.request import RequestError

    d = FakeDispatcher()
    d.gate.clear()
    uploads = tmp_path / "outputs" / ".gradio-cache"
    uploads.mkdir(parents=True)
    (uploads / "fox.png").write_bytes(b"\x89PNG-upload")
    d.info = SimpleNamespace(limits=SimpleNamespace(upload_dirs=(str(uploads),)))
    q = queue_for(tmp_path / "outputs", d)
    job = q.enqueue({"prompt": "x", "image": str(uploads / "fox.png")}, "page")
    (uploads / "fox.png").unlink()  # the page deletes its upload once the request is over
    assert q.store.request_of(q.store.get(job["id"]))["image"] == b"\x89PNG-upload"
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    with pytest.raises(RequestError, match="^image: must be uploaded image data, not a path on the server"):
        q.enqueue({"prompt": "x", "image": str(secret)}, "page")


def test_failure_classification():
    from parallel.lora import LoraRefused

    assert failure_reason(LoraRefused(1, "bad file")) == "refused"
    assert failure_reason(RankFailed(1, 0, "InjectedFault: boom")) == "rank_failed"
    assert failure_reason(ValueError("x")) == "error"
    assert gang_failing(RankFailed(1, 0, "DistBackendError: ... timed out"), False)
    assert not gang_failing(RankFailed(1, 0, "InjectedFault: boom"), True)  # its own fault, even while ending
    assert gang_failing(RuntimeError("the request was interrupted: ...; the server is restarting"), True)
    assert not gang_failing(OSError("No space left on device"), False)


# -- the routes -----------------------------------------------------------------------------------------------
def api_client(server, tmp_path, key: str | None = KEY, listen: str = "127.0.0.1", share: bool = False,
               api_open: bool = False, queue_size: int = 8):
    import warnings

    from starlette.applications import Starlette

    with warnings.catch_warnings():  # starlette 1.x: "install httpx2" (httpx is what this project pins)
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from parallel.api import api_routes

    server.pipe = SimpleNamespace(model_name="wan2.1-14B")
    cfg = server.cfg.replace(outputs_dir=str(tmp_path), api_key=key, listen=listen, share=share, api_open=api_open,
                             queue_size=queue_size)
    d = FakeDispatcher()
    d.gate.clear()  # jobs wait: the tests look at them queued
    jobs = JobQueue(SimpleNamespace(dispatcher=d, failed=None, cfg=cfg, last_memory=[]), JobStore(tmp_path), queue_size)
    jobs.start()
    client = TestClient(Starlette(routes=api_routes(server, cfg, jobs)))
    client.headers["Authorization"] = f"Bearer {key}"
    client.jobs = jobs
    return client


def test_post_queues_a_job_and_get_shows_it(fake_14b_server, tmp_path):  # noqa: F811
    api = api_client(fake_14b_server, tmp_path)
    r = api.post("/v1/videos", json={"prompt": "a fox", "size": "832*480", "frame_num": 17, "seed": 5,
                                     "ulysses_size": 4, "model": "sora-2"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert is_job_id(job["id"]) and (job["object"], job["status"], job["model"]) == ("video", "queued", "wan2.1-14B")
    assert abs(job["created_at"] - time.time()) < 60 and job["size"] == "832*480" and job["steps_total"] == 50
    assert job["request"] == {"prompt": "a fox", "size": "832*480", "frame_num": 17, "base_seed": 5, "ulysses_size": 4}
    shown = api.get(f"/v1/videos/{job['id']}").json()
    assert shown["status"] in ("queued", "in_progress") and shown["progress"] == 0
    assert api.get("/v1/videos").json()["data"][0]["id"] == job["id"]
    assert api.get(f"/v1/videos/{job['id']}/content").status_code == 409
    assert api.get("/v1/videos/video_" + "0" * 32).json()["error"]["type"] == "not_found"


@pytest.mark.parametrize("changes", [
    {"frame_num": 80}, {"prompt": "   "}, {"size": "1024*1024"}, {"sample_steps": 0}, {"base_seed": -7},
    {"ulysses_size": 3}, {"ulysses_size": 2, "ring_size": 1}, {"blocks_to_swap": 41}, {"offload_percent": 1.5},
    {"sample_shift": 0}, {"prompt": "a cat \ud800"},
], ids=lambda c: ",".join(c))
def test_a_bad_field_gets_422_with_the_pages_message(fake_14b_server, tmp_path, changes):  # noqa: F811
    import gradio as gr

    from ui import Controller

    with pytest.raises(gr.Error) as page:
        Controller(fake_14b_server, fake_14b_server.cfg).raw_request(**form(**changes))
    api = api_client(fake_14b_server, tmp_path)
    body = {**form(**changes)}
    body["seed"] = body.pop("base_seed")
    r = api.post("/v1/videos", content=json.dumps(body).encode())
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["message"] == page.value.plain and error["field"] == page.value.title.removeprefix("Invalid ")


def test_malformed_bodies_and_unknown_fields_are_refused_naming_what_is_wrong(fake_14b_server, tmp_path):  # noqa: F811
    api = api_client(fake_14b_server, tmp_path)
    cases = [
        (b"{not json", 400, None, "the request body is not valid JSON; send a JSON object like {\"prompt\": \"a fox in the snow\"}"),
        (b'["a fox"]', 400, None, "the request body must be a JSON object, got a JSON list"),
        (b"\xff\xfe", 400, None, "the request body is not UTF-8; send a JSON object like {\"prompt\": \"a fox in the snow\"}"),
        (b"[" * 600_000 + b"]" * 600_000, 413, None, "the request body is over 1024 KiB"),
        (json.dumps({"prompt": "x", "steps": 4}).encode(), 422, "steps", "steps: unknown field; the fields are prompt, "
         "negative_prompt, size, frame_num, sample_steps, sample_guide_scale, sample_shift, seed, sample_solver, "
         "batch_size, ulysses_size, ring_size, cfg_size, offload_percent, blocks_to_swap, teacache, loras, "
         "sample_timesteps, image, last_frame"),
        (json.dumps({"prompt": "x", "seed": 1, "base_seed": 2}).encode(), 422, "seed", "seed: give seed or base_seed, not both"),
        (json.dumps({"prompt": "x", "model": 3}).encode(), 422, "model",
         "model: must be text (it is ignored: this server runs one model), got int"),
        (json.dumps({"prompt": "x", "frame_num": 10**400}).encode(), 422, "frame_num",
         "frame_num: must be between 1 and 241, got an integer of 401 digits"),
        (b'{"prompt": "x", "frame_num": 1' + b"0" * 5000 + b"}", 400, None, None),  # over Python's int digit limit
    ]
    for body, status, field, message in cases:
        r = api.post("/v1/videos", content=body)
        assert r.status_code == status, (body[:40], r.text)
        assert r.json()["error"]["field"] == field, r.text
        if message is not None:
            assert r.json()["error"]["message"] == message
    assert api.jobs.store.counts()["queued"] == 0


@pytest.mark.parametrize("value, message", [
    ("!!!", "this is not valid base64"),
    ("aGVsbG8h1", "this is not valid base64"),  # 9 characters: no base64 has that length
    ("", "got an empty string"),
    ("data:image/png,AAAA", "a data: URL must be data:image/...;base64,<data>"),
    (12, "got int"),
])
def test_a_bad_base64_image_is_refused_naming_the_field(fake_14b_server, tmp_path, value, message):  # noqa: F811
    api = api_client(fake_14b_server, tmp_path)
    for name in ("image", "last_frame"):
        r = api.post("/v1/videos", json={"prompt": "x", name: value})
        assert r.status_code == 422 and r.json()["error"]["field"] == name, r.text
        assert r.json()["error"]["message"] == (f"{name}: must be a PNG, JPEG or WebP image as a base64 string (at "
                                                f"most 20 MB); {message}")


def test_a_good_base64_image_reaches_the_models_validation(fake_14b_server, tmp_path):  # noqa: F811
    """Decoded, then checked by engine/request.py: a text-to-video model takes no image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    api = api_client(fake_14b_server, tmp_path)
    for value in (base64.b64encode(buf.getvalue()).decode(), "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()):
        r = api.post("/v1/videos", json={"prompt": "x", "image": value})
        assert r.status_code == 422 and r.json()["error"] == {
            "message": "image: this server runs a text-to-video model of size 14B; it takes no image",
            "type": "invalid_request_error", "field": "image"}


def test_every_call_needs_the_key_when_one_is_set(fake_14b_server, tmp_path):  # noqa: F811
    api = api_client(fake_14b_server, tmp_path)
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        for method, path in (("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/metrics"),
                             ("DELETE", "/v1/videos/video_" + "0" * 32)):
            r = api.request(method, path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, path, r.text)
            assert r.json()["error"]["message"] == ("missing or wrong API key: send 'Authorization: Bearer KEY' with "
                                                    "the server's --api_key")
    assert api.get("/v1/videos").status_code == 200 and api.get("/metrics").status_code == 200


def test_without_a_key_the_api_is_served_on_loopback_only_unless_api_open(fake_14b_server, tmp_path):  # noqa: F811
    assert api_client(fake_14b_server, tmp_path / "a", key=None).get("/v1/videos").status_code == 200
    assert api_client(fake_14b_server, tmp_path / "b", key=None, listen="::1").get("/metrics").status_code == 200
    for where, kwargs in (("0.0.0.0", {"listen": "0.0.0.0"}), ("a share link", {"share": True})):
        api = api_client(fake_14b_server, tmp_path / where.replace(" ", "_"), key=None, **kwargs)
        for path in ("/v1/videos", "/metrics"):
            r = api.get(path)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["message"] == (
                f"the /v1/ API and /metrics are off: this server serves {where} without --api_key. Start it with "
                "--api_key KEY (or --api_key_file FILE) and send 'Authorization: Bearer KEY', or with --api_open to "
                "serve them without a key")
    assert api_client(fake_14b_server, tmp_path / "c", key=None, listen="0.0.0.0",
                      api_open=True).get("/v1/videos").status_code == 200


def test_full_queue_answers_429_with_retry_after(fake_14b_server, tmp_path):  # noqa: F811
    api = api_client(fake_14b_server, tmp_path, queue_size=1)
    ok = [api.post("/v1/videos", json={"prompt": f"p{i}"}) for i in range(2)]  # one runs (held), one waits
    assert [r.status_code for r in ok] == [200, 200]
    r = api.post("/v1/videos", json={"prompt": "one too many"})
    assert r.status_code == 429 and r.headers["retry-after"] == "30"
    assert r.json()["error"] == {"message": "the queue is full (1 jobs waiting); try again in 30 s",
                                 "type": "queue_full", "field": None}


def test_list_parameters_are_checked(fake_14b_server, tmp_path):  # noqa: F811
    api = api_client(fake_14b_server, tmp_path)
    for query, message in (("limit=0", "limit: must be an integer between 1 and 100, got '0'"),
                           ("limit=x", "limit: must be an integer between 1 and 100, got 'x'"),
                           ("order=up", "order: must be asc or desc, got 'up'"),
                           ("status=done", "status: must be one of queued, in_progress, completed, failed, cancelled, got 'done'")):
        r = api.get(f"/v1/videos?{query}")
        assert r.status_code == 400 and r.json()["error"]["message"] == message, r.text
    assert api.get("/v1/videos?after=nope").status_code == 404


def test_metrics_are_prometheus_text_that_prometheus_client_parses(fake_14b_server, tmp_path):  # noqa: F811
    from prometheus_client.parser import text_string_to_metric_families

    api = api_client(fake_14b_server, tmp_path)
    r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name, kind in (("wan_videos_completed", "counter"), ("wan_videos_failed", "counter"),
                       ("wan_queue_depth", "gauge"), ("wan_request_duration_seconds", "histogram"),
                       ("wan_step_seconds", "histogram"), ("wan_gpu_memory_peak_bytes", "gauge"),
                       ("wan_gang_restarts", "counter")):
        assert families[name].type == kind, name
    reasons = {s.labels["reason"] for s in families["wan_videos_failed"].samples if s.name.endswith("_total")}
    assert reasons == {"rank_failed", "out_of_memory", "refused", "restarted", "error"}
    assert any(s.name == "wan_request_duration_seconds_bucket" for s in families["wan_request_duration_seconds"].samples)


def test_api_key_file_is_read_once_and_a_bad_one_is_a_flag_error(tmp_path):
    from app import load_config, read_api_key

    f = tmp_path / "key"
    f.write_text("# the team's key\n  " + KEY + "  \n")
    assert read_api_key(load_config(["--api_key_file", str(f)])) == KEY
    assert read_api_key(load_config([])) is None
    for argv, message in ((["--api_key_file", str(tmp_path / "missing")], "--api_key_file: cannot read"),
                          (["--api_key", "a b"], "--api_key: the key must be printable ASCII without spaces"),
                          (["--api_key", "x", "--api_key_file", str(f)], "give one of them, not both")):
        with pytest.raises(ValueError, match=message):
            read_api_key(load_config(argv))
    assert KEY not in repr(load_config(["--api_key", KEY]))  # never in a logged config


def test_a_missing_key_file_stops_before_loading_the_model(tmp_path):
    import subprocess
    import sys

    from tests.ui_server import ROOT

    r = subprocess.run([sys.executable, "app.py", "--api_key_file", str(tmp_path / "nope"), "--model_dir",
                        str(tmp_path / "models")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"app.py: error: --api_key_file: cannot read {tmp_path / 'nope'}" in r.stderr
    assert not (tmp_path / "models").exists()


def test_the_page_history_reads_the_store(tmp_path):
    from ui_parts import history_items

    store = JobStore(tmp_path)
    mp4 = Path(tmp_path) / "fox.mp4"
    mp4.write_bytes(b"x")
    mp4.with_suffix(".json").write_text(json.dumps({"prompt": "a fox", "seed": 3, "size": "64*64", "frame_num": 5}))
    job = store.add({"prompt": "a fox"}, "api")
    store.claim_next()
    store.finish(job["id"], "completed", outputs=[str(mp4), str(mp4.with_suffix(".json"))])
    (tmp_path / "not-a-job.mp4").write_bytes(b"x")  # on disk but no job knows it
    gallery, paths = history_items(tmp_path, store.history(10))
    assert paths == [str(mp4)] and gallery[0][1] == "a fox · seed 3 · 64*64 · 5 frames"
