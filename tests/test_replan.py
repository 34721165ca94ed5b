"""Per-request memory mode: blocks_to_swap / offload_percent changed between requests, with and without FSDP,
on one rank and in a gang; the output never changes (bitwise on CPU), and a re-plan that fails half-way puts
the previous mode back."""

from __future__ import annotations

import pytest
import torch

from engine.dit import run_blocks
from engine.loading import load_dit
from engine.tiny import DIT_FILE
from parallel.offload import StreamingRunner
from parallel.replan import MemoryModes, apply_memory_mode
from tests.multirank import latents, run_gang

CPU = torch.device("cpu")
# (blocks_to_swap, offload_percent) in the order requests ask for them; the tiny DiT has 3 blocks
SEQUENCE = [(0, 0.0), (2, 0.0), (3, 0.0), (1, 0.5), (0, 1.0), (2, 0.0), (0, 0.0)]


@pytest.fixture(scope="module")
def dit_path(tiny_model_dir):
    return tiny_model_dir / "diffusion_models" / DIT_FILE


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 3, 18, 26, generator=g), torch.tensor([700.0]), torch.randn(1, 9, 64, generator=g)


def _weights(model) -> dict[str, torch.Tensor]:
    """Every block parameter's values, wherever they live now (device or host copy)."""
    hosted = model.__dict__.get("_host_copies", {})
    return {n: hosted.get(id(p), p.data).clone() for n, p in model.blocks.named_parameters()}


def test_changing_the_mode_between_forwards_keeps_the_output_bitwise(dit_path):
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = load_dit(dit_path)(x, t, ctx)
    model = load_dit(dit_path)
    before = _weights(model)
    modes = MemoryModes(model, CPU, False, 0, 0.0)
    for swap, pct in SEQUENCE:
        mode = modes.use(swap, pct)
        assert (mode.blocks_to_swap, mode.offload_percent) == (swap, pct)
        with torch.no_grad():
            assert torch.equal(model(x, t, ctx), ref), (swap, pct)
        hosted = model.__dict__.get("_host_copies", {})
        on_host = {n for n, p in model.blocks.named_parameters() if id(p) in hosted}
        assert all(model.blocks.get_parameter(n).numel() == 0 for n in on_host), "host tensors stay off the device"
        if swap:  # the last `swap` blocks are wholly on the host
            assert all(id(p) in hosted for b in model.blocks[-swap:] for p in b.parameters())
        if (swap, pct) == (0, 0.0):
            assert model.block_runner is run_blocks and not hosted and mode.host_gib == 0
        else:
            assert isinstance(model.block_runner, StreamingRunner) and mode.host_gib > 0
            assert mode.host_gib == round(model.block_runner.streamer.host_bytes / 2**30, 3)
    assert modes.changes == len(SEQUENCE) - 1  # the first entry is the mode already in force
    after = _weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_the_same_mode_again_costs_nothing_and_a_kept_block_keeps_its_buffer(dit_path):
    model = load_dit(dit_path)
    modes = MemoryModes(model, CPU, False, 0, 0.0)
    modes.use(1, 0.0)
    store = model.block_runner.streamer.stores[2]
    again = modes.use(1, 0.0)
    assert again.replan_s == 0.0 and modes.changes == 1
    modes.use(2, 0.0)  # block 2 stays wholly on the host: its buffer is not copied
    assert model.block_runner.streamer.stores[2] is store


