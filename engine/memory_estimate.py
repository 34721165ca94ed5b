"""Peak GPU memory of one request on one rank, from shapes and settings alone (for admission control).

Pure arithmetic: no torch, no process groups. A request runs in phases and the allocator's peak is the
fullest phase: `encode` (T5), `embed` (the whole token sequence, before the sequence split), `blocks` (one
DiT block forward at this rank's token count) and `decode` (the VAE). Weights are counted exactly from the
architecture (and the block-swap / offload plan of parallel/offload.py); activations and the VAE workspace
are physical counts (tensor copies of a known shape) scaled by the coefficients of `Calibration`, whose
defaults were fitted to, or counted from, the sources named on each field. `fit_calibration` refits them
to measured peaks; `what_fits` turns an estimate into advice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

from engine.config import PATCH, TEXT_LEN, UMT5_XXL, VAE_STRIDE, DiTConfig

GIB = 2**30
WAN_VAE_PARAMS = 126_892_531  # engine.vae.WanVAE(dim=96): encoder + decoder (both are loaded)
VAE_HALO = 13  # engine.vae.tail_halo(): the decoder tail's receptive radius, latent pixels
VAE_TILE = 64  # engine.vae.DEFAULT_TILE core, latent pixels
CLIP_WIDTH = 1280  # engine.clip.CLIP_H14 (ViT-H/14)
ROPE_BYTES_PER_TOKEN = 2 * 128 * 4  # (L, 2, head_dim) float32 table
MAX_FRAMES = 241  # engine.request.MAX_FRAMES


@dataclass(frozen=True)
class Calibration:
    """The coefficients of the estimate. H100 80GB, torch 2.11, bf16, measured with max_memory_allocated."""

    # DiT block forward, per token of this rank. ACT_COPIES, FFN_COPIES and FIXED_BYTES were fitted
    # (fit_calibration) to the one-forward peaks of benchmarks/results/dit_h100.json: 14B and 1.3B at
    # 832*480*81 and 1280*720*81 (30.46, 35.42, 4.22, 6.22 GiB), all four within 0.01 %; that is
    # 17.7 bytes per (token · dim) and 2.2 per (token · ffn_dim) in bf16.
    RESIDUAL_FP32_COPIES: float = 4.0  # counted (engine/dit.py): forward's tokens, block input, running x, output
    ACT_COPIES_PER_TOKEN_DIM: float = 0.861  # compute-dtype (tokens × dim) tensors live at the peak (q/k/v/out, norms)
    FFN_COPIES_PER_TOKEN: float = 1.107  # compute-dtype (tokens × ffn_dim) tensors (the FFN intermediate)
    FIXED_BYTES: float = 3.43e7  # intercept: time embeddings, text embedding, cuBLAS workspace
    # Sequence parallel, in compute-dtype (local tokens × dim) copies. Counted from parallel/usp.py, NOT
    # measured yet (no multi-GPU run so far): Ulysses keeps the gathered q, k, v plus one send/recv pair
    # of the all-to-all; Ring holds k/v stacked, the incoming block, and the fp32 output/merge buffers.
    ULYSSES_COPIES: float = 5.0
    RING_COPIES: float = 10.0
    # FSDP2 (parallel/fsdp.py): the running block, the prefetched next one and one all-gather output;
    # counted, not measured. Applies to the DiT and the T5 encoder.
    FSDP_UNSHARDED_BLOCKS: float = 3.0
    # The sampler's fp32 latent copies (x, noise, model output and its gather, UniPC history): counted.
    LATENT_FP32_COPIES: float = 8.0
    # T5 encode of the two prompts: (tokens × (d_model + d_ff)) compute-dtype copies; counted, small.
    T5_ACT_COPIES: float = 4.0
    # VAE decode workspace per output pixel of one frame (it decodes 4 frames at a time, so it does not
    # grow with the frame count), bf16. Fitted to benchmarks/results/pipeline_h100.json vae_720p: 1280*720*81
    # with the 14B DiT resident, untiled 37.52 GiB (921,600 px) and tiled 30.74 GiB (its widest tile with
    # halo: 464×632 px). The two per-pixel figures agree within 3 %: tiling only shrinks the pixel count.
    VAE_BYTES_PER_PIXEL_UNTILED: float = 11_511.0
    VAE_BYTES_PER_PIXEL_TILED: float = 11_209.0
    # Outside the allocator's count (not in max_memory_allocated): ASSUMED typical values, not measured
    # here; set them from nvidia-smi (used) minus max_memory_allocated on the target machine.
    CUDA_CONTEXT_BYTES: float = 0.6 * GIB
    NCCL_BYTES: float = 0.5 * GIB  # communicators and their buffers, when world_size > 1
    ALLOCATOR_SLACK: float = 0.05  # caching-allocator fragmentation, share of the allocated peak


DEFAULT = Calibration()
DEFAULT_FIT = ("ACT_COPIES_PER_TOKEN_DIM", "FFN_COPIES_PER_TOKEN", "FIXED_BYTES", "VAE_BYTES_PER_PIXEL_UNTILED",
               "VAE_BYTES_PER_PIXEL_TILED")


@dataclass(frozen=True)
class Request:
    """What is generated: size, frames, videos per request, and whether CFG runs (guide scale != 1)."""

    width: int
    height: int
    frame_num: int = 81
    batch_size: int = 1
    cfg: bool = True


@dataclass(frozen=True)
class Layout:
    """cfg × ring × ulysses of the request (parallel.layout.ParallelLayout has the same fields)."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses


