"""Local attention kernels, (B, heads, L, D) layout. Each has a plain form and one that also returns the
log-sum-exp (fp32, (B, heads, L)) that ring attention needs to merge partial results.

`--attention auto|sdpa|sdpa_cudnn|sdpa_flash|flash_attn_2|flash_attn_3|flash_attn_4|sage|fp8|int8_qk|math`
(fp8, int8_qk: 8-bit attention, parallel/attention_fp8.py; not exact); a backend whose
package is missing fails with the package to install; `auto` takes the fastest one available on the device:
flash_attn_4 (FlashAttention-4, `pip install flash-attn-4`) on Hopper/Blackwell when installed, else cuDNN.
A kernel may name another kernel for cross-attention (512 text keys), where a different one can be faster.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("wan.kernels")

Attn = Callable[[Tensor, Tensor, Tensor], Tensor]
AttnLse = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class BackendUnavailable(ValueError):
    """The requested attention backend cannot run here (the message says what to install)."""


@dataclass(frozen=True)
class Kernel:
    name: str
    attn: Attn
    attn_lse: AttnLse
    exact: bool = True
    cross: Attn | None = None  # for cross-attention (few keys), when another kernel is faster there

    @property
    def cross_attn(self) -> Attn:
        return self.cross or self.attn


def math_attn_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Exact attention in fp32 with its log-sum-exp; the CPU kernel and the reference."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def sdpa_attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _cudnn_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
    return out[0], out[1].reshape(q.shape[:3]).float()


def _flash_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
    return out[0], out[1].reshape(q.shape[:3]).float()


def _sdpa_backend(backend) -> Attn:
    from torch.nn.attention import sdpa_kernel

    def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return attn


def _flash_attn(version: int) -> Kernel:
    if version == 3:
        mod = "flash_attn_interface"
        if importlib.util.find_spec(mod) is None:
            raise BackendUnavailable("attention flash_attn_3 needs the flash-attn 3 package (flash_attn_interface): "
                                     "build it from https://github.com/Dao-AILab/flash-attention (hopper/), or use --attention auto")
        from flash_attn_interface import flash_attn_func
    else:
        if importlib.util.find_spec("flash_attn_2_cuda") is None:  # FA2's extension (FA4 also ships flash_attn/)
            raise BackendUnavailable("attention flash_attn_2 needs the flash-attn package: pip install flash-attn "
                                     "--no-build-isolation, or use --attention auto")
        from flash_attn import flash_attn_func

    def attn_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        res = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True)
        out, lse = res[0], res[1]
        return out.transpose(1, 2), lse.float()

    return Kernel(f"flash_attn_{version}", lambda q, k, v: attn_lse(q, k, v)[0], attn_lse)


def fa4_available() -> bool:
    """Whether FlashAttention-4 (`flash_attn.cute`, package flash-attn-4) can be imported."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # no flash_attn package at all, or a broken one
        return False


def _flash_attn_4(device: torch.device) -> Kernel:
    """FlashAttention-4 (CuTe DSL kernels, compiled on first use of each shape) for self-attention; cuDNN for
    cross-attention, where it is faster (H100, 32,760 × 512 keys: 0.68 vs 0.91 ms; self-attention at 32,760
    tokens 32.1 vs 37.8 ms, same error against fp32: benchmarks/fa4_check.py)."""
    if not fa4_available():
        raise BackendUnavailable("attention flash_attn_4 needs FlashAttention-4: pip install flash-attn-4 "
                                 "(Hopper or Blackwell GPUs), or use --attention auto")
    major, _ = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        raise BackendUnavailable(f"attention flash_attn_4 runs on Hopper (sm90) and Blackwell (sm100) GPUs; this one is "
                                 f"sm{major}x: use --attention auto")
    from flash_attn.cute import flash_attn_func

    @torch.compiler.disable  # a CuTe DSL kernel: torch.compile runs it as an opaque call between two graphs
    def attn_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True)
        return out.transpose(1, 2), lse.float()  # (B, H, L, D), (B, H, L)

    from torch.nn.attention import SDPBackend

    cross = _sdpa_backend(SDPBackend.CUDNN_ATTENTION) if _cudnn_ok(device) else None
    return Kernel("flash_attn_4", lambda q, k, v: attn_lse(q, k, v)[0], attn_lse, cross=cross)


def _sage() -> Kernel:
    if importlib.util.find_spec("sageattention") is None:
        raise BackendUnavailable("attention sage needs the sageattention package: pip install sageattention, or use --attention auto")
    from sageattention import sageattn

    def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)

    def attn_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out, lse = sageattn(q, k, v, tensor_layout="HND", is_causal=False, return_lse=True)
        return out, lse.float()

    return Kernel("sage", attn, attn_lse, exact=False)


def get_kernel(name: str, device: torch.device) -> Kernel:
    """The local kernel for --attention NAME on this device."""
    if device.type != "cuda":
        if name in EIGHT_BIT:
            from parallel.attention_fp8 import fp8_kernel

            return fp8_kernel(name, device, None)  # refuses with what it needs
        if name not in ("auto", "sdpa", "math"):
            raise BackendUnavailable(f"attention {name} needs a CUDA GPU; on CPU use auto, sdpa or math")
        return Kernel("sdpa" if name != "math" else "math", sdpa_attn if name != "math" else (lambda q, k, v: math_attn_lse(q, k, v)[0]), math_attn_lse)
    from torch.nn.attention import SDPBackend

    if name == "auto":
        major, _ = torch.cuda.get_device_capability(device)
        if major in (9, 10) and fa4_available():
            name = "flash_attn_4"
        else:
            name = "sdpa_cudnn" if _cudnn_ok(device) else "sdpa_flash"
    if name == "sdpa_cudnn":
        return Kernel(name, _sdpa_backend(SDPBackend.CUDNN_ATTENTION), _cudnn_lse)
    if name == "sdpa_flash":
        return Kernel(name, _sdpa_backend(SDPBackend.FLASH_ATTENTION), _flash_lse)
    if name == "sdpa":
        return Kernel(name, sdpa_attn, _cudnn_lse if _cudnn_ok(device) else _flash_lse)
    if name == "math":
        return Kernel(name, lambda q, k, v: math_attn_lse(q, k, v)[0], math_attn_lse)
    if name in ("flash_attn_2", "flash_attn_3"):
        return _flash_attn(int(name[-1]))
    if name == "flash_attn_4":
        return _flash_attn_4(device)
    if name == "sage":
        return _sage()
    if name in EIGHT_BIT:
        from parallel.attention_fp8 import fp8_kernel

        return fp8_kernel(name, device, get_kernel("auto", device))
    raise BackendUnavailable(f"attention must be one of auto, sdpa, sdpa_cudnn, sdpa_flash, flash_attn_2, flash_attn_3, "
                             f"flash_attn_4, sage, fp8, int8_qk, math; got {name!r}")


EIGHT_BIT = ("fp8", "int8_qk")


def _cudnn_ok(device: torch.device) -> bool:
    """cuDNN attention runs (and is the fastest measured) on Hopper and newer."""
    try:
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 9 and torch.backends.cudnn.is_available()
    except Exception:  # noqa: BLE001
        return False
