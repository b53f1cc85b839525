"""The decode scan over an int4 copy of the index keys (``PagedDecoder.run(...,
ki_scan=...)`` with ``msa.ops.quant.quantize_int4`` pages): its block maxima against the
quantized values in fp64, the re-scored selection against the reference rule
(``index_precision="int4"``), the quantizer itself and bad input (Triton's interpreter on
CPU)."""
import pytest
import torch

pytest.importorskip("triton")

from msa import MSAConfig  # noqa: E402
from msa.inference import PagedDecoder  # noqa: E402
from msa.ops.decode import paged_decode_reference  # noqa: E402
from msa.ops.decode.select import candidates_width, paged_scan, paged_select, unpack  # noqa: E402
from msa.ops.quant import (fake_quantize_int4, fake_quantize_int8, quantize_int4,  # noqa: E402
                           quantize_int8, unpack_int4)
from tests.helpers import DEVICE  # noqa: E402
from tests.ops.decode.test_fp8 import rescore_case  # noqa: E402
from tests.ops.decode.test_triton import BS, D, HKV, HQ, _cache  # noqa: E402


def test_int4_quantizer_round_trips_within_half_a_step():
    """Group scales ``max|x| / 7`` in fp16, values -7..7 (two's-complement nibbles), dims
    ``j`` and ``j + D/2`` in one byte; saturation past fp16's range; zero groups; int8
    queries."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 128, generator=g, dtype=torch.float64)
    x[0, 0, :32] = 0.0                              # a zero group: scale 1
    x[1, 1, 40] = 1e7                               # past 7 x 65504: saturates
    packed, scales = quantize_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 3, 64)
    assert scales.dtype == torch.float16 and scales.shape == (6, 3, 4)
    assert scales[0, 0, 0] == 1 and scales[1, 1, 1] == 65504
    u = unpack_int4(packed)
    assert int(u.min()) >= -7 and int(u.max()) <= 7
    hi = (packed >> 4).to(torch.int8)                   # two's-complement nibbles
    assert torch.equal(u[..., 64:], torch.where(hi >= 8, hi - 16, hi))
    back = fake_quantize_int4(x)
    step = scales.double().repeat_interleave(32, -1)
    err = (back - x).abs()
    ok = (err <= step / 2 * (1 + 1e-3)) | (x.abs() > 7 * 65504)
    assert bool(ok.all())
    assert back[1, 1, 40] == 7 * 65504
    q8, qs = quantize_int8(x)
    assert q8.dtype == torch.int8 and int(q8.abs().max()) == 127
    assert (fake_quantize_int8(x) - x).abs().max() <= (qs.max() / 2) * (1 + 1e-6)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_int4(torch.zeros(2, 96))


@pytest.mark.parametrize("lengths,nq,per", [((700, 300), 2, 4), ((1000,), 1, None)])
def test_int4_scan_block_maxima_equal_the_quantized_scores(lengths, nq, per):
    """Every block key the scan lists: its id, and its max equal to the fp64 scores of the
    int8 queries and int4 keys (products exact; fp32 group sums)."""
    k, v, ki, table = _cache(lengths, 40, seed=31)
    table = torch.where(table < 0, 0, table)
    k4, ks = quantize_int4(ki)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(2)
    rows, hi = len(lengths) * nq, HKV
    qi = torch.randn(rows, hi, D, generator=g).to(DEVICE)
    cand = torch.full((rows, hi, candidates_width(table.shape[1])), 7, dtype=torch.int64,
                      device=DEVICE)
    paged_scan(qi, k4, table, lens, cand, batch=len(lengths), num_q=nq,
               max_pages=table.shape[1], topk=table.shape[1] + 1, block_size=BS,
               index_scale=D ** -0.5, ki_scales=ks, pages_per_program=per)
    got_m, got_id = unpack(cand.cpu())
    kf, qf = fake_quantize_int4(ki.double()).cpu(), fake_quantize_int8(qi.double()).cpu()
    seen = 0
    for b, n in enumerate(lengths):
        for i in range(nq):
            r, pos = b * nq + i, n - nq + i
            for h in range(hi):
                for j in range(pos // BS):          # earlier blocks: all ranked
                    want = (kf[int(table[b, j])] @ qf[r, h]).max() * D ** -0.5
                    at = (got_id[r, h] == j).nonzero()
                    assert at.numel() == 1, (r, h, j)
                    assert abs(float(got_m[r, h, at[0, 0]]) - float(want)) <= \
                        1e-5 * abs(float(want)) + 1e-6
                    seen += 1
    assert seen > 20


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int4_scan_scores_a_non_finite_query_row_nan(bad):
    """A query row with a NaN or inf scores NaN on every block, as the reference's int8
    rule gives it (``quantize_int8`` makes that row's scale NaN): its blocks rank as the
    most negative, smallest id first; the other rows keep their scores."""
    lengths = (300,)
    k, v, ki, table = _cache(lengths, 40, seed=5)
    k4, ks = quantize_int4(ki)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    qi = torch.randn(1, HKV, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    qi[0, 1, 7] = bad
    assert fake_quantize_int8(qi.double()).isnan()[0, 1].all()
    cand = torch.full((1, HKV, candidates_width(table.shape[1])), 7, dtype=torch.int64,
                      device=DEVICE)
    blocks = (lengths[0] - 1) // BS
    paged_scan(qi, k4, table, lens, cand, batch=1, num_q=1, max_pages=table.shape[1],
               topk=table.shape[1] + 1, block_size=BS, index_scale=D ** -0.5,
               ki_scales=ks, pages_per_program=4)
    m, ids = unpack(cand.cpu())
    live = (ids >= 0) & (ids < table.shape[1])      # (past the lists: the buffer's fill)
    assert sorted(ids[0, 1][live[0, 1]].tolist()) == list(range(blocks))
    assert (m[0, 1][live[0, 1]] == -torch.finfo(torch.float32).max).all()
    assert (m[0, 0][live[0, 0]] > -1e30).all() and m[0, 0][live[0, 0]].isfinite().all()


@pytest.mark.parametrize("hi,nq", [(HKV, 1), (1, 2)])
def test_int4_copy_rescored_like_the_reference(hi, nq):
    """``ki_scan`` with an int4 copy: the scan's best ``topk - 1 + 64`` blocks scored again
    with the exact keys equal the reference rule (``index_precision="int4"``) over 72-79
    blocks, outputs poisoned first; the int4 scan's own top-k differs from the exact one
    on some row (what the re-scoring is for)."""
    n_sel = 3
    lengths = (5000, 4600)
    k, v, ki, table, lens, q, qi, cfg, dec = rescore_case(lengths, 160, 23, 6, hi, nq, n_sel)
    ki4 = quantize_int4(ki)
    rows = len(lengths) * nq
    dec.out.fill_(float("nan"))
    out, topk = dec.run(q, qi, k, v, ki, ki_scan=ki4)
    r_out, _, r_topk = paged_decode_reference(
        q, qi, k, v, ki, table, lens, num_q=nq, topk=n_sel, scale=cfg.scale,
        index_scale=cfg.index_scale, index_precision="int4")
    assert torch.equal(topk, r_topk)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    exact = paged_decode_reference(q, qi, k, v, ki, table, lens, num_q=nq, topk=n_sel,
                                   scale=cfg.scale, index_scale=cfg.index_scale)[2]
    assert torch.equal(topk, exact)         # 64 more candidates hold the exact choice
    scan_only = torch.full_like(topk, -7)
    paged_select(qi, ki4[0], table, lens, batch=len(lengths), num_q=nq,
                 max_pages=table.shape[1], candidates=dec.candidates[:rows],
                 topk_indices=scan_only, block_size=BS, index_scale=cfg.index_scale,
                 ki_scales=ki4[1])
    assert not torch.equal(scan_only, exact)


def test_int4_copy_bad_input_is_named():
    lengths = (300,)
    k, v, ki, table = _cache(lengths, 8, seed=3)
    table = torch.where(table < 0, 0, table)
    k4, ks = quantize_int4(ki)
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, num_index_heads=HKV,
                    index_head_dim=D, block_size=BS, topk=3)
    dec = PagedDecoder(cfg, max_batch=1, num_q=1, max_pages=table.shape[1], device=DEVICE,
                       dtype=torch.float32)
    dec.plan(table, torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
    q = torch.randn(1, HQ, D, device=DEVICE)
    qi = torch.randn(1, HKV, D, device=DEVICE)
    with pytest.raises(ValueError, match="ki_scan's pages"):
        dec.run(q, qi, k, v, ki, ki_scan=(k4[..., :16], ks))
    with pytest.raises(ValueError, match="ki_scan scales must be contiguous fp16"):
        dec.run(q, qi, k, v, ki, ki_scan=(k4, ks.float()))
    with pytest.raises(ValueError, match="ki_scan scales must be contiguous fp16"):
        dec.run(q, qi, k, v, ki, ki_scan=(k4, ks[..., :1]))
    with pytest.raises(TypeError, match="ki_scan must be"):
        dec.run(q, qi, k, v, ki, ki_scan=k4)
    with pytest.raises(ValueError, match="runs on backend='reference' only"):
        import msa
        msa.msa_indexer(qi, ki.reshape(-1, 1, D), torch.tensor([0, 1], device=DEVICE),
                        torch.tensor([0, ki.shape[0] * BS], device=DEVICE), index_precision="int4",
                        backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("nq,kv", [(1, "bf16"), (8, "bf16"), (1, "e4m3"), (2, "e4m3")])
def test_int4_copy_decodes_like_the_triton_scan_and_the_reference(nq, kv, monkeypatch):
    """MiniMax-M3's index shape (4 index heads of 128, pages of 128) on a GPU: with an int4
    copy the decoder's selection (the Gluon scan on Hopper) equals that of the Triton scan
    and the reference rule, and its output the reference's over the same pages (bf16 or
    e4m3 K/V)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from msa.inference import PagedKVCache
    from msa.ops.decode.select import scan_kernel
    cfg = MSAConfig(num_heads=16, num_kv_heads=4, head_dim=128, num_index_heads=4,
                    index_head_dim=128, block_size=128, topk=16)
    lengths = (40000, 9000, 300)
    cache = PagedKVCache.for_model(cfg, num_layers=1, batch=len(lengths), num_pages=460,
                                   dtype=torch.bfloat16 if kv == "bf16" else
                                   torch.float8_e4m3fn, scan_copy="int4", device="cuda")
    g = torch.Generator(device="cuda").manual_seed(7)
    for r, n in enumerate(lengths):
        cache.append(r, *(torch.randn(n, *shape, device="cuda", generator=g)
                          for shape in ((4, 128), (4, 128), (128,))))
    reqs = list(range(len(lengths)))
    table, lens = cache.page_table(reqs), cache.seq_lens(reqs)
    rows = len(lengths) * nq
    q = torch.randn(rows, 16, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    qi = torch.randn(rows, 4, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    (kp, vp, kip), (ks, vs, _) = cache.layer(0), cache.scales(0)
    pages, scales = cache.scan_layer(0)
    dec = PagedDecoder(cfg, max_batch=len(lengths), num_q=nq, max_pages=table.shape[1],
                       device="cuda", graphs=False)
    dec.plan(table, lens)
    if torch.cuda.get_device_capability() == (9, 0) and nq * 4 <= 32:
        assert scan_kernel(qi, pages, (pages.stride(0), pages.stride(1)), 128, nq) == "gluon"
    dec.out.fill_(float("nan"))
    out, topk = (x.clone() for x in dec.run(q, qi, kp, vp, kip, k_scales=ks, v_scales=vs,
                                            ki_scan=(pages, scales)))
    monkeypatch.setenv("MSA_DECODE_KERNEL", "triton")
    t_out, t_topk = dec.run(q, qi, kp, vp, kip, k_scales=ks, v_scales=vs,
                            ki_scan=(pages, scales))
    assert torch.equal(topk, t_topk)
    from msa.ops.quant import dequantize
    kf = kp.float() if ks is None else dequantize(kp, ks)
    vf = vp.float() if vs is None else dequantize(vp, vs)
    r_out, _, r_topk = paged_decode_reference(
        q.float(), qi.float(), kf, vf, kip.float(), table, lens, num_q=nq, topk=16,
        scale=cfg.scale, index_scale=cfg.index_scale, index_precision="int4")
    same = (topk.sort(-1).values == r_topk.sort(-1).values).all(-1)
    assert same.float().mean() >= 0.98            # near-ties of bf16 inputs may swap
    ok = same.all(0)                                    # rows whose every head agrees
    torch.testing.assert_close(out.float()[ok], r_out[ok], rtol=2e-2, atol=2e-2)
