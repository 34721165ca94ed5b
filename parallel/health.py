"""`/healthz`: whether every rank of the gang answers now (a probe through every rank within a deadline)."""

from __future__ import annotations

import threading
import time
from typing import Any

from parallel.runtime import picklable


class HealthCheck:
    """The health verdict of a Dispatcher's gang; `check(deadline_s)` is the /healthz route's body."""

    def __init__(self, dispatcher) -> None:
        self.d = dispatcher
        self._health_lock = threading.Lock()
        self._probe: dict | None = None  # the last probe (shared by concurrent checks, reused for 1 s)

    def __call__(self, deadline_s: float = 5.0) -> dict[str, Any]:
        """Whether every rank answers now, as a report with `healthy: bool` (the /healthz route's body).

        Idle: a tiny probe goes through every rank (the {"op": "probe"} broadcast, then every rank's memory
        report gathered over the control group) within `deadline_s`. The probe runs on a helper thread that
        holds the request lock until the gang has left the collective, so a probe that outlives its deadline
        (a rank stopped or gone) answers unhealthy without leaving the gang half inside a collective: the
        next request waits for it (and a gang that never answers is ended by the heartbeat). Concurrent
        callers share one probe, and a probe that finished less than 1 s ago is reused, so a flood of health
        checks cannot starve requests of the gang.
        Busy (a request holds the gang): a probe would queue behind it, so the answer is "busy", healthy iff
        the heartbeat saw every rank within its timeout.
        """
        t0 = time.monotonic()
        rt = self.d.server.rt
        deadline_s = max(0.0, float(deadline_s))
        report: dict[str, Any] = {"healthy": False, "status": "unhealthy", "world_size": rt.world_size,
                                  "deadline_s": deadline_s, "heartbeat_age_s": None, "heartbeat_timeout_s": None}
        if self.d.server.failed:  # the gang is ending after a failure; torchrun restarts it
            report.update(status="restarting", reason=f"restarting after a failure: {self.d.server.failed}",
                          ranks=self.d.server.last_memory, check_s=round(time.monotonic() - t0, 4))
            return report
        beat_ok = True
        hb = rt.heartbeat
        if hb is not None:
            age = max(0.0, time.time() - hb.last_ok)
            report.update(heartbeat_age_s=round(age, 3), heartbeat_timeout_s=hb.timeout)
            beat_ok = bool(hb.healthy) and age <= hb.timeout

        def run_probe(probe: dict) -> None:  # holds self.d._lock (taken by the caller), releases it at the end
            try:
                probe["ranks"] = self.d._probe_ranks()
            except Exception as exc:  # noqa: BLE001 - a peer is gone: reported, the heartbeat ends the gang
                probe["error"] = picklable(exc)
            finally:
                probe["finished"] = time.monotonic()
                probe["done"].set()
                self.d._lock.release()

        with self._health_lock:
            probe = self._probe
            if probe is None or (probe["done"].is_set() and time.monotonic() - probe["finished"] > 1.0):
                if self.d._lock.acquire(blocking=False):
                    probe = self._probe = {"started": time.monotonic(), "done": threading.Event(), "ranks": None,
                                           "error": None, "finished": None}
                    threading.Thread(target=run_probe, args=(probe,), name="wan-health-probe", daemon=True).start()
                elif probe is None or probe["done"].is_set():
                    probe = None  # a request (or a memory report) holds the gang
        posted = self.d.server.watch.fault
        if probe is None and posted is not None:  # a rank failed inside the running request
            report.update(status="failing", request_running=True, ranks=self.d.server.last_memory,
                          reason=f"rank {posted[0]} failed at step {posted[1]}: {posted[2]}; the request is ending")
            report["check_s"] = round(time.monotonic() - t0, 4)
            return report
        if probe is None:
            report.update(healthy=beat_ok, status="busy" if beat_ok else "unhealthy",
                          request_running=bool(self.d.busy), ranks=self.d.server.last_memory,
                          reason=None if beat_ok else "the heartbeat has not seen every rank within its timeout")
            report["check_s"] = round(time.monotonic() - t0, 4)
            return report
        probe["done"].wait(max(0.0, deadline_s - (time.monotonic() - t0)))
        report["probe_age_s"] = round(time.monotonic() - probe["started"], 4)
        if not probe["done"].is_set():
            report["reason"] = (f"the probe started {time.monotonic() - probe['started']:.1f} s ago has not come "
                                f"back from every rank (deadline {deadline_s:g} s)")
        elif probe["error"] is not None:
            report["reason"] = f"the probe failed: {probe['error']}"
        elif not beat_ok:
            report["reason"] = "the heartbeat has not seen every rank within its timeout"
        else:
            report.update(healthy=True, status="ok", probe_s=round(probe["finished"] - probe["started"], 4))
        report["ranks"] = probe["ranks"] or []
        report["check_s"] = round(time.monotonic() - t0, 4)
        return report

