"""LoRA files for the Wan2.1 DiT: format recognition, key mapping to official names, reading, validation.

Formats are told apart by their keys; each key is reduced to (official module name, part):
  * official / ComfyUI: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `lora_up.weight` / `.alpha`,
    also `lora_A` / `lora_B`, with or without `diffusion_model.` (or `model.diffusion_model.`);
  * kohya / musubi / LyCORIS LoCon: `lora_unet_blocks_0_self_attn_q.lora_down.weight` (VideoX-Fun `lora_unet__`);
  * diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight` with diffusers' module names (its Wan converter:
    attn1/attn2, to_out.0, add_k_proj/add_v_proj, ffn.net.0.proj/ffn.net.2, condition_embedder.*, proj_out);
    alpha from a `.alpha` key, else from the `lora_adapter_metadata` diffusers writes, else the rank;
  * PEFT prefixes `base_model.model.` and the `.default` adapter name; DiffSynth's `pipe.dit.`;
  * full differences: `.diff` (weights, norms, modulation) and `.diff_b` (biases), added as strength × delta.
Module names are compared with dots and underscores folded together, so `ffn_0` and `ffn.0` are one layer.
Scale of a low-rank pair: alpha / rank (1 without alpha; the strength multiplies it at merge time).
Layers of the image branch (`k_img`, `v_img`, `norm_k_img`, `img_emb`) are recognised so that an I2V LoRA
on a T2V model reports how many of its keys it skips instead of failing or dropping them silently.
Files are treated as hostile: size and tensor-count limits, shapes checked before any data is read,
floating point only, NaN/inf refused; `.pth`/`.ckpt` only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from engine.checkpoint import LazyStateDict, ModelFileError, ModelNotFoundError, WrongModelError
from engine.request import RequestError

LORA_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
MAX_LORA_BYTES = 8 * 2**30  # a rank-256 LoRA of every 14B Linear is ~3 GB in bf16
MAX_LORA_TENSORS = 20_000  # the 14B model has 1,095 tensors: 4 per layer covers every format
MAX_RANK = 1024
STRENGTH_RANGE = (-4.0, 4.0)
KEPT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LoraError(ModelFileError):
    """A LoRA file that cannot be used with this model; the message names the file."""


# ----------------------------------------------------------------------------------------------------
# layer names: official names, the image-branch extras, diffusers' names → official
# ----------------------------------------------------------------------------------------------------
_ATTN = ("q", "k", "v", "o", "norm_q", "norm_k")
BLOCK_LAYERS = (*(f"self_attn.{n}" for n in _ATTN), *(f"cross_attn.{n}" for n in _ATTN), "norm3", "ffn.0", "ffn.2",
                "modulation")
I2V_BLOCK_LAYERS = ("cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img")
TOP_LAYERS = ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
              "time_projection.1", "head.head", "head.modulation")
I2V_TOP_LAYERS = ("img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4", "img_emb.emb_pos")
_DIFFUSERS_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k"}
DIFFUSERS_BLOCK = {
    **{f"attn1.{d}": f"self_attn.{o}" for d, o in _DIFFUSERS_ATTN.items()},
    **{f"attn2.{d}": f"cross_attn.{o}" for d, o in _DIFFUSERS_ATTN.items()},
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img", "norm2": "norm3", "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2", "scale_shift_table": "modulation",
}
DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head", "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
}
I2V_LAYERS = frozenset(I2V_BLOCK_LAYERS + I2V_TOP_LAYERS)


def _fold(name: str) -> str:
    return name.replace(".", "_")


# folded name → (official name, naming family)
_BLOCK_TABLE = {_fold(n): (n, "official") for n in BLOCK_LAYERS + I2V_BLOCK_LAYERS}
_BLOCK_TABLE.update({_fold(d): (o, "diffusers") for d, o in DIFFUSERS_BLOCK.items()})
_TOP_TABLE = {_fold(n): (n, "official") for n in TOP_LAYERS + I2V_TOP_LAYERS}
_TOP_TABLE.update({_fold(d): (o, "diffusers") for d, o in DIFFUSERS_TOP.items()})
_BLOCK_RE = re.compile(r"blocks_(\d+)_(.+)")

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "pipe.dit.")
_KOHYA_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")
# key ending → part; longest first so `.lora_B.default.weight` wins over `.weight`-style endings
_PARTS = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_B.default.bias", "up_bias"), (".lora_B.bias", "up_bias"), (".alpha", "alpha"), (".diff_b", "diff_b"),
    (".diff", "diff"),
)
_UNSUPPORTED = {".hada_": "LyCORIS LoHa", ".lokr_": "LyCORIS LoKr", ".dora_scale": "DoRA", ".lora_mid.": "LoCon (Tucker)",
                ".lora_magnitude_vector": "DoRA"}


@dataclass(frozen=True)
class KeyInfo:
    """What one file key means: the official module, the part of the LoRA, the naming family."""

    module: str  # official module (or parameter) name, e.g. 'blocks.3.cross_attn.k'
    part: str  # down | up | up_bias | alpha | diff | diff_b
    family: str  # official | kohya | diffusers (+ '/peft' when the PEFT prefix was there)
    source_module: str  # the module name as the file writes it (for alpha patterns)


def parse_key(key: str) -> KeyInfo | None:
    """Map one LoRA file key to its official module and part; None when it names no DiT layer."""
    end, part = next(((e, p) for e, p in _PARTS if key.endswith(e)), ("", ""))
    if not part:
        return None
    name, peft, kohya = key[: -len(end)], False, False
    stripped = True
    while stripped:
        stripped = False
        for pre in _PREFIXES + _KOHYA_PREFIXES:
            if name.startswith(pre):
                name, stripped = name[len(pre):], True
                peft |= pre == "base_model.model."
                kohya |= pre in _KOHYA_PREFIXES
    folded = _fold(name)
    m = _BLOCK_RE.fullmatch(folded)
    if m and m.group(2) in _BLOCK_TABLE:
        layer, family = _BLOCK_TABLE[m.group(2)]
        hit = (f"blocks.{m.group(1)}.{layer}", family)
    else:
        hit = _TOP_TABLE.get(folded)
    if hit is None:
        return None
    module, family = hit
    family = "kohya" if kohya else family
    return KeyInfo(module, part, family + ("/peft" if peft else ""), name)


def is_i2v_layer(module: str) -> bool:
    """True for layers only the image-to-video model has (k_img, v_img, norm_k_img, img_emb)."""
    return re.sub(r"^blocks\.\d+\.", "", module) in I2V_LAYERS


# ----------------------------------------------------------------------------------------------------
# what a LoRA file holds, after reading and validation
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoraDelta:
    """The change of one model tensor: scale·(up @ down) (low rank) or scale·diff (full difference)."""

    target: str  # official parameter name, e.g. 'blocks.0.self_attn.q.weight'
    shape: tuple[int, ...]  # the target's full shape
    up: Tensor | None = None  # (out, rank), the file's dtype (float32, bf16 or fp16)
    down: Tensor | None = None  # (rank, in·k)
    diff: Tensor | None = None  # the target's shape
    scale: float = 1.0

    def rows(self, start: int, stop: int, device: torch.device | str = "cpu") -> Tensor:
        """Rows [start, stop) of dim 0 of the unscaled-by-strength delta, float32, in the target's shape."""
        if self.diff is not None:
            out = self.diff[start:stop].to(device, torch.float32)
        else:
            up = self.up[start:stop].to(device, torch.float32)
            out = (up @ self.down.to(device, torch.float32)).view(stop - start, *self.shape[1:])
        return out * self.scale if self.scale != 1.0 else out


