"""Triton KV-outer backward vs the reference backward (interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")

import msa  # noqa: E402
from tests.helpers.brute import make_case, rel_err  # noqa: E402
from tests.helpers import DEVICE, force_smallest_launch, plan_of, random_topk  # noqa: E402
from msa.ops.attention.backward import sparse_attn_bwd  # noqa: E402
from msa.ops.attention.naive import (attention_backward_reference,  # noqa: E402
                                     attention_forward_reference)

CASES = {
    # id: (q_lens, k_lens, frag, hq, hkv, d, block, K, Hs, q_per_item)
    "G2-varlen-split-items": ((33, 1, 50), (200, 64, 300), None, 4, 2, 64, 64, 3, 2, 8),
    "G16-D128": ((9,), (260,), None, 16, 1, 128, 64, 4, 1, 256),
    "G3-odd-group": ((20, 9), (150, 70), None, 6, 2, 64, 64, 2, 2, 4),
    "fragments-shared-kv": ((17, 41, 73), (149, 181, 259), (0, 0, 1), 4, 2, 64, 64, 5, 1, 16),
    "one-token-docs-B128": ((33, 1, 1), (385, 1, 1), None, 4, 2, 64, 128, 3, 2, 256),
    "G8-D256-B128": ((20,), (600,), None, 8, 1, 256, 128, 4, 1, 256),      # bf16 only
    "G16-D256-B64": ((7, 30), (90, 400), None, 16, 1, 256, 64, 5, 1, 16),    # bf16 only
}


def _case(name, dtype):
    q_lens, k_lens, frag, hq, hkv, d, block, kk, hs, qpi = CASES[name]
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=d, fragment_indices=frag, seed=len(name))
    topk = random_topk(c["seg"], hs, kk, block, seed=len(name)).to(DEVICE)
    q, k, v = (c[n].to(DEVICE, dtype) for n in "qkv")
    out, lse = attention_forward_reference(q, k, v, topk, c["seg"], block_size=block,
                                           scale=d ** -0.5)
    dout = torch.randn_like(out)
    return c, topk, (q, k, v, out, lse.float(), dout), block, d ** -0.5, qpi


def _reference(c, topk, q, k, v, out, lse, dout, block, scale):
    return attention_backward_reference(q.double(), k.double(), v.double(), topk, c["seg"],
                                        out.double(), lse.double(), dout.double(),
                                        block_size=block, scale=scale)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("name", [n for n in CASES if "D256" not in n])
def test_triton_backward_matches_reference_fp32(name, deterministic):
    c, topk, (q, k, v, out, lse, dout), block, scale, qpi = _case(name, torch.float32)
    got = sparse_attn_bwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1], 7, qpi),
                          out, lse, dout, scale=scale, deterministic=deterministic)
    ref = _reference(c, topk, q, k, v, out, lse, dout, block, scale)
    for a, r in zip(got, ref):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_triton_backward_smallest_launch_matches_reference(deterministic, monkeypatch):
    """The fallback for small shared memory: one stage, 16 query rows per tile."""
    import msa.ops.attention.backward as bwd
    force_smallest_launch(monkeypatch, bwd)
    c, topk, (q, k, v, out, lse, dout), block, scale, qpi = _case("G2-varlen-split-items",
                                                                    torch.float32)
    got = sparse_attn_bwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1], None, qpi),
                          out, lse, dout, scale=scale, deterministic=deterministic)
    for a, r in zip(got, _reference(c, topk, q, k, v, out, lse, dout, block, scale)):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_packed_tiles_of_a_group_of_five(deterministic):
    """G = 5: a 64-row tile holds 12 queries x 5 heads (4 rows off); items of up to 30
    edges span three tiles, so a row past the tile's queries would count the next tile's
    first edge twice in dK and dV."""
    c = make_case((70,), (200,), hq=10, hkv=2, d=64, seed=11)
    topk = random_topk(c["seg"], 2, 3, 64, seed=11).to(DEVICE)
    q, k, v = (c[n].to(DEVICE) for n in "qkv")
    out, lse = attention_forward_reference(q, k, v, topk, c["seg"], block_size=64,
                                           scale=0.125)
    dout = torch.randn_like(out)
    plan = plan_of(topk, c["seg"], 64, 2, q_per_item=30)
    assert int((plan.chunks[0][2].item_e1 - plan.chunks[0][2].item_e0).max()) > 24
    got = sparse_attn_bwd(q, k, v, topk, plan, out, lse, dout, scale=0.125,
                          deterministic=deterministic)
    ref = _reference(c, topk, q, k, v, out, lse, dout, 64, 0.125)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def test_unselected_keys_get_exact_zero_gradients():
    c, _, (q, k, v, _, _, _), block, scale, _ = _case("G2-varlen-split-items", torch.float32)
    topk = torch.full((2, q.shape[0], 3), -1, dtype=torch.int32, device=DEVICE)
    topk[0, 40, 0] = 1                                  # segment 2, block 1 of KV head 0
    out, lse = attention_forward_reference(q, k, v, topk, c["seg"], block_size=block,
                                           scale=scale)
    dq, dk, dv = sparse_attn_bwd(q, k, v, topk, plan_of(topk, c["seg"], block, 2), out,
                                 lse.float(), torch.randn_like(out), scale=scale)
    used = torch.zeros(k.shape[:2], dtype=torch.bool, device=DEVICE)
    base = c["seg"].k_base[2]
    used[base + 64:base + 128, 0] = True
    assert torch.all(dk[~used] == 0) and torch.all(dv[~used] == 0)
    assert dv[used].abs().sum() > 0
    assert torch.all(dq[torch.arange(q.shape[0], device=DEVICE) != 40] == 0)


@pytest.mark.parametrize("name,det", [("G2-varlen-split-items", False),
                                      ("G8-D256-B128", False), ("G8-D256-B128", True),
                                      ("G16-D256-B64", False), ("G16-D256-B64", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backward_half_precision(dtype, name, det):
    """Half inputs (head dim 256 has no fp32 kernel: two 256-wide blocks exceed shared
    memory), fast and deterministic."""
    c, topk, (q, k, v, out, lse, dout), block, scale, qpi = _case(name, dtype)
    got = sparse_attn_bwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1], None, qpi),
                          out, lse, dout, scale=scale, deterministic=det)
    ref = _reference(c, topk, q, k, v, out, lse, dout, block, scale)
    for a, r in zip(got, ref):
        assert a.dtype == dtype
        cos = torch.nn.functional.cosine_similarity(a.double().flatten(), r.flatten(), dim=0)
        assert cos > 0.999 and rel_err(a, r) < 2e-2          # MiniMax's bf16 gate: cosine > 0.99


@pytest.mark.parametrize("deterministic", [False, True])
def test_public_api_backend_triton_uses_triton_backward(deterministic):
    c, topk, (q, k, v, _, _, _), block, scale, _ = _case("fragments-shared-kv", torch.float32)
    args = (topk, c["cu_seqlens_q"].to(DEVICE), c["cu_seqlens_k"].to(DEVICE))
    kw = dict(fragment_indices=c["fragment_indices"].to(DEVICE), block_size=block)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out = msa.msa_sparse_attention(*leaves, *args, **kw, backend=backend,
                                       deterministic=deterministic)
        out.backward(torch.ones_like(out))
        grads[backend] = [x.grad for x in leaves]
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("block_n", [16, 32])
def test_triton_backward_key_sub_blocks(block_n, deterministic):
    """Several programs per block (one per sub-block of keys), each with its own dQ slots;
    a tail block shorter than some sub-blocks."""
    c, topk, (q, k, v, out, lse, dout), block, scale, qpi = _case("one-token-docs-B128",
                                                                  torch.float32)
    got = sparse_attn_bwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1], 5, qpi),
                          out, lse, dout, scale=scale, block_n=block_n,
                          deterministic=deterministic)
    ref = _reference(c, topk, q, k, v, out, lse, dout, block, scale)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def test_deterministic_backward_is_bitwise_repeatable():
    c, topk, (q, k, v, out, lse, dout), block, scale, _ = _case("fragments-shared-kv",
                                                                torch.bfloat16)
    runs = [sparse_attn_bwd(q, k, v, topk, plan_of(topk, c["seg"], block, 2, None, 4), out,
                            lse, dout, scale=scale, deterministic=True) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_deterministic_sums_overlapping_fragments_in_separate_layers():
    from msa.ops.reduce import base_layers
    c = make_case((17, 41, 73), (149, 181, 259), hq=4, hkv=2, d=64,
                  fragment_indices=(0, 0, 1), seed=0)
    bases, layers, n = base_layers(c["seg"], "cpu")     # [0, 330) and [149, 589) overlap
    assert bases.tolist() == [0, 149] and layers.tolist() == [0, 1] and n == 2
    c = make_case((5, 6), (100, 200), hq=4, hkv=2, d=64, seed=0)     # no fragments
    assert base_layers(c["seg"], "cpu")[2] == 1


def test_rowdot_matches_torch_on_strided_inputs():
    from msa.ops.attention.backward import _rowdot
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 6, 64, generator=g).to(DEVICE)
    b = torch.randn(6, 37, 64, generator=g).to(DEVICE).transpose(0, 1)   # strided rows
    got = _rowdot(a, b)
    assert got.dtype == torch.float32 and not torch.isnan(got).any()
    torch.testing.assert_close(got, (a.double() * b.double()).sum(-1).float(),
                               rtol=1e-5, atol=1e-5)
