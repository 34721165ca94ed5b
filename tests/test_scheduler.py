"""Flow-matching samplers: official timestep grid, UniPC / DPM++ against diffusers, Euler accuracy, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from engine.scheduler import (
    ACCEPTED_SOLVERS,
    UNIPC_SIGMA_MAX,
    flow_sigmas,
    make_scheduler,
)

SHAPE = (1, 4, 3, 5)  # diffusers' einsum wants (batch, channels, ...)


def fake_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear, deterministic stand-in for the DiT."""
    s = float(t) / 1000.0
    return torch.tanh(1.3 * x) + 0.4 * torch.sin(2.0 * x + 3.0 * s) - 0.25 * x * s


def start_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234), dtype=torch.float32)


def run(sched, x: torch.Tensor, step) -> torch.Tensor:
    for i, t in enumerate(sched.timesteps):
        x = step(fake_velocity(x, t), i, t, x)
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_official_timesteps_50_steps_shift_5():
    sigmas, t = flow_sigmas(50, 5.0)
    assert t.dtype == torch.int64 and len(t) == 50
    assert t[:5].tolist() == [999, 995, 991, 987, 982]
    assert t[-4:].tolist() == [302, 241, 172, 92]
    assert bool((t[1:] < t[:-1]).all()), "timesteps must strictly decrease"
    assert len(sigmas) == 51 and float(sigmas[-1]) == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_timesteps_shift_8_30_steps_follow_the_rule_in_plain_python():
    _, t = flow_sigmas(30, 8.0)
    expected = []
    for i in range(30):
        s = UNIPC_SIGMA_MAX + i * ((0.0 - UNIPC_SIGMA_MAX) / 30)  # what np.linspace computes
        expected.append(int(8.0 * s / (1 + 7.0 * s) * 1000))
    assert t.tolist() == expected
    assert t[:4].tolist() == [999, 995, 991, 986]
    assert t[-3:].tolist() == [470, 363, 216]


def test_sigma_max_is_the_official_float32_value():
    # float32(0.999) and float64 0.999 truncate differently here; the official scheduler uses the float32 one.
    _, t = flow_sigmas(30, 1.0)
    assert int(t[10]) == 666 and int(t[20]) == 333


def test_last_sigma_is_zero_for_every_solver():
    for name in ACCEPTED_SOLVERS:
        s = make_scheduler(name, 7, 3.0)
        assert s.sigmas.dtype == torch.float32 and s.timesteps.dtype == torch.int64
        assert len(s.sigmas) == 8 and len(s.timesteps) == 7 and float(s.sigmas[-1]) == 0.0


def test_dpmpp_grid_starts_at_sigma_1_like_official_get_sampling_sigmas():
    s = make_scheduler("dpm++", 50, 5.0)
    assert float(s.sigmas[0]) == 1.0 and int(s.timesteps[0]) == 1000
    ref = np.linspace(1, 0, 51)[:50]
    ref = 5.0 * ref / (1 + 4.0 * ref)
    assert s.timesteps.tolist() == (ref * 1000).astype(np.int64).tolist()


@pytest.mark.parametrize("steps,shift", [(10, 5.0), (23, 8.0), (50, 5.0)])
def test_unipc_matches_diffusers_flow_unipc(steps, shift):
    ours = make_scheduler("unipc", steps, shift)
    # diffusers' flow UniPC is the same algorithm as the official FlowUniPCMultistepScheduler; its default flow
    # grid is linspace(1, 1/1000) though, so hand it the official unshifted grid and let it apply flow_shift.
    ref = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
        solver_type="bh2", lower_order_final=True, use_flow_sigmas=True, flow_shift=shift, final_sigmas_type="zero",
    )
    ref.set_timesteps(sigmas=np.linspace(UNIPC_SIGMA_MAX, 0, steps + 1)[:-1])
    assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)
    x = start_noise()
    got = run(ours, x, lambda v, i, t, s: ours.step(v, i, s))
    want = run(ref, x, lambda v, i, t, s: ref.step(v, t, s, return_dict=False)[0])
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5  # bitwise equal on this CPU build; tolerance for other BLAS/CPUs
    assert rel_err(got, x) > 0.1  # it really moved


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy __array__ notice inside diffusers
@pytest.mark.parametrize("steps,shift", [(10, 5.0), (30, 3.0)])
def test_dpmpp_matches_diffusers_dpmsolver_pp_2m_on_the_official_grid(steps, shift):
    ours = make_scheduler("dpm++", steps, shift)
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=True,
        flow_shift=shift,
    )
    ref.set_timesteps(steps)
    ref.sigmas, ref.timesteps = ours.sigmas.clone(), ours.timesteps.clone()  # official dpm++ grid starts at 1
    x = start_noise()
    got = run(ours, x, lambda v, i, t, s: ours.step(v, i, s))
    want = run(ref, x, lambda v, i, t, s: ref.step(v, t, s, return_dict=False)[0])
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


