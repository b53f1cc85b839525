"""Triton indexer-KL backward vs the reference KL (interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")

import msa  # noqa: E402
from tests.helpers.brute import make_case  # noqa: E402
from tests.helpers import DEVICE, force_launch, nan_empty, plan_of, random_topk  # noqa: E402
from msa.ops.attention.naive import attention_forward_reference  # noqa: E402
from msa.ops.indexer.triton import selected_lse  # noqa: E402
from msa.ops.kl.naive import indexer_kl_reference  # noqa: E402
from msa.ops.kl.triton import indexer_kl_bwd  # noqa: E402


CASES = {
    # id: (q_lens, k_lens, frag, hq, hkv, hi, block, K, q_per_item)
    "Hi=Hkv-fragments-split": ((33, 1, 50), (200, 64, 300), (0, 1, 1), 4, 2, 2, 64, 3, 8),
    "Hi=1-G2": ((40,), (300,), None, 4, 2, 1, 64, 3, 256),
    "G16-one-token-docs": ((33, 1, 1), (385, 1, 1), None, 16, 1, 1, 128, 3, 256),
    "G12-Hkv2-Hi1": ((20, 45), (150, 300), None, 24, 2, 1, 64, 3, 16),
}


def _run(name, dtype=torch.float32, **kw):
    q_lens, k_lens, frag, hq, hkv, hi, block, kk, qpi = CASES[name]
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, hi=hi, fragment_indices=frag,
                  seed=len(name), scale=0.7)
    seg = c["seg"]
    topk = random_topk(seg, hi, kk, block, seed=len(name), future=False).to(DEVICE)
    q, k, v, qi, ki = (c[n].to(DEVICE, dtype) for n in ("q", "k", "v", "qi", "ki"))
    _, tlse = attention_forward_reference(q, k, v, topk, seg, block_size=block, scale=0.125)
    ilse = selected_lse(qi, ki, topk, plan_of(topk, seg, block, qi.shape[1]), scale=0.125)
    chunk = kw.pop("query_chunk", None)
    got = indexer_kl_bwd(q, k, tlse, qi, ki, ilse, topk, plan_of(topk, seg, block, hi, chunk, qpi),
                         scale=0.125, index_scale=0.125, loss_coeff=0.3, **kw)
    ref = indexer_kl_reference(q.double(), k.double(), qi.double(), ki.double(), seg, topk,
                               block_size=block, scale=0.125, index_scale=0.125,
                               loss_coeff=0.3)
    return got, ref, c, topk


@pytest.mark.parametrize("det", [{}, {"deterministic": True, "query_chunk": 7}],
                         ids=["fast", "deterministic"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_kl_matches_reference(name, det):
    (loss, dqi, dki), (rl, rq, rk), _, _ = _run(name, **det)
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dqi.double(), rq, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(dki.double(), rk, rtol=1e-4, atol=1e-8)
    assert loss > 0


@pytest.mark.parametrize("det", [{}, {"deterministic": True, "query_chunk": 7}],
                         ids=["fast", "deterministic"])
@pytest.mark.parametrize("name", ["Hi=Hkv-fragments-split", "G16-one-token-docs"])
@pytest.mark.parametrize("ki_once", [True, False], ids=["index-keys-once", "index-keys-per-tile"])
def test_triton_kl_smallest_launch_matches_reference(name, det, ki_once, monkeypatch):
    """The fallbacks for small shared memory: keys (and index keys) loaded per tile,
    fewest rows."""
    import msa.ops.kl.triton as kl_triton
    force_launch(monkeypatch, kl_triton, lambda configs: [
        c for c in configs if not c["K_ONCE"] and c["KI_ONCE"] == ki_once][-1])
    (loss, dqi, dki), (rl, rq, rk), _, _ = _run(name, **det)
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dqi.double(), rq, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(dki.double(), rk, rtol=1e-4, atol=1e-8)


def test_dki_pass_reads_only_the_dz_rows_it_wrote(monkeypatch):
    """The dz buffer between the KL kernel and the dki pass starts as NaN: any row the
    first kernel did not write (an edge, a replica) would poison dki."""
    import msa.ops.kl.triton as kl_triton
    nan_empty(kl_triton, monkeypatch)
    (loss, dqi, dki), (rl, rq, rk), _, _ = _run("Hi=Hkv-fragments-split")
    torch.testing.assert_close(dki.double(), rk, rtol=1e-4, atol=1e-8)
    used = force_launch(monkeypatch, kl_triton, lambda configs: configs[-1])
    (loss, dqi, dki), (rl, rq, rk), _, _ = _run("G16-one-token-docs")
    assert used[-1]["R"] > 1                             # a token's row in several replicas
    torch.testing.assert_close(dki.double(), rk, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("det", [False, True])
def test_triton_kl_head_dim_256_half(det):
    """Head dim 256 (bf16 only: no fp32 kernel at 256) against the fp64 reference."""
    c = make_case((20, 35), (200, 300), hq=8, hkv=1, hi=1, d=256, di=256, seed=3, scale=0.7)
    seg = c["seg"]
    topk = random_topk(seg, 1, 3, 64, seed=3, future=False).to(DEVICE)
    q, k, v, qi, ki = (c[n].to(DEVICE, torch.bfloat16) for n in ("q", "k", "v", "qi", "ki"))
    _, tlse = attention_forward_reference(q, k, v, topk, seg, block_size=64, scale=0.0625)
    ilse = selected_lse(qi, ki, topk, plan_of(topk, seg, 64, qi.shape[1]), scale=0.0625)
    loss, dqi, dki = indexer_kl_bwd(q, k, tlse, qi, ki, ilse, topk, plan_of(topk, seg, 64, 1),
                                    scale=0.0625, index_scale=0.0625, deterministic=det)
    rl, rq, rk = indexer_kl_reference(q.double(), k.double(), qi.double(), ki.double(), seg,
                                      topk, block_size=64, scale=0.0625, index_scale=0.0625)
    assert abs(loss.item() - rl.item()) <= 2e-2 * rl.item()
    for a, r in ((dqi, rq), (dki, rk)):
        cos = torch.nn.functional.cosine_similarity(a.double().flatten(), r.flatten(), dim=0)
        assert cos > 0.999


def test_deterministic_kl_is_bitwise_repeatable():
    runs = [_run("Hi=Hkv-fragments-split", torch.bfloat16, deterministic=True)[0]
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dense_mode_rejects_deterministic():
    c = make_case((20,), (20,), hq=4, hkv=2, hi=2, seed=1)
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3)
    with pytest.raises(ValueError, match="deterministic"):
        msa.msa_attention(*(c[n] for n in ("q", "k", "v", "qi", "ki")), c["cu_seqlens_q"],
                          c["cu_seqlens_k"], config=cfg, mode="dense", deterministic=True)


def _focused_topk(case, seg):
    """Selections of the KL focused cases of MiniMax's tests, ``[2, total_q, 3]``."""
    t = torch.full((2, seg.total_q, 3), -1, dtype=torch.int32)
    if case == "single-owner":                  # only head 0 of the one query selects block 0
        t[0, 0, 0] = 0
    elif case == "adjacent-partial":            # each 1-query document: its own partial block
        t[:, :, 0] = 0
    elif case == "split-owner":                 # every query selects block 0 (8-query items)
        t[:, :, 1] = 0
    return t


