"""FP8 index scoring: e4m3 quantization, the reference's FP8 ranking (the same as ranking
the dequantized inputs; the LSE stays in the inputs' precision) and the Triton FP8 kernel
against it."""
import zlib

import pytest
import torch

import msa
from msa.ops.quant import dequantize, fake_quantize, quantize_e4m3
from tests.helpers.brute import make_case


def test_quantize_round_trip_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.logspace(-3, 3, 50).view(-1, 1, 1)
    x[7, 1] = 0.0
    x8, s = quantize_e4m3(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and s.shape == (50, 3)
    assert float(s[7, 1]) == 1.0 and (x8[7, 1].float() == 0).all()
    back = dequantize(x8, s)
    amax = x.abs().amax(-1, keepdim=True)
    # 3 mantissa bits: error <= 2^-4 of the value (half a step), and at most one
    # subnormal step (2^-9 of the scale) for the smallest values
    err = (back - x).abs()
    assert (err <= torch.maximum(x.abs() / 16, amax * 2.0 ** -9 / 448)).all()
    assert (back.abs().amax(-1) - amax.squeeze(-1)).abs().max() <= 1e-6 * amax.max()


def _case(name, q_lens, k_lens, hi):
    return make_case(q_lens, k_lens, hi=hi, seed=zlib.crc32(name.encode()))


def test_reference_fp8_scan_proposes_and_the_input_scores_decide():
    """FP8 picks ``topk - 1 + 16`` candidates, the inputs' scores choose among them: the
    selection is the input-precision one when the true best blocks are candidates (here
    always), and never a block the FP8 scan did not propose."""
    from msa.ops.quant import FP8_CANDIDATES
    c = _case("ref", (40, 90), (3000, 2600), 2)
    args = (c["cu_seqlens_q"], c["cu_seqlens_k"])
    kw = dict(block_size=64, topk=4, return_lse=True, backend="reference")
    sel8, lse8 = msa.msa_indexer(c["qi"], c["ki"], *args, index_precision="fp8", **kw)
    sel, lse = msa.msa_indexer(c["qi"], c["ki"], *args, **kw)
    assert torch.equal(sel8, sel)
    torch.testing.assert_close(lse8, lse, rtol=0, atol=0)
    # FP8 alone (no re-scoring) differs from the input-precision selection on many rows
    alone, _ = msa.msa_indexer(fake_quantize(c["qi"]), fake_quantize(c["ki"]), *args, **kw)
    assert (alone.sort(-1).values != sel.sort(-1).values).any(-1).float().mean() > 0.05
    # with a zero margin the scan's own choice stands
    wide = msa.msa_indexer(fake_quantize(c["qi"]), fake_quantize(c["ki"]), *args,
                           block_size=64, topk=4 + FP8_CANDIDATES, backend="reference")
    for h in range(2):
        for i in range(sel8.shape[1]):
            assert set(sel8[h, i].tolist()) - {-1} <= set(wide[h, i].tolist())


def test_index_precision_is_checked_by_name():
    c = _case("bad", (10,), (100,), 2)
    with pytest.raises(ValueError, match="index_precision"):
        msa.msa_indexer(c["qi"], c["ki"], c["cu_seqlens_q"], c["cu_seqlens_k"],
                        index_precision="int8")
    with pytest.raises(ValueError, match="index_precision"):
        msa.MSAConfig(index_precision="fp4")


@pytest.mark.parametrize("q_lens,k_lens,hi,block,topk", [
    ((33, 20), (257, 300), 2, 64, 4), ((5, 40), (1400, 129), 4, 128, 16),
    ((30,), (2600,), 2, 64, 3), ((37,), (700,), 3, 64, 4)])
def test_triton_fp8_kernel_matches_the_fp8_reference(q_lens, k_lens, hi, block, topk):
    pytest.importorskip("triton")
    from msa.ops.indexer.naive import indexer_reference
    from msa.ops.indexer.triton import indexer_topk
    from tests.helpers import DEVICE
    c = _case(f"tri{hi}", q_lens, k_lens, hi)
    qi, ki = c["qi"].to(DEVICE), c["ki"].to(DEVICE)
    got = indexer_topk(qi, ki, c["seg"], block_size=block, topk=topk, scale=0.125,
                       index_precision="fp8").cpu()
    want, _ = indexer_reference(c["qi"].double(), c["ki"].double(), c["seg"], block_size=block,
                                topk=topk, scale=0.125, index_precision="fp8")
    assert torch.equal(got, want)


def test_msa_attention_with_fp8_index_scoring_trains():
    c = _case("attn", (70,), (400,), 2)
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3,
                        index_precision="fp8")
    qi = c["qi"].clone().requires_grad_(True)
    out, aux = msa.msa_attention(c["q"], c["k"], c["v"], qi, c["ki"], c["cu_seqlens_q"],
                                 c["cu_seqlens_k"], config=cfg, train_indexer=True,
                                 return_aux=True, backend="reference")
    want = msa.msa_indexer(c["qi"], c["ki"], c["cu_seqlens_q"], c["cu_seqlens_k"],
                           block_size=64, topk=3, backend="reference", index_precision="fp8")
    assert torch.equal(aux.topk_indices, want)
    (out.sum() + aux.kl_loss).backward()
    assert torch.isfinite(qi.grad).all() and qi.grad.abs().sum() > 0
