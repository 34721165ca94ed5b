"""Every parallel layout, with and without FSDP of DiT and T5, gives the latents of one process.

Each gang is the real server (torchrun, gloo, separate processes) serving several requests whose
layouts differ, at a size whose token count does not divide by the ranks (208*144*9: 351 tokens) and at
one that does (256*256*9: 768 tokens).
"""

from __future__ import annotations

import pytest

from tests.conftest import rel_err
from tests.multirank import latents, run_gang

pytestmark = pytest.mark.multirank

SIZES = ("208*144", "256*256")
BASE = {"prompt": "a red fox running through snow", "frame_num": 9, "sample_steps": 3, "sample_guide_scale": 5.0,
        "base_seed": 1234}
ARGV = ["--dtype", "fp32"]


def _requests(tmp, tag, layouts):
    reqs = []
    for name, lay in layouts:
        for size in SIZES:
            raw = {**BASE, "size": size, **lay}
            path = str(tmp / f"{tag}_{name}_{size.replace('*', 'x')}.safetensors")
            reqs.append({"raw": raw, "save_latents": path, "decode": False})
    return reqs


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    reqs = _requests(tmp, "one", [("one", {})])
    results, _ = run_gang(1, ARGV, reqs, tmp, tiny_model_dir)
    assert all(r["ok"] for r in results), results
    return {size: latents(r["save_latents"]) for size, r in zip(SIZES, reqs)}


def _check(reqs, results, reference):
    for req, res in zip(reqs, results):
        assert res["ok"], res
        size = req["raw"]["size"]
        err = rel_err(latents(req["save_latents"]), reference[size])
        assert err < 1e-5, f"{req['save_latents']}: rel err {err:.2e}"


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_two_ranks_ulysses2_ring2_cfg2_match_single_process(reference, tiny_model_dir, tmp_path, fsdp):
    layouts = [("u2", {"ulysses_size": 2, "ring_size": 1}), ("r2", {"ulysses_size": 1, "ring_size": 2}),
               ("cfg2", {"cfg_size": 2, "ulysses_size": 1, "ring_size": 1})]
    reqs = _requests(tmp_path, "w2", layouts)
    argv = ARGV + (["--dit_fsdp", "--t5_fsdp"] if fsdp else [])
    results, log = run_gang(2, argv, reqs, tmp_path, tiny_model_dir)
    _check(reqs, results, reference)
    if fsdp:
        assert "Applied FSDP to model" in log
    assert "Initialized distributed environment with 2 processes" in log
    assert f"Setup complete: FSDP={'true' if fsdp else 'false'}, Context Parallel=true" in log


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_four_ranks_ulysses2xring2_and_cfg2xulysses2_match_single_process(reference, tiny_model_dir, tmp_path, fsdp):
    layouts = [("u2r2", {"ulysses_size": 2, "ring_size": 2}),
               ("cfg2u2", {"cfg_size": 2, "ulysses_size": 2, "ring_size": 1})]
    if not fsdp:  # one server changing layout between requests: u2×r2 → r4 → u4
        layouts += [("r4", {"ulysses_size": 1, "ring_size": 4}), ("u4", {"ulysses_size": 4, "ring_size": 1})]
    reqs = _requests(tmp_path, "w4", layouts)
    argv = ARGV + (["--use_fsdp"] if fsdp else [])
    results, log = run_gang(4, argv, reqs, tmp_path, tiny_model_dir)
    _check(reqs, results, reference)
    forwards = {r["meta"]["dit_forwards"] for r in results}
    assert forwards == {6}, "logical DiT forwards (3 steps × cond/uncond) must not depend on the layout"
