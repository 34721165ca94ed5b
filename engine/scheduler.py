"""Flow-matching samplers (UniPC-bh2, Euler, DPM-Solver++ 2M) on the official Wan2.1 sigma/timestep grid."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

ACCEPTED_SOLVERS: tuple[str, ...] = ("unipc", "euler", "dpm++")
DEFAULT_SOLVER = "unipc"
NUM_TRAIN_TIMESTEPS = 1000
# The official FlowUniPC scheduler starts its grid at float32(1 - 1/1000).item() = 0.9990000128746033, not at
# the float64 0.999: the difference changes some truncated timesteps (30 steps, shift 1: t[10] = 666, not 665).
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
# The official 'dpm++' path uses get_sampling_sigmas(): linspace(1, 0, steps + 1), so its first timestep is 1000.
DPM_SIGMA_MAX = 1.0


def flow_sigmas(steps: int, shift: float, sigma_max: float = UNIPC_SIGMA_MAX) -> tuple[Tensor, Tensor]:
    """Official grid: (fp32 sigmas of length steps+1 ending in 0, int64 truncated timesteps of length steps)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"sample_steps must be a positive integer; got {steps!r}")
    if not shift > 0:
        raise ValueError(f"sample_shift must be > 0; got {shift!r}")
    s = np.linspace(sigma_max, 0.0, int(steps) + 1)[:-1]  # float64, like the official numpy code
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = torch.from_numpy(s * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncation toward zero
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return sigmas, timesteps


def _lam(sigma: Tensor) -> Tensor:
    """Half log-SNR of the flow path x = (1 - sigma) x0 + sigma eps: log(alpha) - log(sigma)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class Scheduler(ABC):
    """A per-request sampler: fixed `sigmas`/`timesteps`, `step` called once per index in order."""

    name: str = ""
    sigma_max: float = UNIPC_SIGMA_MAX

    def __init__(self, steps: int, shift: float) -> None:
        self.steps, self.shift = int(steps), float(shift)
        self.sigmas, self.timesteps = flow_sigmas(steps, shift, self.sigma_max)
        self.reset()

    def __len__(self) -> int:
        return self.steps

    def reset(self) -> None:
        """Forget all history so the same schedule can sample a new request."""
        self._next = 0

    def _begin(self, velocity: Tensor, index: int, sample: Tensor) -> tuple[Tensor, Tensor]:
        """Check the step order and upcast velocity and sample to fp32."""
        if index != self._next:
            raise ValueError(
                f"{self.name} scheduler: step index {index} out of order (expected {self._next}); "
                "use a fresh scheduler or reset() for a new request"
            )
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
        self._next += 1
        return velocity.float(), sample.float()

    @abstractmethod
    def step(self, velocity: Tensor, index: int, sample: Tensor) -> Tensor:
        """Advance `sample` from sigmas[index] to sigmas[index + 1] given the model's flow velocity (fp32 out)."""


class EulerScheduler(Scheduler):
    """Flow-matching Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v."""

    name = "euler"

    def step(self, velocity: Tensor, index: int, sample: Tensor) -> Tensor:
        """One explicit Euler step along the predicted velocity."""
        v, x = self._begin(velocity, index, sample)
        return x + (self.sigmas[index + 1] - self.sigmas[index]) * v


class UniPCScheduler(Scheduler):
    """Flow UniPC, B(h)=bh2, order 2, x0-prediction, lower_order_final, UniC corrector on every step but the first."""

    name = "unipc"

    def reset(self) -> None:
        """Forget the x0 history, the last sample and the last order."""
        super().reset()
        self._x0: list[Tensor] = []
        self._last_sample: Tensor | None = None
        self._order = 1

    def _update(self, x: Tensor, s: int, t: int, m0: Tensor, order: int,
                m1: Tensor | None = None, model_t: Tensor | None = None) -> Tensor:
        """UniP (model_t None) or UniC step from sigmas[s] to sigmas[t]; m0 = x0 at s, m1 = x0 at s - 1."""
        sig_t, sig_s = self.sigmas[t], self.sigmas[s]
        alpha_t = 1 - sig_t
        lam_s = _lam(sig_s)
        h = _lam(sig_t) - lam_s
        hh = -h  # predict_x0
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)  # bh2
        x_t = sig_t / sig_s * x - alpha_t * h_phi_1 * m0
        d1 = None
        if order == 2:
            rk = (_lam(self.sigmas[s - 1]) - lam_s) / h
            d1 = (m1 - m0) / rk
        if model_t is None:  # predictor: order 2 uses the fixed rho_p = 1/2
            return x_t if d1 is None else x_t - alpha_t * b_h * (0.5 * d1)
        if order == 1:  # corrector
            rho_t = 0.5
            res = rho_t * (model_t - m0)
        else:  # solve the 2x2 order conditions R rho = b of UniC-2
            h_phi_k = h_phi_1 / hh - 1
            b1 = h_phi_k * 1 / b_h
            h_phi_k = h_phi_k / hh - 1 / 2
            b2 = h_phi_k * 2 / b_h
            rks = torch.stack([rk, torch.ones(())])
            rho = torch.linalg.solve(torch.stack([torch.pow(rks, 0), torch.pow(rks, 1)]), torch.stack([b1, b2]))
            res = rho[0] * d1 + rho[1] * (model_t - m0)
        return x_t - alpha_t * b_h * res

    def step(self, velocity: Tensor, index: int, sample: Tensor) -> Tensor:
        """Correct the current sample with this model evaluation (UniC), then predict the next one (UniP)."""
        v, x = self._begin(velocity, index, sample)
        x0 = x - self.sigmas[index] * v  # from the uncorrected sample, as the official code does
        if index > 0:
            m1 = self._x0[-2] if self._order == 2 else None
            x = self._update(self._last_sample, index - 1, index, self._x0[-1], self._order, m1, model_t=x0)
        self._x0 = [*self._x0[-1:], x0]
        # warm-up (order 1 first) and lower_order_final (order 1 for the last step to sigma 0)
        self._order = min(2, self.steps - index, index + 1)
        self._last_sample = x
        m1 = self._x0[-2] if self._order == 2 else None
        return self._update(x, index, index + 1, x0, self._order, m1)