@dataclass(frozen=True)
class MemoryMode:
    """Where the weights live and who decodes, as the server runs (RunConfig's memory settings)."""

    world_size: int = 1
    dit_fsdp: bool = False
    blocks_to_swap: int = 0
    offload_percent: float = 0.0
    t5: str = "gpu"  # "gpu", "cpu" or "fsdp"
    offload_model: bool = False  # T5 leaves the GPU after encoding, the DiT before decoding (not under FSDP)
    dtype_bytes: int = 2
    fp8: bool = False  # --quantize fp8: block Linears 1 byte per parameter (the first and last blocks stay 16-bit)
    vae_decode: bool = True  # this rank holds the VAE and decodes
    vae_tiling: bool = False
    vae_parts: int = 1  # patch-parallel decode over this many ranks (the server: every rank, untiled rows)


@dataclass(frozen=True)
class EstimateInputs:
    """Everything the estimate depends on."""

    model: DiTConfig
    request: Request
    layout: Layout = Layout()
    mode: MemoryMode = MemoryMode()
    t5: dict = field(default_factory=lambda: dict(UMT5_XXL))
    vae_params: int = WAN_VAE_PARAMS
    vae_dim: int = 96


def inputs_from_dict(d: dict) -> EstimateInputs:
    """EstimateInputs from dataclasses.asdict(...) (e.g. the `memory-estimate` lines of bench_multigpu's log)."""
    return EstimateInputs(DiTConfig(**d["model"]), Request(**d["request"]), Layout(**d["layout"]), MemoryMode(**d["mode"]),
                          dict(d["t5"]), d["vae_params"], d["vae_dim"])


@dataclass
class Estimate:
    """Bytes on one rank. `parts` are each counted in the phase where they are largest; `phases` are the
    allocator totals per phase, `allocated` their maximum (comparable to torch.cuda.max_memory_allocated)
    and `total` adds what the allocator does not count (CUDA context, NCCL, fragmentation)."""

    parts: dict[str, int]
    phases: dict[str, int]
    peak_phase: str
    allocated: int
    overhead: int

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    @property
    def resident(self) -> int:
        """Bytes held between requests (weights): already outside the free memory of a loaded server."""
        return (self.parts["resident_weights"] + self.parts["text_encoder_resident"] + self.parts["vae_weights"]
                + self.parts.get("image_encoder", 0))


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------
def block_linears(cfg: DiTConfig) -> list[int]:
    """Parameter counts of a DiT block's Linear layers: q, k, v, o of both attentions, the FFN's two (and the
    image branch's k_img, v_img)."""
    d, f = cfg.dim, cfg.ffn_dim
    return [d * d + d] * (10 if cfg.has_image_branch else 8) + [d * f + f, f * d + d]


def block_params(cfg: DiTConfig) -> int:
    """Parameters of one DiT block (Linears + qk-norms, norm3 and the modulation: 12·dim; norm_k_img: dim)."""
    return sum(block_linears(cfg)) + (13 if cfg.has_image_branch else 12) * cfg.dim


