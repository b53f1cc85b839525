"""The benchmarks' structured index inputs give local, shared selections with a sink
(msa.bench.selection), measured by ``selection_stats``; CPU, reference indexer."""
import pytest
import torch

import msa
from msa.bench.selection import inputs, selection_stats


def test_stats_of_a_known_selection():
    # 2 heads, 3 queries at block 40 (block size 1 here: query t's own block is t)
    topk = torch.tensor([[[0, 40, 39, 1], [0, 41, 40, 2], [5, 42, 41, 3]],
                         [[40, 10, 11, 12], [41, 10, 11, 12], [42, 10, 11, -1]]])
    T = 43
    full = torch.full((2, T, 4), -1, dtype=torch.int64)
    full[:, 40:] = topk
    s = selection_stats(full, block_size=1, near=2)
    near = 2 + 2 + 2 + 1 + 1 + 1        # ids within 2 blocks of their query, own included
    assert s["selection_near_share"] == pytest.approx(near / (12 + 11))
    assert s["selection_sink_share"] == pytest.approx(2 / 5)    # rows with block 0, of 5 full
    # next-query pairs with both rows full: (40,41) and (41,42) of head 0, (40,41) of head 1
    assert s["selection_next_query_share"] == pytest.approx((2 + 1 + 3) / (3 * 4))


def test_structured_selection_is_local_shared_and_has_a_sink():
    cfg = msa.MSAConfig(num_heads=2, num_kv_heads=1, head_dim=64, num_index_heads=1,
                        index_head_dim=128, block_size=128, topk=16)
    T = 16384
    cu = torch.tensor([0, T], dtype=torch.int32)
    stats = {}
    for selection in ("random", "structured"):
        _, _, _, qi, ki = inputs(T, cfg, seed=0, selection=selection, device="cpu")
        assert qi.shape == (T, 1, 128) and ki.shape == (T, 1, 128)
        topk = msa.msa_indexer(qi.float(), ki.float(), cu, cu, block_size=128, topk=16,
                               backend="reference")
        stats[selection] = selection_stats(topk, 128)
    r, s = stats["random"], stats["structured"]
    assert s["selection_near_share"] > r["selection_near_share"] + 0.2
    assert s["selection_sink_share"] > max(0.5, 2 * r["selection_sink_share"])
    assert s["selection_next_query_share"] > max(0.8, r["selection_next_query_share"] + 0.3)


def test_unknown_selection_is_refused():
    cfg = msa.MSAConfig(num_heads=2, num_kv_heads=1, head_dim=64, num_index_heads=1,
                        index_head_dim=64)
    with pytest.raises(ValueError, match="selection must be one of"):
        inputs(256, cfg, selection="local", device="cpu")


def test_union_blocks_per_selected_block_counts_each_tile_once():
    from msa.ops.plan import blocks_per_selected_block
    same = torch.tensor([[[0, 3, -1], [3, 0, -1], [0, 3, -1], [-1, 3, 0]]])
    assert blocks_per_selected_block(same, 4) == 1.0      # one union of 2 blocks
    apart = torch.tensor([[[0, 1], [2, 3], [4, 5], [6, 7], [9, 9]]])
    assert blocks_per_selected_block(apart, 2) == 2.0     # the 5th row: partial tile
    assert blocks_per_selected_block(apart[:, :4], 1) == 1.0
    # a sample of every other tile: the first (shared, 1.0) and third (apart, 2.0)
    mixed = torch.tensor([[[0, 1], [0, 1], [5, 6], [7, 8], [2, 3], [4, 9]]])
    assert blocks_per_selected_block(mixed, 2, every=2) == 1.5
    assert blocks_per_selected_block(torch.full((2, 4, 3), -1), 2) == 0.0   # none selected