@dataclass
class LoraFile:
    """A validated LoRA: deltas by official parameter name, plus what could not be used."""

    path: Path
    fmt: str
    deltas: dict[str, LoraDelta]
    skipped: int = 0  # keys of layers this model lacks (an I2V LoRA's image branch on a T2V model)
    skipped_examples: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # keys that name no DiT layer at all
    rank: int = 0
    key: tuple = ()  # identity of the file's contents on disk (path, size, mtime)

    @property
    def name(self) -> str:
        return self.path.name


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------
def file_key(path: Path) -> tuple:
    """(resolved path, size, mtime_ns): changes when the file is replaced."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _open(path: Path) -> tuple[LazyStateDict, dict]:
    if not path.is_file():
        raise ModelNotFoundError(f"LoRA file not found: {path}")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoraError(f"{path} is not a LoRA file: expected one of {', '.join(LORA_SUFFIXES)}")
    size = path.stat().st_size
    if size > MAX_LORA_BYTES:
        raise LoraError(f"{path} is {size:,} bytes; LoRA files larger than {MAX_LORA_BYTES:,} bytes are refused")
    sd = LazyStateDict([path])  # safetensors: header checked, mmap'd; pickles: weights_only=True or refused
    if len(sd) > MAX_LORA_TENSORS:
        raise LoraError(f"{path} has {len(sd):,} tensors; at most {MAX_LORA_TENSORS:,} are allowed in a LoRA")
    meta = {}
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as h:
            meta = h.metadata() or {}
    return sd, meta


def _peft_alpha(meta: dict, path: Path) -> tuple[float | None, dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) from diffusers' `lora_adapter_metadata`, if any."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise LoraError(f"{path}: its lora_adapter_metadata is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise LoraError(f"{path}: its lora_adapter_metadata is not a JSON object")
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    if cfg.get("use_dora"):
        raise LoraError(f"{path} is a DoRA adapter; DoRA is not supported")
    try:
        alpha = None if cfg.get("lora_alpha") is None else float(cfg["lora_alpha"])
        pattern = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
    except (TypeError, ValueError) as exc:
        raise LoraError(f"{path}: lora_alpha in its lora_adapter_metadata is not a number") from exc
    return alpha, pattern, bool(cfg.get("use_rslora"))


def _tensor(sd: LazyStateDict, key: str, path: Path) -> Tensor:
    t = sd[key]
    if not t.is_floating_point():
        raise LoraError(f"{path}: tensor '{key}' has dtype {t.dtype}; LoRA tensors must be floating point")
    if t.dtype not in KEPT_DTYPES:  # fp8, fp64: float32 (bf16/fp16/fp32 are kept and upcast at merge time)
        t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise LoraError(f"{path}: tensor '{key}' contains NaN or infinite values")
    return t


def _misfit(path: Path, key: str, got: tuple, target: str, want: tuple) -> LoraError:
    return WrongLoraError(
        f"{path} does not fit this model (made for another model size?): tensor '{key}' has shape {got} "
        f"but the model's '{target}' is {want}"
    )


class WrongLoraError(LoraError, WrongModelError):
    """A LoRA made for another model (another size, or no layer of this one)."""


def read_lora(path: str | Path, shapes: Mapping[str, tuple[int, ...]]) -> LoraFile:
    """Read and validate a LoRA file against a model's parameter shapes (official names, full shapes)."""
    path = Path(path)
    sd, meta = _open(path)
    groups, usable, skipped, unmatched = _classify(sorted(sd), shapes, path)
    alpha_meta, alpha_pattern, rslora = _peft_alpha(meta, path)
    deltas: dict[str, LoraDelta] = {}
    max_rank = 0
    for module, parts in sorted(groups.items()):
        if "down" in parts or "up" in parts:
            info = usable[parts.get("down") or parts["up"]]
            d = _low_rank(sd, path, module, parts, shapes, info, alpha_meta, alpha_pattern, rslora)
            max_rank = max(max_rank, d.up.shape[1])
            _add(deltas, d)
            if "up_bias" in parts:  # PEFT lora_bias: scaled like the pair
                _add(deltas, _full(sd, path, parts["up_bias"], f"{module}.bias", shapes, d.scale))
        else:
            for lone in ("alpha", "up_bias"):
                if lone in parts:
                    raise LoraError(f"{path}: '{parts[lone]}' has no lora_down/lora_up tensors beside it")
        if "diff" in parts:
            target = f"{module}.weight" if f"{module}.weight" in shapes else module
            _add(deltas, _full(sd, path, parts["diff"], target, shapes, 1.0))
        if "diff_b" in parts:
            _add(deltas, _full(sd, path, parts["diff_b"], f"{module}.bias", shapes, 1.0))
    fmt = Counter(i.family for i in usable.values()).most_common(1)[0][0]
    return LoraFile(path, fmt, deltas, len(skipped), skipped[:3], unmatched, max_rank, file_key(path))