def other_params(cfg: DiTConfig) -> int:
    """Parameters outside the blocks: patch, text and time embeddings, time projection, head (and img_emb)."""
    d, p = cfg.dim, math.prod(PATCH)
    n = (cfg.in_dim * p * d + d) + (cfg.text_dim * d + d + d * d + d) + (cfg.freq_dim * d + d + d * d + d) \
        + (6 * d * d + 6 * d) + (d * cfg.out_dim * p + cfg.out_dim * p + 2 * d)
    if cfg.has_image_branch:  # img_emb: LayerNorm, Linear(c, c), GELU, Linear(c, dim), LayerNorm (+ FLF2V emb_pos)
        c = cfg.image_dim
        n += 2 * c + (c * c + c) + (c * d + d) + 2 * d + (cfg.image_tokens * c if cfg.model_type == "flf2v" else 0)
    return n


def image_encoder_params(cfg: DiTConfig) -> int:
    """Parameters of the CLIP ViT-H/14 tower the image branch uses (31 of 32 blocks; 0 for text-to-video)."""
    if not cfg.has_image_branch:
        return 0
    w, mlp, blocks = CLIP_WIDTH, 4 * CLIP_WIDTH, 31
    per_block = 4 * (w * w + w) + (w * mlp + mlp) + (mlp * w + w) + 4 * w
    return blocks * per_block + 3 * 14 * 14 * w + (257 + 1) * w + 2 * w


def offloaded_params(cfg: DiTConfig, blocks_to_swap: int, offload_percent: float) -> list[int]:
    """Host-resident parameters per streamed unit, as parallel.offload.plan_offload chooses them."""
    n, per_block = cfg.num_layers, block_params(cfg)
    swap = min(max(0, blocks_to_swap), n)
    units = [per_block] * swap
    if offload_percent > 0:
        target = offload_percent * per_block
        for _ in range(n - swap):
            acc = 0
            for b in sorted(block_linears(cfg), reverse=True):
                if abs(acc + b - target) <= abs(acc - target) or offload_percent >= 1.0:
                    acc += b
            if acc:
                units.append(acc)
    return units


def t5_params(t5: dict) -> tuple[int, int, int]:
    """(total, per block, outside the blocks) parameters of a umt5 encoder."""
    d, inner, ff, heads = t5["d_model"], t5["d_kv"] * t5["num_heads"], t5["d_ff"], t5["num_heads"]
    block = 4 * d * inner + 32 * heads + 2 * d + 2 * d * ff + ff * d  # attention, rel. bias, norms, gated FFN
    other = t5["vocab_size"] * d + d
    return t5["num_layers"] * block + other, block, other


