"""PagedKVCache with FP8 (e4m3) pages: tokens quantized on write with per-row scales,
the reference path and the fused decoder read them back dequantized; bad input named."""
import pytest
import torch

from msa import MSAConfig
from msa.inference import PagedKVCache, paged_attention, paged_indexer
from msa.ops.quant import E4M3, dequantize
from tests.helpers import DEVICE

CFG = MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, index_head_dim=64, block_size=64,
                topk=3)


def _fill(cache, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    for r, n in enumerate(lengths):
        k, v = torch.randn(n, 2, 64, generator=g), torch.randn(n, 2, 64, generator=g)
        cache.append(r, k.to(DEVICE), v.to(DEVICE), torch.randn(n, 64, generator=g).to(DEVICE))


def _caches(lengths, index_dtype=E4M3):
    out = []
    for dtype, idt in ((E4M3, index_dtype), (torch.float32, torch.float32)):
        c = PagedKVCache(16, 64, 2, 64, 64, dtype=dtype, index_dtype=idt, device=DEVICE,
                         config=CFG)
        for r in range(len(lengths)):
            c.allocate(r)
        _fill(c, lengths)
        out.append(c)
    return out


def test_fp8_pages_hold_the_tokens_within_e4m3_precision():
    fp8, ref = _caches([150, 70])
    assert fp8.k_pages.dtype == E4M3 and fp8.k_scales.shape == fp8.k_pages.shape[:-1]
    for pages, scales, plain in ((fp8.k_pages, fp8.k_scales, ref.k_pages),
                                 (fp8.ki_pages, fp8.ki_scales, ref.ki_pages)):
        back = dequantize(pages, scales)
        assert ((back - plain).abs() <= plain.abs() / 16 + 1e-2).all()


def test_reference_path_reads_fp8_pages_dequantized():
    fp8, ref = _caches([150, 70])
    table, lens = fp8.page_table([0, 1]), fp8.seq_lens([0, 1])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 64, generator=g).to(DEVICE)
    qi = torch.randn(2, 2, 64, generator=g).to(DEVICE)
    kp, vp, kip = fp8.layer(0)
    ks, vs, kis = fp8.scales(0)
    topk = paged_indexer(qi, kip, table, lens, block_size=64, topk=3, ki_scales=kis)
    want = paged_indexer(qi, dequantize(kip, kis), table, lens, block_size=64, topk=3)
    assert torch.equal(topk, want)
    out = paged_attention(q, kp, vp, topk, table, lens, k_scales=ks, v_scales=vs)
    exact = paged_attention(q, dequantize(kp, ks), dequantize(vp, vs), topk, table, lens)
    torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-6)
    plain = paged_attention(q, *ref.layer(0)[:2], topk, table, lens)
    assert torch.nn.functional.cosine_similarity(out.flatten(), plain.flatten(), dim=0) > 0.99


def test_reference_path_names_missing_or_misshaped_scales():
    fp8, _ = _caches([150, 70])
    table, lens = fp8.page_table([0, 1]), fp8.seq_lens([0, 1])
    q, qi = torch.randn(2, 4, 64).to(DEVICE), torch.randn(2, 2, 64).to(DEVICE)
    kp, vp, kip = fp8.layer(0)
    ks, vs, kis = fp8.scales(0)
    topk = paged_indexer(qi, kip, table, lens, block_size=64, topk=3, ki_scales=kis)
    with pytest.raises(TypeError, match="k_scales goes with float8_e4m3fn pages"):
        paged_attention(q, kp, vp, topk, table, lens)
    with pytest.raises(ValueError, match="v_scales must be contiguous fp32"):
        paged_attention(q, kp, vp, topk, table, lens, k_scales=ks, v_scales=vs[..., 1:])
    with pytest.raises(ValueError, match="ki_scales must be contiguous fp32"):
        paged_indexer(qi, kip, table, lens, block_size=64, topk=3, ki_scales=kis.double())
    with pytest.raises(TypeError, match="ki_scales goes with"):
        paged_indexer(qi, dequantize(kip, kis), table, lens, block_size=64, topk=3,
                      ki_scales=kis)


def test_fused_decoder_reads_fp8_pages():
    pytest.importorskip("triton")
    from msa.inference import PagedDecoder
    fp8, _ = _caches([150, 70])
    table, lens = fp8.page_table([0, 1]), fp8.seq_lens([0, 1])
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 64, generator=g).to(DEVICE)
    qi = torch.randn(2, 2, 64, generator=g).to(DEVICE)
    dec = PagedDecoder(CFG, max_batch=2, num_q=1, max_pages=table.shape[1], device=DEVICE,
                       dtype=torch.float32)
    dec.plan(table, lens)
    ks, vs, kis = fp8.scales(0)
    out, topk = dec.run(q, qi, *fp8.layer(0), k_scales=ks, v_scales=vs, ki_scales=kis)
    kp, vp, kip = fp8.layer(0)
    assert dec.attention_kernel(q, kp, vp) == "triton"      # head dim 64: no Gluon kernel
    want_topk = paged_indexer(qi, kip, table, lens, block_size=64, topk=3, ki_scales=kis)
    assert torch.equal(topk, want_topk)
    want = paged_attention(q, kp, vp, want_topk, table, lens, k_scales=ks, v_scales=vs)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="k_scales"):
        dec.run(q, qi, *fp8.layer(0))
    with pytest.raises(ValueError, match="v_scales"):
        dec.run(q, qi, *fp8.layer(0), k_scales=ks, v_scales=vs[:, :1], ki_scales=kis)
    # FP8 K/V beside bf16-like (here fp32) index keys: the default of an FP8 cache
    mixed, _ = _caches([150, 70], index_dtype=torch.float32)
    ks, vs, kis = mixed.scales(0)
    assert kis is None and mixed.ki_pages.dtype == torch.float32
    out, topk = dec.run(q, qi, *mixed.layer(0), k_scales=ks, v_scales=vs)
    kp, vp, kip = mixed.layer(0)
    want_topk = paged_indexer(qi, kip, table, lens, block_size=64, topk=3)
    assert torch.equal(topk, want_topk)
    want = paged_attention(q, kp, vp, want_topk, table, lens, k_scales=ks, v_scales=vs)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="ki_scales"):
        dec.run(q, qi, *mixed.layer(0), k_scales=ks, v_scales=vs, ki_scales=ks[:, 0])


