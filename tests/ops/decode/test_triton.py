"""Fused paged decoder (plan/run) vs the reference paged operators: scattered, permuted
and shared pages, lengths around page boundaries, Q = 1..16 (interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")

from msa import MSAConfig  # noqa: E402
from msa.inference import PagedDecoder, paged_attention, paged_indexer  # noqa: E402
from msa.ops.decode import paged_decode_reference  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402
HQ, HKV, D, BS, K = 4, 2, 64, 64, 3


def _cache(lengths, num_pages, seed, hi=HKV, shared=False):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_pages, HKV, BS, D, generator=g)
    v = torch.randn(num_pages, HKV, BS, D, generator=g)
    ki = torch.randn(num_pages, BS, D, generator=g)
    perm = torch.randperm(num_pages, generator=g).tolist()
    width = max(-(-n // BS) for n in lengths)
    table = torch.full((len(lengths), width), -1, dtype=torch.int32)
    for r, n in enumerate(lengths):
        need = -(-n // BS)
        pages = perm[:need] if shared else [perm.pop() for _ in range(need)]
        table[r, :need] = torch.tensor(pages, dtype=torch.int32)
    return [x.to(DEVICE) for x in (k, v, ki, table)]


@pytest.mark.parametrize("lengths,nq,hi,shared", [
    ((1, 127, 128, 129), 1, HKV, False),
    ((300, 65, 200), 4, 1, False),
    ((200, 130), 16, HKV, True),                 # shared prefix pages
    ((300, 65, 200, 129, 128, 64, 70, 90, 100), 8, HKV, False),   # 144 rows x KV heads:
])                                        # one merge per row, unsplit attention
def test_decoder_matches_reference(lengths, nq, hi, shared):
    k, v, ki, table = _cache(lengths, 24, seed=len(lengths) + nq, shared=shared)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, num_index_heads=hi,
                    index_head_dim=D, block_size=BS, topk=K)
    g = torch.Generator().manual_seed(7)
    rows = len(lengths) * nq
    q = torch.randn(rows, HQ, D, generator=g).to(DEVICE)
    qi = torch.randn(rows, hi, D, generator=g).to(DEVICE)
    dec = PagedDecoder(cfg, max_batch=len(lengths) + 1, num_q=nq, max_pages=table.shape[1] + 2,
                       device=DEVICE, dtype=torch.float32)
    dec.out.fill_(float("nan"))
    dec.lse.fill_(float("nan"))
    dec.plan(table, lens)
    out, topk = dec.run(q, qi, k, v, ki)
    q_lens = [nq] * len(lengths)
    ref_topk = paged_indexer(qi, ki, table, lens, q_lens, block_size=BS, topk=K)
    ref = paged_attention(q, k, v, ref_topk, table, lens, q_lens)
    assert torch.equal(topk, ref_topk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the op's own reference (fp64), LSE included
    r_out, r_lse, r_topk = paged_decode_reference(
        q.double(), qi.double(), k.double(), v.double(), ki.double(), table, lens, num_q=nq,
        topk=K, scale=cfg.scale, index_scale=cfg.index_scale)
    assert torch.equal(topk, r_topk)
    torch.testing.assert_close(out.double(), r_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec.lse[:rows].double(), r_lse, rtol=1e-5, atol=1e-5)
    # a second step with new lengths reuses the same decoder (plan again, run again)
    lens2 = torch.clamp(lens - 1, min=nq)               # shorter: stays inside its pages
    dec.plan(table, lens2)
    out2, topk2 = dec.run(q, qi, k, v, ki)
    ref_topk2 = paged_indexer(qi, ki, table, lens2, q_lens, block_size=BS, topk=K)
    assert torch.equal(topk2, ref_topk2)
    torch.testing.assert_close(out2, paged_attention(q, k, v, ref_topk2, table, lens2, q_lens),
                               rtol=1e-5, atol=1e-5)


def test_decoder_takes_scan_chunks_longer_than_16_pages():
    """``pages_per_program=32``: the decoder's candidates buffer holds whole chunks."""
    lengths, nq = (300, 65, 200), 2
    k, v, ki, table = _cache(lengths, 24, seed=5)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, index_head_dim=D,
                    block_size=BS, topk=K)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(len(lengths) * nq, HQ, D, generator=g).to(DEVICE)
    qi = torch.randn(len(lengths) * nq, HKV, D, generator=g).to(DEVICE)
    dec = PagedDecoder(cfg, max_batch=3, num_q=nq, max_pages=table.shape[1], device=DEVICE,
                       dtype=torch.float32, pages_per_program=32)
    dec.plan(table, lens)
    out, topk = dec.run(q, qi, k, v, ki)
    q_lens = [nq] * len(lengths)
    ref_topk = paged_indexer(qi, ki, table, lens, q_lens, block_size=BS, topk=K)
    assert torch.equal(topk, ref_topk)
    torch.testing.assert_close(out, paged_attention(q, k, v, ref_topk, table, lens, q_lens),
                               rtol=1e-5, atol=1e-5)