# ----------------------------------------------------------------------------------------------------
# the estimate
# ----------------------------------------------------------------------------------------------------
def token_counts(inp: EstimateInputs) -> tuple[int, int]:
    """(whole sequence, this rank's padded share) of DiT tokens."""
    r = inp.request
    f = (r.frame_num - 1) // VAE_STRIDE[0] + 1
    tokens = f * (r.height // VAE_STRIDE[1] // PATCH[1]) * (r.width // VAE_STRIDE[2] // PATCH[2])
    return tokens, -(-tokens // inp.layout.sp)


def _vae_pixels(inp: EstimateInputs) -> int:
    """Output pixels of one frame that one decode pass holds at once (the frame, a tile or a row slice)."""
    h, w = inp.request.height // VAE_STRIDE[1], inp.request.width // VAE_STRIDE[2]
    m = inp.mode
    if m.vae_parts > 1:  # patch-parallel rows (parallel/vae_parallel.py), untiled, halo on both sides
        rows = min(h, -(-h // m.vae_parts) + 2 * VAE_HALO)
        return rows * w * VAE_STRIDE[1] * VAE_STRIDE[2]
    if m.vae_tiling:
        def span(n: int) -> int:  # the widest tile (split_spans) widened by the halo, clipped to the frame
            k = max(1, math.ceil(n / VAE_TILE))
            return min(n, -(-n // k) + (2 * VAE_HALO if k > 2 else VAE_HALO if k == 2 else 0))
        return span(h) * span(w) * VAE_STRIDE[1] * VAE_STRIDE[2]
    return h * w * VAE_STRIDE[1] * VAE_STRIDE[2]


def estimate(inp: EstimateInputs, cal: Calibration = DEFAULT) -> Estimate:
    """Peak GPU bytes of one request on the rank described by `inp` (parts, phases, allocator peak)."""
    cfg, r, lay, m = inp.model, inp.request, inp.layout, inp.mode
    dt, d, b = m.dtype_bytes, cfg.dim, r.batch_size
    tokens, local = token_counts(inp)
    fsdp_world = m.world_size if m.dit_fsdp and m.world_size > 1 else 1
    # DiT weights
    units = offloaded_params(cfg, m.blocks_to_swap, m.offload_percent)
    dit_total = block_params(cfg) * cfg.num_layers + other_params(cfg)
    resident = (dit_total - sum(units)) * dt / fsdp_world
    if m.fp8:  # fp8 blocks (parallel/quantize.py, default rule 1,1): 1 byte per block parameter, 16-bit elsewhere
        kept = min(2, cfg.num_layers)
        resident -= (cfg.num_layers - kept) * block_params(cfg) * (dt - 1) * (1 - sum(units) / max(dit_total, 1))
    if fsdp_world > 1:  # unsharded while running: the root's own parameters and the gathered blocks
        streamed = (other_params(cfg) + cal.FSDP_UNSHARDED_BLOCKS * block_params(cfg)) * dt
        root_unsharded = other_params(cfg) * dt
    elif m.dit_fsdp and units:  # FSDP2's CPU offload on one rank: the copied-in shard, gathered and prefetched
        streamed = cal.FSDP_UNSHARDED_BLOCKS * max(units) * dt  # (GPU lane, H200: measured, within 5 %)
        root_unsharded = 0.0
    else:
        streamed = sum(sorted(units, reverse=True)[:2]) * dt  # at most two units on the GPU
        root_unsharded = 0.0
    # T5
    t5_all, t5_block, t5_other = t5_params(inp.t5)
    t5_act = cal.T5_ACT_COPIES * 2 * TEXT_LEN * (inp.t5["d_model"] + inp.t5["d_ff"]) * dt
    t5_resident, t5_encode = 0.0, 0.0
    if m.t5 == "fsdp" and m.world_size > 1:
        t5_resident = t5_all * dt / m.world_size
        t5_encode = (t5_other + cal.FSDP_UNSHARDED_BLOCKS * t5_block) * dt + t5_act
    elif m.t5 != "cpu":
        t5_resident = 0.0 if m.offload_model else t5_all * dt
        t5_encode = (t5_all * dt if m.offload_model else 0.0) + t5_act
    # activations
    act = b * local * (d * (cal.RESIDUAL_FP32_COPIES * 4 + cal.ACT_COPIES_PER_TOKEN_DIM * dt)
                       + cfg.ffn_dim * cal.FFN_COPIES_PER_TOKEN * dt)
    sp_buf = b * local * d * dt * ((cal.ULYSSES_COPIES if lay.ulysses > 1 else 0) + (cal.RING_COPIES if lay.ring > 1 else 0))
    if lay.sp > 1:
        sp_buf += local * ROPE_BYTES_PER_TOKEN
    padded = local * lay.sp != tokens
    embed = b * tokens * d * (dt + 4 + (4 if padded else 0))  # patch-conv output, fp32 copy (and its pad)
    latent = b * cfg.in_dim * ((r.frame_num - 1) // VAE_STRIDE[0] + 1) * (r.height // 8) * (r.width // 8) * 4
    latents = cal.LATENT_FP32_COPIES * latent
    cfg_bytes = (2 * latent if r.cfg else 0) + (2 * latent if lay.cfg > 1 else 0)
    fixed = cal.FIXED_BYTES + tokens * ROPE_BYTES_PER_TOKEN + 2 * b * TEXT_LEN * cfg.text_dim * 4
    # VAE
    vae_w = inp.vae_params * dt if m.vae_decode else 0.0
    vae_work = 0.0
    if m.vae_decode:
        f_lat, h, w = (r.frame_num - 1) // VAE_STRIDE[0] + 1, r.height // 8, r.width // 8
        coef = cal.VAE_BYTES_PER_PIXEL_TILED if m.vae_tiling and m.vae_parts == 1 else cal.VAE_BYTES_PER_PIXEL_UNTILED
        rows = r.height / m.vae_parts if m.vae_parts > 1 else r.height
        video = 3 * r.frame_num * rows * r.width * dt
        feats = 4 * inp.vae_dim * f_lat * h * w * dt + 2 * 16 * f_lat * h * w * dt
        vae_work = coef * dt / 2 * _vae_pixels(inp) + video + feats + latent / b
    # image-to-video: the CLIP tower next to the text encoder (fp16), and the VAE encoding the conditioning video
    clip_w = image_encoder_params(cfg) * 2 if m.t5 != "cpu" else 0.0
    base = resident + t5_resident + vae_w + fixed + clip_w
    phases = {
        "encode": base + t5_encode,
        "embed": base + root_unsharded + embed + latents + cfg_bytes,
        "blocks": base + streamed + act + sp_buf + latents + cfg_bytes,
    }
    if m.vae_decode:
        dit_gone = resident if m.offload_model and fsdp_world == 1 else 0.0
        phases["decode"] = base - dit_gone + vae_work
    if cfg.has_image_branch:  # every rank VAE-encodes [image, zeros…]: assumed to hold what an untiled decode does
        phases["image_encode"] = base + (vae_w if not m.vae_decode else 0.0) + vae_work + latents
    peak_phase = max(phases, key=phases.get)
    allocated = phases[peak_phase]
    overhead = cal.CUDA_CONTEXT_BYTES + (cal.NCCL_BYTES if m.world_size > 1 else 0) + cal.ALLOCATOR_SLACK * allocated
    parts = {"resident_weights": resident, "streamed_buffers": streamed, "activations": act, "embedding": embed,
             "sequence_parallel_buffers": sp_buf, "latents": latents, "cfg": cfg_bytes,
             "text_encoder_resident": t5_resident, "text_encoder_encode": t5_encode, "vae_weights": vae_w,
             "vae_decode": vae_work, "fixed": fixed, "image_encoder": clip_w, "overhead": overhead}
    return Estimate({k: int(v) for k, v in parts.items()}, {k: int(v) for k, v in phases.items()}, peak_phase,
                    int(allocated), int(overhead))


# ----------------------------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------------------------
def fit_calibration(measurements: Sequence[tuple], names: Sequence[str] = DEFAULT_FIT,
                    start: Calibration = DEFAULT) -> tuple[Calibration, list[float]]:
    """Least-squares (relative) fit of the named coefficients to measured allocator peaks.

    measurements: (EstimateInputs, measured max_memory_allocated bytes[, phase]) — a phase ("decode", …)
    pins what was measured (e.g. a VAE decode alone); otherwise the estimate's peak phase is used, re-chosen
    until it settles. Returns the calibration and (estimate − measured) / measured per measurement.
    Coefficients that no measurement depends on keep their value."""
    import numpy as np

    known = {f.name for f in fields(Calibration)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown coefficients {unknown}; known: {sorted(known)}")
    cal = start
    zero = replace(cal, **{n: 0.0 for n in names})
    pinned = [mm[2] if len(mm) > 2 else None for mm in measurements]

    def phases(c: Calibration) -> list[str]:
        return [p or estimate(mm[0], c).peak_phase for mm, p in zip(measurements, pinned)]

    for _ in range(20):
        phase = phases(cal)

        def at(c: Calibration, i: int, phase: list[str] = phase) -> float:
            return estimate(measurements[i][0], c).phases[phase[i]]

        const = np.array([at(zero, i) for i in range(len(measurements))])
        cols = np.array([[at(replace(zero, **{n: 1.0}), i) for n in names] for i in range(len(measurements))]) - const[:, None]
        used = [j for j in range(len(names)) if np.any(np.abs(cols[:, j]) > 0)]
        meas = np.array([float(mm[1]) for mm in measurements])
        w = 1.0 / meas
        sol, *_ = np.linalg.lstsq(cols[:, used] * w[:, None], (meas - const) * w, rcond=None)
        cal = replace(cal, **{names[j]: float(v) for j, v in zip(used, sol)})
        if phases(cal) == phase:  # the same phases give the same linear problem: done
            break
    phase = phases(cal)
    errors = [(estimate(mm[0], cal).phases[p] - mm[1]) / mm[1] for mm, p in zip(measurements, phase)]
    return cal, errors


# ----------------------------------------------------------------------------------------------------
# advice
# ----------------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """The answer of `what_fits`: whether the request fits, and what would."""

    fits: bool
    need_bytes: int
    free_bytes: int
    rank: int
    max_frames: int | None  # largest 4n+1 frame count that fits at this size and batch (None: not even 1)
    max_batch: int | None  # largest batch that fits at the requested frames (None: not even 1)
    swap: dict | None  # {"blocks_to_swap", "offload_percent", "saves_bytes", "fits"} or None when maxed out
    sentence: str


def _need(inp: EstimateInputs, cal: Calibration, loaded: bool, resident: int | None = None) -> int:
    """Bytes needed: in all, or (loaded) beyond the weights loaded now (`resident`: those of the running
    mode, when the estimate is of another mode whose weights would replace them)."""
    e = estimate(inp, cal)
    if not loaded:
        return e.total
    return e.total - (e.resident if resident is None else resident) - int(cal.CUDA_CONTEXT_BYTES)


def _with(inp: EstimateInputs, **request) -> EstimateInputs:
    return replace(inp, request=replace(inp.request, **request))


def what_fits(inp: EstimateInputs, free_bytes: int, rank: int = 0, cal: Calibration = DEFAULT,
              loaded: bool = False) -> Fit:
    """Compare the estimate with a rank's free bytes; suggest the most frames / batch and the block swap that
    fit. loaded=True: free_bytes were measured with the model already loaded (its weights are not needed)."""
    r, m, layers = inp.request, inp.mode, inp.model.num_layers
    need = _need(inp, cal, loaded)
    fits = need <= free_bytes
    frames = [f for f in range(1, MAX_FRAMES + 1, 4) if _need(_with(inp, frame_num=f), cal, loaded) <= free_bytes]
    batches = [k for k in range(1, r.batch_size + 1) if _need(_with(inp, batch_size=k), cal, loaded) <= free_bytes]
    max_frames, max_batch = (frames[-1] if frames else None), (batches[-1] if batches else None)
    swap = None
    tries = [(k, m.offload_percent) for k in range(m.blocks_to_swap + 1, layers + 1)]
    if m.offload_percent < 1.0:
        tries.append((layers, 1.0))
    for k, p in tries:
        n = _need(replace(inp, mode=replace(m, blocks_to_swap=k, offload_percent=p)), cal, loaded,
                  estimate(inp, cal).resident if loaded else None)
        if n <= free_bytes or (k, p) == tries[-1]:
            swap = {"blocks_to_swap": k, "offload_percent": p, "saves_bytes": need - n, "fits": n <= free_bytes}
            break
    size = f"{r.width}*{r.height}, {r.frame_num} frames, batch {r.batch_size}"
    what = "beyond the loaded weights" if loaded else "on the fullest GPU"
    head = f"{size} needs about {need / GIB:.1f} GiB {what}"
    if fits:
        return Fit(True, need, free_bytes, rank, max_frames, max_batch, swap,
                   f"{head} and rank {rank} has {free_bytes / GIB:.1f} GiB free: it fits")
    text = f"{head} but rank {rank} has {free_bytes / GIB:.1f} GiB free: "
    text += (f"at most {max_frames} frames fit at this size and batch" if max_frames
             else "not even 1 frame fits at this size and batch")
    if r.batch_size > 1 and max_batch:
        text += f" (or batch {max_batch} at {r.frame_num} frames)"
    if swap is None:
        text += "; block swap and offload are already at their maximum"
    else:
        more_offload = swap["offload_percent"] != m.offload_percent
        flag = f"--blocks_to_swap {swap['blocks_to_swap']}" + (
            f" --offload_percent {swap['offload_percent']}" if more_offload else "")
        verdict = "and make it fit" if swap["fits"] else "(not enough)"
        text += (f"; more block swap{' and offload' if more_offload else ''} ({flag}) would save "
                 f"{swap['saves_bytes'] / GIB:.1f} GiB {verdict}")
    return Fit(False, need, free_bytes, rank, max_frames, max_batch, swap, text)