class DPMSolverPPScheduler(Scheduler):
    """Flow DPM-Solver++ 2M (midpoint), as the official sample_solver='dpm++': sigmas from 1, first/last order 1."""

    name = "dpm++"
    sigma_max = DPM_SIGMA_MAX

    def reset(self) -> None:
        """Forget the previous x0."""
        super().reset()
        self._prev_x0: Tensor | None = None

    def step(self, velocity: Tensor, index: int, sample: Tensor) -> Tensor:
        """First order on the first and last step (final sigma 0), multistep second order in between."""
        v, x = self._begin(velocity, index, sample)
        sig_t, sig_s = self.sigmas[index + 1], self.sigmas[index]
        x0 = x - sig_s * v
        prev, self._prev_x0 = self._prev_x0, x0
        alpha_t = 1 - sig_t
        lam_s = _lam(sig_s)
        h = _lam(sig_t) - lam_s  # +inf at sigma 1 or 0; exp(-inf) = 0 gives the exact limits
        coef = alpha_t * (torch.exp(-h) - 1.0)
        x_t = sig_t / sig_s * x - coef * x0
        if index == 0 or index == self.steps - 1:
            return x_t
        r0 = (lam_s - _lam(self.sigmas[index - 1])) / h
        return x_t - 0.5 * coef * ((1.0 / r0) * (x0 - prev))


def distilled_sigmas(timesteps: list[float], shift: float) -> tuple[Tensor, Tensor]:
    """Explicit timesteps (before the shift, from 1000 down) → (float32 shifted sigmas ending in 0, float timesteps).

    σ = t / 1000, σ' = s·σ / (1 + (s − 1)·σ), the model sees 1000·σ' (lightx2v's step-distilled grid):
    [1000, 750, 500, 250] at shift 5 → 1000, 937.5, 833.33, 625.
    """
    if not timesteps:
        raise ValueError("sample_timesteps must not be empty")
    if not shift > 0:
        raise ValueError(f"sample_shift must be > 0; got {shift!r}")
    s = np.asarray([float(t) for t in timesteps], dtype=np.float64) / NUM_TRAIN_TIMESTEPS
    s = shift * s / (1 + (shift - 1) * s)
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return sigmas, torch.from_numpy(s * NUM_TRAIN_TIMESTEPS)


class DistilledScheduler(Scheduler):
    """Few-step distilled sampling on explicit timesteps: x0 = x − σ·v, x_next = x0 + σ_next·v."""

    name = "euler"

    def __init__(self, timesteps: list[float], shift: float) -> None:
        self.steps, self.shift = len(timesteps), float(shift)
        self.sigmas, self.timesteps = distilled_sigmas(timesteps, shift)
        self.reset()

    def step(self, velocity: Tensor, index: int, sample: Tensor) -> Tensor:
        """The x0 prediction, re-noised to the next sigma along the same velocity."""
        v, x = self._begin(velocity, index, sample)
        x0 = x - self.sigmas[index] * v
        return x0 + self.sigmas[index + 1] * v


_SOLVERS: dict[str, type[Scheduler]] = {"unipc": UniPCScheduler, "euler": EulerScheduler, "dpm++": DPMSolverPPScheduler}


def make_scheduler(name: str, steps: int, shift: float, timesteps: list[float] | tuple[float, ...] = ()) -> Scheduler:
    """A fresh scheduler for one request; `name` is one of ACCEPTED_SOLVERS; explicit `timesteps` (before the
    shift) sample on that grid with the distilled Euler update (the request's validation allows only 'euler')."""
    if timesteps:
        return DistilledScheduler(list(timesteps), shift)
    cls = _SOLVERS.get(name)
    if cls is None:
        raise ValueError(f"sample_solver must be one of {', '.join(ACCEPTED_SOLVERS)}; got {name!r}")
    return cls(steps, shift)
