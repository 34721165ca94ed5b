"""Reading checkpoint files lazily (safetensors mmap, .pth with weights_only) with clear errors."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class ModelFileError(Exception):
    """Base class of every model-file problem; the message is meant for the user."""


class ModelNotFoundError(ModelFileError):
    """No weights where we looked."""


class CorruptFileError(ModelFileError):
    """The file exists but cannot be read (truncated, not a checkpoint)."""


class UnsafePickleError(ModelFileError):
    """A .pth pickle that only loads with arbitrary code execution."""


class WrongModelError(ModelFileError):
    """The file holds tensors of another model (or another size)."""


# ----------------------------------------------------------------------------------------------------
# lazy state dicts
# ----------------------------------------------------------------------------------------------------
class LazyStateDict(Mapping[str, Tensor]):
    """name → tensor, read on access from mmap'd safetensors files (or a weights_only .pth).

    Also answers shapes and dtypes without reading data, and reads row slices of 2-D+ tensors so
    a rank can take only its FSDP shard.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._where: dict[str, int] = {}
        self._handles: list = []
        self._pth: dict[str, Tensor] = {}
        for i, f in enumerate(files):
            if f.suffix == ".safetensors":
                h = _open_safetensors(f)
                self._handles.append(h)
                for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    self._where[k] = i
            else:
                self._handles.append(None)
                for k, v in read_pth(f).items():
                    self._where[k] = i
                    self._pth[k] = v

    def __getitem__(self, name: str) -> Tensor:
        i = self._where[name]
        if name in self._pth:
            return self._pth[name]
        try:
            return self._handles[i].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CorruptFileError(f"cannot read tensor '{name}' from {self.files[i]}: {exc} (file truncated or corrupt?)") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading its data."""
        if name in self._pth:
            return tuple(self._pth[name].shape)
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """Stored dtype as safetensors names it (F32, BF16, F8_E4M3, …) or torch's name for .pth."""
        if name in self._pth:
            return str(self._pth[name].dtype).replace("torch.", "")
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of dim 0, reading only those bytes for safetensors files."""
        if name in self._pth:
            return self._pth[name][start:stop]
        try:
            return self._handles[self._where[name]].get_slice(name)[start:stop]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CorruptFileError(f"cannot read tensor '{name}' from {self.files[self._where[name]]}: {exc}") from exc


def _open_safetensors(path: Path):
    try:
        _check_safetensors_size(path)
        h = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        size = path.stat().st_size if path.exists() else 0
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({size:,} bytes): {exc}. "
            "The download may be incomplete: compare the size with the source and download it again."
        ) from exc
    return h


def _check_safetensors_size(path: Path) -> None:
    """A safetensors file must be at least header + the largest data offset long (catches truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size:
            raise ValueError(f"header length {n:,} exceeds the file size")
        header = json.loads(fh.read(n))  # raises ValueError on garbage
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise CorruptFileError(
            f"{path} is truncated: it has {size:,} bytes but its header describes {8 + n + end:,}. "
            "Download it again."
        )


def read_pth(path: Path) -> dict[str, Tensor]:
    """Load a pickled checkpoint with weights_only=True (never arbitrary code); unwrap 'state_dict'/'model'."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"refusing to load {path}: it is a pickle that needs unsafe loading (it contains objects other "
            "than tensors, which could run arbitrary code). Convert it to safetensors with a tool you trust, "
            f"or use the safetensors file of this model. Details: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CorruptFileError(f"cannot read {path}: {exc} (file truncated or not a PyTorch checkpoint?)") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CorruptFileError(f"{path} does not hold a dict of tensors")
    return obj


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


# ----------------------------------------------------------------------------------------------------
# finding files
# ----------------------------------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint given as a file, or a folder with an index json or shards."""
    if path.is_file():
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        idx = json.loads(indexes[0].read_text())
        names = sorted(set(idx.get("weight_map", {}).values()))
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ModelNotFoundError(f"{indexes[0]} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if not files:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return files


def open_checkpoint(path: str | Path) -> LazyStateDict:
    """Open a checkpoint file or folder lazily; raises ModelNotFoundError / CorruptFileError."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"model file not found: {p}")
    files = weight_files(p)
    if not files:
        raise ModelNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {p}")
    return LazyStateDict(files)


# ----------------------------------------------------------------------------------------------------
# loading into a meta-built module
# ----------------------------------------------------------------------------------------------------
def dequantize_fp8(sd: Mapping[str, Tensor], name: str, tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """Upcast a float8 weight, multiplying by its ComfyUI per-tensor `scale_weight` when present."""
    if tensor.dtype not in FP8_DTYPES:
        return tensor
    out = tensor.to(torch.float32)
    scale_name = name.rsplit(".", 1)[0] + ".scale_weight"
    if scale_name in sd:
        out = out * sd[scale_name].to(torch.float32)
    return out.to(dtype)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def keeps_fp32(module: nn.Module, name: str) -> bool:
    """Whether tensor `name` matches one of the module's `keep_fp32` patterns (whole dotted components:
    "modulation" matches "blocks.3.modulation", "head.head" matches "head.head.weight")."""
    dotted = f".{name}."
    return any(f".{pattern}." in dotted for pattern in getattr(module, "keep_fp32", ()))


def run_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor `name` gets in a run of `dtype`: float32 for the module's `keep_fp32` tensors when
    `dtype` is a 16-bit float, else `dtype`."""
    return torch.float32 if dtype in LOW_PRECISION and keeps_fp32(module, name) else dtype


@torch.no_grad()
def cast_to_run_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating parameter and buffer (meta or real) to its `run_dtype`, in place (instead of
    `module.to(dtype)`, which would also cast the `keep_fp32` tensors); tied parameters stay tied."""
    for mod_name, mod in module.named_modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is None or not t.is_floating_point() or t.dtype in FP8_DTYPES:
                    continue  # fp8 weights stay fp8 (parallel/quantize.py)
                want = run_dtype(module, f"{mod_name}.{key}" if mod_name else key, dtype)
                if t.dtype != want:
                    t.data = t.data.to(want)
    return module


def load_into(
    module: nn.Module,
    view: CheckpointView,
    device: torch.device | str,
    dtype: torch.dtype,
    what: str,
    path: Path | str,
    skip: tuple[str, ...] = (),
    place: Callable[[str], torch.device | str] | None = None,
) -> nn.Module:
    """Fill a meta-device module tensor by tensor: read, upcast/convert, move, assign.

    Names and shapes are checked first, so a file of another model fails before any data is read.
    `skip` names tied aliases that the file does not hold (they are re-tied by the caller);
    `place(name)` may put some tensors elsewhere than `device` (host memory for offloaded weights).
    Each tensor gets its `run_dtype`: `dtype`, or float32 for the module's `keep_fp32` tensors.
    """
    expected = {n: t for n, t in module.state_dict().items() if n not in skip}
    # fp8 layers (engine.fp8.Fp8Linear): the file's weight, kept fp8 or quantized, makes `weight_scale` too
    fp8 = {n for n, t in expected.items() if t.dtype in FP8_DTYPES}
    made = {n[: -len("weight")] + "weight_scale" for n in fp8}
    for n, t in expected.items():
        if n in view and tuple(view.shape(n)) != tuple(t.shape):
            raise WrongModelError(
                f"{path} does not match the {what}: tensor '{n}' has shape {tuple(view.shape(n))} in the file "
                f"but the model expects {tuple(t.shape)}"
            )
    missing = [n for n in expected if n not in view and n not in made]
    if missing:
        raise WrongModelError(
            f"{path} is not a {what} checkpoint: {len(missing)} of its tensors are missing, e.g. '{missing[0]}'"
        )
    extra = [n for n in view if n not in expected]
    if extra:
        raise WrongModelError(f"{path} is not a {what} checkpoint: unexpected tensor '{extra[0]}' (and {len(extra) - 1} more)")
    new_sd = {}
    for n in expected:
        if n in made:
            continue
        if n in fp8:
            from engine.fp8 import load_fp8_weight

            new_sd[n], new_sd[n[: -len("weight")] + "weight_scale"] = load_fp8_weight(view, n, place(n) if place else device)
            continue
        want = run_dtype(module, n, dtype)
        new_sd[n] = view.read(n, want).to(device=place(n) if place else device, dtype=want)
    result = module.load_state_dict(new_sd, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - set(skip):
        raise WrongModelError(f"{path}: could not load {what}: {result}")
    return module


IGNORED_SUFFIXES = (".scale_weight", ".scale_input")
IGNORED_NAMES = ("scaled_fp8", "spiece_model")


class CheckpointView(Mapping[str, Tensor]):
    """A renamed, filtered view of a LazyStateDict that upcasts ComfyUI fp8 weights on access.

    `rename(file_name) -> model_name | None` (None drops the tensor).
    """

    def __init__(self, sd: LazyStateDict, rename: Callable[[str], str | None], dtype: torch.dtype) -> None:
        self.sd = sd
        self.dtype = dtype
        self.src: dict[str, str] = {}
        for k in sd:
            if k in IGNORED_NAMES or k.endswith(IGNORED_SUFFIXES):
                continue
            new = rename(k)
            if new is not None:
                self.src[new] = k

    def __getitem__(self, name: str) -> Tensor:
        return self.read(name)

    def read(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Tensor `name`; an fp8 one is dequantized straight to `dtype` (default: the view's dtype)."""
        k = self.src[name]
        return dequantize_fp8(self.sd, k, self.sd[k], dtype or self.dtype)

    def read_stored(self, name: str) -> tuple[Tensor, Tensor | None]:
        """Tensor `name` as stored (no dequantization) and its ComfyUI `scale_weight`, if the file has one."""
        k = self.src[name]
        scale_name = k.rsplit(".", 1)[0] + ".scale_weight"
        return self.sd[k], self.sd.get(scale_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.src)

    def __len__(self) -> int:
        return len(self.src)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.sd.shape(self.src[name])

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> Tensor:
        """Rows [start, stop) of dim 0 of tensor `name` (fp8 dequantized to `dtype`, default the view's)."""
        k = self.src[name]
        return dequantize_fp8(self.sd, k, self.sd.read_rows(k, start, stop), dtype or self.dtype)
