"""The distributed runtime's error model: faults, dead workers, idle timeouts, bad layouts, bad launches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.layout import LayoutError, ParallelLayout, check_layout, default_layout, resolve_layout
from tests.multirank import ROOT, gang_env, latents, rank_pids, run_gang

REQ = {"prompt": "a lighthouse at night", "size": "208*144", "frame_num": 5, "sample_steps": 5, "base_seed": 7}


# -- layouts -------------------------------------------------------------------------------------------
def test_ulysses_must_divide_heads_message_suggests_valid_layouts():
    with pytest.raises(LayoutError) as e:
        check_layout(ParallelLayout(ulysses=8), 8, 12)
    assert str(e.value) == (
        "ulysses_size=8 does not divide the model's 12 attention heads (12 / 8 = 1.50); Ulysses splits whole heads "
        "across ranks. Valid for 8 ranks: Ulysses 4 × Ring 2 or Ulysses 2 × Ring 4 or Ring 8"
    )


def test_product_must_equal_world_message_shows_arithmetic():
    with pytest.raises(LayoutError) as e:
        check_layout(ParallelLayout(ring=3, ulysses=2), 8, 40)
    assert str(e.value) == (
        "cfg_size 1 × ring_size 3 × ulysses_size 2 = 6, but the world size is 8: the product must equal the number "
        "of ranks. Valid for 8 ranks and 40 heads: Ulysses 8 or Ulysses 4 × Ring 2 or Ulysses 2 × Ring 4 or Ring 8"
    )


def test_ulysses3_on_four_ranks_is_refused():
    with pytest.raises(LayoutError, match="ulysses_size=3 does not divide the model's 4 attention heads"):
        resolve_layout(4, 4, 3, None)


def test_default_layouts():
    assert default_layout(8, 40) == ParallelLayout(ring=1, ulysses=8)
    assert default_layout(8, 12) == ParallelLayout(ring=2, ulysses=4)
    assert default_layout(16, 40, local_world=8) == ParallelLayout(ring=2, ulysses=8)  # Ring across nodes
    assert resolve_layout(8, 40, 2, 4) == ParallelLayout(ring=4, ulysses=2)  # the guide's 2 × 4
    assert resolve_layout(4, 4, None, None, use_context_parallel=False) == ParallelLayout(replicas=4)


# -- faults and timeouts (real gangs) -----------------------------------------------------------------------
@pytest.mark.multirank
def test_exception_on_rank1_at_step3_fails_request_everywhere_then_next_succeeds(tiny_model_dir, tmp_path):
    reqs = [
        {"raw": REQ, "fault": {"rank": 1, "step": 3, "message": "injected failure"}, "decode": False},
        {"raw": REQ, "save_latents": str(tmp_path / "after.safetensors"), "decode": False},
    ]
    results, log = run_gang(2, ["--ulysses_size", "2"], reqs, tmp_path, tiny_model_dir)
    assert results[0]["ok"] is False
    assert results[0]["type"] == "RankFailed"
    assert results[0]["error"] == "rank 1 failed at step 3: InjectedFault: injected failure"
    # both ranks left the request at step 3 (rank 0 reports it, rank 1 logs it)
    assert "rank 1: request ended: rank 1 failed at step 3" in log
    assert results[1]["ok"] is True
    assert latents(tmp_path / "after.safetensors").isfinite().all()


@pytest.mark.multirank
def test_idle_longer_than_compute_timeout_then_next_request_works(tiny_model_dir, tmp_path):
    reqs = [{"raw": {**REQ, "sample_steps": 2}, "decode": False},
            {"raw": {**REQ, "sample_steps": 2}, "decode": False, "sleep_s": 8}]
    results, _ = run_gang(2, ["--dist_timeout", "3", "--ring_size", "2"], reqs, tmp_path, tiny_model_dir)
    assert [r["ok"] for r in results] == [True, True], results


@pytest.mark.multirank
def test_sigkill_of_a_worker_ends_the_whole_gang_quickly(tiny_model_dir, tmp_path):
    env = gang_env(tiny_model_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           "app.py", "--prompt", "a long run",
           "--size", "208*144", "--frame_num", "9", "--sample_steps", "200", "--ulysses_size", "2",
           "--outputs_dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        pids: dict[int, int] = {}
        while time.time() < deadline and len(pids) < 2:
            time.sleep(0.5)
            pids = rank_pids(proc.pid)
        assert len(pids) == 2, "workers did not start"
        time.sleep(6)  # let it load and start denoising
        t0 = time.time()
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0
    assert elapsed < 60
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_world_size_without_torchrun_explains_how_to_launch(tmp_path):
    env = {**gang_env(), "WORLD_SIZE": "8", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "12355"}
    proc = subprocess.run([sys.executable, "app.py", "--prompt", "x"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "WORLD_SIZE=8 is set but this process was not started by torchrun" in proc.stderr
    assert "./launch.sh --nproc 8" in proc.stderr


def test_xfuser_backend_on_cpu_is_refused_with_a_message(tiny_model_dir):
    proc = subprocess.run([sys.executable, "app.py", "--prompt", "x", "--sp_backend", "xfuser"], cwd=ROOT,
                          env=gang_env(tiny_model_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sp_backend xfuser has no CPU path" in proc.stderr


def test_unknown_attention_backend_names_the_package(tiny_model_dir):
    from parallel.kernels import BackendUnavailable, get_kernel

    with pytest.raises(BackendUnavailable, match="attention flash_attn_2 needs a CUDA GPU"):
        get_kernel("flash_attn_2", __import__("torch").device("cpu"))


def test_flash_attn_4_needs_a_gpu_and_a_kernel_may_name_its_own_cross_attention():
    import torch

    from parallel.apply import LocalAttention
    from parallel.kernels import BackendUnavailable, Kernel, get_kernel, math_attn_lse

    with pytest.raises(BackendUnavailable, match="attention flash_attn_4 needs a CUDA GPU; on CPU use auto, sdpa or math"):
        get_kernel("flash_attn_4", torch.device("cpu"))
    calls = []

    def tagged(tag):
        def attn(q, k, v):
            calls.append((tag, tuple(q.shape), tuple(k.shape)))  # (B, H, L, D): LocalAttention transposed
            return math_attn_lse(q, k, v)[0]
        return attn

    kern = Kernel("two", tagged("self"), math_attn_lse, cross=tagged("cross"))
    q, kv = torch.randn(1, 6, 2, 8), torch.randn(1, 3, 2, 8)  # (B, L, heads, D)
    out = LocalAttention(kern, cross=True)(q, kv, kv)
    LocalAttention(kern)(q, q, q)
    assert calls == [("cross", (1, 2, 6, 8), (1, 2, 3, 8)), ("self", (1, 2, 6, 8), (1, 2, 6, 8))]
    ref = math_attn_lse(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2))[0].transpose(1, 2)
    assert torch.equal(out, ref)
    assert Kernel("one", tagged("x"), math_attn_lse).cross_attn is not None  # no cross kernel: the same one
