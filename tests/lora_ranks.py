"""Driver for the 2-rank FSDP LoRA test, run under torchrun (gloo on CPU): every rank shards the same random
small DiT, applies, switches and removes LoRAs on its own rows; rank 0 saves the outputs.

    python -m torch.distributed.run --nproc_per_node 2 tests/lora_ranks.py A.safetensors B.safetensors OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(pa: str, pb: str, out: str) -> int:
    import torch
    import torch.distributed as dist

    from engine.dit import WanDiT
    from parallel.fsdp import apply_fsdp, flat_mesh
    from parallel.lora import apply_loras
    from tests.lora_util import SMALL, fresh, run
    from tests.weights import random_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    with torch.device("meta"):
        meta = WanDiT(SMALL)
    sd = random_state_dict(meta, seed=1)
    model = fresh(sd)
    apply_fsdp(model, model.blocks, flat_mesh(torch.device("cpu"), dist.get_world_size()))
    from torch.distributed.tensor import DTensor, Shard

    q = model.blocks[0].self_attn.q.weight
    assert isinstance(q, DTensor) and tuple(q.placements) == (Shard(0),) and q.to_local().shape[0] == 256 // 2
    run(model)
    results = {}
    for name, loras in (("merged", [(pa, 0.7), (pb, -1.0)]), ("switched", [(pb, 0.25)]), ("removed", [])):
        apply_loras(model, loras)
        results[name] = run(model)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