@pytest.mark.parametrize("det", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("case,q_lens,k_lens", [
    ("zero-owner", (7,), (128,)), ("single-owner", (1,), (128,)),
    ("adjacent-partial", (1, 1), (39, 35)), ("split-owner", (65,), (128,))])
def test_triton_kl_spec_focused_cases(case, q_lens, k_lens, det):
    """KL focused cases: zero-owner blocks, a single owner (one head), partial blocks of adjacent
    documents, one block split over many items (causal inside the local block)."""
    c = make_case(q_lens, k_lens, hq=4, hkv=2, hi=2, seed=11, scale=0.7)
    seg = c["seg"]
    topk = _focused_topk(case, seg).to(DEVICE)
    q, k, v, qi, ki = (c[n].to(DEVICE) for n in ("q", "k", "v", "qi", "ki"))
    _, tlse = attention_forward_reference(q, k, v, topk, seg, block_size=128, scale=0.125)
    ilse = selected_lse(qi, ki, topk, plan_of(topk, seg, 128, qi.shape[1]), scale=0.125)
    loss, dqi, dki = indexer_kl_bwd(q, k, tlse, qi, ki, ilse, topk,
                                    plan_of(topk, seg, 128, 2, None, 8), scale=0.125,
                                    index_scale=0.125, deterministic=det)
    rl, rq, rk = indexer_kl_reference(q.double(), k.double(), qi.double(), ki.double(), seg,
                                      topk, block_size=128, scale=0.125, index_scale=0.125)
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dqi.double(), rq, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(dki.double(), rk, rtol=1e-4, atol=1e-8)
    if case == "zero-owner":
        assert loss == 0 and not dqi.any() and not dki.any()
    if case == "single-owner":                  # head 1 selected nothing: exactly zero
        assert not dqi[:, 1].any() and dqi[:, 0].any()
    if case == "split-owner":
        assert dki.any()


def test_triton_kl_bf16_within_spec_tolerance():
    (loss, dqi, dki), (rl, rq, rk), _, _ = _run("Hi=Hkv-fragments-split", torch.bfloat16)
    for a, r in ((dqi, rq), (dki, rk)):
        assert a.dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(a.double().flatten(), r.flatten(), dim=0)
        assert cos > 0.99                                   # MiniMax's KL gate on real cases
    torch.testing.assert_close(loss.double(), rl, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_msa_attention_triton_backend_trains_like_the_reference(mode):
    cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=3,
                        kl_loss_coeff=0.5)
    c = make_case((90, 40), (90, 200), hq=4, hkv=2, hi=2, seed=6)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [c[n].to(DEVICE).clone().requires_grad_(True) for n in ("q", "k", "v", "qi",
                                                                          "ki")]
        out, aux = msa.msa_attention(*leaves, c["cu_seqlens_q"].to(DEVICE),
                                     c["cu_seqlens_k"].to(DEVICE), config=cfg,
                                     return_aux=True, backend=backend, mode=mode)
        out.backward(torch.ones_like(out))
        grads[backend] = [x.grad for x in leaves] + [aux.kl_loss]
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("q_per_item", [7, 64, 1024])
@pytest.mark.parametrize("name", ["Hi=Hkv-fragments-split", "Hi=1-G2"])
def test_dense_warmup_kl_triton_matches_reference(name, q_per_item):
    import msa.ops.kl.dense as dense_kl
    q_lens, k_lens, frag, hq, hkv, hi, block, _, _ = CASES[name]
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, hi=hi, fragment_indices=frag,
                  seed=len(name), scale=0.7)
    q, k, qi, ki = (c[n].to(DEVICE) for n in ("q", "k", "qi", "ki"))
    got = dense_kl.indexer_kl_dense(q, k, qi, ki, c["seg"], block_size=block, scale=0.125,
                                    index_scale=0.125, loss_coeff=0.3, q_per_item=q_per_item)
    ref = indexer_kl_reference(q.double(), k.double(), qi.double(), ki.double(), c["seg"],
                               None, block_size=block, scale=0.125, index_scale=0.125,
                               loss_coeff=0.3)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-7)
    assert got[0] > 0


