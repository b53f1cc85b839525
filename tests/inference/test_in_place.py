"""Paged prefill attention reading the pages in place (``paged_attention_in_place``:
the KV-outer kernel over page rows, e4m3 pages dequantized per block) equals the
gathering reference path; bad input named (Triton's interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")

from msa.inference import paged_attention, paged_attention_in_place, paged_indexer  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402
from tests.inference.test_fp8_cache import _caches  # noqa: E402


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("lengths,q_lens", [((150, 70), (40, 70)), ((300,), (1,))])
def test_in_place_equals_gathering(fp8, lengths, q_lens):
    fp8_cache, plain = _caches(list(lengths))
    cache = fp8_cache if fp8 else plain
    table, lens = cache.page_table(list(range(len(lengths)))), cache.seq_lens(
        list(range(len(lengths))))
    g = torch.Generator().manual_seed(sum(q_lens))
    q = torch.randn(sum(q_lens), 4, 64, generator=g).to(DEVICE)
    qi = torch.randn(sum(q_lens), 2, 64, generator=g).to(DEVICE)
    kp, vp, kip = cache.layer(0)
    ks, vs, kis = cache.scales(0)
    topk = paged_indexer(qi, kip, table, lens, list(q_lens), block_size=64, topk=3,
                         ki_scales=kis)
    want = paged_attention(q, kp, vp, topk, table, lens, list(q_lens), k_scales=ks,
                           v_scales=vs)
    got = paged_attention_in_place(q, kp, vp, topk, table, lens, list(q_lens), k_scales=ks,
                                   v_scales=vs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_in_place_names_bad_input():
    fp8_cache, plain = _caches([150, 70])
    table, lens = plain.page_table([0, 1]), plain.seq_lens([0, 1])
    q = torch.randn(2, 4, 64).to(DEVICE)
    kp, vp, _ = plain.layer(0)
    topk = torch.tensor([[[0, 2, -1], [1, -1, -1]]] * 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(IndexError, match="topk_indices"):               # block 2 of 150 - 1
        paged_attention_in_place(q, kp, vp, topk + (topk == 2).int() * 5, table, lens)
    with pytest.raises(ValueError, match="k_pages must be contiguous"):
        paged_attention_in_place(q, kp.transpose(1, 2), vp, topk, table, lens)
    with pytest.raises(ValueError, match="q must be"):
        paged_attention_in_place(q[:, :3], kp, vp, topk, table, lens)
    with pytest.raises(TypeError, match="v_pages must be torch.float32 or float8_e4m3fn"):
        paged_attention_in_place(q, kp, vp.double(), topk, table, lens)
    k8, v8, _ = fp8_cache.layer(0)
    with pytest.raises(TypeError, match="k_scales"):
        paged_attention_in_place(q, k8, v8, topk, table, lens)