def _classify(keys: list[str], shapes: Mapping[str, tuple[int, ...]], path: Path):
    """(module → part → key, usable key → KeyInfo, skipped keys, unmatched keys), refusing unusable files."""
    for k in keys:
        for marker, what in _UNSUPPORTED.items():
            if marker in k:
                raise LoraError(f"{path} is a {what} file (tensor '{k}'); only plain LoRA (lora_down/lora_up, "
                                "lora_A/lora_B) and full differences (.diff, .diff_b) are supported")
    parsed = {k: parse_key(k) for k in keys}
    unmatched = [k for k, i in parsed.items() if i is None]
    absent = {k for k, i in parsed.items() if i and is_i2v_layer(i.module) and i.module not in shapes
              and f"{i.module}.weight" not in shapes}
    skipped = [k for k in keys if k in absent]
    usable = {k: i for k, i in parsed.items() if i and k not in absent}
    if not usable:
        if skipped:
            raise WrongLoraError(f"{path} only changes layers this model lacks: its {len(skipped)} keys are all for "
                                 f"the image-to-video branch (e.g. '{skipped[0]}')")
        examples = ", ".join(f"'{k}'" for k in keys[:3])
        raise WrongLoraError(f"{path} is not a LoRA for the Wan2.1 DiT: none of its {len(keys)} keys match a layer "
                             f"(e.g. {examples})")
    num_layers = 1 + max((int(n.split(".")[1]) for n in shapes if n.startswith("blocks.")), default=-1)
    groups: dict[str, dict[str, str]] = {}
    for k, i in usable.items():
        if i.module.startswith("blocks.") and int(i.module.split(".")[1]) >= num_layers:
            raise WrongLoraError(f"{path} was made for another model size: tensor '{k}' is for block "
                                 f"{i.module.split('.')[1]} but this model has {num_layers} blocks")
        if i.part in groups.setdefault(i.module, {}):
            raise LoraError(f"{path}: tensors '{groups[i.module][i.part]}' and '{k}' are the same part of one layer")
        groups[i.module][i.part] = k
    return groups, usable, skipped, unmatched


