"""The two-pass FP8 scan (``msa.ops.indexer.two_pass``): the selection kernel against a
sort of the stored block maxima (ties, NaN, -0, rows past their bucket capacity), the
block-maxima kernel against fp64 sums of the same e4m3 operands, and the whole FP8
indexer on the two-pass scan against the FP8 reference."""
import pytest
import torch

from msa.ops.indexer.naive import rank_scores
from msa.ops.geometry import query_tiles
from msa.varlen import cu_seqlens_from_lengths, make_segments
from tests.helpers import DEVICE

pytest.importorskip("triton")
from msa.ops.indexer import two_pass  # noqa: E402


def _segments(q_lens, k_lens):
    return make_segments(sum(q_lens), sum(k_lens), cu_seqlens_from_lengths(q_lens),
                         cu_seqlens_from_lengths(k_lens))


def _expected(maxb, seg, block, block_t, hi, topk):
    """Rows ``[hi, total_q, topk]`` from the block maxima ``maxb [blocks, rows]`` of the
    tiles in ``query_tiles`` order, by sorting: score desc, id asc (the reference's
    ``rank_scores``: NaN as the most negative fp16, -0 as +0)."""
    q0s, ns, _, offs = (t.tolist() for t in query_tiles(seg, block_t, "cpu"))
    out = torch.full((hi, seg.total_q, topk), -1, dtype=torch.int32)
    for t, (q0, n, off) in enumerate(zip(q0s, ns, offs)):
        for tok in range(n):
            local = (off + tok) // block
            for h in range(hi):
                col = (t * block_t + tok) * hi + h
                vals = rank_scores(maxb[:local, col]).double().tolist()
                order = sorted(range(local), key=lambda b: (-vals[b], b))
                kept = order[:topk - 1]
                out[h, q0 + tok, :len(kept)] = torch.tensor(kept, dtype=torch.int32)
                out[h, q0 + tok, min(local, topk - 1)] = local
    return out