def test_decoder_validates_plan():
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, index_head_dim=D,
                    block_size=BS, topk=K)
    dec = PagedDecoder(cfg, max_batch=2, num_q=2, max_pages=4, device=DEVICE)
    table = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        dec.plan(table, torch.tensor([1, 5], dtype=torch.int32))     # fewer than num_q
    with pytest.raises(ValueError, match="seq_lens"):
        dec.plan(table, torch.tensor([300, 5], dtype=torch.int32))   # beyond the pages
    with pytest.raises(ValueError, match="max_batch"):
        dec.plan(torch.zeros(3, 4, dtype=torch.int32), torch.full((3,), 5))
    with pytest.raises(IndexError, match="negative page"):
        dec.plan(torch.tensor([[0, -1], [1, 2]], dtype=torch.int32),
                 torch.tensor([100, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="plan"):
        dec.run(*[None] * 5)
    with pytest.raises(ValueError, match="num_q"):
        PagedDecoder(cfg, max_batch=2, num_q=17, max_pages=4, device=DEVICE)
    with pytest.raises(TypeError, match="config must be an msa.MSAConfig"):
        PagedDecoder(cfg.__dict__, max_batch=2, num_q=2, max_pages=4, device=DEVICE)


@pytest.mark.gpu
def test_decoder_cuda_graph_replay_and_no_sync():
    lengths = (900, 300, 129)
    k, v, ki, table = _cache(lengths, 40, seed=3)
    k, v, ki = (x.bfloat16() for x in (k, v, ki))
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, index_head_dim=D,
                    block_size=BS, topk=K)
    dec = PagedDecoder(cfg, max_batch=3, num_q=2, max_pages=table.shape[1], device=DEVICE)
    q = torch.randn(6, HQ, D, device=DEVICE, dtype=torch.bfloat16)
    qi = torch.randn(6, HKV, D, device=DEVICE, dtype=torch.bfloat16)
    dec.plan(table, torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
    dec.run(q, qi, k, v, ki)                                   # compile outside capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dec.run(q, qi, k, v, ki)                               # no host synchronisation
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_topk = dec.run(q, qi, k, v, ki)
    for new in ((500, 64, 2), (950, 250, 128)):
        dec.plan(table, torch.tensor(new, dtype=torch.int32, device=DEVICE))
        graph.replay()
        out, topk = (x.clone() for x in (g_out, g_topk))
        e_out, e_topk = dec.run(q, qi, k, v, ki)
        assert torch.equal(topk, e_topk) and torch.equal(out, e_out)


@pytest.mark.gpu
def test_decoder_eager_graphs_equal_plain_launches():
    """``run`` called eagerly replays its own graphs (msa.inference.step_graphs): the
    results equal a decoder that launches every time, bitwise, with fresh queries each
    call, after ``plan()`` with new lengths, for a smaller batch and for FP8 pages (new
    graphs), with poisoned outputs before each call; inside the caller's own capture it
    launches."""
    from msa.ops.quant import quantize_e4m3
    lengths = (900, 300, 129)
    k, v, ki, table = _cache(lengths, 40, seed=4)
    k, v, ki = (x.bfloat16() for x in (k, v, ki))
    (k8, ks), (v8, vs), (ki8, kis) = quantize_e4m3(k), quantize_e4m3(v), quantize_e4m3(ki)
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, index_head_dim=D,
                    block_size=BS, topk=K)
    decs = [PagedDecoder(cfg, max_batch=3, num_q=2, max_pages=table.shape[1], device=DEVICE,
                         graphs=graphs) for graphs in (True, False)]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cases = [(lengths, (k, v, ki), {}), ((500, 64, 2), (k, v, ki), {}),
             ((950, 250), (k, v, ki), {}),
             ((950, 250), (k8, v8, ki8), dict(k_scales=ks, v_scales=vs, ki_scales=kis))]
    for lens, pages, scales in cases:
        for dec in decs:
            dec.plan(table[:len(lens)], torch.tensor(lens, dtype=torch.int32, device=DEVICE))
        for _ in range(3):
            rows = 2 * len(lens)
            q = torch.randn(rows, HQ, D, device=DEVICE, dtype=torch.bfloat16, generator=g,
                            requires_grad=bool(scales))     # FP8 case: rows with grad
            qi = torch.randn(rows, HKV, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
            got = []
            for dec in decs:
                dec.out.fill_(float("nan"))
                dec.topk_indices.fill_(-7)
                got.append([x.clone() for x in dec.run(q, qi, *pages, **scales)])
            assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
            assert not got[0][0].isnan().any()
    assert decs[0].graphs.captured == 3 and decs[1].graphs is None
    assert not any(x.requires_grad for x in decs[0]._static.values())
    # the caller's own capture: launched inside it, no graph of the decoder's own
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = decs[0].run(q, qi, k, v, ki)
    graph.replay()
    assert torch.equal(out, decs[1].run(q, qi, k, v, ki)[0])
    assert decs[0].graphs.captured == 3


def test_decoder_ties_rank_smaller_block_first():
    lengths = (700, 400)
    k, v, ki, table = _cache(lengths, 24, seed=5)
    ki = torch.zeros_like(ki)                                  # every block max ties at 0
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, index_head_dim=D,
                    block_size=BS, topk=K)
    qi = torch.randn(4, HKV, D).to(DEVICE)
    q = torch.randn(4, HQ, D).to(DEVICE)
    dec = PagedDecoder(cfg, max_batch=2, num_q=2, max_pages=table.shape[1],
                       device=DEVICE, dtype=torch.float32)
    dec.plan(table, lens)
    _, topk = dec.run(q, qi, k, v, ki)
    assert topk[0, 0].tolist() == [0, 1, 10]                   # pos 698: local block 10
    assert torch.equal(topk, paged_indexer(qi, ki, table, lens, [2, 2], block_size=BS,
                                           topk=K))


def test_decoder_run_checks_inputs():
    k, v, ki, table = _cache((300, 130), 12, seed=2)
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, index_head_dim=D,
                    block_size=BS, topk=K)
    dec = PagedDecoder(cfg, max_batch=2, num_q=1, max_pages=table.shape[1], device=DEVICE,
                       dtype=torch.float32)
    dec.plan(table, torch.tensor([300, 130], dtype=torch.int32, device=DEVICE))
    q = torch.randn(2, HQ, D, device=DEVICE)
    qi = torch.randn(2, HKV, D, device=DEVICE)
    with pytest.raises(ValueError, match="q must be"):
        dec.run(q[:1], qi, k, v, ki)
    with pytest.raises(ValueError, match="ki_pages must be"):
        dec.run(q, qi, k, v, ki[..., :32])
    with pytest.raises(TypeError, match="dtypes"):
        dec.run(q.double(), qi, k, v, ki)
    with pytest.raises(IndexError, match="pools hold"):
        dec.run(q, qi, k[:1], v[:1], ki[:1])
    v_other = v.transpose(1, 2).contiguous().transpose(1, 2)       # same values, own strides
    with pytest.raises(ValueError, match="same strides"):
        dec.run(q, qi, k, v_other, ki)
    out, _ = dec.run(q, qi, k, v, ki)
    assert torch.isfinite(out).all()
    # the kernel choice checks the attention's inputs as run does
    assert dec.attention_kernel(q, k, v) == "triton"
    with pytest.raises(ValueError, match="v_pages must be"):
        dec.attention_kernel(q, k, v[..., :32])
    with pytest.raises(TypeError, match="dtypes"):
        dec.attention_kernel(q.double(), k, v)
    # and the index scan's (the Gluon scan: Hopper, e4m3 or bf16 pages of 128 keys x 128)
    assert dec.scan_kernel(qi, ki) == "triton"
    with pytest.raises(ValueError, match="qi must be"):
        dec.scan_kernel(qi[:1], ki)


