"""Prometheus metrics of the server (`GET /metrics`), in a registry of its own (not prometheus_client's
global one, so that tests and several servers in one process stay apart). Fed by parallel/job_queue.py."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REQUEST_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
FAILURE_REASONS = ("rank_failed", "out_of_memory", "refused", "restarted", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's counters, gauges and histograms; `exposition()` is the body of GET /metrics."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.completed = Counter("wan_videos_completed", "Video jobs that completed (a request of the page or the API).",
                                 registry=r)
        self.failed = Counter("wan_videos_failed", "Video jobs that failed, by reason.", ["reason"], registry=r)
        for reason in FAILURE_REASONS:
            self.failed.labels(reason)  # every reason present from the start (0), so rate() sees the first one
        self.cancelled = Counter("wan_videos_cancelled", "Video jobs cancelled (queued or running).", registry=r)
        self.queue_depth = Gauge("wan_queue_depth", "Jobs waiting in the queue (not yet running).", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.running = Gauge("wan_videos_in_progress", "Jobs running on the gang now (0 or 1).", registry=r)
        self.running.set_function(running)
        self.request_duration = Histogram("wan_request_duration_seconds", "Time a completed job held the gang: "
                                          "its start on every rank to its files written.", buckets=REQUEST_BUCKETS,
                                          registry=r)
        self.queue_wait = Histogram("wan_queue_wait_seconds", "Time a job waited in the queue before it started.",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.step = Histogram("wan_step_seconds", "Seconds per denoising step (all ranks in lockstep).",
                              buckets=STEP_BUCKETS, registry=r)
        self.memory_peak = Gauge("wan_gpu_memory_peak_bytes", "Peak device memory of the last request, per rank "
                                 "(CUDA allocator peak; on a CPU rank the process's peak RSS).", ["rank"], registry=r)
        self.restarts = Counter("wan_gang_restarts", "Times torchrun restarted the gang after a failure (kept in "
                                "the job store across restarts).", registry=r)

    def set_memory(self, reports: list[dict]) -> None:
        """Per-rank peaks from the Dispatcher's memory reports ({"rank", "peak_gib"})."""
        for m in reports:
            self.memory_peak.labels(str(m.get("rank"))).set(float(m.get("peak_gib") or 0.0) * 2**30)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
