"""Model configs (1.3B, 14B, the I2V/FLF2V 14B, tiny ones), supported sizes and sampling defaults."""

from __future__ import annotations

from dataclasses import dataclass

HEAD_DIM = 128
TEXT_LEN = 512
FPS = 16
VAE_STRIDE = (4, 8, 8)  # (time, height, width) compression of the VAE
PATCH = (1, 2, 2)  # DiT patch (t, h, w)
CLIP_DIM = 1280  # width of the CLIP ViT-H/14 image tokens the image branch takes
CLIP_TOKENS = 257  # tokens per image (16×16 patches + class token)
MODEL_TYPES = ("t2v", "i2v", "flf2v")  # text-, image-, first-last-frame-to-video
# umt5-xxl encoder (the Wan2.1 text encoder), as transformers' UMT5Config arguments
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# the official configs prepend camera terms per task: I2V "camera shake", FLF2V also "camera cut"
NEGATIVE_PROMPTS = {
    "t2v": DEFAULT_NEGATIVE_PROMPT,
    "i2v": "镜头晃动，" + DEFAULT_NEGATIVE_PROMPT,
    "flf2v": "镜头切换，镜头晃动，" + DEFAULT_NEGATIVE_PROMPT,
}


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Wan2.1 DiT; everything else follows from these numbers."""

    dim: int
    ffn_dim: int
    num_layers: int
    freq_dim: int = 256
    text_dim: int = 4096
    in_dim: int = 16
    out_dim: int = 16
    eps: float = 1e-6
    text_len: int = TEXT_LEN
    # "i2v" / "flf2v": the image branch (img_emb, k_img/v_img/norm_k_img; in_dim 36 = 16 noise + 20 of y)
    model_type: str = "t2v"
    image_dim: int = CLIP_DIM

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}")

    @property
    def has_image_branch(self) -> bool:
        return self.model_type != "t2v"

    @property
    def image_tokens(self) -> int:
        """CLIP tokens the model takes per video: 0 (T2V), 257 (I2V), 2·257 (FLF2V: first and last frame)."""
        return {"t2v": 0, "i2v": CLIP_TOKENS, "flf2v": 2 * CLIP_TOKENS}[self.model_type]

    @property
    def num_heads(self) -> int:
        return self.dim // HEAD_DIM

    @property
    def head_dim(self) -> int:
        return HEAD_DIM

    @property
    def name(self) -> str:
        """The named size this shape corresponds to, or 'custom'."""
        for name, cfg in DIT_CONFIGS.items():
            if (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.model_type) == (
                self.dim, self.ffn_dim, self.num_layers, self.model_type
            ):
                return name
        return "custom"


DIT_CONFIGS: dict[str, DiTConfig] = {
    "1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_layers=30),
    "14B": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40),
    # The embedded demo model: dim 512 → 4 heads of 128, so Ulysses 4 is testable.
    "tiny": DiTConfig(dim=512, ffn_dim=1024, num_layers=3, text_dim=64),
    # Image-to-video (I2V-14B-480P and -720P share these shapes) and first-last-frame-to-video.
    "i2v-14B": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, model_type="i2v"),
    "flf2v-14B": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, model_type="flf2v"),
    # tiny image models (tests, embedded random-weight demo): the tiny T2V shapes plus the image branch
    # (image_dim 64: the tiny CLIP encoder's width, engine/clip.py TINY_IMAGE_CLIP)
    "tiny-i2v": DiTConfig(dim=512, ffn_dim=1024, num_layers=3, text_dim=64, in_dim=36, model_type="i2v", image_dim=64),
    "tiny-flf2v": DiTConfig(dim=512, ffn_dim=1024, num_layers=3, text_dim=64, in_dim=36, model_type="flf2v",
                            image_dim=64),
}

# Sizes (W*H) each real model was trained for; the tiny model accepts any multiple of 16.
SUPPORTED_SIZES: dict[str, tuple[str, ...]] = {
    "1.3B": ("832*480", "480*832"),
    "14B": ("1280*720", "720*1280", "832*480", "480*832"),
    "i2v-14B": ("1280*720", "720*1280", "832*480", "480*832"),
    "flf2v-14B": ("1280*720", "720*1280", "832*480", "480*832"),
}
TINY_SIZES = ("256*256", "208*144", "320*192", "192*320")

# Sampling defaults per model (official generate.py for the real ones).
SAMPLE_DEFAULTS: dict[str, dict[str, float]] = {
    "1.3B": {"sample_shift": 8.0, "sample_guide_scale": 6.0, "frame_num": 81, "sample_steps": 50},
    "14B": {"sample_shift": 5.0, "sample_guide_scale": 5.0, "frame_num": 81, "sample_steps": 50},
    # the random-weight demo model: short clips and few steps, so a CPU answers in seconds
    "tiny": {"sample_shift": 5.0, "sample_guide_scale": 5.0, "frame_num": 17, "sample_steps": 10},
    # I2V: 40 steps, shift 5.0 (3.0 at 832*480 / 480*832, chosen with the size); FLF2V: 50 steps, shift 16
    "i2v-14B": {"sample_shift": 5.0, "sample_guide_scale": 5.0, "frame_num": 81, "sample_steps": 40},
    "flf2v-14B": {"sample_shift": 16.0, "sample_guide_scale": 5.0, "frame_num": 81, "sample_steps": 50},
    "tiny-i2v": {"sample_shift": 5.0, "sample_guide_scale": 5.0, "frame_num": 17, "sample_steps": 10},
    "tiny-flf2v": {"sample_shift": 5.0, "sample_guide_scale": 5.0, "frame_num": 17, "sample_steps": 10},
    "custom": {"sample_shift": 5.0, "sample_guide_scale": 5.0, "frame_num": 81, "sample_steps": 50},
}


def latent_shape(width: int, height: int, frames: int, z_dim: int = 16) -> tuple[int, int, int, int]:
    """(C, F', H/8, W/8) of the latent for a video of this size."""
    return (z_dim, (frames - 1) // VAE_STRIDE[0] + 1, height // VAE_STRIDE[1], width // VAE_STRIDE[2])


def token_count(width: int, height: int, frames: int) -> int:
    """Sequence length of the DiT for a video of this size."""
    _, f, h, w = latent_shape(width, height, frames)
    return f * (h // PATCH[1]) * (w // PATCH[2])
