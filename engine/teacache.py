"""TeaCache for Wan2.1: skip the block stack on steps whose timestep embedding barely moved, reusing the
last residual of the same branch (conditional and unconditional keep separate state).

The decision depends only on the timestep embedding `e`, which is identical on every rank; it is still
agreed over ranks through `agree` (set by parallel/), so no rank can take a different branch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

# polynomial in the rel-L1 distance of `e` (TeaCache4Wan2.1, mode "e")
COEFFICIENTS = {
    "14B": [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404],
    "1.3B": [2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01],
    "i2v-14B-480P": [-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01],
    "i2v-14B-720P": [-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683],
}
AREA_480P = 832 * 480


def coefficients_for(model_key: str, area: int = 0) -> list[float]:
    """The model's TeaCache4Wan2.1 coefficients: 14B and 1.3B by name (the 1.3B ones for the tiny and custom
    models); image-to-video by the request's area, since the I2V-14B-480P and -720P files have the same shapes
    (the 480P set up to 832·480 pixels, else the 720P set; FLF2V-14B is a 720P model)."""
    if model_key == "i2v-14B":
        return COEFFICIENTS["i2v-14B-480P" if area <= AREA_480P else "i2v-14B-720P"]
    if model_key == "flf2v-14B":
        return COEFFICIENTS["i2v-14B-720P"]
    return COEFFICIENTS["14B" if model_key == "14B" else "1.3B"]


@dataclass
class _Branch:
    prev_e: Tensor | None = None
    residual: Tensor | None = None
    accumulated: float = 0.0


@dataclass
class TeaCache:
    """A block runner wrapper: `runner(model, x, e, e0, ctx, rope)` that may skip `inner`."""

    inner: Callable[..., Tensor]
    threshold: float
    coefficients: list[float]
    cache_device: str = "gpu"  # "cpu" keeps the residuals in host memory
    agree: Callable[[str, bool], bool] | None = None  # (branch, want_compute) → compute? (same on every rank)
    steps: int = 0
    branch: str = "cond"
    step: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    _state: dict[str, _Branch] = field(default_factory=dict)

    def begin(self, steps: int) -> None:
        """Reset for a new request of `steps` denoising steps."""
        self.steps, self.skipped, self._state = steps, [], {}

    def set_position(self, step: int, branch: str) -> None:
        self.step, self.branch = step, branch

    def _want_compute(self, st: _Branch, e: Tensor) -> bool:
        if self.step == 0 or self.step >= self.steps - 1 or st.prev_e is None or st.residual is None:
            st.accumulated = 0.0
            return True
        rel = ((e - st.prev_e).abs().mean() / st.prev_e.abs().mean()).item()
        st.accumulated += float(np.poly1d(self.coefficients)(rel))
        if st.accumulated < self.threshold:
            return False
        st.accumulated = 0.0
        return True

    def __call__(self, model, x: Tensor, e: Tensor, e0: Tensor, context: Tensor, rope: Tensor) -> Tensor:
        st = self._state.setdefault(self.branch, _Branch())
        want = self._want_compute(st, e.float())
        compute = self.agree(self.branch, want) if self.agree is not None else want
        if compute:
            st.accumulated = 0.0
        st.prev_e = e.detach().float().clone()
        if not compute and st.residual is not None and st.residual.shape == x.shape:
            self.skipped.append((self.step, self.branch))
            return x + st.residual.to(x.device, non_blocking=True)
        out = self.inner(model, x, e, e0, context, rope)
        res = (out - x).detach()
        st.residual = res.to("cpu") if self.cache_device == "cpu" else res
        return out
