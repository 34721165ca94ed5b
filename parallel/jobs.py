"""The job store: every generation (from the /v1/videos API or the page) as a row of `outputs/jobs.sqlite`.

The standard library's sqlite3 in WAL mode with `synchronous=FULL`: a job is committed before it is
acknowledged, so a gang that dies (any rank SIGKILLed, rank 0 included) loses nothing. The next gang's rank 0
opens the store, puts the job that was running back at the head of the queue (or fails it after
MAX_ATTEMPTS starts), and the queued jobs keep their order. Images sent with a job are files in its own
folder `outputs/jobs/<id>/` (deleted with the job), never inside the row.

The queue that runs the jobs through the Dispatcher is parallel/job_queue.py; the HTTP routes parallel/api.py.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)
MAX_ATTEMPTS = 2  # starts of one job; a gang that dies twice while running it fails it
RESTARTED_TWICE = f"the gang restarted {MAX_ATTEMPTS} times while running this job"
IMAGE_FIELDS = ("image", "last_frame")  # request fields that carry image bytes (stored as files)
STORE_NAME = "jobs.sqlite"
JOBS_DIR = "jobs"  # outputs/jobs/<id>/: the inputs of one job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order (kept when a job is re-queued after a restart)
    id TEXT NOT NULL UNIQUE,                -- video_<32 hex>
    source TEXT NOT NULL,                   -- api | page
    status TEXT NOT NULL,
    request TEXT NOT NULL,                  -- the raw request as JSON (images: the names of files in its folder)
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,    -- how often it started
    steps_done INTEGER NOT NULL DEFAULT 0,
    steps_total INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    seed INTEGER,                           -- the seed used (known once it ran)
    error TEXT,
    reason TEXT,                            -- why it failed, as a metric label (parallel/job_queue.py)
    outputs TEXT NOT NULL DEFAULT '[]',     -- JSON: the mp4 paths, then the sidecars
    timings TEXT NOT NULL DEFAULT '{}'      -- JSON: the sidecar's timings
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def is_job_id(text: str) -> bool:
    """Whether `text` has the shape of a job id (anything else is not looked up)."""
    tail = text[6:]
    return text.startswith("video_") and len(tail) == 32 and all(c in "0123456789abcdef" for c in tail)


def _json_value(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


class JobStore:
    """The jobs of this server in SQLite; every method is one transaction (thread-safe, one connection)."""

    def __init__(self, outputs_dir: str | Path) -> None:
        self.outputs_dir = Path(outputs_dir).resolve()
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.outputs_dir / STORE_NAME
        self.jobs_dir = self.outputs_dir / JOBS_DIR
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # committed = on disk, before the client hears of it
        self._db.executescript(SCHEMA)

    def private_paths(self) -> list[str]:
        """What the page's file route must never serve: the database and the jobs' input images."""
        return [str(self.jobs_dir), *(str(self.path) + tail for tail in ("", "-wal", "-shm", "-journal"))]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn, *args):
        """Run fn(db, *args) in one IMMEDIATE transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db, *args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    # -- writing --------------------------------------------------------------------------------------------
    def add(self, raw: dict[str, Any], source: str, steps_total: int | None = None,
            images: dict[str, bytes] | None = None, job_id: str | None = None) -> dict[str, Any]:
        """A new queued job (committed when this returns); `images` become files in its folder."""
        job_id = job_id or new_job_id()
        request = dict(raw)
        names = []
        if images:
            folder = self.jobs_dir / job_id
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in images.items():
                (folder / name).write_bytes(data)
                names.append(name)
        request["_images"] = names
        text = json.dumps(request, default=_json_value, ensure_ascii=True)

        def insert(db):
            db.execute("INSERT INTO jobs (id, source, status, request, created_at, steps_total) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, source, QUEUED, text, time.time(), steps_total))

        try:
            self._tx(insert)
        except BaseException:
            shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
            raise
        return self.get(job_id)

    def claim_next(self) -> dict[str, Any] | None:
        """The oldest queued job, now in_progress with one more attempt; None when nothing waits."""
        def claim(db):
            row = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1, steps_done = 0 "
                       "WHERE id = ?", (IN_PROGRESS, time.time(), row["id"]))
            return row["id"]

        job_id = self._tx(claim)
        return self.get(job_id) if job_id else None

    def unclaim(self, job_id: str) -> None:
        """Back to the head of the queue, the attempt not counted (the gang refused it before it ran)."""
        self._update(job_id, "status = ?, started_at = NULL, attempts = MAX(0, attempts - 1)", (QUEUED,),
                     only=IN_PROGRESS)

    def progress(self, job_id: str, done: int, total: int) -> None:
        self._update(job_id, "steps_done = ?, steps_total = ?", (done, total), only=IN_PROGRESS)

    def finish(self, job_id: str, status: str, *, error: str | None = None, reason: str | None = None,
               outputs: list[str] | None = None, seed: int | None = None, timings: dict | None = None,
               steps_done: int | None = None) -> None:
        """A job's end: completed (with its files), failed (error, reason) or cancelled."""
        sets = "status = ?, finished_at = ?, error = ?, reason = ?, outputs = ?, seed = COALESCE(?, seed), timings = ?"
        args: tuple = (status, time.time(), error, reason, json.dumps(outputs or []), seed,
                       json.dumps(timings or {}, default=str))
        if steps_done is not None:
            sets, args = sets + ", steps_done = ?", (*args, steps_done)
        self._update(job_id, sets, args)

    def request_cancel(self, job_id: str) -> None:
        self._update(job_id, "cancel_requested = 1", (), only=IN_PROGRESS)

    def cancel_queued(self, job_id: str) -> bool:
        """A queued job becomes cancelled; False when it is not queued (any more)."""
        def cancel(db):
            cur = db.execute("UPDATE jobs SET status = ?, finished_at = ?, cancel_requested = 1 WHERE id = ? AND status = ?",
                             (CANCELLED, time.time(), job_id, QUEUED))
            return cur.rowcount == 1

        return self._tx(cancel)

    def delete(self, job_id: str) -> list[str]:
        """Remove a finished job, its folder and its output files; returns the files removed."""
        job = self.get(job_id)
        if job is None or job["status"] not in FINISHED:
            return []
        self._tx(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))
        removed = []
        for path in job["outputs"]:
            p = Path(path)
            if p.resolve().is_relative_to(self.outputs_dir) and p.is_file():
                p.unlink()
                removed.append(str(p))
        shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
        return removed

    def _update(self, job_id: str, sets: str, args: tuple, only: str | None = None) -> None:
        where, extra = ("id = ? AND status = ?", (job_id, only)) if only else ("id = ?", (job_id,))
        self._tx(lambda db: db.execute(f"UPDATE jobs SET {sets} WHERE {where}", (*args, *extra)))

    # -- after a restart ------------------------------------------------------------------------------------
    def recover(self) -> list[dict[str, Any]]:
        """At start-up: every job the last gang left in_progress goes back to the head of the queue, or fails
        after MAX_ATTEMPTS starts (or is cancelled when a cancel was asked). Returns those jobs, as they are now."""
        def fix(db):
            rows = db.execute("SELECT id, attempts, cancel_requested FROM jobs WHERE status = ? ORDER BY seq",
                              (IN_PROGRESS,)).fetchall()
            now = time.time()
            for r in rows:
                if r["cancel_requested"]:
                    db.execute("UPDATE jobs SET status = ?, finished_at = ? WHERE id = ?", (CANCELLED, now, r["id"]))
                elif r["attempts"] >= MAX_ATTEMPTS:
                    db.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ?, reason = ? WHERE id = ?",
                               (FAILED, now, RESTARTED_TWICE, "restarted", r["id"]))
                else:
                    db.execute("UPDATE jobs SET status = ?, steps_done = 0 WHERE id = ?", (QUEUED, r["id"]))
            return [r["id"] for r in rows]

        return [self.get(i) for i in self._tx(fix)]

    def count_restarts(self, torchrun_restart_count: int) -> int:
        """Add the gang restarts torchrun counted since the last start (TORCHELASTIC_RESTART_COUNT; a new torchrun
        counts from 0 again) to the total kept in the store; returns the total."""
        def count(db):
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            seen, total = int(meta.get("torchrun_restarts_seen", 0)), int(meta.get("gang_restarts", 0))
            n = torchrun_restart_count
            total += n - seen if n >= seen else n
            for key, value in (("torchrun_restarts_seen", n), ("gang_restarts", total)):
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                           "excluded.value", (key, str(value)))
            return total

        return self._tx(count)

    # -- reading --------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        """One job with its queue position (jobs ahead of it; None unless queued)."""
        with self._lock:
            row = self._db.execute(f"SELECT *, {_POSITION} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def list_jobs(self, limit: int = 20, after: str | None = None, order: str = "desc",
             status: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """A page of jobs, newest first (order desc) or oldest first, after the job `after`; and whether more follow."""
        cmp, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        where, args = [], []
        if after is not None:
            where.append(f"seq {cmp} (SELECT seq FROM jobs WHERE id = ?)")
            args.append(after)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        sql = f"SELECT *, {_POSITION} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {direction} LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        """Jobs per status (every status present)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | {r["status"]: r["n"] for r in rows}

    def queued(self, source: str | None = None) -> int:
        with self._lock:
            sql, args = "SELECT COUNT(*) FROM jobs WHERE status = ?", [QUEUED]
            if source is not None:
                sql, args = sql + " AND source = ?", [*args, source]
            return self._db.execute(sql, args).fetchone()[0]

    def recent_run_seconds(self, n: int = 20) -> list[float]:
        """How long the last `n` completed jobs ran (newest first), for Retry-After."""
        with self._lock:
            rows = self._db.execute("SELECT finished_at - started_at FROM jobs WHERE status = ? AND started_at IS NOT "
                                    "NULL ORDER BY finished_at DESC LIMIT ?", (COMPLETED, n)).fetchall()
        return [max(0.0, r[0]) for r in rows]

    def history(self, limit: int) -> list[dict[str, Any]]:
        """Completed jobs whose first video and sidecar still exist, newest first, in engine.video.list_history's
        shape ({video, sidecar, name, mtime, meta}): the page's history gallery."""
        from engine.video import read_sidecar, sidecar_path

        with self._lock:
            rows = self._db.execute("SELECT outputs FROM jobs WHERE status = ? ORDER BY finished_at DESC LIMIT ?",
                                    (COMPLETED, limit * 2)).fetchall()
        items = []
        for r in rows:
            videos = [p for p in json.loads(r["outputs"]) if p.endswith(".mp4")]
            for video in videos:
                side = sidecar_path(video)
                try:
                    meta, mtime = read_sidecar(side), Path(video).stat().st_mtime
                except (OSError, ValueError):
                    continue  # deleted by hand, or half written: not in the gallery
                items.append({"video": video, "sidecar": str(side), "name": Path(video).stem, "mtime": mtime, "meta": meta})
        return items[:limit]

    def request_of(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job's raw request for the Dispatcher, its image files read back as bytes."""
        raw = {k: v for k, v in job["request"].items() if not k.startswith("_")}  # "_": the store's own notes
        for name in job["request"].get("_images", []):
            raw[name] = (self.jobs_dir / job["id"] / name).read_bytes()
        return raw


_POSITION = ("CASE WHEN status = 'queued' THEN (SELECT COUNT(*) FROM jobs q WHERE q.status = 'queued' AND q.seq < jobs.seq) "
             "END AS position")


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job["request"] = json.loads(job["request"])
    job["outputs"] = json.loads(job["outputs"])
    job["timings"] = json.loads(job["timings"])
    job["cancel_requested"] = bool(job["cancel_requested"])
    return job
