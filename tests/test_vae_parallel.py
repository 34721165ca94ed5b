"""The patch-parallel VAE decode on 2 and 4 ranks equals the one-rank decode, untiled and tiled (--vae_tiling).

The frame is tall (62 latent rows) and narrow (4 columns), so that every rank's window (its rows widened by
the 13-row halo of the tiny VAE) is well inside the frame: a halo too small or a slice put in the wrong
place changes rows next to the cuts. The decode runs in float64, where a correct halo reproduces the
one-rank decode to rounding (measured: < 1e-14; each slice cut with a halo of 11 rows instead of 13: 1.6e-9),
so the tolerance can be tight; float32 convolutions of different extents already differ by ~3e-6 (a halo
short by 5 rows: 3e-5).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.loading import load_vae
from engine.tiny import VAE_FILE
from engine.vae import split_spans
from parallel.vae_parallel import decode_rows, parallel_decode

pytestmark = pytest.mark.multirank

ROWS, COLS = 62, 4  # latent rows × columns: 496 × 32 px; 2 latent frames → 5 video frames
TILE = (12, 3)  # the worker's --vae_tiling tile (engine.vae.DEFAULT_TILE there): each slice is cut in tiles
TOL = 1e-12  # float64


def _latents() -> torch.Tensor:
    """float32 values held in float64 (the serving loop hands the decode float32 latents)."""
    return torch.randn(1, 16, 2, ROWS, COLS, generator=torch.Generator().manual_seed(0)).double()


def _worker(rank: int, world: int, init: str, vae_path: str, latents: torch.Tensor, out_path: str) -> None:
    """One rank: the bare parallel_decode, then the serving loop's decode with --vae_tiling (Server._decode)."""
    import engine.vae
    from engine.cli import RunConfig
    from engine.pipeline import GenerationResult
    from engine.request import GenerationRequest
    from parallel.runtime import Runtime
    from parallel.serve import Server, StepAgreement

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rt = Runtime(rank, world, rank, world, torch.device("cpu"), control=dist.group.WORLD, compute=dist.group.WORLD)
    vae = load_vae(vae_path, dtype=torch.float64)
    calls = []
    decode_tail = vae.decode_tail

    def counted(feats, region=None, out=None):
        calls.append(region)
        return decode_tail(feats, region, out)

    vae.decode_tail = counted
    with torch.no_grad():
        untiled = parallel_decode(vae, latents, rank, world, rt.gather_object)
        untiled_calls = len(calls)
        engine.vae.DEFAULT_TILE = TILE  # what --vae_tiling (tile=True) decodes with, here
        cfg = RunConfig(vae_tiling=True)
        server = Server(cfg, rt, SimpleNamespace(vae=vae, dit=None), SimpleNamespace(parallel_vae=True, dit_fsdp=False))
        result = GenerationResult(GenerationRequest(prompt="x"), latents.float())
        server._decode(result, StepAgreement(rt, None, None, None))
    counts = rt.gather_object((untiled_calls, len(calls) - untiled_calls))
    if rank == 0:
        torch.save({"untiled": untiled, "tiled": result.video, "calls": counts}, out_path)
    dist.destroy_process_group()
    from parallel.runtime import exit_process

    exit_process(0)  # as every rank of the server does: gloo's threads can abort at interpreter teardown


@pytest.fixture(scope="module")
def vae_path(tiny_model_dir) -> str:
    return str(tiny_model_dir / "vae" / VAE_FILE)


@pytest.fixture(scope="module")
def one_rank(vae_path) -> torch.Tensor:
    with torch.no_grad():
        return load_vae(vae_path, dtype=torch.float64).decode(_latents())


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def decoded(request, vae_path, tmp_path_factory) -> dict:
    world, tmp = request.param, tmp_path_factory.mktemp(f"vae{request.param}")
    init = f"file://{tmp / 'rendezvous'}"  # a file store: no port to pick
    mp.spawn(_worker, args=(world, init, vae_path, _latents(), str(tmp / "v.pt")), nprocs=world, join=True)
    return {"world": world, **torch.load(tmp / "v.pt", weights_only=True)}


def _spans(world: int) -> list[tuple[int, int]]:
    return split_spans(ROWS, -(-ROWS // world))


def test_parallel_decode_equals_one_rank_decode(decoded, one_rank, vae_path):
    world, halo = decoded["world"], load_vae(vae_path).tail_halo
    spans = _spans(world)
    windows = [(max(0, r0 - halo), min(ROWS, r1 + halo)) for r0, r1 in spans]
    assert len(spans) == world and all(b - a <= 0.75 * ROWS for a, b in windows), windows  # the halo matters
    got = decoded["untiled"]
    assert got.dtype == torch.float64 and got.shape == one_rank.shape == (1, 3, 5, 8 * ROWS, 8 * COLS)
    assert (got - one_rank).abs().max().item() < TOL
    assert [untiled for untiled, _ in decoded["calls"]] == [1] * world  # one slice per rank


def test_tiled_parallel_decode_equals_untiled_one_rank_decode(decoded, one_rank):
    world, got = decoded["world"], decoded["tiled"]
    assert got.shape == one_rank.shape
    assert (got - one_rank).abs().max().item() < TOL
    tiles = [len(split_spans(r1 - r0, TILE[0])) * len(split_spans(COLS, TILE[1])) for r0, r1 in _spans(world)]
    assert all(t >= 4 for t in tiles)  # several tiles per slice: tiling was applied on every rank
    assert [tiled for _, tiled in decoded["calls"]] == tiles


def test_more_ranks_than_latent_rows_leaves_empty_slices(vae_path):
    vae = load_vae(vae_path)
    z = torch.randn(1, 16, 1, 2, 4)
    with torch.no_grad():
        parts = [decode_rows(vae, z, r, 4) for r in range(4)]
        ref = vae.decode(z)
    rows = [p for p, (r0, r1) in parts if r1 > r0]
    assert len(rows) == 2
    assert torch.allclose(torch.cat(rows, dim=3), ref, atol=1e-5)
