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


def _worker(rank, world, init_file, mode, result_dir, docs):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        full = _inputs()
        local = [zigzag_shard(x, world, rank).clone().requires_grad_(True) for x in full]
        out = context_parallel_msa(*local, config=CFG, mode=mode,
                                   cu_seqlens=None if docs is None else torch.tensor(docs))
        dout = zigzag_shard(torch.linspace(-1, 1, out.numel() * world, dtype=out.dtype)
                            .view(T, *out.shape[1:]), world, rank)
        out.backward(dout)
        torch.save([out.detach()] + [x.grad for x in local],
                   os.path.join(result_dir, f"r{rank}.pt"))
        dist.barrier()      # no rank tears its connections down while the other's last
                            # transfer is in flight (gloo aborts the process then)
    finally:
        dist.destroy_process_group()


# packed documents: one crossing from rank 1's first chunk into its second, a 1-token
# document, documents ending exactly at and short of chunk boundaries (chunks of 128)
DOCS = [0, 100, 101, 300, 384, 450, 512]


@pytest.mark.parametrize("mode,docs", [("sparse", None), ("dense", None), ("sparse", DOCS)],
                         ids=["sparse", "dense", "sparse-packed-docs"])
def test_two_ranks_equal_single_process(tmp_path, mode, docs):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), mode, str(tmp_path), docs),
             nprocs=world, join=True)
    full = [x.clone().requires_grad_(True) for x in _inputs()]
    cu = torch.tensor(docs or [0, T])
    out = msa.msa_attention(*full, config=CFG, mode=mode, cu_seqlens_q=cu, cu_seqlens_k=cu)
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    out.backward(dout)
    ref = [out.detach()] + [x.grad for x in full]
    for rank in range(world):
        got = torch.load(tmp_path / f"r{rank}.pt")
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, zigzag_shard(r, world, rank), rtol=1e-9, atol=1e-12)


def test_local_segments_share_each_document_prefix():
    from msa.distributed import local_segments
    # rank 1 of 2 holds chunks 1 and 2 ([128, 256), [256, 384)); document [101, 300)
    # spans both: one packed prefix, two fragments
    cu_q, cu_k, frag, ranges = local_segments(512, 2, 1, [0, 100, 101, 300, 512])
    assert ranges == [(101, 300), (300, 384)]
    assert cu_q == [0, 128, 172, 256] and cu_k == [0, 155, 199, 283] and frag == [0, 0, 2]


def test_bad_document_boundaries_are_rejected():
    import torch.distributed as dist_mod
    from unittest import mock
    local = [x[:256] for x in _inputs()]
    with mock.patch.object(dist_mod, "get_world_size", return_value=2), \
            mock.patch.object(dist_mod, "get_rank", return_value=0):
        with pytest.raises(ValueError, match="cu_seqlens"):
            context_parallel_msa(*local, config=CFG, cu_seqlens=torch.tensor([0, 300, 200, 512]))
        with pytest.raises(ValueError, match="cu_seqlens"):
            context_parallel_msa(*local, config=CFG, cu_seqlens=torch.tensor([0, 500]))
        with pytest.raises(TypeError, match="config must be an msa.MSAConfig"):
            context_parallel_msa(*local, config=CFG.__dict__)


@pytest.mark.parametrize("seed", range(6))
def test_local_segments_see_exactly_their_document_prefix(seed):
    """Every local query reaches, through cu_q / cu_k / fragments / packed ranges, exactly
    the global keys of its own document up to itself."""
    from msa.distributed import local_segments, zigzag_chunks
    g = torch.Generator().manual_seed(seed)
    world = int(torch.randint(1, 5, (1,), generator=g))
    total = 2 * world * int(torch.randint(1, 40, (1,), generator=g))
    cuts = torch.randperm(total - 1, generator=g)[:int(torch.randint(0, 8, (1,), generator=g))]
    bounds = [0] + sorted(int(c) + 1 for c in cuts) + [total]
    c = total // (2 * world)
    for rank in range(world):
        cu_q, cu_k, frag, ranges = local_segments(total, world, rank, bounds)
        packed = [r for a, b in ranges for r in range(a, b)]           # packed row -> global
        local_global = [t for ch in zigzag_chunks(world, rank)
                        for t in range(ch * c, ch * c + c)]
        assert cu_q[-1] == len(local_global) and cu_k[-1] == len(packed)
        for s in range(len(frag)):
            base, end = cu_k[frag[s]], cu_k[s + 1]
            for i in range(cu_q[s], cu_q[s + 1]):
                pos = end - base - (cu_q[s + 1] - cu_q[s]) + (i - cu_q[s])
                seen = packed[base:base + pos + 1]
                gq = local_global[i]
                doc0 = max(b for b in bounds if b <= gq)
                assert seen == list(range(doc0, gq + 1)), (world, rank, s, i)
