"""GenerationRequest and its validation: every user value is checked here, with messages naming the field."""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.config import DEFAULT_NEGATIVE_PROMPT, SUPPORTED_SIZES

MAX_PROMPT_CHARS = 2000
MAX_PROMPT_TOKENS = 512
MAX_FRAMES = 241
MAX_STEPS = 200
MAX_SEED = 2**32 - 1
MAX_BATCH = 8
MAX_LORAS = 4
SOLVERS = ("unipc", "euler", "dpm++")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class RequestError(ValueError):
    """An invalid request value; `field` names the parameter, the message says what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class GenerationRequest:
    """A fully resolved, validated request: the only thing that crosses the control plane."""

    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    width: int = 832
    height: int = 480
    frame_num: int = 81
    sample_steps: int = 50
    sample_guide_scale: float = 5.0
    sample_shift: float = 5.0
    sample_solver: str = "unipc"
    base_seed: int = -1
    batch_size: int = 1
    # per-request layout and speed knobs (validated against the running world by parallel/)
    ulysses_size: int = 1
    ring_size: int = 1
    cfg_size: int = 1
    teacache: float = 0.0
    # per-request memory mode (None: the start-up value); a change re-plans the weights before the request
    offload_percent: float | None = None
    blocks_to_swap: int | None = None
    # explicit timesteps before the shift (few-step distilled sampling); () = the solver's own grid
    sample_timesteps: tuple[float, ...] = ()
    # resolved LoRA files and strengths, in order, applied on every rank before the first DiT forward
    loras: tuple[tuple[str, float], ...] = ()
    # image-to-video: the checked images as PNG bytes (the same on every rank); width/height are then the
    # output size the official rule derives from the image's aspect ratio and the requested area
    image: bytes | None = None
    last_frame: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"

    def with_seed(self) -> GenerationRequest:
        """This request with a concrete seed (random when -1), chosen once on rank 0."""
        if self.base_seed >= 0:
            return self
        return replace(self, base_seed=secrets.randbelow(MAX_SEED + 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RequestLimits:
    """What the loaded model accepts."""

    model: str = "14B"
    sizes: tuple[str, ...] = SUPPORTED_SIZES["14B"]
    any_multiple_of_16: bool = False  # the tiny model accepts any W*H that are multiples of 16
    max_side: int = 1920
    count_tokens: Callable[[str], int] | None = None
    solvers: tuple[str, ...] = SOLVERS
    num_blocks: int = 40  # the DiT's blocks: the most blocks_to_swap can name
    image_inputs: int = 0  # 0 text-to-video, 1 image-to-video (image), 2 first-last-frame (image, last_frame)
    upload_dirs: tuple[str, ...] = ()  # where uploaded images may be read from by path (the server's own folders)
    models_dir: str | None = None  # request LoRA names are files in <models_dir>/loras (None: LoRAs refused)
    default_negative: str = DEFAULT_NEGATIVE_PROMPT  # what an empty negative prompt means (the task's official one)
    shift_by_size: bool = False  # I2V: an unset sample_shift is 3.0 at 832*480 / 480*832, else 5.0 (official)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _number(field_name: str, value: Any, lo: float, hi: float, integer: bool, lo_open: bool = False) -> float | int:
    """`value` as a number in [lo, hi] ((lo, hi] with lo_open), or a RequestError naming the field and the range."""
    kind = "an integer" if integer else "a number"
    span = f"greater than {_fmt(lo)} and at most {_fmt(hi)}" if lo_open else f"between {_fmt(lo)} and {_fmt(hi)}"
    if isinstance(value, bool) or value is None:
        raise RequestError(field_name, f"must be {kind} {span}, got {value!r}")
    try:
        x = float(value) if not isinstance(value, (int, float)) else value
    except (TypeError, ValueError):
        raise RequestError(field_name, f"must be {kind} {span}, got {str(value)[:40]!r}") from None
    if isinstance(x, int) and abs(x) > 2**63:  # beyond any range here (and beyond float: isfinite would overflow)
        raise RequestError(field_name, f"must be {span}, got an integer of {len(str(abs(x)))} digits")
    if not math.isfinite(x):
        raise RequestError(field_name, f"must be a finite number {span}, got {x}")
    if integer:
        if float(x) != int(x):
            raise RequestError(field_name, f"must be {kind} {span}, got {x}")
        x = int(x)
    if not (lo < x <= hi if lo_open else lo <= x <= hi):
        raise RequestError(field_name, f"must be {span}, got {x}")
    return x


def _text(field_name: str, value: Any, limits: RequestLimits, allow_empty: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(field_name, f"must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\\ud800"): no file or tokenizer can take it
        raise RequestError(field_name, f"must be valid Unicode text; character {exc.start} is an unpaired "
                                       f"surrogate {value[exc.start]!r}") from None
    text = _CONTROL.sub("", value).strip()
    if not text and not allow_empty:
        raise RequestError(field_name, "must not be empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(field_name, f"must be at most {MAX_PROMPT_CHARS} characters, got {len(text)}")
    if text and limits.count_tokens is not None:
        n = limits.count_tokens(text)
        if n > MAX_PROMPT_TOKENS:
            raise RequestError(field_name, f"must be at most {MAX_PROMPT_TOKENS} tokens, got {n}")
    return text


def parse_size(value: Any, limits: RequestLimits) -> tuple[int, int]:
    """'W*H' (or 'WxH') → (W, H), checked against the model's sizes."""
    allowed = ", ".join(limits.sizes)
    if not isinstance(value, str) or not re.fullmatch(r"\s*\d{1,5}\s*[*xX]\s*\d{1,5}\s*", value):
        raise RequestError("size", f"must look like W*H, one of {allowed}, got {str(value)[:40]!r}")
    w, h = (int(s) for s in re.split(r"[*xX]", value.replace(" ", "")))
    norm = f"{w}*{h}"
    if limits.any_multiple_of_16:
        if w % 16 or h % 16 or not (16 <= w <= limits.max_side and 16 <= h <= limits.max_side):
            raise RequestError(
                "size", f"the {limits.model} model takes W*H with W and H multiples of 16 between 16 and {limits.max_side}, got {norm}"
            )
    elif norm not in limits.sizes:
        raise RequestError("size", f"{norm} is not supported by the {limits.model} model; choose one of {allowed}")
    return w, h