def test_fp8_cache_keeps_bf16_index_keys_unless_asked():
    cache = PagedKVCache(4, 64, 2, 64, 64, dtype=E4M3)
    assert cache.ki_pages.dtype == torch.bfloat16 and cache.scales(0)[2] is None
    assert cache.k_pages.dtype == E4M3 and cache.scales(0)[0] is not None


def test_fp8_cache_rejects_non_finite_tokens_and_odd_dtypes():
    cache = PagedKVCache(4, 64, 2, 64, 64, dtype=E4M3, device=DEVICE)
    cache.allocate(0)
    k = torch.randn(3, 2, 64, device=DEVICE)
    bad = k.clone()
    bad[1, 0, 5] = float("inf")
    with pytest.raises(ValueError, match="v holds NaN or inf"):
        cache.append(0, k, bad, torch.randn(3, 64, device=DEVICE))
    assert cache.lengths[0] == 0 and len(cache.free_pages) == 4     # nothing appended
    cache.append(0, k, k, torch.randn(3, 64, device=DEVICE))
    assert cache.lengths[0] == 3
    with pytest.raises(ValueError, match="dtype"):
        PagedKVCache(4, 64, 2, 64, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        PagedKVCache(4, 64, 2, 64, 64, dtype=torch.float8_e5m2)
    with pytest.raises(ValueError, match="index_dtype"):
        PagedKVCache(4, 64, 2, 64, 64, index_dtype=torch.int8)


@pytest.mark.parametrize("copy,rule", [("e4m3", "fp8"), ("int4", "int4")])
def test_scan_copy_is_written_and_ranks_by_its_rule(copy, rule):
    """``scan_copy``: the copy is ``quantize_e4m3`` / ``quantize_int4`` of the stored index
    keys; ``attend`` (reference path here, the fused decoder with ``ki_scan`` on a GPU)
    selects by the ``index_precision="fp8"`` / ``"int4"`` rule; bad input named."""
    from msa.ops.quant import quantize_e4m3, quantize_int4
    lengths = [2500, 1300]
    c = PagedKVCache(64, 64, 2, 64, 64, dtype=torch.float32, scan_copy=copy,
                     device=DEVICE, config=CFG)
    for r in range(len(lengths)):
        c.allocate(r)
    _fill(c, [n - 1 for n in lengths])
    pages, scales = c.scan_layer(0)
    want_p, want_s = (quantize_e4m3 if copy == "e4m3" else quantize_int4)(c.ki_pages[0])
    assert torch.equal(pages.view(torch.uint8), want_p.view(torch.uint8))
    assert torch.equal(scales, want_s)
    g = torch.Generator().manual_seed(9)
    q, qi = torch.randn(2, 1, 4, 64, generator=g), torch.randn(2, 1, 2, 64, generator=g)
    k, v = torch.randn(2, 1, 2, 64, generator=g), torch.randn(2, 1, 2, 64, generator=g)
    ki = torch.randn(2, 1, 1, 64, generator=g)
    q, qi, k, v, ki = (x.to(DEVICE) for x in (q, qi, k, v, ki))
    out = c.attend(0, q, k, v, qi, ki)
    table, lens = c.page_table([0, 1]), c.seq_lens([0, 1])
    topk = paged_indexer(qi[:, 0], c.ki_pages[0], table, lens, block_size=64, topk=3,
                         index_precision=rule)
    want = paged_attention(q[:, 0], c.k_pages[0], c.v_pages[0], topk, table, lens)
    torch.testing.assert_close(out[:, 0], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scan_copy"):
        PagedKVCache(4, 64, 2, 64, 64, index_dtype=E4M3, scan_copy=copy)
    with pytest.raises(ValueError, match="scan_copy"):
        PagedKVCache(4, 64, 2, 64, 64, scan_copy="yes")
    with pytest.raises(ValueError, match="scan_copy='int4' needs an index_dim"):
        PagedKVCache(4, 64, 2, 64, 96, scan_copy="int4")
    c.allocate(2)
    with pytest.raises(ValueError, match="ki holds NaN"):
        c.append(2, k[0], v[0], torch.full((1, 64), float("nan"), device=DEVICE))
