"""Text → video in one process: encode prompts → seeded noise → denoise with CFG → decode."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from engine.config import latent_shape
from engine.request import GenerationRequest
from engine.scheduler import make_scheduler
from engine.teacache import TeaCache, coefficients_for

log = logging.getLogger("wan.pipeline")

TEACACHE_MIN_STEPS = 10  # below this TeaCache has no step to skip worth the risk (few-step distilled sampling)
StepCallback = Callable[[int, int], None]  # (step about to run, total steps); may raise to stop


class Cancelled(Exception):
    """The request was cancelled at a step boundary."""


@dataclass
class GenerationResult:
    """Latents (always), decoded video (when decoded) and the run's measurements."""

    request: GenerationRequest
    latents: Tensor  # (B, 16, F', H/8, W/8) float32, CPU
    video: Tensor | None = None  # (B, 3, F, H, W) in [-1, 1], CPU
    dit_forwards: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_gib: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory of this process (CUDA allocator peak, else max RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pad_contexts(embs: list[Tensor], dtype: torch.dtype) -> Tensor:
    """List of (L_i, D) → (B, max L, D) zero-padded (the DiT pads further to 512)."""
    length = max(e.shape[0] for e in embs)
    out = embs[0].new_zeros(len(embs), length, embs[0].shape[1], dtype=dtype)
    for i, e in enumerate(embs):
        out[i, : e.shape[0]] = e.to(dtype)
    return out


class SequentialCFG:
    """Classifier-free guidance v_u + g·(v_c − v_u) with two forwards in turn (one when g == 1)."""

    def __call__(self, pipe: WanPipeline, x: Tensor, t: Tensor, ctx_c: Tensor, ctx_u: Tensor, guide: float) -> Tensor:
        v_c = pipe.model_forward(x, t, ctx_c, "cond")
        if guide == 1.0:
            return v_c
        v_u = pipe.model_forward(x, t, ctx_u, "uncond")
        return v_u + guide * (v_c - v_u)


class WanPipeline:
    """Holds the three models; `generate(request)` runs one request start to finish."""

    def __init__(
        self,
        dit: torch.nn.Module,
        text_encoder: Any,
        vae: torch.nn.Module,
        device: torch.device | str,
        model_name: str = "custom",
        random_weights: bool = False,
    ) -> None:
        self.dit = dit
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = torch.device(device)
        self.model_name = model_name
        self.random_weights = random_weights
        self.dit_forwards = 0
        self.guidance: Callable[..., Tensor] = SequentialCFG()
        self.model_key = "custom"
        self.offload_t5 = False  # --offload_model: the text encoder leaves the GPU after encoding
        self.teacache_device = "gpu"
        self.teacache_agree: Callable[[str, bool], bool] | None = None  # set by parallel/ (rank agreement)
        self.step = 0
        self.steps = 0  # the running request's step count (0 outside a request); with `step`, what a
        # step-dependent kernel choice reads (8-bit attention's exact first/last steps)
        self.cache: TeaCache | None = None
        self.last_timesteps: list[float] = []  # what the model saw in the last denoise
        self.teacache_off_reason = ""  # why the last request ran without the TeaCache it asked for
        self.image_encoder: Any = None  # image-to-video: the CLIP vision tower (engine/clip.py)
        self.dit_kwargs: dict[str, Tensor] = {}  # per request: the image branch's clip_fea and y
        self._teacache_off_logged = False

    # -- stages ---------------------------------------------------------------------------------------
    def encode_prompts(self, req: GenerationRequest) -> tuple[Tensor, Tensor]:
        """(B, L, text_dim) contexts for the prompt and the negative prompt, on the DiT's device."""
        if self.offload_t5:
            self.text_encoder.to(self.device)
        try:
            embs = self.text_encoder.encode([req.prompt, req.negative_prompt])
        finally:
            if self.offload_t5:
                self.text_encoder.to("cpu")
        ctx = [e.to(self.device) for e in embs]
        b = req.batch_size
        return pad_contexts([ctx[0]] * b, torch.float32), pad_contexts([ctx[1]] * b, torch.float32)

    def initial_noise(self, req: GenerationRequest) -> Tensor:
        """fp32 noise from CPU generators seeded base_seed + i (the same on every machine and rank)."""
        shape = latent_shape(req.width, req.height, req.frame_num, self.dit.cfg.out_dim)  # noise: 16 channels
        noise = [
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(req.base_seed + i), dtype=torch.float32)
            for i in range(req.batch_size)
        ]
        return torch.stack(noise).to(self.device)  # (B, C, F', H/8, W/8)

    def model_forward(self, x: Tensor, t: Tensor, context: Tensor, branch: str) -> Tensor:
        """One logical DiT forward (branch is 'cond' or 'uncond'; the step cache keys its state on it)."""
        self.dit_forwards += 1
        if self.cache is not None:
            self.cache.set_position(self.step, branch)
        return self.dit(x, t, context, **self.dit_kwargs)

    def encode_images(self, req: GenerationRequest) -> None:
        """Image-to-video: the CLIP tokens (B, 257·n, 1280) and the conditioning y (B, 20, F', h, w) of the
        request's image(s), for every DiT forward of this request (both CFG branches, as the official code)."""
        self.dit_kwargs = {}
        if req.image is None:
            return
        import io

        from PIL import Image

        from engine.i2v import I2VSize, i2v_condition
        from engine.images import image_tensor

        if self.image_encoder is None:
            raise RuntimeError("this pipeline has no image encoder: an image-to-video request needs one")
        frames = [image_tensor(Image.open(io.BytesIO(b)).convert("RGB")) for b in (req.image, req.last_frame) if b]
        dev = self.device
        if self.offload_t5:  # --offload_model: the encoders visit the GPU only while encoding
            self.image_encoder.to(dev)
        try:
            clip = torch.cat([self.image_encoder.encode(f[None]) for f in frames], dim=1).to(dev)  # (1, 257·n, 1280)
        finally:
            if self.offload_t5:
                self.image_encoder.to("cpu")
        size = I2VSize(req.height // 8, req.width // 8)
        y = i2v_condition(self.vae, frames[0], req.frame_num, size, frames[1] if len(frames) > 1 else None)
        b = req.batch_size
        self.dit_kwargs = {"clip_fea": clip.float().expand(b, -1, -1), "y": y[None].to(dev).expand(b, -1, -1, -1, -1)}

    def predict_velocity(self, x: Tensor, t: Tensor, ctx_c: Tensor, ctx_u: Tensor, guide: float) -> Tensor:
        """Guided velocity through the current guidance strategy (sequential here, CFG-parallel from parallel/)."""
        return self.guidance(self, x, t, ctx_c, ctx_u, guide)

    def denoise(self, req: GenerationRequest, ctx_c: Tensor, ctx_u: Tensor, on_step: StepCallback | None = None) -> Tensor:
        """Run the sampler from seeded noise to the final latents (B, C, F', H/8, W/8) fp32."""
        sched = make_scheduler(req.sample_solver, req.sample_steps, req.sample_shift, req.sample_timesteps)
        self.last_timesteps = [float(t) for t in sched.timesteps.tolist()]
        self.steps = len(self.last_timesteps)
        x = self.initial_noise(req)
        for i, t in enumerate(sched.timesteps.tolist()):
            self.step = i
            if on_step is not None:
                on_step(i, req.sample_steps)
            tt = torch.full((x.shape[0],), float(t), device=self.device)
            v = self.predict_velocity(x, tt, ctx_c, ctx_u, req.sample_guide_scale)
            x = sched.step(v.float(), i, x)
        if on_step is not None:
            on_step(req.sample_steps, req.sample_steps)
        return x

    def decode(self, latents: Tensor, tiled: bool = False) -> Tensor:
        """Latents → video (B, 3, F, H, W) in [-1, 1] on the CPU, one video at a time."""
        vae_dtype = next(self.vae.parameters()).dtype
        vae_device = next(self.vae.parameters()).device
        out = [self.vae.decode(z[None].to(vae_device, vae_dtype), tile=tiled).float().cpu() for z in latents]
        return torch.cat(out)

    # -- whole request --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, req: GenerationRequest, on_step: StepCallback | None = None, decode: bool = True, tiled: bool = False) -> GenerationResult:
        """Encode, denoise and (optionally) decode one validated request with a concrete seed."""
        if req.base_seed < 0:
            raise ValueError("generate() needs a concrete seed: call request.with_seed() first")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.dit_forwards = 0
        self._setup_cache(req)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        ctx_c, ctx_u = self.encode_prompts(req)
        timings["text_encoder_s"] = self._since(t0)
        if req.image is not None:
            t_img = time.perf_counter()
            self.encode_images(req)
            timings["image_encoder_s"] = self._since(t_img)
        t1 = time.perf_counter()
        latents = self.denoise(req, ctx_c, ctx_u, on_step)
        timings["denoise_s"] = self._since(t1)
        timings["per_step_s"] = timings["denoise_s"] / max(req.sample_steps, 1)
        skipped = sorted(self.cache.skipped) if self.cache is not None else []
        result = GenerationResult(req, latents.float().cpu(), dit_forwards=self.dit_forwards - len(skipped))
        result.info["skipped_steps"] = [list(s) for s in skipped]
        result.info["timesteps"] = list(self.last_timesteps)
        if self.teacache_off_reason:
            result.info["teacache_disabled_reason"] = self.teacache_off_reason
        if self.cache is not None:
            self.cache._state.clear()  # free the cached residuals
        if decode:
            t2 = time.perf_counter()
            result.video = self.decode(latents, tiled=tiled)
            timings["vae_decode_s"] = self._since(t2)
        timings["total_s"] = self._since(t0)
        result.timings = timings
        result.peak_memory_gib = peak_memory_gib(self.device)
        return result

    def reset_request_state(self, failed: bool = False) -> None:
        """Drop everything a request left behind (called after every request, failed or not): the step
        cache's residuals, a block runner's in-flight state, and after a failure the DiT's size caches."""
        if self.cache is not None:
            self.cache._state.clear()
        self.dit_kwargs = {}
        runner = self.dit.block_runner
        while runner is not None:
            reset = getattr(runner, "reset", None)
            if callable(reset):
                reset()
            runner = getattr(runner, "inner", None)
        if failed and hasattr(self.dit, "clear_caches"):
            self.dit.clear_caches()
        self.step = 0
        self.steps = 0

    def _setup_cache(self, req: GenerationRequest) -> None:
        """Install TeaCache around the block runner for this request (or take it out)."""
        runner = self.dit.block_runner
        base = runner.inner if isinstance(runner, TeaCache) else runner
        self.teacache_off_reason = ""
        if req.teacache > 0 and req.sample_steps < TEACACHE_MIN_STEPS:
            self.teacache_off_reason = (f"TeaCache is off below {TEACACHE_MIN_STEPS} steps (this request has "
                                        f"{req.sample_steps})")
            if not self._teacache_off_logged:
                log.info("%s", self.teacache_off_reason)
                self._teacache_off_logged = True
        if req.teacache > 0 and not self.teacache_off_reason:
            coefficients = coefficients_for(self.model_key, req.width * req.height)
            self.cache = TeaCache(base, req.teacache, coefficients, self.teacache_device, self.teacache_agree)
            self.cache.begin(req.sample_steps)
            self.dit.block_runner = self.cache
        else:
            self.cache = None
            self.dit.block_runner = base

    def _since(self, t: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return round(time.perf_counter() - t, 4)
