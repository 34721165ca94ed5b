"""Regional torch.compile: one graph per block shape, reused by every block and by later requests of the
same size (no recompilation), equal to the eager forward; also with block swap streaming the weights."""

from __future__ import annotations

import torch

from engine.loading import load_dit
from engine.tiny import DIT_FILE
from parallel.offload import apply_offload, plan_offload
from parallel.speed import apply_compile


def test_compiled_blocks_match_eager_and_do_not_recompile(tiny_model_dir):
    torch._dynamo.reset()
    path = tiny_model_dir / "diffusion_models" / DIT_FILE
    eager, compiled = load_dit(path), load_dit(path)
    apply_offload(compiled, plan_offload(compiled.blocks, 1, 0.0), torch.device("cpu"))  # with block swap too
    apply_compile(compiled, "inductor")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 18, 26, generator=g), torch.randn(1, 9, 64, generator=g)
    frames = torch._dynamo.utils.counters["frames"]
    with torch.no_grad():
        for step, t in enumerate((900.0, 500.0, 100.0)):  # three "requests" of the same size
            ref = eager(x, torch.tensor([t]), ctx)
            out = compiled(x, torch.tensor([t]), ctx)
            assert (out - ref).abs().max().item() < 1e-4
            if step == 0:
                compiled_after_first = frames["ok"]
    assert compiled_after_first >= 1
    assert frames["ok"] == compiled_after_first, "a request of the same size recompiled a block"