def test_causal_lse_kernel_matches_dense_selection_lse():
    from msa.ops.kl.dense import causal_lse
    c = make_case((33, 1, 50), (200, 64, 300), hq=4, hkv=2, hi=2, fragment_indices=(0, 1, 1),
                  seed=3, scale=0.7)
    seg = c["seg"]
    q, k, qi, ki = (c[n].to(DEVICE) for n in ("q", "k", "qi", "ki"))
    got_t = causal_lse(q, k, seg, scale=0.125, block_size=64)
    got_s = causal_lse(qi, ki, seg, scale=0.125, block_size=64)
    # oracle: the reference KL's own LSEs are over the same causal sets
    pos = seg.positions()
    for b in range(seg.num_segments):
        for j in range(seg.q_len[b]):
            r = seg.q_start[b] + j
            keys = slice(seg.k_base[b], seg.k_base[b] + int(pos[r]) + 1)
            x = torch.einsum("hgd,nhd->hgn", q[r].double().view(2, 2, 64),
                             k[keys].double()) * 0.125
            torch.testing.assert_close(got_t[r].double(), torch.logsumexp(x, -1).flatten(),
                                       rtol=1e-5, atol=1e-5)
            z = (qi[r].double() @ ki[keys, 0].double().T) * 0.125
            torch.testing.assert_close(got_s[r].double(), torch.logsumexp(z, -1),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_per_item", [1, 5, 64])
def test_dense_items_cover_each_causal_query_block_pair_once(q_per_item):
    from msa.ops.kl.dense import dense_items
    from msa.varlen import Segments
    # chunked prefill (q shorter than k), a 1-token segment, fragments sharing KV rows
    seg = Segments([0, 40, 41], [40, 1, 90], [0, 300, 300], [200, 1, 150], 131, 450)
    bs, hi = 32, 2
    it = dense_items(seg, bs, hi, q_per_item, "cpu")
    got = []
    for h, krow, t0, nk, e0, e1 in zip(*(x.tolist() for x in (
            it.item_h, it.item_krow, it.item_t0, it.item_nk, it.item_e0, it.item_e1))):
        assert 0 < e1 - e0 <= q_per_item and 0 < nk <= bs
        got += [(h, krow, t0, nk, q) for q in range(e0, e1)]
    want = []
    pos = seg.positions()
    for b in range(seg.num_segments):
        for j in range(seg.num_blocks(b, bs)):
            t0 = j * bs
            for q in range(seg.q_start[b], seg.q_start[b] + seg.q_len[b]):
                if pos[q] >= t0:                             # the query sees the block
                    want += [(h, seg.k_base[b] + t0, t0, min(bs, seg.k_len[b] - t0), q)
                             for h in range(hi)]
    assert sorted(got) == sorted(want)