def _add(deltas: dict[str, LoraDelta], d: LoraDelta) -> None:
    if d.target in deltas:  # e.g. a low-rank pair and a .diff for one weight: both are added
        prev = deltas[d.target]
        full = prev.rows(0, prev.shape[0]) + d.rows(0, d.shape[0])
        d = LoraDelta(d.target, d.shape, diff=full)
    deltas[d.target] = d


def _full(sd: LazyStateDict, path: Path, key: str, target: str, shapes, scale: float) -> LoraDelta:
    if target not in shapes:
        raise WrongLoraError(f"{path}: tensor '{key}' is for '{target}', which this model does not have")
    want, got = tuple(shapes[target]), tuple(sd.shape(key))
    if got != want:
        raise _misfit(path, key, got, target, want)
    return LoraDelta(target, want, diff=_tensor(sd, key, path), scale=scale)


def _low_rank(sd, path: Path, module: str, parts: dict[str, str], shapes, info: KeyInfo, alpha_meta,
              alpha_pattern, rslora) -> LoraDelta:
    for need, other in (("down", "up"), ("up", "down")):
        if need not in parts:
            raise LoraError(f"{path}: '{parts[other]}' has no matching {'lora_down/lora_A' if need == 'down' else 'lora_up/lora_B'} tensor")
    target = f"{module}.weight"
    if target not in shapes:
        raise WrongLoraError(f"{path}: tensor '{parts['down']}' is for '{target}', which this model does not have")
    want = tuple(shapes[target])
    if len(want) < 2:
        raise LoraError(f"{path}: '{parts['down']}' is a low-rank pair for '{target}', a {len(want)}-D tensor")
    down_s, up_s = tuple(sd.shape(parts["down"])), tuple(sd.shape(parts["up"]))
    rank = down_s[0] if down_s else 0
    if not 1 <= rank <= MAX_RANK or rank > min(want[0], math.prod(want[1:])):
        raise LoraError(f"{path}: tensor '{parts['down']}' has rank {rank}; allowed 1 to "
                        f"{min(MAX_RANK, want[0], math.prod(want[1:]))} for '{target}'")
    if math.prod(down_s[1:]) != math.prod(want[1:]) or down_s[1:2] != want[1:2]:
        raise _misfit(path, parts["down"], down_s, target, want)
    if len(up_s) < 2 or up_s[0] != want[0] or math.prod(up_s[1:]) != up_s[1]:
        raise _misfit(path, parts["up"], up_s, target, want)
    if up_s[1] != rank:
        raise LoraError(f"{path}: '{parts['up']}' has rank {up_s[1]} but '{parts['down']}' has rank {rank}")
    down = _tensor(sd, parts["down"], path).reshape(rank, -1)
    up = _tensor(sd, parts["up"], path).reshape(want[0], rank)
    if "alpha" in parts:
        if math.prod(sd.shape(parts["alpha"])) != 1:
            raise LoraError(f"{path}: '{parts['alpha']}' has shape {tuple(sd.shape(parts['alpha']))}; alpha is one number")
        alpha = _tensor(sd, parts["alpha"], path).item()
    else:
        alpha = next((a for pat, a in alpha_pattern.items() if info.source_module == pat
                      or info.source_module.endswith("." + pat)), alpha_meta)
    scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)
    return LoraDelta(target, want, up=up, down=down, scale=scale)


