"""Find the user's model files: the seed's `models/` layout, an official `--ckpt_dir`, or diffusers folders."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint import WEIGHT_SUFFIXES, ModelNotFoundError

log = logging.getLogger("wan.models")

OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_TOKENIZER = "google/umt5-xxl"
OFFICIAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


@dataclass
class ModelFiles:
    """Where each part of the model comes from."""

    dit: Path
    t5: Path
    vae: Path
    tokenizer: Path | None = None
    image_encoder: Path | None = None  # image-to-video models: the CLIP vision tower (None: not found)
    random_weights: bool = False
    embedded: bool = False  # the embedded tiny model (no weights were found)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "tiny-random" if self.random_weights else self.dit.stem


def _candidates(folder: Path) -> list[Path]:
    """Weight files and checkpoint sub-folders directly inside folder."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES or p.is_dir() and any(q.suffix in WEIGHT_SUFFIXES for q in p.iterdir()):
            out.append(p)
    return out


def _pick(kind: str, flag: str, folder: Path, choice: str | None, prefer: tuple[str, ...], searched: list[str]) -> Path | None:
    """Resolve --dit/--t5/--vae NAME (a path, or a file name in folder); else the only/preferred file there."""
    if choice:
        for p in (Path(choice), folder / choice, *(folder / f"{choice}{s}" for s in WEIGHT_SUFFIXES)):
            if p.exists():
                return p
        have = ", ".join(p.name for p in _candidates(folder)) or "nothing"
        raise ModelNotFoundError(f"{flag} {choice}: no such file, and {folder} has no file of that name (it has: {have})")
    searched.append(f"{folder}/*{{{','.join(WEIGHT_SUFFIXES)}}}")
    files = _candidates(folder)
    if len(files) <= 1:
        return files[0] if files else None
    ranked = sorted(files, key=lambda p: (not any(s in p.name.lower() for s in prefer), p.name))
    log.info(
        "several %s files in %s: %s; using %s (pick another with %s NAME)",
        kind, folder, ", ".join(p.name for p in files), ranked[0].name, flag,
    )
    return ranked[0]


def _diffusers_folder(root: Path) -> ModelFiles:
    tok, clip = root / "tokenizer", root / "image_encoder"
    return ModelFiles(root / "transformer", root / "text_encoder", root / "vae", tok if tok.exists() else None,
                      clip if clip.is_dir() else None)


def _official_folder(root: Path, tokenizer: str | None) -> ModelFiles:
    missing = [str(root / n) for n in (OFFICIAL_T5, OFFICIAL_VAE) if not (root / n).exists()]
    if not any(root.glob("diffusion_pytorch_model*.safetensors")):
        missing.insert(0, str(root / "diffusion_pytorch_model*.safetensors"))
    if missing:
        raise ModelNotFoundError(f"--ckpt_dir {root} is not an official Wan2.1 checkpoint folder; missing: {', '.join(missing)}")
    tok = Path(tokenizer) if tokenizer else root / OFFICIAL_TOKENIZER
    clip = root / OFFICIAL_CLIP
    return ModelFiles(root, root / OFFICIAL_T5, root / OFFICIAL_VAE, tok if tok.exists() else None,
                      clip if clip.is_file() else None)


def find_model_files(
    model_dir: str | Path = "models",
    ckpt_dir: str | Path | None = None,
    dit: str | None = None,
    t5: str | None = None,
    vae: str | None = None,
    tokenizer: str | None = None,
    task: str | None = None,
    clip: str | None = None,
) -> ModelFiles | None:
    """The model files to use, or None when nothing was asked for and nothing is there (→ the tiny model).

    Raises ModelNotFoundError naming every place searched when some parts are found but not others,
    or when an explicitly named file is missing.
    """
    if ckpt_dir:
        root = Path(ckpt_dir)
        if not root.is_dir():
            raise ModelNotFoundError(f"--ckpt_dir {root}: no such folder")
        files = _diffusers_folder(root) if (root / "transformer").is_dir() else _official_folder(root, tokenizer)
        files.tokenizer = Path(tokenizer) if tokenizer else files.tokenizer
        if clip or files.image_encoder is None:  # the checkpoint's own encoder unless --clip names another
            files.image_encoder = _pick_clip(Path(model_dir), clip) or files.image_encoder
        return files
    root = Path(model_dir)
    if (root / "transformer").is_dir() and not dit:
        files = _diffusers_folder(root)
        if clip or files.image_encoder is None:
            files.image_encoder = _pick_clip(root, clip) or files.image_encoder
        return files
    prefer = ("14b",) if task and "14B" in task else ("1.3b", "1_3b") if task and "1.3B" in task else ("14b",)
    searched: list[str] = []
    dit_p = _pick("DiT", "--dit", root / "diffusion_models", dit, prefer, searched)
    t5_p = _pick("text encoder", "--t5", root / "text_encoders", t5, ("umt5",), searched)
    vae_p = _pick("VAE", "--vae", root / "vae", vae, ("wan",), searched)
    if dit_p is None and t5_p is None and vae_p is None and not (dit or t5 or vae):
        return None
    missing = [n for n, p in (("DiT", dit_p), ("text encoder", t5_p), ("VAE", vae_p)) if p is None]
    if missing:
        raise ModelNotFoundError(
            f"missing model files: {', '.join(missing)}. Searched: {'; '.join(searched)}. "
            "Expected the layout models/diffusion_models/*.safetensors, models/text_encoders/umt5_xxl_*.safetensors, "
            "models/vae/*.safetensors (or pass --ckpt_dir with an official or diffusers checkpoint folder)."
        )
    return ModelFiles(dit_p, t5_p, vae_p, Path(tokenizer) if tokenizer else None, _pick_clip(root, clip))


def _pick_clip(model_dir: Path, clip: str | None) -> Path | None:
    """--clip NAME (a path or a file in model_dir/clip_vision), else the one there (clip_vision_h preferred)."""
    return _pick("CLIP image encoder", "--clip", model_dir / "clip_vision", clip, ("clip_vision_h", "vit-h", "vit_h"), [])


def image_encoder_missing(files: ModelFiles, model_dir: str | Path) -> ModelNotFoundError:
    """The error for an image-to-video DiT without its CLIP image encoder, naming every place searched."""
    return ModelNotFoundError(
        f"{files.dit} is an image-to-video model, which needs the CLIP image encoder (open-clip "
        f"xlm-roberta-large-vit-huge-14), and none was found. Searched: {Path(model_dir) / 'clip_vision'}/*"
        f"{{{','.join(WEIGHT_SUFFIXES)}}}, {OFFICIAL_CLIP} in --ckpt_dir, image_encoder/ of a diffusers folder. "
        "Put ComfyUI's clip_vision_h.safetensors in models/clip_vision/ (or pass --clip FILE).")
