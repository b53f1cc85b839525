"""The fused decode kernels on e4m3 pages with per-row scales equal the same kernels on
the dequantized pages (Triton's interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")

from msa.ops.decode.select import candidates_width, unpack  # noqa: E402
from msa.ops.decode.triton import paged_decode, partial_buffers  # noqa: E402
from msa.ops.quant import dequantize, fake_quantize, quantize_e4m3  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402
from tests.ops.decode.test_triton import BS, D, HKV, HQ, K, _cache  # noqa: E402


def _run(q, qi, k, v, ki, table, lens, nq, **scales):
    rows, hi = q.shape[0], qi.shape[1]
    f32 = dict(dtype=torch.float32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((rows, HQ), float("nan"), **f32)
    topk = torch.full((hi, rows, K), -7, dtype=torch.int32, device=DEVICE)
    cand = torch.full((rows, hi, candidates_width(table.shape[1])), 7, dtype=torch.int64,
                      device=DEVICE)
    paged_decode(q, qi, k, v, ki, table, lens, batch=len(lens), num_q=nq,
                 max_pages=table.shape[1], num_kv_heads=HKV, candidates=cand,
                 topk_indices=topk, out=out, lse=lse,
                 partials=partial_buffers(len(lens), nq, HQ, HKV, D, K, DEVICE),
                 block_size=BS, scale=D ** -0.5, index_scale=D ** -0.5, **scales)
    return out, lse, topk, cand


def _poison_past_end(ks, vs, table, lengths):
    """Copies of the row scales whose slots past each request's last token (never read)
    hold inf / NaN."""
    ks, vs = ks.clone(), vs.clone()
    for r, n in enumerate(lengths):
        last = int(table[r, (n - 1) // BS])
        ks[last, :, n % BS or BS:] = float("inf")
        vs[last, :, n % BS or BS:] = float("nan")
    return ks, vs


@pytest.mark.parametrize("lengths,nq", [((300, 65, 129), 1), ((200, 130), 4)])
def test_fp8_pages_decode_like_their_dequantized_copy(lengths, nq):
    k, v, ki, table = _cache(lengths, 24, seed=11)
    table = torch.where(table < 0, 0, table)
    (k8, ks), (v8, vs), (ki8, kis) = quantize_e4m3(k), quantize_e4m3(v), quantize_e4m3(ki)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(len(lengths) * nq, HQ, D, generator=g).to(DEVICE)
    qi = torch.randn(len(lengths) * nq, HKV, D, generator=g).to(DEVICE)
    ks, vs = _poison_past_end(ks, vs, table, lengths)
    got = _run(q, qi, k8, v8, ki8, table, lens, nq, k_scales=ks, v_scales=vs, ki_scales=kis)
    # e4m3 index keys are scored against e4m3 index queries (docs/semantics.md)
    want = _run(q, fake_quantize(qi), dequantize(k8, ks).nan_to_num(0.0, 0.0, 0.0),
                dequantize(v8, vs).nan_to_num(0.0, 0.0, 0.0), dequantize(ki8, kis), table,
                lens, nq)
    assert torch.equal(got[2], want[2])
    (got_m, got_id), (want_m, want_id) = unpack(got[3]), unpack(want[3])
    assert torch.equal(got_id, want_id)                 # the scan's ranked lists
    torch.testing.assert_close(got_m, want_m, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # and near the unquantized cache (e4m3: 3 mantissa bits)
    plain = _run(q, qi, k, v, ki, table, lens, nq)
    cos = torch.nn.functional.cosine_similarity(got[0].flatten(), plain[0].flatten(), dim=0)
    assert cos > 0.99


def test_fp8_pages_meet_bf16_queries_in_fp16():
    """bf16 queries over e4m3 pages: the tiles enter fp16 MMAs undequantized, the queries
    scaled per row into fp16's range (``fp8_softmax_step``); against fp32 queries over the
    dequantized pages, within the bf16 output's rounding. Large query rows (beyond fp16's
    range), a zero row and small rows included; the scales of slots past the last token
    poisoned."""
    lengths, nq = (300, 65, 129), 2
    k, v, ki, table = _cache(lengths, 24, seed=5)
    table = torch.where(table < 0, 0, table)
    (k8, ks), (v8, vs) = quantize_e4m3(k), quantize_e4m3(v)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    want_kv = (dequantize(k8, ks), dequantize(v8, vs))
    ks, vs = _poison_past_end(ks, vs, table, lengths)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(len(lengths) * nq, HQ, D, generator=g).to(DEVICE)
    q[0, 0] *= 3e5                      # |q| up to ~1e6: past fp16's 65504
    q[1, 3] = 0.0
    q[2] *= 1e-3
    q = q.bfloat16()
    qi = torch.randn(len(lengths) * nq, HKV, D, generator=g).to(DEVICE)
    got = _run(q, qi, k8, v8, ki, table, lens, nq, k_scales=ks, v_scales=vs)
    want = _run(q.float(), qi, *want_kv, ki, table, lens, nq)
    assert torch.equal(got[2], want[2])
    assert got[0].isfinite().all()
    torch.testing.assert_close(got[0].float(), want[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)


def rescore_case(lengths, num_pages, seed, query_seed, hi, nq, n_sel, **decoder):
    """A cache (``_cache``, unused page ids as 0), its lengths, fp32 queries ``q, qi`` and a
    float32 ``PagedDecoder`` selecting ``n_sel`` blocks, planned, its exact-keys buffer
    poisoned: ``(k, v, ki, table, lens, q, qi, cfg, dec)``."""
    from msa import MSAConfig
    from msa.inference import PagedDecoder
    k, v, ki, table = _cache(lengths, num_pages, seed=seed)
    table = torch.where(table < 0, 0, table)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(query_seed)
    rows = len(lengths) * nq
    q = torch.randn(rows, HQ, D, generator=g).to(DEVICE)
    qi = torch.randn(rows, hi, D, generator=g).to(DEVICE)
    cfg = MSAConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, num_index_heads=hi,
                    index_head_dim=D, block_size=BS, topk=n_sel)
    dec = PagedDecoder(cfg, max_batch=len(lengths), num_q=nq, max_pages=table.shape[1],
                       device=DEVICE, dtype=torch.float32, **decoder)
    dec.exact.fill_(5)
    dec.plan(table, lens)
    return k, v, ki, table, lens, q, qi, cfg, dec


@pytest.mark.parametrize("hi,per,nq", [(HKV, None, 2), (1, 8, 1), (HKV, 4, 2)])
def test_fp8_index_copy_rescored_like_the_reference(hi, per, nq):
    """``ki_scan``: the scan reads an e4m3 copy of the index keys, its best ``topk - 1 +
    16`` blocks are scored again with the exact keys; equal to the reference rule
    (``index_precision="fp8"``), lists of one block and ranked lists of 8 and 4 pages;
    and the re-scoring changes rows of the FP8 selection (top 8 of 40 random blocks)."""
    n_sel = 8
    from msa.ops.decode import paged_decode_reference
    lengths = (2500, 1900, 700)
    k, v, ki, table, lens, q, qi, cfg, dec = rescore_case(lengths, 90, 21, 4, hi, nq, n_sel,
                                                          pages_per_program=per)
    ki8, kis = quantize_e4m3(ki)
    fp8_only = dec.run(q, qi, k, v, ki8, ki_scales=kis)[1].clone()
    out, topk = dec.run(q, qi, k, v, ki, ki_scan=(ki8, kis))
    r_out, _, r_topk = paged_decode_reference(
        q, qi, k, v, ki, table, lens, num_q=nq, topk=n_sel, scale=cfg.scale,
        index_scale=cfg.index_scale, index_precision="fp8")
    assert torch.equal(topk, r_topk)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    assert not torch.equal(topk, fp8_only)
    with pytest.raises(TypeError, match="ki_scan goes with"):
        dec.run(q, qi, k, v, ki8, ki_scales=kis, ki_scan=(ki8, kis))
    with pytest.raises(ValueError, match="ki_scan's pages"):
        dec.run(q, qi, k, v, ki, ki_scan=(ki8[:-1], kis[:-1]))
    with pytest.raises(ValueError, match="ki_scan scales must be contiguous fp32"):
        dec.run(q, qi, k, v, ki, ki_scan=(ki8, kis.double()))
