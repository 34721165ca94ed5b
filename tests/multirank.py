"""Helpers to run the real server as a CPU/gloo gang of separate processes (torchrun) from pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` holds a listening socket on (Linux /proc)."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return set()
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def gang_env(tiny_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if tiny_dir is not None:
        env["WAN_TINY_DIR"] = str(tiny_dir)
    return env


def run_gang(nproc: int, argv: list[str], requests: list[dict], workdir: Path, tiny_dir: Path,
             timeout: float = 600, **spec_extra) -> tuple[list[dict], str]:
    """Start `nproc` ranks with torchrun, submit `requests` from rank 0; returns (results, log).

    spec_extra: more keys of tests/gang.py's SPEC (e.g. dynamo_counters=True). torchrun runs --standalone:
    its rendezvous store binds a port of the system's choosing, so no port is picked here (a port checked
    free may be taken before the server binds it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv + ["--outputs_dir", str(workdir / "outputs")], "requests": requests,
            "result": str(workdir / "result.json"), **spec_extra}
    (workdir / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max_restarts=0", str(ROOT / "tests" / "gang.py"), str(workdir / "spec.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=gang_env(tiny_dir), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    (workdir / "gang.log").write_text(log)
    if proc.returncode != 0 or not (workdir / "result.json").exists():
        raise AssertionError(f"gang of {nproc} exited with {proc.returncode}:\n{log[-6000:]}")
    return json.loads((workdir / "result.json").read_text()), log


def latents(path: str | Path) -> torch.Tensor:
    return load_file(str(path))["latents"]


def rank_pids(agent_pid: int) -> dict[int, int]:
    """RANK → pid of the live worker processes of a torchrun agent."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != agent_pid or stat[0] == "Z":
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(d.name)
    return out
