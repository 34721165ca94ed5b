"""The fused Triton kernels compute what the plain torch ops compute: run in Triton's interpreter on the
CPU (a subprocess, since TRITON_INTERPRET must be set before triton loads), the whole tiny DiT forward
through the kernels against the same forward through torch ops."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.multirank import ROOT, gang_env

SCRIPT = textwrap.dedent('''
    import copy
    import os
    import torch
    from engine import fused
    from engine.checkpoint import cast_to_run_dtype
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

    # the model's dtypes in a bf16 run: bf16 activations, fp32 norm weights (WanDiT.keep_fp32)
    xb, wq = torch.randn(2, 40, 256, generator=g).bfloat16(), 1 + 0.1 * torch.randn(256, generator=g)
    for table in (tab, None):  # self-attention q/k (RoPE) and cross-attention (no RoPE)
        a, b = both(fused.rms_norm_rope, xb, wq, 1e-6, table, 2)
        ref = torch.nn.functional.rms_norm(xb.float(), (256,), wq, 1e-6).view(2, 40, 2, 128)
        if table is not None:
            ref = ref * table[None, :, None, 0] + ref.view(2, 40, 2, 64, 2).flip(-1).view(2, 40, 2, 128) * table[None, :, None, 1]
        # torch rounds the fp32 result to nearest (within half a bf16 ulp, <= 2^-8 relative); the interpreter
        # truncates its fp32 -> bf16 stores (within one ulp of torch's value; the GPU rounds to nearest)
        assert a.dtype == b.dtype == torch.bfloat16
        assert ((b.float() - ref).abs() <= 2**-8 * ref.abs() + 1e-7).all(), ("rms_norm_rope bf16 torch", table is None)
        assert ((a.float() - b.float()).abs() <= 2**-7 * b.float().abs() + 1e-7).all(), ("rms_norm_rope bf16", rel(a, b))
    a, b = both(fused.rms_norm_rope, x, wq, 1e-6, None, 2)
    assert rel(a, b) < 1e-6, ("rms_norm no rope", rel(a, b))
    (xa, ha), (xb2, hb) = both(fused.residual_norm, x, xb, gate, bias, wq, 1e-6, torch.bfloat16, False)
    assert rel(xa, xb2) < 1e-6 and rel(ha, hb) < 1e-2, ("residual_norm fp32 affine weights", rel(ha, hb))
    mb = cast_to_run_dtype(copy.deepcopy(model), torch.bfloat16)
    assert mb.blocks[0].self_attn.norm_q.weight.dtype == torch.float32 and mb.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = both(mb, xin, t, ctx)
        ref = model(xin, t, ctx)
    assert rel(a, b) < 1e-2 and rel(a, ref) < 2e-2, ("bf16 forward", rel(a, b), rel(a, ref))
    print("fused ok", rel(a, b))
''')


def test_fused_kernels_match_torch_ops_in_the_triton_interpreter():
    env = {**gang_env(), "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused ok" in proc.stdout
