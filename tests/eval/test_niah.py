"""Kernel-level needle-in-a-haystack harness."""
import json

from msa.cli import main


def test_niah_grid_finds_the_needle_everywhere(tmp_path):
    path = tmp_path / "niah.json"
    assert main(["niah", "--length", "2k,5k", "--depths", "0,0.5,1", "--device", "cpu",
                 "--no-progress", "--json", str(path)]) == 0
    cells = json.loads(path.read_text())["cells"]
    assert len(cells) == 6
    for c in cells:
        assert c["selected"] == 1.0 and 0.99 <= c["recall"] <= 1.0 + 1e-6
        assert c["cosine"] > 0.99 and c["max_err"] < 1e-4


def test_fp8_cache_keeps_the_needle_and_quantizes_what_it_says():
    import torch
    from msa.eval.niah import as_fp8_cache
    from msa.ops.quant import fake_quantize
    k, v, ki, qi = (torch.randn(300, 2, 64) for _ in range(4))
    k8, v8, ki8, qi8 = as_fp8_cache(k, v, ki, qi, "kv")
    assert torch.equal(ki8, ki) and torch.equal(qi8, qi) and torch.equal(k8, fake_quantize(k))
    assert not torch.equal(k8, k) and torch.equal(v8, fake_quantize(v))
    everything = as_fp8_cache(k, v, ki, qi, "all")      # e4m3 index keys meet e4m3 queries
    assert torch.equal(everything[2], fake_quantize(ki))
    assert torch.equal(everything[3], fake_quantize(qi))
    assert all(torch.equal(a, b) for a, b in zip(as_fp8_cache(k, v, ki, qi, "none"),
                                                 (k, v, ki, qi)))
    assert main(["niah", "--length", "5k", "--depths", "0,1", "--device", "cpu",
                 "--no-progress", "--fp8-cache", "all"]) == 0      # the needle: selected


def test_oracle_mass_is_the_best_selection_under_the_rule():
    """Exhaustive check on a small case: no selection of (local block + K-1 earlier
    blocks per group) holds more dense mass than ``oracle_mass``, and one holds exactly
    that much."""
    import itertools

    import torch

    import msa
    from msa.eval.niah import block_mass, dense_mass, oracle_mass
    from msa.varlen import Segments
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, num_index_heads=2,
                        index_head_dim=64, block_size=64, topk=3)
    g = torch.Generator().manual_seed(0)
    T, probe = 390, 1                            # 7 blocks; the query in block 6
    q, k = torch.randn(probe, 4, 64, generator=g) * 0.4, torch.randn(T, 2, 64, generator=g)
    seg = Segments([0], [probe], [0], [T], probe, T)
    assert torch.allclose(block_mass(q, k, seg, cfg).sum(-1), torch.ones(probe, 4))
    best = oracle_mass(q, k, seg, cfg, num_groups=2)
    found = []
    for pair in itertools.product(itertools.combinations(range(6), 2), repeat=2):
        topk = torch.tensor([[[*pair[h], 6]] * probe for h in range(2)])    # [2, probe, 3]
        found.append(dense_mass(q, k, topk, seg, cfg))
    assert max(found) <= best + 1e-6 and abs(max(found) - best) < 1e-6
    assert best > sorted(found)[len(found) // 2]


def test_mass_helpers_reject_bad_arguments():
    import pytest
    import torch

    import msa
    from msa.eval.niah import best_mass, mass_inside
    from msa.varlen import Segments
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3)
    mass = torch.rand(2, 4, 5)
    seg = Segments([0], [2], [0], [300], 2, 300)
    with pytest.raises(IndexError, match="topk block ids"):
        mass_inside(mass, torch.full((2, 2, 3), 5))
    with pytest.raises(ValueError, match="topk must be"):
        mass_inside(mass, torch.zeros(3, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_groups"):
        best_mass(mass, seg, cfg, num_groups=3)
    with pytest.raises(ValueError, match="mass must be"):
        best_mass(mass[0], seg, cfg, num_groups=2)


def test_m3_indexer_training_loop_runs():
    pytest = __import__("pytest")
    pytest.importorskip("transformers.models.minimax_m3_vl")
    from msa.eval.m3_indexer import run
    points = run(steps=2, length=256, probe=64, eval_every=2, progress=False)
    assert [p.step for p in points] == [0, 2]
    for p in points:
        assert p.eval_kl > 0 and len(p.recall) == 2
        assert all(0 <= r <= b + 1e-6 <= 1 + 1e-6 for r, b in zip(p.recall, p.best))
