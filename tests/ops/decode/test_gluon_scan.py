"""The Gluon decode index scan (msa.ops.decode.gluon_scan): it compiles for Hopper on any
machine (pages by TMA, one e4m3 or bf16 wgmma per page in either orientation, no spills),
and on a Hopper GPU its top-k rows are a top-k of the fp64 scores of the same values (up
to the tensor cores' rounding of near-equal block maxima), its block maxima are the
Triton scan's, and bytes past each request's last token are never read."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from msa.ops.decode.select import (candidates_width, paged_select, scan_chunks,  # noqa: E402
                                   scan_kernel, unpack)
from msa.ops.quant import (dequantize, dequantize_int4, fake_quantize,  # noqa: E402
                           fake_quantize_int8, quantize_e4m3, quantize_int4)
from tests.helpers import gluon_ptx  # noqa: E402

BS, DI, K = 128, 128, 16
SCALE = DI ** -0.5
# Hopper's e4m3 wgmma adds its products with about 13 fractional bits, not fp32's 24: a
# score may move by a few 2^-13 of the sum of its products' magnitudes (2^-11.6 at most
# measured here), so near-equal block maxima may swap; none may move by more than
ROUNDING = {torch.float8_e4m3fn: 2.0 ** -10,    # x  scale * sum_d |q_d k_d|, the block's largest
            # 16-bit keys: fp32 sums of 128 exact products, in any order, rounded or
            # truncated at each add (128 x 2^-23)
            torch.bfloat16: 2.0 ** -16,
            # int4 keys (uint8 pages): exact int32 sums per group of 32 dims, four of
            # them scaled and added in fp32
            torch.uint8: 2.0 ** -20}


def _sig(dtype: str):
    from msa.ops.decode import gluon_scan as g
    layout = g.page_layout(8 if dtype == "fp8e4nv" else 16)
    return {"QI": "*bf16", "k_desc": f"tensordesc<{dtype}[128, 128],{layout!r}>",
            "KIS": "*fp32", "PAGE_TABLE": "*i32", "SEQ_LENS": "*i32", "CAND": "*i64",
            "scale": "fp32", "rows_per_page": "i32", "table_width": "i32",
            **{f"stride_{s}": "i32" for s in ("qt", "qh", "tb", "cc", "ch")}}


def test_compiles_for_sm90():
    """Both orientations over e4m3 and bf16 keys: one token x 4 index heads (8 rows: the
    keys as the MMA rows; ranked lists, or whole chunks: each warp's maxima per page), 4
    tokens (16 rows), 8 tokens (32 rows), 16 tokens (64 rows: the rows as the MMA
    rows)."""
    cases = [(dtype, nq, rows, rank, f"{shape}k{k}.f32.{ab}.{ab}")
             for dtype, k, ab in (("fp8e4nv", 32, "e4m3"), ("bf16", 16, "bf16"))
             for nq, rows, rank, shape in ((1, 8, True, "m64n8"), (1, 8, False, "m64n8"),
                                           (4, 16, True, "m64n16"),
                                           (8, 32, False, "m64n32"), (8, 32, True, "m64n32"),
                                           (16, 64, False, "m64n128"))]
    ptxs = gluon_ptx("msa.ops.decode.gluon_scan", "paged_scan_kernel",
                     [_sig(dtype) for dtype, *_ in cases], [
                         dict(NQ=nq, HI=4, PAGES=16, KR=16, RANK=rank, STAGES=3, R=rows,
                              num_warps=4) for _, nq, rows, rank, _ in cases])
    assert len(ptxs) == len(cases)
    for ptx, (*_, mma) in zip(ptxs, cases):
        assert f"wgmma.mma_async.sync.aligned.{mma}" in ptx, mma
        assert "cp.async.bulk.tensor.2d" in ptx and "ld.local" not in ptx


def test_int4_scan_compiles_for_sm90():
    """Packed int4 keys: int8 wgmmas with the keys from registers (unpacked by one
    operation per four bytes), one token (8 rows; ranked lists or whole chunks) and 8
    tokens (32 rows, whole chunks)."""
    from msa.ops.decode import gluon_scan as g
    sig = {**_sig("bf16"), "KIS": "*i64",
           "k_desc": f"tensordesc<u8[128, 64],{g.page_layout(8, 64)!r}>"}
    cases = [(1, 8, True, "m64n8k32"), (1, 8, False, "m64n8k32"), (8, 32, False, "m64n32k32")]
    ptxs = gluon_ptx("msa.ops.decode.gluon_scan", "paged_scan_kernel", sig, [
        dict(NQ=nq, HI=4, PAGES=16, KR=16, RANK=rank, STAGES=g.INT4_STAGES, R=rows,
             num_warps=4) for nq, rows, rank, _ in cases])
    for ptx, (*_, shape) in zip(ptxs, cases):
        assert f"wgmma.mma_async.sync.aligned.{shape}.s32.s8.s8" in ptx, shape
        assert "ldmatrix" in ptx and "shr.u16" not in ptx       # no byte-by-byte unpacking
        assert "cp.async.bulk.tensor.2d" in ptx and "ld.local" not in ptx


def _case(lengths, nq, hi, seed, dtype):
    """Queries, keys ``[pages, BS, DI]`` (e4m3 with their scales, int4 ``[pages, BS, DI /
    2]`` uint8 with theirs, or bf16 and ``None``), a page table and the lengths."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    per = max(-(-n // BS) for n in lengths)
    pages = len(lengths) * per + 5
    ki = torch.randn(pages, BS, DI, device="cuda", generator=g)
    ki, kis = quantize_e4m3(ki) if dtype == torch.float8_e4m3fn else quantize_int4(ki) \
        if dtype == torch.uint8 else (ki.to(dtype), None)
    table = torch.randperm(pages, device="cuda", generator=g)[:len(lengths) * per]
    table = table.view(len(lengths), per).to(torch.int32).contiguous()
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    qi = torch.randn(len(lengths) * nq, hi, DI, device="cuda", generator=g,
                     dtype=torch.bfloat16)
    return qi, ki, kis, table, lens


def _select(qi, ki, kis, table, lens, nq, per):
    rows, hi = qi.shape[0], qi.shape[1]
    cand = torch.full((rows, hi, candidates_width(table.shape[1], per)), 7, dtype=torch.int64,
                      device="cuda")
    topk = torch.full((hi, rows, K), -7, dtype=torch.int32, device="cuda")
    paged_select(qi, ki, table, lens, batch=len(lens), num_q=nq, max_pages=table.shape[1],
                 candidates=cand, topk_indices=topk, block_size=BS, index_scale=SCALE,
                 ki_scales=kis, pages_per_program=per)
    return cand, topk


def _scores(qi, ki, kis, table, lens, nq):
    """fp64 block maxima ``[rows, hi, blocks]`` of the queries (e4m3 keys: the queries'
    ``fake_quantize``, the keys dequantized; int4 keys: int8 queries) against the keys
    (``-inf`` for blocks a row does not rank), and how far the tensor cores' rounding may
    move each (``ROUNDING``, zero for those blocks)."""
    int4, fp8 = ki.dtype == torch.uint8, ki.dtype == torch.float8_e4m3fn
    keys = (dequantize(ki, kis) if fp8 else dequantize_int4(ki, kis) if int4
            else ki).double()                                   # [P, BS, DI]
    q = (fake_quantize(qi) if fp8 else fake_quantize_int8(qi) if int4 else qi).double()
    rounding = ROUNDING[ki.dtype]
    rows, hi = qi.shape[:2]
    out = torch.full((rows, hi, table.shape[1]), float("-inf"), dtype=torch.float64,
                     device="cuda")
    tol = torch.zeros_like(out)
    for r in range(rows):
        local = (int(lens[r // nq]) - nq + r % nq) // BS
        kb = keys[table[r // nq, :local].long()]                # [local, BS, DI]
        out[r, :, :local] = torch.einsum("hd,jtd->hjt", q[r], kb).amax(-1) * SCALE
        tol[r, :, :local] = torch.einsum("hd,jtd->hjt", q[r].abs(), kb.abs()).amax(-1) * \
            SCALE * rounding
    return out, tol.nan_to_num(0.0)


def _assert_a_top_n(sc, picked, atol):
    """``picked`` (distinct indices into the fp64 scores ``sc``) are a top-``n`` of them,
    ``n = len(picked)``, up to ``atol``: none below the n-th best by more, none left out
    above it by more."""
    kth = sc.topk(len(picked)).values[-1]
    rest = torch.ones(sc.numel(), dtype=torch.bool, device=sc.device)
    rest[picked] = False
    assert sc[picked].min() >= kth - atol
    assert not rest.any() or sc[rest].max() <= kth + atol


def _assert_top_k(topk, scores, tol, lens, nq):
    """Each row: ``min(K - 1, local)`` distinct earlier blocks whose fp64 scores are a
    top-k up to the row's rounding ``tol`` (none below the (K-1)-th best by more, none left
    out above it by more), then the local block, then -1."""
    hi, rows, _ = topk.shape
    for r in range(rows):
        local = (int(lens[r // nq]) - nq + r % nq) // BS
        n = min(K - 1, local)
        for h in range(hi):
            row = topk[h, r].tolist()
            assert row[n] == local and all(x == -1 for x in row[n + 1:]), row
            picked = row[:n]
            assert len(set(picked)) == n and all(0 <= x < local for x in picked), row
            if n == 0:
                continue
            sc, atol = scores[r, h, :local], tol[r, h, :local].max()
            if sc.isnan().all():            # a NaN query: every block the most negative
                assert picked == list(range(n)), row
                continue
            _assert_a_top_n(sc, torch.tensor(picked, device=sc.device), atol)


def _assert_ranked_lists(cand, scores, tol, lens, nq, per):
    """With few rows the scan leaves each chunk's best ``KR`` keys, the largest first:
    each list (row, head, chunk) holds a top-``KR`` of the chunk's rankable blocks by
    their fp64 scores (up to the rounding ``tol``), ``EMPTY`` past them, its head its
    largest key."""
    rows, hi = cand.shape[:2]
    pages, ls, n_lists, kr = scan_chunks(rows * hi, len(lens), scores.shape[2], K, per,
                                         "gluon")
    m, ids = unpack(cand)
    for r in range(rows):
        local = (int(lens[r // nq]) - nq + r % nq) // BS
        for h in range(hi):
            for p in range(n_lists):
                lo, hi_ = p * pages, min((p + 1) * pages, local)
                n = max(0, min(kr, hi_ - lo))
                got = ids[r, h, p * ls:p * ls + kr]
                assert (got[n:] == -1).all() and (got[:n] >= lo).all() and \
                    (got[:n] < hi_).all() and len(set(got[:n].tolist())) == n, got
                if n == 0:
                    continue
                assert m[r, h, p * ls] == m[r, h, p * ls:p * ls + n].max()
                sc, atol = scores[r, h, lo:hi_], tol[r, h, lo:hi_].max()
                if sc.isnan().all():
                    continue
                _assert_a_top_n(sc, got[:n] - lo, atol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("lengths,nq,hi,per", [
    ((3000, 2500, 1800), 2, 4, None),               # 8 rows: keys as the MMA rows
    ((100, 129, 256, 257, 5000), 1, 4, None),       # no earlier block, chunks with no page
    (tuple(range(1000, 9000, 200)), 8, 4, None),    # 32 rows, whole chunks: warp maxima
    (tuple(range(2000, 9000, 1000)), 6, 4, None),   # 24 of 32 rows, whole chunks
    ((30000, 9000), 8, 4, None),                    # 32 rows, chunks ranked in the scan
    ((20000, 7000), 16, 4, None),                   # 64 rows as the MMA rows, ranked
    ((9000, 300), 1, 8, None),                      # 8 index heads
    ((9000, 4000, 1000), 3, 4, 4),                  # 12 of 16 rows, 4 pages per program
    ((70000,), 1, 4, None),                         # one long request, chunks ranked
])
def test_gluon_scan_is_a_top_k_and_matches_triton(lengths, nq, hi, per, dtype, monkeypatch):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode scan is for Hopper")
    if dtype == torch.uint8 and nq * hi > 32:
        pytest.skip("int4 keys: the Gluon scan takes at most 32 rows")
    qi, ki, kis, table, lens = _case(lengths, nq, hi, nq * 100 + hi, dtype)
    qi[-1, -1, 5] = float("nan")                    # a NaN query row (semantics: smallest ids)
    assert scan_kernel(qi, ki, (ki.stride(0), ki.stride(1)), BS, nq) == "gluon"
    cand, topk = _select(qi, ki, kis, table, lens, nq, per)
    scores, tol = _scores(qi, ki, kis, table, lens, nq)
    _assert_top_k(topk, scores, tol, lens, nq)
    rows = qi.shape[0] * hi
    chunk, _, _, kr = scan_chunks(rows, len(lengths), table.shape[1], K, per, "gluon")
    rank = kr < chunk
    if rank:
        _assert_ranked_lists(cand, scores, tol, lens, nq, per)
    # NaN bytes (and scales) in every key row past a request's last token: never read
    poisoned, pkis = ki.clone(), None if kis is None else kis.clone()
    for b, n in enumerate(lengths):
        if n % BS:
            page = int(table[b, (n - 1) // BS])
            if pkis is None:
                poisoned[page, n % BS:] = float("nan")
            elif dtype == torch.uint8:                  # int4 has no NaN: large values
                poisoned[page, n % BS:] = 0x77
                pkis[page, n % BS:] = float("nan")
            else:
                poisoned.view(torch.uint8)[page, n % BS:] = 0x7F        # e4m3 NaN
                pkis[page, n % BS:] = float("nan")
    p_cand, p_topk = _select(qi, poisoned, pkis, table, lens, nq, per)
    assert torch.equal(p_cand, cand) and torch.equal(p_topk, topk)
    # the Triton scan's block maxima, block by block
    monkeypatch.setenv("MSA_DECODE_KERNEL", "triton")
    t_cand, _ = _select(qi, ki, kis, table, lens, nq, per)
    (gm, gid), (tm, tid) = unpack(cand), unpack(t_cand)
    rows = qi.shape[0]
    dense = torch.full((2, rows, hi, table.shape[1] + 1), float("nan"), device="cuda")
    for i, (m, ids) in enumerate(((gm, gid), (tm, tid))):
        live = (ids >= 0) & (ids < table.shape[1])      # (past the lists: the buffer's fill)
        r, h, _ = live.nonzero(as_tuple=True)
        dense[i, r, h, ids[live]] = m[live]
    keyed = ~dense[0, ..., :-1].isnan()
    t_keyed = ~dense[1, ..., :-1].isnan()
    # every block the Gluon scan keys, the Triton scan keys; without ranking, the same
    # blocks (ranked lists hold each chunk's best only, the Triton scan's also the keys
    # of the chunk's later pages)
    assert not (keyed & ~t_keyed).any() and (rank or torch.equal(keyed, t_keyed))
    diff = (dense[0, ..., :-1] - dense[1, ..., :-1]).abs().double()
    # the Triton kernel sums e4m3 products exactly in fp32 (+ fp32's rounding), bf16 ones
    # in fp32: both kernels' rounding
    bound = tol if kis is not None else 2 * tol
    assert (diff[keyed] <= bound[keyed] + 1e-5).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_gluon_scan_reads_a_cache_through_pages_of_its_rows(dtype):
    """The transformers decode layout: index keys ``[B, Tk, 1, Di]`` (a view of a static
    cache ``[B, 1, Tk, Di]``) read through pages of their blocks, ``ki_strides = (BS * Di,
    Di)``, page ``b * NB + j``; the TMA rows span the whole cache (``tma_rows``), so the
    rows equal those of the same bytes read as a pool of pages."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode scan is for Hopper")
    b, nb, nq, hi = 3, 40, 2, 4
    g = torch.Generator(device="cuda").manual_seed(5)
    cache = torch.randn(b, 1, nb * BS, DI, device="cuda", generator=g)
    cache, scales = quantize_e4m3(cache) if dtype == torch.float8_e4m3fn else \
        (cache.to(dtype), None)
    pool_scales = None if scales is None else scales.view(b * nb, BS)
    view = cache.view(b, nb * BS, 1, DI)
    table = (torch.arange(b, device="cuda").view(-1, 1) * nb +
             torch.arange(nb, device="cuda")).to(torch.int32).contiguous()
    lens = torch.tensor([nb * BS - 7, 3000, 4500], dtype=torch.int32, device="cuda")
    qi = torch.randn(b * nq, hi, DI, device="cuda", generator=g, dtype=torch.bfloat16)
    assert scan_kernel(qi, view, (BS * DI, DI), BS, nq) == "gluon"
    outs = []
    for keys, strides in ((view, (BS * DI, DI)), (cache.view(b * nb, BS, DI), None)):
        cand = torch.full((b * nq, hi, candidates_width(nb)), 7, dtype=torch.int64,
                          device="cuda")
        topk = torch.full((hi, b * nq, K), -7, dtype=torch.int32, device="cuda")
        paged_select(qi, keys, table, lens, batch=b, num_q=nq, max_pages=nb, candidates=cand,
                     topk_indices=topk, block_size=BS, index_scale=SCALE,
                     ki_scales=pool_scales, ki_strides=strides, mask_tail=True)
        outs.append((cand, topk))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    scores, tol = _scores(qi, cache.view(b * nb, BS, DI), pool_scales, table, lens, nq)
    _assert_top_k(outs[0][1], scores, tol, lens, nq)
