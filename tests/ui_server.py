"""Start the real app (one process, or a torchrun gang through launch.sh) for the UI tests, with `--port 0`:
the web server binds a port of the system's choosing and prints it (ui.py LISTENING), so no test depends on a
port it checked free a moment before still being free when the server binds it.

    with running_app(tmp_path, tiny_dir, "--queue_size", "1") as app:
        app.url, app.outputs, app.log()
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Small requests: a few seconds each on two CPU cores.
SMALL = {"size": "208*144", "frame_num": 5, "sample_steps": 2}


@dataclass
class RunningApp:
    url: str  # http://127.0.0.1:PORT once the app announced the port it bound
    outputs: Path
    proc: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def videos(self) -> list[Path]:
        return sorted(self.outputs.glob("*.mp4"))


# ui.py LISTENING, printed by rank 0 once its web server serves
LISTENING = re.compile(r"Wan2\.1 web UI listening on http://\S+:(\d+) \(pid (\d+)\)")


def announced_port(log_text: str, pid: int | None = None) -> int | None:
    """The port of the last 'Wan2.1 web UI listening on ...' line in a log (of process `pid` if given)."""
    ports = [int(port) for port, who in LISTENING.findall(log_text) if pid is None or int(who) == pid]
    return ports[-1] if ports else None


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the app's own process group (Gradio and torchrun shut down cleanly), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def running_app(tmp: Path, tiny_dir: Path, *args: str, nproc: int = 1, start_timeout: float = 240) -> Iterator[RunningApp]:
    """app.py (nproc 1) or `./launch.sh --nproc N` serving the tiny model on CPU until the block exits."""
    tmp.mkdir(parents=True, exist_ok=True)
    outputs = tmp / "outputs"
    flags = ["--port", "0", "--outputs_dir", str(outputs), *args]
    env = {**os.environ, "WAN_TINY_DIR": str(tiny_dir), "CUDA_VISIBLE_DEVICES": "", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "app.py", *flags]
    else:
        # launch.sh with the interpreter running the tests: its venv's python3 first on PATH, no venv set-up
        env.update(LAUNCH_NO_VENV="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   LAUNCH_MAX_RESTARTS="0")
        env.pop("WAN_VENV", None)
        cmd = ["./launch.sh", "--nproc", str(nproc), *flags]
    log_path = tmp / "app.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    app = RunningApp("", outputs, proc, log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with {proc.returncode} before serving:\n{app.log()}")
            port = announced_port(log_path.read_text(errors="replace"))
            if port is not None:
                app.url = f"http://127.0.0.1:{port}"
                try:
                    if httpx.get(app.url + "/gradio_api/info", timeout=2).status_code in (200, 401):
                        break
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not serve within {start_timeout:.0f} s:\n{app.log()}")
            time.sleep(0.5)
        yield app
    finally:
        _stop(proc)