def parse_timesteps(value: Any) -> tuple[float, ...]:
    """'1000,750,500,250' or a list of numbers → a strictly decreasing tuple in (0, 1000]; None/'' → ()."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise RequestError("sample_timesteps", f"must be a list of numbers like 1000,750,500,250, got {str(value)[:40]!r}")
    if len(items) > MAX_STEPS:
        raise RequestError("sample_timesteps", f"must have at most {MAX_STEPS} entries, got {len(items)}")
    out = tuple(float(_number("sample_timesteps", v.strip() if isinstance(v, str) else v, 0, 1000, integer=False,
                              lo_open=True)) for v in items)
    if any(b >= a for a, b in zip(out, out[1:])):
        raise RequestError("sample_timesteps", f"must be strictly decreasing, got {','.join(_fmt(t) for t in out)}")
    return out


def parse_loras(value: Any, limits: RequestLimits) -> tuple[tuple[str, float], ...]:
    """A request's `loras`: [{name, strength}] or [[name, strength]] → ((path in <models_dir>/loras, strength), ...)."""
    from engine.lora import check_strength, lora_dir, resolve_lora

    if not isinstance(value, (list, tuple)):
        raise RequestError("loras", f"must be a list of {{name, strength}}, got {type(value).__name__}")
    if len(value) > MAX_LORAS:
        raise RequestError("loras", f"at most {MAX_LORAS} LoRAs per request, got {len(value)}")
    if value and limits.models_dir is None:
        raise RequestError("loras", "this server takes no LoRAs from requests")
    out = []
    for item in value:
        if isinstance(item, Mapping):
            name, strength = item.get("name"), item.get("strength", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, strength = item
        else:
            raise RequestError("loras", f"each entry must be {{name, strength}} or [name, strength], got {str(item)[:60]!r}")
        if not isinstance(name, str):
            raise RequestError("loras", f"a LoRA name must be text, got {type(name).__name__}")
        if strength is None:
            strength = 1.0
        try:
            path = resolve_lora(name, limits.models_dir)
            s = check_strength(strength)
        except RequestError as exc:
            raise RequestError("loras", str(exc).removeprefix("lora: ")) from None
        if any(p == str(path) for p, _ in out):
            raise RequestError("loras", f"'{name}' is listed twice; in {lora_dir(limits.models_dir)} each LoRA "
                                        "appears once (set its strength instead)")
        out.append((str(path), s))
    return tuple(out)


def parse_images(raw: Mapping[str, Any], limits: RequestLimits, width: int, height: int,
                 ) -> tuple[bytes | None, bytes | None, int, int]:
    """(image, last_frame) as checked PNG bytes and the output (width, height) from the image's aspect ratio
    at the area width × height; (None, None, width, height) for a text-to-video model (which refuses images)."""
    names = ("image", "last_frame")[: limits.image_inputs]
    for name in ("image", "last_frame"):
        if name not in names and raw.get(name) is not None:
            what = "a text-to-video" if limits.image_inputs == 0 else "an image-to-video (one image)"
            raise RequestError(name, f"this server runs {what} model of size {limits.model}; it takes no {name}")
    if not names:
        return None, None, width, height
    import io
    from pathlib import Path

    from engine.i2v import i2v_size  # torch: only for image-to-video models (the CLI checks stay torch-free)
    from engine.images import load_image

    out: list[bytes] = []
    size = None
    for name in names:
        if raw.get(name) is None:
            raise RequestError(name, f"the {limits.model} image-to-video model needs {name} (a PNG, JPEG or WebP image)")
        img = load_image(raw[name], name, tuple(Path(d) for d in limits.upload_dirs))
        if size is None:
            try:
                size = i2v_size(width * height, img.height, img.width)
            except ValueError as exc:
                raise RequestError(name, str(exc)) from None
        buf = io.BytesIO()
        img.save(buf, format="PNG")  # normalised: RGB PNG, the same bytes on every rank
        out.append(buf.getvalue())
    out += [None] * (2 - len(out))
    return out[0], out[1], size.width, size.height


def validate_request(raw: Mapping[str, Any], limits: RequestLimits, defaults: Mapping[str, Any] | None = None) -> GenerationRequest:
    """Check every field of a raw request (UI, API or CLI) and build a GenerationRequest."""
    d = {**(defaults or {}), **{k: v for k, v in raw.items() if v is not None}}
    prompt = _text("prompt", d.get("prompt"), limits, allow_empty=False)
    negative = _text("negative_prompt", d.get("negative_prompt", ""), limits, allow_empty=True) or limits.default_negative
    width, height = parse_size(d.get("size", limits.sizes[0] if limits.sizes else "832*480"), limits)
    shift = d.get("sample_shift")
    if shift is None:  # the requested size (the area), before the image's aspect ratio reshapes it
        shift = (3.0 if {width, height} == {832, 480} else 5.0) if limits.shift_by_size else 5.0
    image, last_frame, width, height = parse_images(raw, limits, width, height)
    frames = _number("frame_num", d.get("frame_num", 81), 1, MAX_FRAMES, integer=True)
    if (frames - 1) % 4:
        raise RequestError("frame_num", f"must be 4n+1 between 1 and {MAX_FRAMES} (e.g. 17, 33, 81), got {frames}")
    if last_frame is not None and frames < 5:
        raise RequestError("frame_num", f"first-last-frame video needs at least 5 frames (4n+1), got {frames}")
    solver = d.get("sample_solver", "unipc")
    if solver not in limits.solvers:
        raise RequestError("sample_solver", f"must be one of {', '.join(limits.solvers)}, got {str(solver)[:40]!r}")
    seed = _number("base_seed", d.get("base_seed", -1), -1, MAX_SEED, integer=True)
    steps = _number("sample_steps", d.get("sample_steps", 50), 1, MAX_STEPS, integer=True)
    timesteps = parse_timesteps(raw.get("sample_timesteps"))
    if timesteps:
        if raw.get("sample_steps") is not None and steps != len(timesteps):
            raise RequestError("sample_steps", f"must equal the number of sample_timesteps ({len(timesteps)}), got {steps}")
    else:
        timesteps = parse_timesteps((defaults or {}).get("sample_timesteps"))
        if timesteps and raw.get("sample_steps") is not None and steps != len(timesteps):
            timesteps = ()  # the default timesteps are the default for their own step count only
    if timesteps:
        steps = len(timesteps)
        if raw.get("sample_solver") is None:
            solver = "euler"
        elif solver != "euler":
            raise RequestError("sample_solver", f"explicit sample_timesteps use the distilled Euler update; "
                                                f"set sample_solver to euler, got {str(solver)[:40]!r}")
    if raw.get("loras") is not None:
        loras = parse_loras(raw["loras"], limits)
    else:
        loras = tuple((str(p), float(s)) for p, s in (defaults or {}).get("loras", ()))
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        frame_num=frames,
        sample_steps=steps,
        sample_guide_scale=float(_number("sample_guide_scale", d.get("sample_guide_scale", 5.0), 0, 20, integer=False)),
        sample_shift=float(_number("sample_shift", shift, 0, 20, integer=False, lo_open=True)),
        sample_solver=solver,
        base_seed=seed,
        batch_size=_number("batch_size", d.get("batch_size", 1), 1, MAX_BATCH, integer=True),
        ulysses_size=_number("ulysses_size", d.get("ulysses_size", 1), 1, 1024, integer=True),
        ring_size=_number("ring_size", d.get("ring_size", 1), 1, 1024, integer=True),
        cfg_size=_number("cfg_size", d.get("cfg_size", 1), 1, 2, integer=True),
        teacache=float(_number("teacache", d.get("teacache", 0.0), 0, 10, integer=False)),
        offload_percent=None if d.get("offload_percent") is None else float(
            _number("offload_percent", d["offload_percent"], 0, 1, integer=False)),
        blocks_to_swap=None if d.get("blocks_to_swap") is None else int(
            _number("blocks_to_swap", d["blocks_to_swap"], 0, limits.num_blocks, integer=True)),
        sample_timesteps=timesteps,
        loras=loras,
        image=image,
        last_frame=last_frame,
    )
