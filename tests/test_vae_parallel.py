"""The patch-parallel VAE decode on 2 and 4 ranks equals the one-rank decode."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.loading import load_vae
from engine.tiny import VAE_FILE
from parallel.vae_parallel import decode_rows, parallel_decode
from tests.multirank import free_port

pytestmark = pytest.mark.multirank


def _worker(rank: int, world: int, port: int, vae_path: str, latents: torch.Tensor, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def gather(obj):
        got = [None] * world if rank == 0 else None
        dist.gather_object(obj, got, dst=0)
        return got

    vae = load_vae(vae_path)
    with torch.no_grad():
        video = parallel_decode(vae, latents, rank, world, gather)
    if rank == 0:
        torch.save(video, out_path)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_decode_equals_one_rank_decode(tiny_model_dir, tmp_path, world):
    vae_path = str(tiny_model_dir / "vae" / VAE_FILE)
    latents = torch.randn(1, 16, 2, 18, 26, generator=torch.Generator().manual_seed(0))  # 208×144, 5 frames
    mp.spawn(_worker, args=(world, free_port(), vae_path, latents, str(tmp_path / "v.pt")), nprocs=world, join=True)
    got = torch.load(tmp_path / "v.pt", weights_only=True)
    with torch.no_grad():
        ref = load_vae(vae_path).decode(latents)
    assert got.shape == ref.shape == (1, 3, 5, 144, 208)
    assert (got - ref).abs().max().item() < 1e-4


def test_more_ranks_than_latent_rows_leaves_empty_slices(tiny_model_dir):
    vae = load_vae(tiny_model_dir / "vae" / VAE_FILE)
    z = torch.randn(1, 16, 1, 2, 4)
    with torch.no_grad():
        parts = [decode_rows(vae, z, r, 4) for r in range(4)]
        ref = vae.decode(z)
    rows = [p for p, (r0, r1) in parts if r1 > r0]
    assert len(rows) == 2
    assert torch.allclose(torch.cat(rows, dim=3), ref, atol=1e-5)
