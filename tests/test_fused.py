"""The fused Triton kernels compute what the plain torch ops compute: run in Triton's interpreter on the
CPU (a subprocess, since TRITON_INTERPRET must be set before triton loads), the whole tiny DiT forward
through the kernels against the same forward through torch ops."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.multirank import ROOT, gang_env

SCRIPT = textwrap.dedent('''
    import os
    import torch
    from engine import fused
    from engine.config import DiTConfig
    from engine.dit import WanDiT, rope_table
    from tests.weights import random_state_dict

    g = torch.Generator().manual_seed(0)
    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()
    def both(fn, *args):
        os.environ["WAN_FUSED"] = "interpret"
        a = fn(*args)
        os.environ["WAN_FUSED"] = "0"
        return a, fn(*args)

    x = torch.randn(2, 40, 256, generator=g)
    shift, scale = torch.randn(2, 1, 256, generator=g), torch.randn(2, 1, 256, generator=g)
    a, b = both(fused.modulate, x, shift, scale, 1e-6, torch.float32)
    assert rel(a, b) < 1e-6, ("modulate", rel(a, b))
    a, b = both(fused.modulate, x, shift, scale, 1e-6, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and rel(a, b) < 1e-2, ("modulate bf16", rel(a, b))
    w, bias = torch.randn(256, generator=g), torch.randn(256, generator=g)
    a, b = both(fused.affine_norm, x, w, bias, 1e-6, torch.float32)
    assert rel(a, b) < 1e-6, ("affine_norm", rel(a, b))
    tab = rope_table((2, 4, 5), 128, torch.device("cpu"))
    a, b = both(fused.rms_norm_rope, x, w, 1e-6, tab, 2)
    assert a.shape == (2, 40, 2, 128) and rel(a, b) < 1e-6, ("rms_norm_rope", rel(a, b))
    y, gate = torch.randn(2, 40, 256, generator=g).bfloat16(), torch.randn(2, 1, 256, generator=g)
    a, b = both(fused.gated_residual, x, y, gate)
    assert rel(a, b) < 1e-6, ("gated_residual", rel(a, b))
    a, b = both(fused.gated_residual, x, y, None)
    assert rel(a, b) < 1e-6, ("residual", rel(a, b))
    sh, sc = torch.randn(2, 1, 256, generator=g), torch.randn(2, 1, 256, generator=g)
    for gt, a_, b_, one_plus in [(gate, sh, sc, True), (None, sh, sc, True), (gate, bias, w, False)]:
        (xa, ha), (xb, hb) = both(fused.residual_norm, x, y, gt, a_, b_, 1e-6, torch.bfloat16, one_plus)
        assert rel(xa, xb) < 1e-6 and ha.dtype == torch.bfloat16 and rel(ha, hb) < 1e-2, ("residual_norm", one_plus)
        xr = x + y.float() * (gt if gt is not None else 1)
        ln = torch.nn.functional.layer_norm(xr, (256,), eps=1e-6)
        ref = ln * (1 + b_) + a_ if one_plus else ln * b_ + a_
        assert rel(xa, xr) < 1e-6 and rel(ha, ref) < 1e-2, ("residual_norm vs formula", rel(ha, ref))
    x3 = torch.randn(1, 40, 384, generator=g)  # dim not a power of two: masked pairs
    a, b = both(fused.rms_norm_rope, x3, torch.randn(384, generator=g), 1e-6, tab, 3)
    assert rel(a, b) < 1e-6, ("rms_norm_rope 384", rel(a, b))

    model = WanDiT(DiTConfig(dim=256, ffn_dim=512, num_layers=2, text_dim=64))
    model.load_state_dict(random_state_dict(model, seed=1))
    xin, t, ctx = torch.randn(1, 16, 2, 8, 10, generator=g), torch.tensor([700.0]), torch.randn(1, 7, 64, generator=g)
    with torch.no_grad():
        a, b = both(model, xin, t, ctx)
    assert rel(a, b) < 1e-5, ("forward", rel(a, b))
    print("fused ok", rel(a, b))
''')


def test_fused_kernels_match_torch_ops_in_the_triton_interpreter():
    env = {**gang_env(), "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused ok" in proc.stdout
