"""Admission control (issue 14): a request that cannot fit on the fullest rank is refused before any rank
starts, with one sentence naming size, frames and batch and what would fit; what fits goes through."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.cli import RunConfig
from engine.config import DIT_CONFIGS
from engine.request import GenerationRequest, RequestError
from parallel.admission import check_fits, estimate_inputs
from parallel.layout import ParallelLayout


def fake_server(world: int = 2, **cfg) -> SimpleNamespace:
    """The parts of a Server admission control reads: a CUDA rank of a 14B gang (no GPU needed)."""
    state = SimpleNamespace(layout_for=lambda u, r, c: ParallelLayout(cfg=c or 1, ring=r or 1, ulysses=u or world),
                            t5_fsdp=False, dit_fsdp=False, parallel_vae=True, info=SimpleNamespace(dtype=torch.bfloat16))
    return SimpleNamespace(cfg=RunConfig(**cfg), state=state, rt=SimpleNamespace(device=torch.device("cuda", 0), world_size=world),
                           pipe=SimpleNamespace(dit=SimpleNamespace(cfg=DIT_CONFIGS["14B"]), text_encoder=None))


MEMORY = [{"rank": 0, "available_gib": 100.0}, {"rank": 1, "available_gib": 40.0}]


def test_a_request_that_cannot_fit_is_refused_naming_size_frames_batch_and_what_fits():
    req = GenerationRequest(prompt="x", width=1280, height=720, frame_num=241, batch_size=8, ulysses_size=2)
    with pytest.raises(RequestError) as err:
        check_fits(fake_server(), req, MEMORY)
    assert err.value.field == "size"
    text = str(err.value)
    assert text.startswith("size: 1280*720, 241 frames, batch 8 needs about ")
    assert " GiB beyond the loaded weights but rank 1 has 40.0 GiB free: at most " in text
    assert " frames fit at this size and batch (or batch " in text


def test_a_request_that_fits_is_admitted_and_cpu_ranks_are_not_checked():
    req = GenerationRequest(prompt="x", width=832, height=480, frame_num=81, batch_size=1, ulysses_size=2)
    check_fits(fake_server(), req, MEMORY)
    big = GenerationRequest(prompt="x", width=1280, height=720, frame_num=241, batch_size=8)
    cpu = fake_server()
    cpu.rt.device = torch.device("cpu")
    check_fits(cpu, big, MEMORY)


def test_the_estimate_sees_the_servers_memory_mode_and_layout():
    req = GenerationRequest(prompt="x", width=832, height=480, frame_num=81, sample_guide_scale=1.0, ulysses_size=2)
    inp = estimate_inputs(fake_server(blocks_to_swap=10, offload_percent=0.5, t5_cpu=True, vae_tiling=True), req)
    assert (inp.mode.blocks_to_swap, inp.mode.offload_percent, inp.mode.t5, inp.mode.vae_tiling) == (10, 0.5, "cpu", True)
    assert (inp.layout.ulysses, inp.layout.ring, inp.request.cfg, inp.mode.vae_parts) == (2, 1, False, 2)


def test_the_estimate_reads_a_real_servers_model_text_encoder_and_mode(tiny_model_dir):
    from tests.conftest import production_server

    server = production_server(tiny_model_dir, blocks_to_swap=1)
    req = GenerationRequest(prompt="x", width=208, height=144, frame_num=9)
    inp = estimate_inputs(server, req)
    assert inp.model == server.pipe.dit.cfg and inp.mode.blocks_to_swap == 1
    assert inp.t5 == {"vocab_size": 2048, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}
    server.rt.device = torch.device("cuda", 0)  # as on a GPU: the check runs (with room to spare)
    check_fits(server, req, [{"rank": 0, "available_gib": 50.0}])


def test_a_fault_in_the_estimate_admits_the_request_with_a_warning(caplog):
    server = fake_server()
    server.pipe.dit.cfg = None  # an estimate that cannot run
    req = GenerationRequest(prompt="x", width=1280, height=720, frame_num=241, batch_size=8)
    check_fits(server, req, MEMORY)
    assert "admission control could not estimate the request (AttributeError" in caplog.text
