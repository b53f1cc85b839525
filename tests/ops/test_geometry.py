"""Segment geometry on the device (msa.ops.geometry): block rows, query tiles, the cache."""
import pytest
import torch

from msa.ops import geometry as G
from msa.ops.geometry import block_rows
from tests.helpers.brute import make_case


def test_block_rows_geometry():
    """Per-query and per-row arrays built on the device match the segment arithmetic."""
    c = make_case((33, 0, 1, 50), (200, 64, 65, 300), hq=4, hkv=2,
                  fragment_indices=(0, 1, 1, 3), seed=5)
    seg = c["seg"]
    rows = block_rows(seg, 64, "cpu")
    pos, nblk, rowbase, kbase, krow, t0, nk = [], [], [], [], [], [], []
    base = 0
    for b in range(seg.num_segments):
        nb = seg.num_blocks(b, 64)
        for i in range(seg.q_len[b]):
            pos.append(seg.k_len[b] - seg.q_len[b] + i)
            nblk.append(nb), rowbase.append(base), kbase.append(seg.k_base[b])
        for L in range(nb):
            krow.append(seg.k_base[b] + 64 * L), t0.append(64 * L)
            nk.append(min(64, seg.k_len[b] - 64 * L))
        base += nb
    assert rows.total_rows == base == len(krow)
    for got, want in [(rows.q_pos, pos), (rows.q_nblocks, nblk), (rows.q_rowbase, rowbase),
                      (rows.q_kbase, kbase), (rows.row_krow, krow), (rows.row_t0, t0),
                      (rows.row_nk, nk)]:
        assert got.tolist() == want


def test_geometry_is_built_once_per_layout(monkeypatch):
    """``block_rows`` and ``query_tiles`` of a layout seen before return what was built
    then (equal segments, another object: every layer of a model); another layout, block
    size or tile, and the least recently used past ``GEOMETRY_CACHE_SIZE``, build anew."""
    from msa.varlen import Segments
    monkeypatch.setattr(G, "_GEOMETRY", type(G._GEOMETRY)())
    built = []
    real = G._build_rows
    monkeypatch.setattr(G, "_build_rows", lambda *a: built.append(a[1]) or real(*a))

    def seg(n):
        return Segments([0, n], [n, 7], [0, n], [n, 9], n + 7, n + 9)
    r = block_rows(seg(40), 16, "cpu")
    assert block_rows(seg(40), 16, "cpu") is r and built == [16]
    assert block_rows(seg(41), 16, "cpu") is not r and block_rows(seg(40), 32, "cpu") is not r
    assert G.query_tiles(seg(40), 4, "cpu") is G.query_tiles(seg(40), 4, "cpu")
    assert G.query_tiles(seg(40), 4, "cpu") is not G.query_tiles(seg(40), 8, "cpu")
    for n in range(G.GEOMETRY_CACHE_SIZE):
        block_rows(seg(100 + n), 16, "cpu")
    assert len(G._GEOMETRY) == G.GEOMETRY_CACHE_SIZE
    built.clear()
    assert block_rows(seg(40), 16, "cpu") is not r and built == [16]
    assert block_rows(seg(100 + G.GEOMETRY_CACHE_SIZE - 1), 16, "cpu") is not None and \
        built == [16]
    with torch.inference_mode():                   # first seen under inference mode
        first = block_rows(seg(7), 16, "cpu")
    assert not first.q_pos.is_inference() and block_rows(seg(7), 16, "cpu") is first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA graphs")
def test_geometry_is_not_remembered_while_a_graph_is_captured(monkeypatch):
    """Inside a capture ``block_rows`` builds its own tensors (the graph's memory, written
    on replay) and leaves the cache as it was; replayed, they hold the geometry."""
    from msa.varlen import Segments
    monkeypatch.setattr(G, "_GEOMETRY", type(G._GEOMETRY)())
    seg = Segments([0], [300], [0], [300], 300, 300)
    eager = block_rows(seg, 64, "cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            captured = block_rows(seg, 64, "cuda")
    assert captured is not eager and list(G._GEOMETRY.values()) == [eager]
    graph.replay()
    torch.cuda.synchronize()
    assert captured.q_pos.tolist() == eager.q_pos.tolist() == list(range(300))
