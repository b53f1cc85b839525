"""Context parallelism: 2 CPU processes (gloo) equal single-process MSA, forward and
backward (main branch and indexer KL)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import msa
from msa.distributed import context_parallel_msa, zigzag_shard

CFG = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3,
                    kl_loss_coeff=0.5)
T = 512


def _inputs():
    g = torch.Generator().manual_seed(0)
    shapes = ((4, 64), (2, 64), (2, 64), (2, 64), (1, 64))
    return [torch.randn(T, *s, generator=g, dtype=torch.float64) for s in shapes]


def _worker(rank, world, init_file, mode, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        full = _inputs()
        local = [zigzag_shard(x, world, rank).clone().requires_grad_(True) for x in full]
        out = context_parallel_msa(*local, config=CFG, mode=mode)
        dout = zigzag_shard(torch.linspace(-1, 1, out.numel() * world, dtype=out.dtype)
                            .view(T, *out.shape[1:]), world, rank)
        out.backward(dout)
        torch.save([out.detach()] + [x.grad for x in local],
                   os.path.join(result_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_two_ranks_equal_single_process(tmp_path, mode):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), mode, str(tmp_path)),
             nprocs=world, join=True)
    full = [x.clone().requires_grad_(True) for x in _inputs()]
    out = msa.msa_attention(*full, config=CFG, mode=mode,
                            cu_seqlens_q=torch.tensor([0, T]), cu_seqlens_k=torch.tensor([0, T]))
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    out.backward(dout)
    ref = [out.detach()] + [x.grad for x in full]
    for rank in range(world):
        got = torch.load(tmp_path / f"r{rank}.pt")
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, zigzag_shard(r, world, rank), rtol=1e-9, atol=1e-12)