def _select(qi, ki, table, lens, nq, topk, per, bs=64):
    """``paged_select`` over the pages (candidates and rows poisoned first) and the
    reference selection: ``(sel, ref)``."""
    from msa.ops.decode.select import candidates_width, paged_select
    rows, hi, mp = qi.shape[0], qi.shape[1], table.shape[1]
    sel = torch.full((hi, rows, topk), -7, dtype=torch.int32, device=DEVICE)
    paged_select(qi, ki, table, lens, batch=len(lens), num_q=nq, max_pages=mp,
                 candidates=torch.full((rows, hi, candidates_width(mp)), 3, device=DEVICE),
                 topk_indices=sel, block_size=bs, index_scale=1.0, pages_per_program=per)
    ref = paged_indexer(qi, ki, table, lens, [nq] * len(lens), block_size=bs, topk=topk,
                        softmax_scale=1.0)
    return sel, ref


@pytest.mark.parametrize("max_pages,lengths,nq,per,lists,target", [
    (700, (700 * 64, 36000, 16400), 2, None, 88, None),    # lists of 8, a short last chunk
    (512, (512 * 64, 1333), 1, 32, 16, None),              # lists of 16 (of 32 pages)
    (40, (40 * 64,) * 6 + (1000, 65, 64), 8, None, 20, None),   # 144 rows: whole chunks of 2
    (12, (12 * 64, 700, 65, 64), 8, None, 6, 24),   # the same over 48 pages, 24 programs
    (32, (32 * 64,) * 8 + (700,), 8, 16, 2, None),         # 144 rows: whole chunks of 16
    (24, (24 * 64,) * 9 + (100,), 16, 1, 24, None),        # 320 rows: lists of one block
])
def test_selection_merges_ranked_lists(max_pages, lengths, nq, per, lists, target,
                                       monkeypatch):
    """Each scan program ranks its chunk's blocks (few rows) or swaps its chunk's largest
    key to the front (many rows); the merge takes the heads of the lists
    (``msa.ops.decode.select``); rows equal the reference, ties (few distinct scores)
    included. ``target``: programs the scan aims at instead of ``TARGET_PROGRAMS`` (the
    same chunking over fewer pages, for the interpreter)."""
    from msa.ops.decode import select
    from msa.ops.decode.select import candidates_width, paged_select, scan_chunks
    if target:
        monkeypatch.setattr(select, "TARGET_PROGRAMS", target)
    bs, di, hi, topk = 64, 64, 2, 16
    rows = len(lengths) * nq
    assert scan_chunks(rows * hi, len(lengths), max_pages, topk, per)[2] == lists
    g = torch.Generator().manual_seed(max_pages)
    pages = len(lengths) * max_pages
    ki = torch.randint(-2, 3, (pages, bs, di), generator=g).float().to(DEVICE)
    qi = torch.randint(-2, 3, (rows, hi, di), generator=g).float().to(DEVICE)
    table = torch.randperm(pages, generator=g).view(len(lengths), max_pages).int().to(DEVICE)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    sel, ref = _select(qi, ki, table, lens, nq, topk, per, bs)
    assert torch.equal(sel, ref)
    width = candidates_width(max_pages)
    with pytest.raises(ValueError, match="candidates must be int64"):     # a block-max buffer
        paged_select(qi, ki, table, lens, batch=len(lengths), num_q=nq, max_pages=max_pages,
                     candidates=torch.zeros((rows, hi, width), device=DEVICE),
                     topk_indices=sel, block_size=bs, index_scale=1.0, pages_per_program=per)


