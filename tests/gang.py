"""Driver for multi-rank tests, run under torchrun: start the real server, submit a list of requests from
rank 0 (each with its own layout, latents path, fault injection), write what happened to a JSON file.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/gang.py SPEC.json
SPEC: {"argv": [app flags...], "requests": [{"raw": {...}, "save_latents": path, "fault": {...}}],
       "result": path, "idle_s": seconds to sleep before request i (optional list),
       "dynamo_counters": true to write every rank's torch._dynamo frame counts after each request to
       RESULT.dynamo.rank<R>.jsonl (see count_compilations)}
Each result is appended to RESULT.jsonl as soon as it is known, so a gang that torchrun restarts (after a
failure that ended the gang) goes on with the next request; RESULT (JSON) holds the list at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(spec_path: str) -> int:
    from app import load_config
    from parallel.faults import ServerRestarting
    from parallel.serve import start_server

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("mp4") is False:  # machines without imageio-ffmpeg (the GPU lane): frames checked, not encoded
        import parallel.outputs

        def check_frames(frames, path, fps=16) -> None:
            if frames.dtype.name != "uint8" or frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"bad frames {frames.dtype} {frames.shape}")

        parallel.outputs.write_mp4 = check_frames
    cfg = load_config(spec["argv"])
    server = start_server(cfg)
    if spec.get("dynamo_counters"):
        count_compilations(server, f"{spec['result']}.dynamo.rank{server.rt.rank}.jsonl")
    if not server.is_rank0:
        server.worker_loop()
        server.shutdown()
        return 0
    lines = Path(spec["result"] + "l")
    results = [json.loads(x) for x in lines.read_text().splitlines()] if lines.exists() else []
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def record(entry: dict) -> None:
        results.append(entry)
        with open(lines, "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    try:
        for i, item in enumerate(spec["requests"]):
            if i < len(results):
                continue  # done by an earlier attempt of the gang
            time.sleep(item.get("sleep_s", 0))
            t0 = time.perf_counter()
            try:
                out = server.dispatcher.submit(item["raw"], save_file=item.get("save_file"),
                                               save_latents=item.get("save_latents"), fault=item.get("fault"),
                                               decode=item.get("decode", True))
                record({"ok": True, "videos": [str(p) for p in out.videos], "meta": out.meta, "attempt": attempt,
                        "memory": out.memory, "seconds": time.perf_counter() - t0, "t": time.time(),
                        "host_rss_gib": host_rss_gib()})
            except ServerRestarting:
                break  # the gang is ending; the next attempt goes on from here
            except Exception as exc:  # noqa: BLE001 - recorded for the test to check
                record({"ok": False, "error": str(exc), "type": type(exc).__name__, "index": i, "attempt": attempt,
                        "memory": server.last_memory, "seconds": time.perf_counter() - t0, "t": time.time(),
                        "restarting": bool(server.failed), "host_rss_gib": host_rss_gib()})
            if server.failed:
                break
    finally:
        if not server.failed:
            Path(spec["result"]).write_text(json.dumps(results, indent=1, default=str))
        server.shutdown()
    return 0


def host_rss_gib() -> dict:
    """This process's resident set now and at its peak, GiB."""
    import resource

    now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return {"now": round(now, 3), "peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def count_compilations(server, path: str) -> None:
    """After every request this rank runs, append torch._dynamo's frame counters to `path` (one JSON line:
    {"request": n, "frames": {"total": .., "ok": ..}}): a frame compiled again shows as a higher count."""
    from torch._dynamo.utils import counters

    execute, done = server.execute, []

    def counted(*args, **kwargs):
        try:
            return execute(*args, **kwargs)
        finally:
            done.append(1)
            with open(path, "a") as fh:
                fh.write(json.dumps({"request": len(done), "frames": dict(counters["frames"])}) + "\n")

    server.execute = counted


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()
    code = main(sys.argv[1])
    from parallel.runtime import exit_process

    exit_process(code)
