"""Two "nodes" on one machine: two `./launch.sh --nnodes 2` agents (torchrun, 2 CPU ranks each) meeting at
127.0.0.1. They generate like one process, agree on the default layout (Ulysses inside a node, Ring across
nodes), refuse to start when one node's model file is missing, and go down together when a node dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import rel_err
from tests.multirank import ROOT, gang_env, latents, listening_ports, run_gang

pytestmark = pytest.mark.multirank
REQ = ["--prompt", "a lighthouse at night", "--size", "208*144", "--frame_num", "9", "--base_seed", "3", "--dtype", "fp32"]


def node_env(tiny_dir: Path, model_dir: Path | None = None) -> dict[str, str]:
    env = gang_env(tiny_dir)
    env.update(LAUNCH_NO_VENV="1", LAUNCH_MAX_RESTARTS="0", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    return env


def start_node(rank: int, port: int, tiny_dir: Path, args: list[str]) -> subprocess.Popen:
    cmd = ["./launch.sh", "--nproc", "2", "--nnodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
           "--master_port", str(port), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=node_env(tiny_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def start_nodes(tiny_dir: Path, args0: list[str], args1: list[str], attempts: int = 5,
                timeout: float = 120) -> list[subprocess.Popen]:
    """Node 0 first, then node 1 once node 0's torchrun agent listens on the rendezvous port.

    A static rendezvous needs a port both nodes know in advance: a candidate the system has just given out
    is handed to node 0, and only its own bind proves it free; when it was taken in between (node 0 exits
    with EADDRINUSE), the start is retried on another."""
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # a candidate only (see above)
        node0 = start_node(0, port, tiny_dir, args0)
        deadline = time.monotonic() + timeout
        while port not in listening_ports(node0.pid) and node0.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(node0.pid, signal.SIGKILL)
                raise AssertionError(f"node 0 did not listen on {port} within {timeout:.0f} s:\n{node0.communicate()[0]}")
            time.sleep(0.1)
        if node0.poll() is None:
            return [node0, start_node(1, port, tiny_dir, args1)]
        out = node0.communicate()[0]
        assert "EADDRINUSE" in out or "address already in use" in out.lower(), out[-3000:]
    raise AssertionError(f"node 0 could not bind a rendezvous port in {attempts} attempts")


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        out.append((p.returncode, text))
    return out


def test_two_nodes_generate_like_one_process_with_ulysses_inside_ring_across(tiny_model_dir, tmp_path):
    one, _ = run_gang(1, ["--dtype", "fp32"], [{"raw": {"prompt": "a lighthouse at night", "size": "208*144",
                                                         "frame_num": 9, "base_seed": 3, "sample_steps": 10},
                                                 "save_latents": str(tmp_path / "one.st"), "decode": False}],
                      tmp_path / "one", tiny_model_dir)
    assert one[0]["ok"]
    args = [*REQ, "--sample_steps", "10", "--save_latents", str(tmp_path / "two.st"), "--outputs_dir", str(tmp_path)]
    (rc0, log0), (rc1, log1) = finish(start_nodes(tiny_model_dir, args, args))
    assert rc0 == 0 and rc1 == 0, log0[-3000:] + log1[-3000:]
    assert "Initialized distributed environment with 4 processes" in log0
    assert "default layout: ulysses 2 × ring 2 (2 nodes: Ulysses inside a node, Ring across nodes)" in log0
    assert rel_err(latents(tmp_path / "two.st"), latents(tmp_path / "one.st")) < 1e-5


def test_a_model_file_missing_on_node1_stops_both_nodes_with_its_name(tiny_model_dir, tmp_path):
    dit = tiny_model_dir / "diffusion_models"
    good = ["--model_dir", str(tiny_model_dir), *REQ]
    bad = ["--model_dir", str(tiny_model_dir), "--dit", "/nowhere/wan2.1_14b.safetensors", *REQ]
    assert any(dit.iterdir())
    (rc0, log0), (rc1, log1) = finish(start_nodes(tiny_model_dir, good, bad), timeout=180)
    assert rc0 != 0 and rc1 != 0
    for log in (log0, log1):
        assert "node 1 (" in log and "--dit /nowhere/wan2.1_14b.safetensors: no such file" in log


def test_killing_node1s_agent_makes_node0_exit_nonzero_quickly(tiny_model_dir, tmp_path):
    import threading

    args = [*REQ, "--sample_steps", "200", "--frame_num", "17", "--outputs_dir", str(tmp_path), "--heartbeat_timeout", "20"]
    procs = start_nodes(tiny_model_dir, args, args)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(procs[0].stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any("Setup complete" in ln for ln in lines):
            assert procs[0].poll() is None, "".join(lines)[-3000:]
            time.sleep(0.5)
        time.sleep(5)  # denoising now (200 steps of 17 frames: far from done)
        assert procs[0].poll() is None and procs[1].poll() is None, "".join(lines)[-3000:]
        t0 = time.time()
        os.kill(procs[1].pid, signal.SIGKILL)  # node 1's torchrun agent, not its workers
        rc0 = procs[0].wait(timeout=60)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert rc0 != 0
    assert elapsed < 60
