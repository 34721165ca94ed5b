"""The one queue of rank 0: jobs of the /v1/videos API and of the page, in the store's order, run one at a
time through `server.dispatcher.submit` by a single worker thread.

The Dispatcher broadcasts each request to every rank, so nothing here adds a collective: a cancel is
`dispatcher.cancel()` (agreed at the next step by every rank), progress is the Dispatcher's callback.

What happens to a job when something goes wrong:
- cancelled (queued: at once; running: at the next step) → `cancelled`;
- the job's own failure (a rank raised in it, a LoRA or memory mode refused, an OOM) → `failed` with the
  one-line message the page shows;
- the gang failing under it (a rank gone, a collective broken, "restarting") → the job stays `in_progress`
  in the store and this worker stops taking jobs: the gang exits, torchrun restarts it, and the next rank 0
  re-queues the job at the head (`JobStore.recover`). If the gang does not end within the heartbeat and
  fault-grace deadlines after all, the job is failed with the error.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.pipeline import Cancelled
from engine.request import RequestError
from parallel.faults import TIMEOUT_WORDS, ServerRestarting
from parallel.jobs import CANCELLED, COMPLETED, FAILED, IMAGE_FIELDS, QUEUED, JobStore
from parallel.lora import LoraRefused
from parallel.metrics import Metrics
from parallel.replan import MemoryModeRefused
from parallel.serve import Output, Progress, RankFailed

log = logging.getLogger("wan.jobs")

# words of an error that says the gang itself is failing (not the request): the job is run again after the restart
GANG_WORDS = (*TIMEOUT_WORDS, "Connection refused", "Broken pipe", "the request was interrupted", "is restarting")
PROGRESS_WRITE_S = 1.0  # the running job's steps are written to the store at most this often (read from memory)


class QueueFull(Exception):
    """The queue holds --queue_size waiting jobs; `retry_after` seconds is when one slot is likely free."""

    def __init__(self, size: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({size} jobs waiting); try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Running:
    """The job the gang runs now, as the worker sees it (its progress is read from here, not the store)."""

    job: dict[str, Any]
    cancel: bool = False
    steps_done: int = 0
    steps_total: int | None = None
    written: float = 0.0


@dataclass
class Waiter:
    """A caller in this process waiting for its job (the page): the result and its progress callback."""

    future: Future = field(default_factory=Future)
    progress: Progress | None = None


def failure_reason(exc: BaseException) -> str:
    """The `reason` label of wan_videos_failed_total for a job's own failure."""
    if isinstance(exc, (LoraRefused, MemoryModeRefused, RequestError)):
        return "refused"
    if "out of GPU memory" in str(exc):
        return "out_of_memory"
    return "rank_failed" if isinstance(exc, RankFailed) else "error"


def one_line(exc: BaseException) -> str:
    """What the client reads (the page's wording: the message of ours, type + first line otherwise)."""
    if isinstance(exc, (RankFailed, ServerRestarting, LoraRefused, MemoryModeRefused, RequestError)):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def gang_failing(exc: BaseException, server_failed: bool) -> bool:
    """Whether `exc` says the gang is failing under the job (then it runs again after the restart)."""
    if isinstance(exc, RankFailed):
        return any(w in exc.error for w in GANG_WORDS)
    if isinstance(exc, (LoraRefused, MemoryModeRefused, RequestError, OSError)):
        return False
    return server_failed or type(exc).__name__.startswith("Dist") or any(w in str(exc) for w in GANG_WORDS)


