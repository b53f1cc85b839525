"""Multi-token decode attention over the union of a request's selected blocks
(``msa.ops.decode.multi``) equals the reference on the same selection: overlapping and
distinct blocks per token, -1 slots, one or several splits, bf16-like and FP8 pages
(Triton's interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")

import msa.ops.decode.multi as multi  # noqa: E402
import msa.ops.decode.triton as dt  # noqa: E402
from msa.inference import paged_attention  # noqa: E402
from msa.ops.quant import dequantize, quantize_e4m3  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402
from tests.ops.decode.test_triton import BS, D, HKV, HQ, _cache  # noqa: E402

K = 4


def _selection(lengths, nq, g):
    """Head-major ``[HKV, B*Q, K]``: each token's local block, then a mix of blocks
    shared with the other tokens, its own picks and -1 slots."""
    rows = []
    for n in lengths:
        for i in range(nq):
            local = (n - nq + i) // BS
            earlier = torch.randperm(local, generator=g)[:K - 1].tolist() if local else []
            if i % 2 and len(earlier) > 1:                  # some tokens stop early
                earlier = earlier[:1]
            rows.append(earlier + [-1] * (K - 1 - len(earlier)) + [local])
    one = torch.tensor(rows, dtype=torch.int32)
    return torch.stack([one, one.roll(1, dims=-1)]).to(DEVICE)      # per KV head


def _attend(q, k, v, topk, table, lens, nq, **scales):
    rows = q.shape[0]
    f32 = dict(dtype=torch.float32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((rows, HQ), float("nan"), **f32)
    n = dt.partial_rows(len(lens), nq, HKV, K)
    dt.paged_attend(q, k, v, topk, table, lens, batch=len(lens), num_q=nq,
                    num_kv_heads=HKV, out=out, lse=lse, po=torch.empty(n * 16 * D, **f32),
                    pl=torch.empty(n * 16, **f32), block_size=BS, scale=D ** -0.5, **scales)
    return out, lse


@pytest.mark.parametrize("lengths,nq,programs", [
    ((300, 200, 130), 4, None),          # several splits per (request, KV head)
    ((300, 200), 3, 1),                   # one program per (request, KV head)
    ((260,), 8, None),
])
@pytest.mark.parametrize("fp8", [False, True])
def test_union_equals_reference(monkeypatch, lengths, nq, programs, fp8):
    if programs is not None:
        monkeypatch.setattr(multi, "TARGET_PROGRAMS", programs)
        monkeypatch.setattr(dt, "TARGET_PROGRAMS", programs)
    calls = []
    launch = multi.launch_union
    monkeypatch.setattr(dt, "launch_union", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    k, v, _, table = _cache(lengths, 24, seed=nq)
    table = torch.where(table < 0, 0, table)
    g = torch.Generator().manual_seed(len(lengths) + nq)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lengths) * nq, HQ, D, generator=g).to(DEVICE)
    topk = _selection(lengths, nq, g)
    q_lens = [nq] * len(lengths)
    if fp8:
        (k8, ks), (v8, vs) = quantize_e4m3(k), quantize_e4m3(v)
        out, lse = _attend(q, k8, v8, topk, table, lens, nq, k_scales=ks, v_scales=vs)
        k, v = dequantize(k8, ks), dequantize(v8, vs)
    else:
        out, lse = _attend(q, k, v, topk, table, lens, nq)
    assert calls, "the union kernel did not run"
    want = paged_attention(q, k, v, topk, table, lens, q_lens)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the per-token kernel on the same selection: the same outputs and LSEs
    monkeypatch.setattr(dt, "MAX_ROWS", 0)
    out1, lse1 = (_attend(q, k8, v8, topk, table, lens, nq, k_scales=ks, v_scales=vs) if fp8
                  else _attend(q, k, v, topk, table, lens, nq))
    torch.testing.assert_close(out, out1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse1, rtol=1e-5, atol=1e-5)