@pytest.mark.parametrize("pattern,per,hi", [("one_chunk", 8, 1), ("one_chunk", 16, 1),
                                            ("two_chunks", 8, 1), ("distinct", 16, 1),
                                            ("one_chunk", 16, 140), ("two_chunks", 8, 140)])
def test_selection_merge_takes_runs_from_one_list(pattern, per, hi):
    """The merge of lists: a row whose top blocks all lie in one chunk's list (the merge
    takes many keys of one list), in two lists that alternate, or distinct random maxima,
    equals the reference (lists of ``per`` blocks: ranked for one row, whole chunks with
    the largest first for 140 rows)."""
    from msa.ops.decode.select import rank_in_scan, scan_chunks
    bs, di, topk, mp = 64, 64, 16, 320
    assert rank_in_scan(hi) == (hi == 1)
    assert scan_chunks(hi, 1, mp, topk, per)[1:] == (per, mp // per, min(per, 16))
    g = torch.Generator().manual_seed(7)
    score = torch.randperm(mp, generator=g).float()              # the block maxima
    if pattern == "one_chunk":          # blocks 80..95: the best (one or two chunks)
        score[80:96] = 1000.0 + torch.arange(16.0)
    elif pattern == "two_chunks":       # chunks 3 and 30 interleave in rank
        score[24:32] = 1000.0 + 2 * torch.arange(8.0)
        score[240:248] = 1001.0 + 2 * torch.arange(8.0)
    ki = torch.zeros(mp, bs, di)
    ki[:, 0, 0] = score                 # one key per block carries its max (queries e_0)
    qi = torch.zeros(1, hi, di)
    qi[..., 0] = 1.0
    table = torch.arange(mp, dtype=torch.int32).view(1, mp)
    lens = torch.tensor([mp * bs], dtype=torch.int32)
    ki, qi, table, lens = (x.to(DEVICE) for x in (ki, qi, table, lens))
    sel, ref = _select(qi, ki, table, lens, 1, topk, per, bs)
    assert torch.equal(sel, ref)
    if pattern == "one_chunk":
        assert sel[0, 0, :15].tolist() == list(range(95, 80, -1))


@pytest.mark.parametrize("mp,per,topk", [(96, 16, 32), (320, 8, 64), (320, 16, 5)])
def test_selection_merge_of_ranked_lists_any_k(mp, per, topk):
    """The merge of ranked lists takes the lists of the ``k - 1`` best heads, then the best
    of their keys: fewer lists than ``k`` (6 lists, k 32), ``k`` 64 over lists of 8, and
    ``k`` below the list length; random block maxima with ties, rows equal the
    reference."""
    from msa.ops.decode.select import scan_chunks
    bs, di, hi = 64, 64, 2
    assert scan_chunks(hi, 1, mp, topk, per)[1] == per
    g = torch.Generator().manual_seed(mp + topk)
    ki = torch.randint(-3, 4, (mp, bs, di), generator=g).float().to(DEVICE)
    qi = torch.randint(-3, 4, (1, hi, di), generator=g).float().to(DEVICE)
    table = torch.randperm(mp, generator=g).view(1, mp).int().to(DEVICE)
    lens = torch.tensor([mp * bs - 7], dtype=torch.int32, device=DEVICE)
    sel, ref = _select(qi, ki, table, lens, 1, topk, per, bs)
    assert torch.equal(sel, ref)


def test_gluon_scan_takes_32_pages_a_program_only_where_it_ranks():
    """Pages per scan program: at most 16, or 32 for the Gluon scan where it ranks its
    chunks (one long request: 8192 pages at 1M) into lists shorter than that (not the 31
    candidates of a re-scored scan) and the pages fill one wave of programs (not 16
    requests at 128K), and the default candidates buffer holds whole chunks of either."""
    from msa.ops.decode.select import MAX_PAGES, candidates_width, rank_in_scan, scan_chunks
    assert rank_in_scan(4) and not rank_in_scan(64 * 8 * 4)
    assert scan_chunks(4, 1, 8192, 16, kernel="gluon")[:3] == (32, 32, 256)
    assert scan_chunks(4, 1, 8192, 16)[:3] == (16, 16, 512)
    assert scan_chunks(64 * 8 * 4, 64, 1024, 16, kernel="gluon")[0] == 16
    assert scan_chunks(4, 1, 8192, 16, pages_per_program=8, kernel="gluon")[0] == 8
    assert scan_chunks(4, 1, 8192, 32, kernel="gluon")[:4] == (16, 16, 512, 16)
    assert scan_chunks(16 * 4, 16, 1024, 16, kernel="gluon")[:3] == (16, 16, 64)
    assert MAX_PAGES == 32 and candidates_width(8193) == 8224 and candidates_width(40, 64) == 64