def test_unipc_last_step_returns_the_x0_prediction_of_the_final_evaluation():
    s = make_scheduler("unipc", 6, 5.0)
    x = start_noise()
    for i in range(5):
        x = s.step(fake_velocity(x, s.timesteps[i]), i, x)
    v = fake_velocity(x, s.timesteps[5])
    assert torch.equal(s.step(v, 5, x), x - s.sigmas[5] * v)


@pytest.mark.parametrize("name", ACCEPTED_SOLVERS)
def test_perfect_model_of_a_point_mass_lands_exactly_on_it(name):
    # data = c: the exact flow velocity is (x - c) / sigma, so x0 = c at every step and every solver must hit c
    c = torch.linspace(-1, 1, 60).reshape(SHAPE)
    s = make_scheduler(name, 12, 5.0)
    x = start_noise()
    for i in range(12):
        x = s.step((x - c) / s.sigmas[i], i, x)
    assert torch.allclose(x, c, atol=1e-5)


def test_euler_integrates_a_linear_ode_with_first_order_accuracy():
    # dx/dsigma = a x  =>  x(0) = x(sigma_0) exp(-a sigma_0)
    a = 0.7
    errs = []
    for steps in (50, 100, 200):
        s = make_scheduler("euler", steps, 1.0)
        x = torch.full((3,), 2.0)
        for i in range(steps):
            x = s.step(a * x, i, x)
        exact = 2.0 * math.exp(-a * float(s.sigmas[0]))
        errs.append(abs(float(x[0]) - exact))
    assert errs[0] < 5e-3
    assert 1.8 < errs[0] / errs[1] < 2.2 and 1.8 < errs[1] / errs[2] < 2.2


def test_euler_step_formula():
    s = make_scheduler("euler", 5, 5.0)
    x, v = torch.randn(2, 8).unbind(0)
    assert torch.equal(s.step(v, 0, x), x + (s.sigmas[1] - s.sigmas[0]) * v)


def test_bad_solver_name_raises_with_exact_message():
    with pytest.raises(ValueError) as e:
        make_scheduler("ddim", 10, 5.0)
    assert str(e.value) == "sample_solver must be one of unipc, euler, dpm++; got 'ddim'"
    assert ACCEPTED_SOLVERS == ("unipc", "euler", "dpm++")


@pytest.mark.parametrize("name", ACCEPTED_SOLVERS)
def test_same_inputs_give_bitwise_identical_outputs_and_reset_restarts(name):
    x = start_noise()
    a = make_scheduler(name, 15, 5.0)
    b = make_scheduler(name, 15, 5.0)
    ra = run(a, x, lambda v, i, t, s: a.step(v, i, s))
    rb = run(b, x, lambda v, i, t, s: b.step(v, i, s))
    assert torch.equal(ra, rb)
    a.reset()
    assert torch.equal(run(a, x, lambda v, i, t, s: a.step(v, i, s)), ra)


def test_step_out_of_order_raises_and_low_precision_velocity_is_upcast():
    s = make_scheduler("unipc", 4, 5.0)
    x = start_noise()
    with pytest.raises(ValueError, match="out of order"):
        s.step(torch.zeros_like(x), 1, x)
    out = s.step(fake_velocity(x, s.timesteps[0]).bfloat16(), 0, x)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="out of order"):
        s.step(torch.zeros_like(x), 0, out)


def test_invalid_steps_or_shift_raise():
    with pytest.raises(ValueError, match="sample_steps"):
        flow_sigmas(0, 5.0)
    with pytest.raises(ValueError, match="sample_shift"):
        flow_sigmas(10, 0.0)