class JobQueue:
    """Rank 0's queue of jobs in a JobStore, run in order by one worker thread (`start()`)."""

    def __init__(self, server, store: JobStore, queue_size: int) -> None:
        self.server, self.store, self.queue_size = server, store, queue_size
        self.dispatcher = server.dispatcher
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._running: Running | None = None
        self._waiters: dict[str, Waiter] = {}
        self._stopped = False
        self.metrics = Metrics(queue_depth=lambda: self.store.queued(), running=lambda: int(self._running is not None))

    # -- start-up -------------------------------------------------------------------------------------------
    def start(self, torchrun_restart_count: int = 0) -> threading.Thread:
        """Re-queue what the last gang left running, count the restarts, start the worker."""
        for job in self.store.recover():
            if job["status"] == QUEUED:
                log.warning("job %s was running when the gang stopped: queued again at the head (attempt %d of 2 next)",
                            job["id"], job["attempts"] + 1)
            elif job["status"] == FAILED:
                self.metrics.failed.labels(job["reason"]).inc()
                log.error("job %s failed: %s", job["id"], job["error"])
        self.metrics.restarts.inc(self.store.count_restarts(torchrun_restart_count))
        self.metrics.set_memory(self.server.last_memory or [])
        thread = threading.Thread(target=self._loop, name="wan-jobs", daemon=True)
        thread.start()
        return thread

    # -- what callers do ------------------------------------------------------------------------------------
    def enqueue(self, raw: dict[str, Any], source: str = "api", steps_total: int | None = None,
                waiter: Waiter | None = None, limit: bool = True) -> dict[str, Any]:
        """Add a job (committed before this returns); QueueFull when --queue_size jobs wait already (`limit`).
        Image bytes in `raw` (image, last_frame) become files in the job's folder."""
        raw = dict(raw)
        for name in IMAGE_FIELDS:  # the page's uploads are files it deletes once the request is over: keep a copy
            if isinstance(raw.get(name), (str, Path)) and str(raw[name]).strip():
                from engine.images import read_image_bytes

                limits = getattr(getattr(self.dispatcher, "info", None), "limits", None)
                dirs = tuple(Path(d) for d in getattr(limits, "upload_dirs", ()))
                raw[name] = read_image_bytes(raw[name], name, dirs)  # only inside the upload folder
        images = {k: bytes(raw.pop(k)) for k in IMAGE_FIELDS if isinstance(raw.get(k), (bytes, bytearray))}
        with self._lock:
            if limit and self.store.queued() >= self.queue_size:
                raise QueueFull(self.queue_size, self.retry_after())
            from parallel.jobs import new_job_id

            job_id = new_job_id()
            if waiter is not None:
                self._waiters[job_id] = waiter
            try:
                job = self.store.add(raw, source, steps_total, images, job_id=job_id)
            except BaseException:
                self._waiters.pop(job_id, None)
                raise
        self._wake.set()
        return job

    def submit(self, raw: dict[str, Any], progress: Progress | None = None, source: str = "page") -> tuple[str, Future]:
        """Queue a job for a caller in this process; (its id, a Future of the Dispatcher's Output)."""
        waiter = Waiter(progress=progress)
        job = self.enqueue(raw, source, raw.get("sample_steps"), waiter, limit=False)  # the page's own queue bounds it
        return job["id"], waiter.future

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued job (at once) or the running one (at the next step, every rank); None if unknown."""
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                return None
            if job["status"] == QUEUED and self.store.cancel_queued(job_id):
                self.metrics.cancelled.inc()
                self._resolve(job_id, exc=Cancelled("cancelled before it started"))
            elif self._running is not None and self._running.job["id"] == job_id:
                self._running.cancel = True
                self.store.request_cancel(job_id)
                self.dispatcher.cancel()
        return self.view(job_id)

    def view(self, job_id: str) -> dict[str, Any] | None:
        """The job as stored, with the live progress of the running one."""
        job = self.store.get(job_id)
        running = self._running
        if job is not None and running is not None and running.job["id"] == job_id and job["status"] == "in_progress":
            job["steps_done"] = max(job["steps_done"], running.steps_done)
            job["steps_total"] = running.steps_total or job["steps_total"]
        return job

    def page_runner(self) -> PageRunner:
        return PageRunner(self)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """The completed jobs' videos, newest first (the page's history gallery)."""
        return self.store.history(limit)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the median run of recent jobs (30 s before any)."""
        runs = self.store.recent_run_seconds()
        return int(min(3600, max(1, math.ceil(statistics.median(runs) if runs else 30))))

    # -- the worker -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()
            with self._lock:
                job = None if self.server.failed else self.store.claim_next()
                if job is not None:
                    self._running = Running(job, steps_total=job["steps_total"])
            if job is None:
                self._wake.wait(1.0)
                continue
            try:
                self._run(self._running)
            except Exception:  # noqa: BLE001 - the worker must outlive any one job (logged with its traceback)
                log.exception("job %s: the job queue failed around it", job["id"])
                self.store.finish(job["id"], FAILED, error="internal error of the job queue (see the log)",
                                  reason="error")
            finally:
                self._running = None

    def _run(self, running: Running) -> None:
        job = running.job
        job_id = job["id"]
        waiter = self._waiters.get(job_id)
        if job["attempts"] == 1 and job["started_at"]:
            self.metrics.queue_wait.observe(max(0.0, job["started_at"] - job["created_at"]))
        last = {"done": 0, "secs": 0.0}

        def on_step(done: int, total: int, seconds: float) -> None:
            if running.cancel:
                self.dispatcher.cancel()  # a cancel that came before the gang was busy
            if last["done"] and done > last["done"]:  # the first report includes the prompt's encoding
                self.metrics.step.observe((seconds - last["secs"]) / (done - last["done"]))
            last.update(done=done, secs=seconds)
            running.steps_done, running.steps_total = done, total
            now = time.monotonic()
            if now - running.written >= PROGRESS_WRITE_S:
                running.written = now
                self.store.progress(job_id, done, total)
            if waiter is not None and waiter.progress is not None:
                waiter.progress(done, total, seconds)

        t0 = time.monotonic()
        try:
            raw = self.store.request_of(job)
            out = self.dispatcher.submit(raw, progress=on_step)
        except Cancelled as exc:
            self.store.finish(job_id, CANCELLED, steps_done=running.steps_done)
            self.metrics.cancelled.inc()
            self._resolve(job_id, exc=exc)
        except ServerRestarting as exc:  # refused before it ran: first in line for the next gang
            self.store.unclaim(job_id)
            self._stopped = True
            self._resolve(job_id, exc=exc)
        except Exception as exc:  # noqa: BLE001 - every failure ends in the store (and the page's waiter)
            self._resolve(job_id, exc=exc)
            if gang_failing(exc, bool(self.server.failed)):
                self._hold(job_id, exc)
            else:
                self._fail(job_id, exc, running.steps_done)
        else:
            outputs = [str(p) for p in out.videos] + [str(p) for p in out.sidecars]
            self.store.finish(job_id, COMPLETED, outputs=outputs, seed=out.request.base_seed,
                              timings=out.meta.get("timings", {}), steps_done=out.request.sample_steps)
            self.metrics.completed.inc()
            self.metrics.request_duration.observe(time.monotonic() - t0)
            self.metrics.set_memory(out.memory)
            self._resolve(job_id, out=out)

    def _fail(self, job_id: str, exc: BaseException, steps_done: int) -> None:
        reason = failure_reason(exc)
        log.error("job %s failed: %s", job_id, one_line(exc))
        self.store.finish(job_id, FAILED, error=one_line(exc), reason=reason, steps_done=steps_done)
        self.metrics.failed.labels(reason).inc()

    def _hold(self, job_id: str, exc: BaseException) -> None:
        """The gang is failing under the job: leave it in_progress for the next gang, unless this gang lives on."""
        cfg = self.server.cfg
        deadline = time.monotonic() + cfg.heartbeat_timeout + 5 + cfg.fault_grace + 10
        log.error("job %s was interrupted by a failure of the gang (%s); it runs again once torchrun has restarted "
                  "the gang", job_id, one_line(exc))
        while time.monotonic() < deadline:
            if self.server.failed:
                self._stopped = True  # this gang is ending: nothing more runs here
                return
            time.sleep(0.5)
        log.error("job %s: the gang did not restart after all; the job failed", job_id)
        self._fail(job_id, exc, 0)

    def _resolve(self, job_id: str, out: Output | None = None, exc: BaseException | None = None) -> None:
        waiter = self._waiters.pop(job_id, None)
        if waiter is None or waiter.future.done():
            return
        if exc is not None:
            waiter.future.set_exception(exc)
        else:
            waiter.future.set_result(out)


class PageRunner:
    """The page's way into the queue, shaped like the Dispatcher (submit / cancel) for ui.Controller: the page's
    requests wait in the same queue as the API's, in one order. Gradio runs one page request at a time."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.current: str | None = None

    def submit(self, raw: dict[str, Any], progress: Progress | None = None, **_: Any) -> Output:
        job_id, future = self.queue.submit(raw, progress, source="page")
        self.current = job_id
        try:
            return future.result()
        finally:
            self.current = None

    def cancel(self) -> None:
        """Cancel the page's job: dropped while it waits, stopped at the next step once it runs."""
        if self.current is not None:
            self.queue.cancel(self.current)


def start_jobs(server, cfg) -> JobQueue:
    """Rank 0: open outputs/jobs.sqlite, re-queue what the last gang left running, start the worker; the queue
    is `server.jobs` from then on (the page's Controller and the API routes use it)."""
    store = JobStore(cfg.outputs_dir)
    jobs = JobQueue(server, store, cfg.queue_size)
    server.jobs = jobs
    jobs.start(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
    return jobs
