"""The GPU lane's per-request switches (issues 15 and 16): the memory mode (blocks_to_swap / offload_percent)
and the LoRA set changed between requests of one running server, on the 14B's real shapes.

    python benchmarks/gpu_lane.py --part replan,lora

replan: swap 0 → 20 → 40 → 0 across four requests at 832×480×81 (without FSDP, then FSDP on a one-rank mesh):
per-GPU peak and in-use memory, host GiB and the seconds each re-plan took; every request's latents must equal
the first one's bit for bit. lora: no LoRA → A → A at 0.5 → A + B → none (rank-32 / rank-64 LoRAs of all 400
block Linears, random), plain and under block swap 20: the seconds each switch took.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks.gpu_lane import case, gang, in_use, peak, say, write_safetensors

SWAPS = {"14B": (0, 20, 40, 0), "tiny": (0, 1, 3, 0)}
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def _same(a: str, b: str) -> bool:
    from safetensors.torch import load_file

    return torch.equal(load_file(a)["latents"], load_file(b)["latents"])


def part_replan(m: dict, req: dict, work: Path) -> list[dict]:
    out, real = [], "--task" in m["flags"]  # the 14B (else --smoke: the tiny model on a CPU, no peaks to compare)
    swaps = SWAPS["14B" if real else "tiny"]
    for name, flags in (("replan:swap_0_20_40_0", []), ("replan:fsdp_swap_0_20_40_0", ["--dit_fsdp"])):
        d = work / name.replace(":", "_")
        d.mkdir(parents=True, exist_ok=True)
        reqs = [{"raw": dict(req, blocks_to_swap=s, offload_percent=0.0), "decode": False,
                 "save_latents": str(d / f"latents_{i}.st")} for i, s in enumerate(swaps)]
        res, log, wall = gang(name, m["flags"] + flags, reqs, work, timeout=540)
        if len(res) != len(reqs) or not all(r.get("ok") for r in res):
            out.append(case(name, False, wall, 0.0, f"{len(res)} results: " + str([r.get("error") for r in res])
                            + log[-1500:].replace("\n", " | ")))
            continue
        rows, same = [], True
        for i, r in enumerate(res):
            mode = r["meta"]["memory_mode"]
            eq = i == 0 or _same(reqs[0]["save_latents"], reqs[i]["save_latents"])
            same = same and eq
            rows.append({"blocks_to_swap": mode["blocks_to_swap"], "replan_s": mode["replan_s"],
                         "host_gib": mode["host_gib"], "peak_gib": peak(r), "in_use_gib": in_use(r),
                         "request_s": round(r["seconds"], 2), "latents_equal_first": eq})
        swapped = [x["peak_gib"] for x in rows]
        lower = swapped[1] < swapped[0] and swapped[2] < swapped[1] and abs(rows[3]["in_use_gib"] - rows[0]["in_use_gib"]) < 0.05
        ok = same and [x["blocks_to_swap"] for x in rows] == list(swaps) and (lower or not real)
        detail = "; ".join(f"swap {x['blocks_to_swap']}: peak {x['peak_gib']:.2f} GiB, in use {x['in_use_gib']:.2f} GiB, "
                           f"host {x['host_gib']:.2f} GiB, re-plan {x['replan_s']:.2f} s, request {x['request_s']:.1f} s"
                           for x in rows) + f"; latents bitwise equal across the four: {same}"
        out.append(case(name, ok, sum(x["replan_s"] for x in rows), max(swapped), detail, per_request=rows))
    return out


def write_lane_loras(models: Path, dcfg) -> list[str]:
    """Two random LoRAs of every block Linear (official lora_down / lora_up names) in <models>/loras."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = models / "loras"
    d.mkdir(exist_ok=True)
    dims = {"self_attn": (dcfg.dim, dcfg.dim), "cross_attn": (dcfg.dim, dcfg.dim)}
    names = []
    for name, rank, seed in (("lane_a.safetensors", 32, 11), ("lane_b.safetensors", 64, 12)):
        items = []
        for b in range(dcfg.num_layers):
            for lin in LINEARS:
                out_f, in_f = dims.get(lin.split(".")[0], (dcfg.ffn_dim, dcfg.dim) if lin == "ffn.0" else (dcfg.dim, dcfg.ffn_dim))
                key = f"diffusion_model.blocks.{b}.{lin}"

                def down(in_f=in_f, rank=rank, s=seed * 1000 + b, dev=dev):
                    g = torch.Generator(dev).manual_seed(s)
                    return (torch.randn(rank, in_f, generator=g, device=dev) / math.sqrt(in_f)).to(torch.bfloat16)

                def up(out_f=out_f, rank=rank, s=seed * 1000 + b + 500, dev=dev):
                    g = torch.Generator(dev).manual_seed(s)
                    return (0.01 * torch.randn(out_f, rank, generator=g, device=dev)).to(torch.bfloat16)

                items += [(f"{key}.lora_down.weight", down, (rank, in_f), torch.bfloat16),
                          (f"{key}.lora_up.weight", up, (out_f, rank), torch.bfloat16)]
        write_safetensors(d / name, items, {"note": "GPU lane: random LoRA"})
        names.append(name)
        say(f"wrote {name}: rank {rank}, {len(items)} tensors, {(d / name).stat().st_size / 2**20:.0f} MiB")
    return names


def part_lora(m: dict, req: dict, work: Path) -> list[dict]:
    from engine.config import DIT_CONFIGS

    key = "14B" if "--task" in m["flags"] else "tiny"
    a, b = write_lane_loras(Path(m["flags"][m["flags"].index("--model_dir") + 1]), DIT_CONFIGS[key])
    sets = [[], [{"name": a, "strength": 1.0}], [{"name": a, "strength": 0.5}],
            [{"name": a, "strength": 1.0}, {"name": b, "strength": 1.0}], []]
    out = []
    for name, flags in (("lora:switch", []), ("lora:switch+swap20", ["--blocks_to_swap", "20"])):
        reqs = [{"raw": dict(req, loras=s, sample_steps=1), "decode": False} for s in sets]
        res, log, wall = gang(name, m["flags"] + flags, reqs, work, timeout=540)
        if len(res) != len(reqs) or not all(r.get("ok") for r in res):
            out.append(case(name, False, wall, 0.0, f"{len(res)} results: " + str([r.get("error") for r in res])
                            + log[-1500:].replace("\n", " | ")))
            continue
        rows = [{"loras": [(x["name"], x["strength"]) for x in s], "switch_s": r["meta"]["loras"].get("seconds", 0.0),
                 "changed": r["meta"]["loras"].get("changed", 0), "restored": r["meta"]["loras"].get("restored", 0),
                 "peak_gib": peak(r), "request_s": round(r["seconds"], 2)} for s, r in zip(sets, res)]
        detail = "; ".join(f"{x['loras'] or 'none'}: switch {x['switch_s']:.2f} s ({x['changed']} merged, "
                           f"{x['restored']} restored), request {x['request_s']:.1f} s, peak {x['peak_gib']:.2f} GiB"
                           for x in rows)
        out.append(case(name, True, max(x["switch_s"] for x in rows), max(x["peak_gib"] for x in rows), detail,
                        per_request=rows))
    return out
