"""Failures inside a request (issue 14): faults injected *inside* the forward on rank 1 of real CPU gangs end
the request with a message naming rank, step and cause, and the next request succeeds (after the gang's
restart when the other ranks were stuck in a collective); the pieces that make this work, one by one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine.loading import load_dit
from engine.tiny import DIT_FILE
from parallel import faults
from parallel.offload import apply_offload, plan_offload
from tests.multirank import ROOT, gang_env, latents
from tests.test_memory_modes import _inputs

REQ = {"prompt": "a red fox in the snow", "size": "208*144", "frame_num": 9, "sample_steps": 4, "base_seed": 11}
GRACE, HEARTBEAT = 3, 20  # --fault_grace and --heartbeat_timeout of the gangs below (dist_timeout stays 600 s)


def run_restarting_gang(nproc: int, argv: list[str], requests: list[dict], work: Path, tiny: Path,
                        grace: float = GRACE, timeout: float = 420) -> tuple[list[dict], str]:
    """tests/gang.py under torchrun with one restart allowed; every request's result, and the log."""
    work.mkdir(parents=True, exist_ok=True)
    flags = ["--fault_grace", str(grace), "--heartbeat_timeout", str(HEARTBEAT), "--dist_timeout", "600"]
    spec = {"argv": argv + flags + ["--outputs_dir", str(work / "outputs")], "requests": requests,
            "result": str(work / "result.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max_restarts=1", str(ROOT / "tests" / "gang.py"), str(work / "spec.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=gang_env(tiny), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    (work / "gang.log").write_text(log)
    lines = work / "result.jsonl"
    results = [json.loads(x) for x in lines.read_text().splitlines()] if lines.exists() else []
    if proc.returncode != 0 or len(results) != len(requests):
        raise AssertionError(f"gang of {nproc} exited with {proc.returncode}, {len(results)} results:\n{log[-8000:]}")
    return results, log


# -- faults inside the forward of real gangs -------------------------------------------------------------------
CASES = {
    "ulysses2_attention": (2, ["--ulysses_size", "2"], {"where": "attention", "step": 0},
                           "rank 1 failed at step 0: InjectedFault: injected fault in attention on rank 1 at step 0"),
    "ring2_streamed_block": (2, ["--ring_size", "2", "--blocks_to_swap", "2"], {"where": "block", "step": 1, "block": 1},
                             "rank 1 failed at step 1: InjectedFault: injected fault in block on rank 1 at step 1"),
    "cfg2_oom": (2, ["--cfg_size", "2", "--ulysses_size", "1", "--ring_size", "1"], {"where": "oom", "step": 2},
                 "rank 1 failed at step 2: out of GPU memory (208*144, 9 frames, batch 1): use fewer frames, a "
                 "smaller size or batch, or save memory with --blocks_to_swap / --offload_percent (the low_vram "
                 "preset), FSDP (--dit_fsdp) or more ranks"),
    "u2r2_fsdp_attention": (4, ["--ulysses_size", "2", "--ring_size", "2", "--dit_fsdp"],
                            {"where": "attention", "step": 1, "block": 1},
                            "rank 1 failed at step 1: InjectedFault: injected fault in attention on rank 1 at step 1"),
}


@pytest.mark.multirank
@pytest.mark.parametrize("case", list(CASES))
def test_fault_inside_the_forward_on_rank1_errors_the_client_restarts_the_gang_and_the_next_request_works(
        case, tiny_model_dir, tmp_path):
    nproc, argv, fault, message = CASES[case]
    reqs = [{"raw": REQ, "fault": {"rank": 1, **fault}, "decode": False},
            {"raw": REQ, "save_latents": str(tmp_path / "after.safetensors"), "decode": False}]
    results, log = run_restarting_gang(nproc, argv, reqs, tmp_path, tiny_model_dir)
    failed, after = results
    assert failed["ok"] is False and failed["type"] == "RankFailed", failed
    assert failed["error"] == message
    assert failed["seconds"] < HEARTBEAT + 30, "the client waited longer than the heartbeat timeout + 30 s"
    assert failed["restarting"] is True  # the other ranks were stuck in a collective: the gang was ended
    assert "Aborting the communicators and exiting (code 3) so that torchrun restarts the gang" in log
    assert after["ok"] is True and after["attempt"] == 1, after  # served by the restarted gang
    assert latents(tmp_path / "after.safetensors").isfinite().all()


@pytest.mark.multirank
def test_fault_in_the_parallel_vae_decode_ends_the_request_on_every_rank_without_a_restart(tiny_model_dir, tmp_path):
    reqs = [{"raw": REQ, "fault": {"rank": 1, "where": "vae"}},
            {"raw": REQ}]
    # a grace far above rank 0's own decode time: the agreement at the decode's gather, not the watch, ends it
    results, log = run_restarting_gang(2, ["--ulysses_size", "2"], reqs, tmp_path, tiny_model_dir, grace=300)
    failed, after = results
    assert failed["error"] == "rank 1 failed at step 4: InjectedFault: injected fault in the VAE decode on rank 1"
    assert failed["restarting"] is False and after["attempt"] == 0  # agreed at the decode's gather: no restart
    assert after["ok"] is True and len(after["videos"]) == 1
    assert "rank 1: request ended: rank 1 failed at step 4" in log  # step 4 of 4: after the last step


# -- the pieces -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_path(tiny_model_dir):
    return tiny_model_dir / "diffusion_models" / DIT_FILE


def test_a_failure_inside_a_streamed_block_leaves_the_streamer_clean_for_the_next_forward(dit_path):
    x, t, ctx = _inputs()
    ref_model = load_dit(dit_path)
    with torch.no_grad():
        ref = ref_model(x, t, ctx)
    model = load_dit(dit_path)
    streamer = apply_offload(model, plan_offload(model.blocks, 2, 0.5), torch.device("cpu"))
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected inside a streamed block)")

    handle = model.blocks[-1].register_forward_pre_hook(boom)  # a swapped block: its unit is resident then
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        model(x, t, ctx)
    assert not streamer.resident and not streamer.pending and streamer.resets == 1
    with torch.no_grad():
        out = model(x, t, ctx)  # before the fix: KeyError from the unit marked resident
    handle.remove()
    assert torch.equal(out, ref)
    assert streamer.max_on_device <= 2


def test_the_streamers_host_copies_share_one_exact_size_buffer_per_unit(dit_path):
    model = load_dit(dit_path)
    streamer = apply_offload(model, plan_offload(model.blocks, 1, 0.0), torch.device("cpu"))
    (i,) = streamer.units
    views = [h for _, h in streamer.units[i]]
    flat = streamer.stores[i].flat
    assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views)
    exact = sum(v.numel() * v.element_size() for v in views)
    assert exact <= streamer.host_bytes <= exact + 64 * len(views)


def test_fsdp_offload_units_are_materialised_on_the_cpu_and_the_rest_on_the_device():
    from parallel.fsdp import materialize

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    host = [model[1][0]]
    materialize(model, torch.device("meta"), host)  # "meta" stands in for the GPU: what is not host stays there
    assert {p.device.type for p in model[1][0].parameters()} == {"cpu"}
    assert {p.device.type for p in model[0].parameters()} == {"meta"}
    assert {p.device.type for p in model[1][1].parameters()} == {"meta"}


def test_offload_under_fsdp_makes_whole_block_units_only(dit_path):
    from parallel.offload import fsdp_offload_units, plan_fsdp_offload

    model = load_dit(dit_path)  # 3 blocks
    plan = plan_fsdp_offload(model.blocks, 1, 0.5)  # 1 swapped + half of the other 2
    assert plan.swapped == [1, 2] and not plan.layers
    offloaded, plain = fsdp_offload_units(model, plan)
    assert offloaded == [model.blocks[1], model.blocks[2]] and plain == [model.blocks[0]]
    assert all(isinstance(m, type(model.blocks[0])) for m in offloaded), "no Linear as its own FSDP unit"
    assert plan_fsdp_offload(model.blocks, 0, 1.0).swapped == [0, 1, 2]
    assert plan_fsdp_offload(model.blocks, 0, 0.0).empty


def test_ring_exchange_posts_send_and_receive_as_one_batch(monkeypatch):
    from parallel import usp

    batches = []
    monkeypatch.setattr(usp.dist, "batch_isend_irecv", lambda ops: batches.append(ops) or [])
    monkeypatch.setattr(usp.dist, "P2POp", lambda op, tensor, peer, group: (op, peer))
    kv = torch.zeros(2, 1, 2, 3, 4)
    incoming, works = usp.ring_exchange(kv, 1, 3, group=None)
    (ops,) = batches
    assert ops == [(dist.isend, 1), (dist.irecv, 3)]
    assert incoming.shape == kv.shape and works == []


def test_layout_groups_are_built_warmed_up_and_the_least_recently_used_destroyed(monkeypatch):
    from parallel import layout as lay_mod
    from parallel.layout import MeshCache, ParallelLayout

    made, destroyed, warmed = [], [], []
    monkeypatch.setattr(lay_mod.dist, "new_group", lambda ranks, backend=None: made.append(tuple(ranks)) or object())
    monkeypatch.setattr(lay_mod.dist, "destroy_process_group", lambda g: destroyed.append(g))
    monkeypatch.setattr(MeshCache, "_warm_up", lambda self, g: warmed.append(g.layout))
    cache = MeshCache(4, 0, keep=2)
    a, b, c = ParallelLayout(ulysses=4), ParallelLayout(ring=4), ParallelLayout(ring=2, ulysses=2)
    ga = cache.get(a)
    cache.get(b)
    assert cache.get(a) is ga  # cached, and now the most recently used
    cache.get(c)  # evicts b, the least recently used
    assert cache.layouts() == [a, c] and cache.destroyed == 1 and destroyed
    assert warmed == [a, b, c]


def test_fault_board_prefers_the_real_cause_over_the_timeouts_it_caused(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    board = faults.FaultBoard(store)
    assert board.read(7) is None
    board.post(7, 0, 2, "DistBackendError: [Gloo] Timed out waiting 600000ms for recv operation to complete: timed out")
    board.post(7, 1, 2, "InjectedFault: boom")
    assert board.read(7) == (1, 2, "InjectedFault: boom")
    assert board.read(8) is None


def test_fault_watch_calls_out_a_rank_still_inside_the_request_after_the_grace(tmp_path):
    board = faults.FaultBoard(dist.FileStore(str(tmp_path / "store"), 1))
    seen = threading.Event()
    got = []
    watch = faults.FaultWatch(board, grace=0.3, on_stuck=lambda *f: (got.append(f), seen.set()), poll=0.05)
    watch.begin(1)
    board.post(1, 1, 0, "InjectedFault: boom")
    assert seen.wait(10)
    assert got == [(1, 0, "InjectedFault: boom")]
    # a request that ends within the grace is not called out
    watch2 = faults.FaultWatch(board, grace=5.0, on_stuck=lambda *f: got.append(f), poll=0.05)
    watch2.begin(1)
    time.sleep(0.3)
    watch2.end()
    time.sleep(0.3)
    assert len(got) == 1


def test_a_server_that_is_restarting_refuses_requests_with_a_message():
    from parallel.serve import Dispatcher

    class FakeServer:
        failed = "rank 1 failed at step 0: InjectedFault: boom"
        state = None

    d = Dispatcher.__new__(Dispatcher)
    d.server = FakeServer()
    with pytest.raises(faults.ServerRestarting) as err:
        d.submit({"prompt": "x"})
    assert str(err.value) == ("the server is restarting after a failure (rank 1 failed at step 0: InjectedFault: "
                              "boom); try again in a minute")


def test_out_of_memory_reads_as_one_sentence_saying_what_to_change():
    from engine.request import GenerationRequest

    req = GenerationRequest(prompt="x", width=1280, height=720, frame_num=241, batch_size=8)
    text = faults.describe(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), req)
    assert text == ("out of GPU memory (1280*720, 241 frames, batch 8): use fewer frames, a smaller size or batch, "
                    "or save memory with --blocks_to_swap / --offload_percent (the low_vram preset), FSDP "
                    "(--dit_fsdp) or more ranks")
    assert faults.describe(ValueError("bad\nsecond line")) == "ValueError: bad"


def test_fault_specs_are_checked():
    with pytest.raises(ValueError, match="fault 'where' must be one of step, attention, block, vae, oom, cuda_error"):
        faults.check_fault({"where": "everywhere"})
    assert faults.check_fault(None) is None


def test_a_failed_request_frees_its_activations_and_per_request_state_before_the_error_is_raised(tiny_model_dir):
    import weakref

    from engine.request import GenerationRequest
    from parallel.serve import RankFailed
    from tests.conftest import production_server

    server = production_server(tiny_model_dir, blocks_to_swap=1)
    seen: list = []
    hook = server.pipe.dit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    req = GenerationRequest(prompt="a fox", width=208, height=144, frame_num=9, sample_steps=10, base_seed=1,
                            teacache=0.3)  # 10 steps: TeaCache is off below 10
    with pytest.raises(RankFailed) as err:
        server.execute(req, {"decode": False, "fault": {"rank": 0, "where": "block", "block": 2, "step": 9}})  # the last step: always computed
    assert str(err.value) == "rank 0 failed at step 9: InjectedFault: injected fault in block on rank 0 at step 9"
    assert err.value.__context__ is None and err.value.__cause__ is None  # no traceback holding the forward's frames
    assert seen and all(ref() is None for ref in seen), "activations of the failed request are still referenced"
    streamer = server.pipe.dit.block_runner.inner.streamer  # TeaCache wraps the streaming runner
    assert not streamer.resident and not streamer.pending
    assert server.pipe.cache is not None and not server.pipe.cache._state  # TeaCache residuals dropped
    assert not server.pipe.dit._rope_cache  # the size caches too, after a failure
    hook.remove()
    assert server.execute(req, {"decode": False}).latents.isfinite().all()
