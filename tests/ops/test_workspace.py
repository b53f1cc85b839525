"""Chunk and item sizes of the KV-outer kernels (msa.ops.workspace)."""
import pytest
import torch

from msa.ops import workspace as W
from tests.helpers.brute import make_case


def test_item_queries_hold_the_same_rows_at_every_group():
    """``q_per_item`` per GQA group: 4096 (query, head) rows, at least 256 queries."""
    assert [W.item_queries(g) for g in (1, 4, 6, 8, 16, 64)] == \
        [4096, 1024, 682, 512, 256, 256]


def test_workspace_scale_multiplies_the_chunks_and_the_items(monkeypatch):
    """``MSA_WORKSPACE_SCALE`` multiplies every per-chunk budget and ``ITEM_ROWS``."""
    def sizes():
        return (W.forward_chunk(64, 128, 2, 16), W.backward_chunk(64, 128, 2, 16, 1),
                W.kl_chunk(4, 128, 16, False, 128), W.kl_chunk(4, 128, 16, True, 128),
                W.lse_chunk(4, 16), W.item_queries(16))
    monkeypatch.delenv("MSA_WORKSPACE_SCALE", raising=False)
    base = sizes()
    assert base[-1] == 256
    monkeypatch.setenv("MSA_WORKSPACE_SCALE", "2")
    for b, s in zip(base, sizes()):
        assert s in (2 * b, 2 * b + 1)


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "two", ""])
def test_workspace_scale_rejects_what_is_not_a_positive_number(monkeypatch, raw):
    monkeypatch.setenv("MSA_WORKSPACE_SCALE", raw)
    with pytest.raises(ValueError, match="MSA_WORKSPACE_SCALE must be a positive number"):
        W.forward_chunk(64, 128, 2, 16)


@pytest.mark.slow
def test_a_small_workspace_trains_as_the_default(monkeypatch):
    """A training step planned in chunks of 6 queries (a tiny ``MSA_WORKSPACE_SCALE``)
    gives the loss and the five gradients of the default's single chunk."""
    import msa
    from msa.ops import plan as P
    from tests.ops.kl.test_deferred import step
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=1, head_dim=64, num_index_heads=1,
                        index_head_dim=64, block_size=64, topk=2, kl_loss_coeff=0.5)
    c = make_case((40, 30), (100, 130), hq=4, hkv=1, hi=1, seed=5)
    monkeypatch.delenv("MSA_WORKSPACE_SCALE", raising=False)
    want = step(c, cfg)
    monkeypatch.setenv("MSA_WORKSPACE_SCALE", "5e-6")
    assert W.kl_chunk(1, 64, 2, False, 64) == 6
    planned = []
    real = P.queue_chunks

    def queue_chunks(*args):
        queued = real(*args)
        planned.append(queued.ends.shape[1])
        return queued
    monkeypatch.setattr(P, "queue_chunks", queue_chunks)
    got = step(c, cfg)
    assert planned and all(n == 12 for n in planned)      # 70 queries in chunks of 6
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dqi", "dki"), got, want):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