# ----------------------------------------------------------------------------------------------------
# the --lora flag and the loras folder
# ----------------------------------------------------------------------------------------------------
def parse_lora_arg(text: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]` → (path, strength); strength defaults to 1.0 and must lie in STRENGTH_RANGE.

    The strength is what follows the LAST colon when it reads as a number, so `C:\\loras\\a.safetensors`,
    `C:\\loras\\a.safetensors:0.8` and `/x/a:b.safetensors:0.5` all work; `a.safetensors:abc` is refused.
    """
    text = text.strip()
    if not text:
        raise RequestError("lora", "empty value; expected PATH[:STRENGTH]")
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
            path = head
        except ValueError:
            if head.lower().endswith(LORA_SUFFIXES) or not tail or re.fullmatch(r"[-+.\deE]+|nan|inf", tail, re.I):
                raise RequestError("lora", f"strength '{tail}' of '{text}' is not a number; expected PATH[:STRENGTH] "
                                   f"with STRENGTH from {STRENGTH_RANGE[0]:g} to {STRENGTH_RANGE[1]:g}") from None
    return path, check_strength(strength)


def check_strength(strength: float) -> float:
    """The strength as a float, refused (field `lora`) outside STRENGTH_RANGE or when not finite."""
    lo, hi = STRENGTH_RANGE
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise RequestError("lora", f"strength {strength!r} is not a number; allowed {lo:g} to {hi:g}") from None
    if not math.isfinite(s) or not lo <= s <= hi:
        raise RequestError("lora", f"strength {strength} is out of range; allowed {lo:g} to {hi:g}")
    return s


def lora_dir(models_dir: str | Path) -> Path:
    """ComfyUI's LoRA folder: <models_dir>/loras."""
    return Path(models_dir) / "loras"


def list_loras(models_dir: str | Path) -> list[str]:
    """Names (relative to <models_dir>/loras, '/'-separated) of the .safetensors files there, sorted."""
    root = lora_dir(models_dir)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors") if p.is_file())


def resolve_lora(name: str, models_dir: str | Path) -> Path:
    """A request's LoRA name → its file inside <models_dir>/loras; absolute names and '..' are refused."""
    root = lora_dir(models_dir)
    parts = Path(name.replace("\\", "/")).parts
    if not name or Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or ":" in name:
        raise RequestError("lora", f"'{name}' is not a file in {root}; pick one of the listed LoRAs")
    p = root / name
    if not p.is_file():
        raise RequestError("lora", f"no LoRA named '{name}' in {root}")
    return p


def cli_loras(specs: tuple[str, ...] | list[str], models_dir: str | Path) -> tuple[tuple[str, float], ...]:
    """--lora PATH[:STRENGTH] values → ((file, strength), ...); a value that is no file is a name in <models_dir>/loras."""
    out = []
    for text in specs:
        path, strength = parse_lora_arg(text)
        p = Path(path)
        if not p.is_file():
            try:
                p = resolve_lora(path, models_dir)
            except RequestError:
                raise RequestError("lora", f"LoRA file not found: '{path}' is neither a file nor a LoRA in "
                                           f"{lora_dir(models_dir)}") from None
        out.append((str(p), strength))
    return tuple(out)