def test_a_re_plan_that_fails_half_way_puts_the_previous_mode_back(dit_path):
    x, t, ctx = _inputs()
    model = load_dit(dit_path)
    with torch.no_grad():
        ref = model(x, t, ctx)
    modes = MemoryModes(model, CPU, False, 0, 0.0)
    modes.use(1, 0.0)

    def fail_after_first(i: int) -> None:
        raise RuntimeError(f"no host memory left after block {i}")

    with pytest.raises(RuntimeError, match="no host memory left after block"):
        modes.use(0, 1.0, fail_after_first)
    assert (modes.current.blocks_to_swap, modes.current.offload_percent) == (1, 0.0)
    streamer = model.block_runner.streamer
    assert sorted(streamer.units) == [2], "only the swapped block holds host tensors again"
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref)
    # from the plain mode too (no streamer yet to fall back on)
    modes.use(0, 0.0)
    with pytest.raises(RuntimeError, match="no host memory left"):
        modes.use(3, 0.0, fail_after_first)
    assert model.block_runner is run_blocks and not model.__dict__["_host_copies"]
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref)


def test_teacache_around_the_runner_stays_around_it(dit_path):
    from engine.teacache import TeaCache

    model = load_dit(dit_path)
    cache = TeaCache(model.block_runner, 0.1, [1.0, 0.0], "cpu", None)
    model.block_runner = cache
    apply_memory_mode(model, 2, 0.0, CPU, False)
    assert model.block_runner is cache and isinstance(cache.inner, StreamingRunner)
    apply_memory_mode(model, 0, 0.0, CPU, False)
    assert model.block_runner is cache and cache.inner is run_blocks


def _raw(**kw) -> dict:
    return {"prompt": "a fox", "size": "208*144", "frame_num": 9, "sample_steps": 2, "base_seed": 5, **kw}


@pytest.mark.multirank
@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "ulysses2"])
def test_a_two_rank_gang_changes_the_mode_per_request_without_changing_the_latents(tiny_model_dir, tmp_path, fsdp):
    """swap 0 → 2 → 3 → (1, 0.5) → 0 across requests on both ranks (FSDP: each rank's own shards move), a
    re-plan that fails on rank 1 half-way is refused on every rank with the previous mode put back, and the
    next request runs in the new mode. Every request's latents equal the first one's, bit for bit."""
    argv = ["--dtype", "fp32"] + (["--use_fsdp"] if fsdp else ["--ulysses_size", "2"])
    steps = [(0, 0.0), (2, 0.0), (3, 0.0), (1, 0.5), None, (1, 1.0), (0, 0.0)]
    requests = []
    for i, step in enumerate(steps):
        if step is None:  # a fault on rank 1 after its second block moved, on the way to swap 3
            requests.append({"raw": _raw(blocks_to_swap=3, offload_percent=0.0), "decode": False,
                             "fault": {"where": "replan", "rank": 1, "block": 1}})
            continue
        swap, pct = step
        requests.append({"raw": _raw(blocks_to_swap=swap, offload_percent=pct), "decode": False,
                         "save_latents": str(tmp_path / f"r{i}.st")})
    results, log = run_gang(2, argv, requests, tmp_path / "gang", tiny_model_dir)
    failed = results[4]
    assert not failed["ok"]
    assert failed["error"] == ("rank 1: changing the memory mode to blocks_to_swap 3, offload_percent 0 failed: "
                               "injected fault in the memory re-plan on rank 1 after block 1; every rank kept "
                               "blocks_to_swap 1, offload_percent 0.5")
    assert failed["type"] == "MemoryModeRefused"
    first = latents(tmp_path / "r0.st")
    for i, step in enumerate(steps):
        if step is None:
            continue
        res = results[i]
        assert res["ok"], res
        mode = res["meta"]["memory_mode"]
        assert (mode["blocks_to_swap"], mode["offload_percent"]) == step
        assert (mode["host_gib"] > 0) == (step != (0, 0.0))
        assert torch.equal(latents(tmp_path / f"r{i}.st"), first), f"request {i} ({step}) changed the latents"
    assert results[5]["meta"]["memory_mode"]["replan_s"] > 0, "rank 0 went back to (1, 0.5): (1, 1.0) is a change"
    assert "memory mode: blocks_to_swap 0 → 2, offload_percent 0 → 0" in log
    assert "memory mode: blocks_to_swap 3 → 1, offload_percent 0 → 0.5" in log  # rank 0 going back
