"""`--preset auto`: memory settings chosen from each GPU's free memory and the model's size.

The rule (also in the README), with F = the smallest free memory of any GPU, W = GPUs, D = DiT weights,
T = text-encoder weights, L = DiT blocks, A = activation reserve (4 GiB + 10 GiB × dim/5120 / W):
1. Everything fits unsharded (D + T + A ≤ F): no FSDP, no offload (the max_speed preset).
2. Else, with W > 1: FSDP of DiT and T5; if (D + T)/W + D/L + A ≤ F that is all.
3. Else, on a GPU with fp8 tensor cores (sm89+, fp8_ok): if the fp8 DiT fits whole with T5 on the CPU,
   D8 + A8 ≤ F with D8 = D·(1/2 + 1/L) (fp8 blocks, the first and last in bf16) and A8 = 4 GiB + 4 GiB ×
   dim/5120 / W (832×480×81's activations; 720p needs more), no block swap: --quantize fp8, T5 on the CPU,
   tiled VAE, no FSDP (fp8 is not sharded). The 14B on a 24 GB card: 14.0 + 8 ≤ 23.
4. Else the text encoder goes to the CPU (T leaves the budget), the VAE decodes in tiles, and the last
   k blocks are swapped with k = ceil((weights on the GPU + A − F) / block size), up to L; if even all L
   blocks swapped do not fit, offload_percent 1.0 streams the rest of the layers too.
"""

from __future__ import annotations

import math


def auto_settings(world: int, free_gib: float, dit_gib: float, t5_gib: float, layers: int, dim: int,
                  fp8_ok: bool = False) -> dict:
    """The settings `--preset auto` picks (RunConfig field names); fp8_ok: the GPUs have fp8 tensor cores."""
    reserve = 4.0 + 10.0 * dim / 5120 / world
    out: dict = {"use_fsdp": False, "t5_cpu": False, "blocks_to_swap": 0, "offload_percent": 0.0, "vae_tiling": False}
    if dit_gib + t5_gib + reserve <= free_gib:
        return out
    block = dit_gib / layers
    on_gpu = dit_gib
    if world > 1:
        out["use_fsdp"] = True
        on_gpu = dit_gib / world + block
        if on_gpu + t5_gib / world + reserve <= free_gib:
            return out
    if fp8_ok and dit_gib * (0.5 + 1 / layers) + 4.0 + 4.0 * dim / 5120 / world <= free_gib:
        out.update(use_fsdp=False, t5_cpu=True, vae_tiling=True, quantize="fp8")
        return out
    out.update(t5_cpu=True, vae_tiling=True)
    per_block = block / world if world > 1 else block
    k = max(0, math.ceil((on_gpu + reserve - free_gib) / per_block))
    if k > layers:
        out.update(blocks_to_swap=layers, offload_percent=1.0)
    else:
        out["blocks_to_swap"] = k
    return out


def free_memory_gib(device) -> float:
    """Free memory of this rank's GPU (GiB); a large number on the CPU."""
    import torch

    if device.type != "cuda":
        return 1e9
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**30