def _group_maxima(maxb):
    """What ``block_max_kernel`` stores as group maxima: the largest of each whole group
    of ``GROUP`` blocks, NaN as -65504."""
    g = two_pass.GROUP
    whole = maxb[:maxb.shape[0] // g * g].float()
    whole = torch.where(whole.isnan(), -65504.0, whole)
    return whole.view(-1, g, maxb.shape[1]).amax(1).half()


def _select(maxb, seg, block, block_t, hi, topk):
    tiles = [t.to(DEVICE) for t in query_tiles(seg, block_t, "cpu")]
    out = torch.full((hi, seg.total_q, topk), -1, dtype=torch.int32, device=DEVICE)
    two_pass.select(maxb.to(DEVICE).contiguous(), _group_maxima(maxb).to(DEVICE).contiguous(),
                    maxb.shape[1], tiles, out, block_size=block, block_t=block_t)
    return out.cpu()


def _maxb(seg, block, block_t, hi, gen, values):
    ntiles = query_tiles(seg, block_t, "cpu")[0].numel()
    nblk = max(seg.k_len) // block
    return values[torch.randint(len(values), (nblk, ntiles * block_t * hi),
                                generator=gen)].half()


@pytest.mark.parametrize("q_lens,k_lens,block,topk,block_t,hi", [
    ((5, 9), (700, 40), 8, 8, 4, 2),    # a short segment: rows with fewer blocks than topk
    ((6,), (1100, ), 4, 32, 4, 2),      # the FP8 scan's 31 ranked blocks
    ((70,), (900,), 8, 6, 32, 2),       # a tile's 64 rows over four programs
])
def test_selection_sorts_the_stored_maxima(q_lens, k_lens, block, topk, block_t, hi):
    """Heavy ties (eight distinct values), NaN, -0 and +0, -inf: the kept blocks and
    their order equal a sort by (score desc, id asc), NaN as -65504, -0 as +0."""
    gen = torch.Generator().manual_seed(len(q_lens) + topk)
    seg = _segments(q_lens, k_lens)
    values = torch.tensor([float("nan"), -0.0, 0.0, float("-inf"), -65504.0, -1.5, 2.0, 2.0])
    maxb = _maxb(seg, block, block_t, hi, gen, values)
    got = _select(maxb, seg, block, block_t, hi, topk)
    assert torch.equal(got, _expected(maxb, seg, block, block_t, hi, topk))


def test_selection_raises_its_threshold_when_candidates_overflow():
    """All high scores in one bucket (block ids = 0 mod 64): the first threshold admits
    every one of them, more than the 64 slots, and the kernel must tighten it."""
    gen = torch.Generator().manual_seed(5)
    block, block_t, hi, topk = 2, 2, 1, 32
    seg = _segments((3,), (64 * 100 * block,))
    maxb = (torch.randn(64 * 100, 4, generator=gen) - 10).half()        # 2 tiles x 2 rows
    maxb[::64] = (torch.rand(100, 4, generator=gen) * 100 + 10).half()
    got = _select(maxb, seg, block, block_t, hi, topk)
    want = _expected(maxb, seg, block, block_t, hi, topk)
    assert torch.equal(got, want)
    assert (want[0, :, :topk - 1] % 64 == 0).all()       # the overflowing bucket won


def test_selection_tightens_within_the_listed_groups():
    """40 groups of near-tied high blocks (two values): the groups reaching the first
    threshold fit the group list, the blocks in them do not fit the slots, and the
    threshold is tightened over the listed groups."""
    gen = torch.Generator().manual_seed(6)
    block, block_t, hi, topk = 2, 2, 1, 32
    seg = _segments((3,), (64 * 100 * block,))
    maxb = (torch.randn(64 * 100, 4, generator=gen) - 10).half()
    high = 40 * two_pass.GROUP
    maxb[:high] = torch.tensor([50.0, 50.5])[torch.randint(2, (high, 4), generator=gen)]
    got = _select(maxb, seg, block, block_t, hi, topk)
    want = _expected(maxb, seg, block, block_t, hi, topk)
    assert torch.equal(got, want)
    assert (want[0, :, :topk - 1] < high).all()


def test_selection_reading_every_block_counts_each_once():
    """High blocks in 8 of the 64 buckets only (ids = 0 mod 64): the first threshold is
    low, more groups reach it than the group list holds, and every block is read one by
    one; the best blocks sit right after the whole groups, where that read and the read
    of the tail meet (6416 is not a multiple of 64)."""
    gen = torch.Generator().manual_seed(7)
    block, block_t, hi, topk = 2, 2, 1, 32
    seg = _segments((3,), (6420 * block,))                # tail = 6416
    maxb = (torch.randn(6420, 4, generator=gen) - 10).half()
    maxb[:6400:64] = (torch.rand(100, 4, generator=gen) * 100 + 10).half()
    maxb[6416:6420] = 200.0
    got = _select(maxb, seg, block, block_t, hi, topk)
    want = _expected(maxb, seg, block, block_t, hi, topk)
    assert torch.equal(got, want)
    assert (want[0, 1:, :3] >= 6416).all()


def test_key_blocks_quantize_each_block_of_each_key_base_once():
    """``key_blocks``: fragment chain ``[0, 1, 0]`` (segment 2 reads segment 0's and 1's
    keys from base 0, segment 1 its own from base 40: two block layouts of the same keys),
    each base's keys copied to whole blocks, zero padded, quantized with its block's
    ``max|k| / bound``; an all-zero block gets scale 0 and leaves the others' normaliser
    alone."""
    from msa.ops.quant import E4M3
    gen = torch.Generator().manual_seed(5)
    block, bound = 16, 16.0
    seg = make_segments(9, 100, cu_seqlens_from_lengths((3, 3, 3)),
                        cu_seqlens_from_lengths((40, 25, 35)),
                        fragment_indices=torch.tensor([0, 1, 0], dtype=torch.int32))
    assert seg.k_base == [0, 40, 0] and seg.k_len == [40, 25, 100]
    ki = torch.randn(100, 8, generator=gen) * torch.rand(100, 1, generator=gen) * 3
    ki[16:32] = 0.0                                       # block 1 of base 0
    k8, ks16, moved = two_pass.key_blocks(ki.to(DEVICE), seg, block, bound)
    k8, ks16 = k8.cpu(), ks16.cpu()
    assert moved.k_base == [0, 112, 0] and moved.k_len == seg.k_len
    assert k8.shape == (112 + 32, 8) and ks16.shape == (9,)
    want_scale = []
    for base, new, ext in ((0, 0, 100), (40, 112, 25)):
        for b in range(-(-ext // block)):
            keys = ki[base + b * block:base + min((b + 1) * block, ext)]
            amax = keys.abs().amax().item()
            scale = amax / bound if amax > 0 else 1.0
            rows = k8[new + b * block:new + (b + 1) * block].float()
            want = (keys / torch.tensor(scale)).clamp(-bound, bound).to(E4M3).float()
            assert torch.equal(rows[:len(keys)], want), (base, b)
            assert not rows[len(keys):].any()             # padding
            want_scale.append(scale if amax > 0 else 0.0)
    want16 = (torch.tensor(want_scale) / max(want_scale)).half()
    assert want16[1] == 0 and torch.equal(ks16, want16)


def test_block_maxima_are_the_fp16_sums_of_the_e4m3_operands():
    """Each stored maximum within the fp16 rounding of its exact value (fp64 sums of the
    same e4m3 products times the fp16 block scale): ``Di`` roundings of the running sum,
    one of the scale product, one of the stored value. Segments of 300 and 150 keys: the
    second's blocks start mid-block of the input, so its keys are moved."""
    from msa.ops.quant import quantize_e4m3
    gen = torch.Generator().manual_seed(11)
    hi, di, block, block_t = 2, 64, 16, 8
    seg = _segments((20, 7), (300, 150))
    qi = torch.randn(seg.total_q, hi, di, generator=gen)
    ki = torch.randn(seg.total_k, di, generator=gen) * torch.rand(seg.total_k, 1,
                                                                  generator=gen)
    bound = two_pass.fp16_bound(di)
    assert di * bound ** 2 <= 65504
    q8 = quantize_e4m3(qi, bound)[0]
    k8, ks16, seg = two_pass.key_blocks(ki, seg, block, bound)
    assert seg.k_base == [0, 304] and k8.shape == (304 + 160, di)
    host = query_tiles(seg, block_t, "cpu")
    nblk = int(((host[3] + host[1] - 1) // block).max())
    rows = host[0].numel() * block_t * hi
    maxb = torch.full((nblk * rows,), float("nan"), dtype=torch.float16, device=DEVICE)
    maxg = torch.full((nblk * rows,), float("nan"), dtype=torch.float16, device=DEVICE)
    stride = two_pass.block_maxima(q8.to(DEVICE), k8.to(DEVICE), ks16.to(DEVICE),
                                   [t.to(DEVICE) for t in host], maxb, maxg,
                                   block_size=block, block_t=block_t)
    assert stride == rows
    maxb, maxg = maxb.cpu().view(nblk, rows), maxg.cpu().view(nblk, rows)
    for t, (n, off) in enumerate(zip(host[1].tolist(), host[3].tolist())):
        cols = slice(t * block_t * hi, (t * block_t + n) * hi)
        whole = (off + n - 1) // block // two_pass.GROUP
        group = _group_maxima(maxb[:whole * two_pass.GROUP, cols])
        assert torch.equal(maxg[:whole, cols], group), t
    maxb = maxb.double()
    checked = 0
    for t, (q0, n, kbase, off) in enumerate(zip(*(x.tolist() for x in host))):
        for blk in range((off + n - 1) // block):
            keys = slice(kbase + blk * block, kbase + (blk + 1) * block)
            prod = q8[q0:q0 + n].double() @ k8[keys].double().T        # [n, hi, block]
            exact = prod.amax(-1) * ks16[kbase // block + blk].double()
            mag = (q8[q0:q0 + n].double().abs() @ k8[keys].double().abs().T).amax(-1)
            got = maxb[blk, t * block_t * hi:(t * block_t + n) * hi].view(n, hi)
            tol = (di + 2) * 2.0 ** -11 * mag + 2.0 ** -24
            assert ((got - exact).abs() <= tol).all(), (t, blk)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("hi,block,topk", [(2, 64, 4), (4, 32, 16)])
def test_fp8_indexer_on_the_two_pass_scan_matches_the_fp8_reference(hi, block, topk,
                                                                    monkeypatch):
    """The FP8 indexer on the two-pass scan (then re-scoring) selects what the FP8
    reference (exact e4m3 sums, then re-scoring) does, and its candidates hold the
    reference's."""
    from msa.ops.indexer import triton as tri
    from msa.ops.indexer.naive import indexer_reference
    monkeypatch.setattr(tri, "FP8_SCAN", "two_pass")
    from msa.ops.indexer.triton import indexer_topk, scan_topk
    from tests.helpers.brute import make_case
    c = make_case((33, 50), (2100, 1500), hi=hi, seed=hi + topk)
    qi, ki = c["qi"].to(DEVICE), c["ki"].to(DEVICE)
    got = indexer_topk(qi, ki, c["seg"], block_size=block, topk=topk, scale=0.125,
                       index_precision="fp8").cpu()
    want, _ = indexer_reference(c["qi"].double(), c["ki"].double(), c["seg"],
                                block_size=block, topk=topk, scale=0.125,
                                index_precision="fp8")
    assert torch.equal(got, want)
    from msa.ops.quant import FP8_CANDIDATES
    cand = scan_topk(qi, ki, c["seg"], block, topk + FP8_CANDIDATES, 0.125, True,
                     kernel="two_pass").cpu()
    inside = [(set(want[h, i].tolist()) - {-1}) <= set(cand[h, i].tolist())
              for h in range(hi) for i in range(want.shape[1])]
    assert all(inside)


def test_re_scored_candidates_are_ranked_by_score_then_id():
    """``rank_candidates_kernel``: the best ``topk - 1`` candidates before the local block
    by their re-scored maxima (ties, NaN, -0 and +0 among them), ids ascending on ties,
    then the local block; empty (-1) and later candidates are never ranked."""
    from msa.ops.indexer.triton import rank_candidates_kernel
    gen = torch.Generator().manual_seed(2)
    hi, n, c, topk, block = 3, 37, 12, 6, 4
    q0, total_q = 5, 50
    q_pos = torch.randint(0, 200, (total_q,), generator=gen).to(torch.int32)
    ids = torch.stack([torch.randperm(60, generator=gen)[:c] for _ in range(hi * total_q)])
    ids = ids.view(hi, total_q, c).to(torch.int32)
    ids[torch.rand(ids.shape, generator=gen) < 0.2] = -1
    values = torch.tensor([float("nan"), -0.0, 0.0, -3.4028234663852886e38, 3.0, 3.0,
                           float("-inf"), 7.5])
    pl = values[torch.randint(len(values), (n * hi * c,), generator=gen)]
    out = torch.full((hi, total_q, topk), -1, dtype=torch.int32)
    dev = [x.to(DEVICE) for x in (pl, ids, q_pos, out)]
    rank_candidates_kernel[(-(-n * hi // 8),)](
        *dev, q0, n, ids.stride(0), ids.stride(1), out.stride(0), out.stride(1), HI=hi,
        C=c, CP=16, BS=block, NRANK=topk - 1, RB=8)
    got = dev[3].cpu()
    want = torch.full_like(out, -1)
    for i in range(n * hi):
        q, h = q0 + i // hi, i % hi
        local = int(q_pos[q]) // block
        key = rank_scores(pl[i * c:(i + 1) * c]).tolist()
        cands = [(key[j], int(ids[h, q, j])) for j in range(c)
                 if 0 <= int(ids[h, q, j]) < local]
        cands.sort(key=lambda sv: (-sv[0], sv[1]))
        n_ranked = min(local, topk - 1)
        kept = [b for _, b in cands][:n_ranked]
        want[h, q, :len(kept)] = torch.tensor(kept, dtype=torch.int32)
        want[h, q, n_ranked] = local
    assert torch.equal(got, want)


def test_chunks_of_block_maxima_do_not_change_the_rows():
    """A budget of one tile per chunk (each chunk its own buffer layout and launches)
    selects what one chunk of every tile does."""
    from tests.helpers.brute import make_case
    c = make_case((40, 70), (900, 700), hi=2, seed=9)
    qi, ki = c["qi"].to(DEVICE), c["ki"][:, 0].to(DEVICE)
    kw = dict(block_size=32, topk=6, block_t=8)
    whole = two_pass.scan_topk_two_pass(qi, ki, c["seg"], **kw)
    tiny = two_pass.scan_topk_two_pass(qi, ki, c["seg"], budget=1, **kw)
    assert len(list(two_pass._chunks([10] * 3, 16, 1))) == 3
    assert torch.equal(whole, tiny)


def test_zero_key_rows_do_not_flatten_small_keys():
    """Keys of magnitude 1e-8 beside all-zero rows (padding): a zero row's scale (1) must
    not normalise the others' scales into fp16 underflow, or every block would tie."""
    from msa.ops.indexer.naive import indexer_reference
    from msa.ops.indexer.triton import indexer_topk
    from tests.helpers.brute import make_case
    c = make_case((20,), (3000,), hi=2, seed=4)          # 46 blocks, 19 candidates
    ki = c["ki"] * 1e-8
    ki[::7] = 0.0
    got = indexer_topk(c["qi"].to(DEVICE), ki.to(DEVICE), c["seg"], block_size=64, topk=4,
                       scale=0.125, index_precision="fp8").cpu()
    want, _ = indexer_reference(c["qi"].double(), ki.double(), c["seg"], block_size=64,
                                topk=4, scale=0.125, index_precision="fp8")
    assert torch.equal(got, want)
