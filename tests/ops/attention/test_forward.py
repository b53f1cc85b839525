"""Triton KV-outer forward vs the reference (interpreter on CPU, real kernels on GPU)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from tests.helpers.brute import make_case, rel_err  # noqa: E402
from tests.helpers import (DEVICE, force_launch, force_smallest_launch, plan_of,  # noqa: E402
                           random_topk)
from msa.ops.attention.forward import sparse_attn_fwd  # noqa: E402
from msa.ops.attention.naive import attention_forward_reference  # noqa: E402

CASES = {
    # id: (q_lens, k_lens, frag, hq, hkv, d, block, K, Hs, q_per_item, query_chunk)
    "G2-varlen-chunked-B64": ((33, 1, 50), (200, 64, 300), None, 4, 2, 64, 64, 3, 2, 16, 40),
    "G1-Hs1-B128": ((70,), (300,), None, 2, 2, 64, 128, 2, 1, 256, None),
    "G16-D128-B64": ((9,), (260,), None, 16, 1, 128, 64, 4, 1, 8, None),
    "G3-odd-group": ((20,), (150,), None, 6, 2, 64, 64, 2, 2, 256, 7),
    "G5-packed-tiles": ((70,), (200,), None, 10, 2, 64, 64, 3, 2, 30, None),
    "fragments-shared": ((17, 41, 73), (149, 181, 259), (0, 0, 1), 4, 2, 64, 64, 5, 2, 32, None),
    "G8-D256-B128": ((20,), (600,), None, 8, 1, 256, 128, 4, 1, 256, None),
    "K64-B64": ((5,), (4200,), None, 2, 1, 64, 64, 64, 1, 256, None),
}


def _inputs(name, dtype):
    q_lens, k_lens, frag, hq, hkv, d, block, kk, hs, qpi, qc = CASES[name]
    c = make_case(q_lens, k_lens, hq=hq, hkv=hkv, d=d, fragment_indices=frag, seed=len(name))
    topk = random_topk(c["seg"], hs, kk, block, seed=len(name))
    to = dict(device=DEVICE, dtype=dtype)
    return c, topk.to(DEVICE), (c["q"].to(**to), c["k"].to(**to), c["v"].to(**to))


def _poisoned(q):
    return (torch.full_like(q, float("nan")),
            torch.full(q.shape[:2], float("nan"), device=q.device))


@pytest.mark.parametrize("name", [n for n in CASES if "D256" not in n])
def test_triton_forward_matches_reference_fp32(name):
    _check_fp32(name)


def test_triton_forward_smallest_launch_matches_reference(monkeypatch):
    """The last fallback for small shared memory: 16 rows per tile, the block walked in
    halves."""
    import msa.ops.attention.forward as fwd
    force_smallest_launch(monkeypatch, fwd)
    _check_fp32("G2-varlen-chunked-B64")


def _force_key_sub_blocks(monkeypatch):
    """Launch the forward with its first sub-block configuration (block walked in
    quarters, tuned tile), the one a head-dim-256 forward gets on a 99 KB GPU."""
    import msa.ops.attention.forward as fwd
    return force_launch(monkeypatch, fwd,
                        lambda configs: next(c for c in configs if c.get("KSPLIT")))


@pytest.mark.parametrize("name", ["G2-varlen-chunked-B64", "fragments-shared",
                                  "G16-D128-B64", "G1-Hs1-B128"])
def test_triton_forward_key_sub_blocks_match_reference_fp32(monkeypatch, name):
    used = _force_key_sub_blocks(monkeypatch)
    _check_fp32(name)
    assert used and all(c["KSPLIT"] == CASES[name][6] // 4 for c in used)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_forward_key_sub_blocks_head_dim_256(monkeypatch, dtype):
    used = _force_key_sub_blocks(monkeypatch)
    _check_half(dtype, "G8-D256-B128")
    assert used and used[0]["KSPLIT"] == 32


def _check_fp32(name):
    """fp32 KV-outer forward of case ``name`` into NaN-poisoned outputs vs fp64."""
    c, topk, (q, k, v) = _inputs(name, torch.float32)
    *_, block, _, _, qpi, qc = CASES[name]
    out, lse = _poisoned(q)
    sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1], qc, qpi),
                    scale=q.shape[-1] ** -0.5, out=out, lse=lse, query_major=False)
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=block,
                                               scale=q.shape[-1] ** -0.5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["G2-varlen-chunked-B64", "G8-D256-B128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_forward_half_within_official_tolerance(dtype, name):
    _check_half(dtype, name)


def _check_half(dtype, name):
    """Half-precision forward of case ``name`` (NaN-poisoned outputs) vs fp64."""
    c, topk, (q, k, v) = _inputs(name, dtype)
    block, scale = CASES[name][6], q.shape[-1] ** -0.5
    out, lse = _poisoned(q)
    sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1]), scale=scale,
                    out=out, lse=lse, query_major=False)
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=block, scale=scale)
    # MiniMax's own bf16 tolerances: out 3e-2, lse 1e-3 vs the fp32 reference
    torch.testing.assert_close(out.double(), ref_o, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lse.double(), ref_l, rtol=1e-3, atol=1e-3)
    # and the bf16 P/partials cost at most a few bf16 ulps in aggregate
    assert rel_err(out, ref_o) < 1e-2


@pytest.mark.parametrize("query_major", [False, True])
def test_empty_rows_give_zero_and_neg_inf(query_major):
    c, _, (q, k, v) = _inputs("G2-varlen-chunked-B64", torch.float32)
    topk = torch.full((2, q.shape[0], 3), -1, dtype=torch.int32, device=DEVICE)
    topk[1, 5, 2] = 0
    out, lse = _poisoned(q)
    sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], 64, 2), scale=0.125, out=out,
                    lse=lse, query_major=query_major)
    assert torch.isfinite(lse[5, 2:]).all()
    mask = torch.ones_like(lse, dtype=torch.bool)
    mask[5, 2:] = False
    assert torch.all(out[mask] == 0) and torch.all(torch.isneginf(lse[mask]))


def test_public_api_backend_triton_with_autograd():
    public_api_matches_reference()


def public_api_matches_reference():
    """``msa_sparse_attention`` with Triton's backend and its input gradients equal the
    reference's (whichever forward kernel the environment chooses)."""
    import msa
    c, topk, (q, k, v) = _inputs("G2-varlen-chunked-B64", torch.float32)
    args = (topk, c["cu_seqlens_q"].to(DEVICE), c["cu_seqlens_k"].to(DEVICE))
    q.requires_grad_(True)
    o_t = msa.msa_sparse_attention(q, k, v, *args, block_size=64, backend="triton")
    o_r = msa.msa_sparse_attention(q, k, v, *args, block_size=64, backend="reference")
    torch.testing.assert_close(o_t, o_r, rtol=1e-5, atol=1e-5)
    g_t, = torch.autograd.grad(o_t.sum(), q)
    g_r, = torch.autograd.grad(o_r.sum(), q)
    torch.testing.assert_close(g_t, g_r, rtol=1e-5, atol=1e-5)


def test_fp32_head_dim_256_is_rejected_clearly():
    c, topk, (q, k, v) = _inputs("G8-D256-B128", torch.float32)
    with pytest.raises(NotImplementedError, match="head dim 128"):
        sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], 128, 1), scale=0.0625)


@pytest.mark.parametrize("name", ["G2-varlen-chunked-B64", "G16-D128-B64", "fragments-shared",
                                  "K64-B64"])
def test_query_major_kernel_matches_reference(name):
    c, topk, (q, k, v) = _inputs(name, torch.float32)
    block = CASES[name][6]
    out, lse = _poisoned(q)
    sparse_attn_fwd(q, k, v, topk, plan_of(topk, c["seg"], block, k.shape[1]),
                    scale=q.shape[-1] ** -0.5, out=out, lse=lse, query_major=True)
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=block,
                                               scale=q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_per_item", [1, 3, 4, 5, 9, 64])
def test_forward_items_of_every_tile_count(q_per_item):
    """The kernel loads the next tile's rows while one computes: items of 1-17 queries
    (tiles of 4 queries at 16 heads per group) end on full, partial and single tiles.
    Partials go to NaN-poisoned buffers: a tile left out, or rows written to slots not
    selected, show there."""
    from msa.ops.attention.forward import launch_combine, launch_partials
    from msa.ops.geometry import block_rows
    from msa.ops.plan import plan_chunks
    c = make_case((30,), (300,), hq=16, hkv=1, d=64, seed=5)
    topk = random_topk(c["seg"], 1, 3, 64, seed=5).to(DEVICE).int()
    q, k, v = (c[n].to(DEVICE) for n in "qkv")
    rows = block_rows(c["seg"], 64, DEVICE)
    (q0, q1, plan), = plan_chunks(topk, rows, 0, 30, 30, 1, q_per_item)
    counts = (plan.item_e1 - plan.item_e0)[:plan.num_items]
    busiest = int(torch.bincount(topk[topk >= 0].long().cpu()).max())       # 17 queries
    assert busiest > 8 and int(counts.max()) == min(q_per_item, busiest)
    po = torch.full((30 * 3 * 16 * 64,), float("nan"), device=DEVICE)
    pl = torch.full((30 * 3 * 16,), float("nan"), device=DEVICE)
    launch_partials(q, k, v, rows, plan, q0, po, pl, scale=0.125, topk=3, block_size=64)
    # every selected (query, slot) written, nothing else touched
    written = ~torch.isnan(pl.view(30, 3, 16))
    assert torch.equal(written, (topk[0] >= 0)[:, :, None].expand(30, 3, 16))
    out, lse = _poisoned(q)
    launch_combine(po, pl, topk, rows, out, lse, q0, q1, 1)
    ref_o, ref_l = attention_forward_reference(q.double(), k.double(), v.double(), topk,
                                               c["seg"], block_size=64, scale=0.125)
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, rtol=1e-5, atol=1e-5)


def test_attention_kernel_names_the_forward_that_runs(monkeypatch):
    """``msa.attention_kernel``: the reference without Triton's backend, the query-major
    kernel for at most 1024 queries (batched: B x Tq), else the KV-outer kernel, Gluon
    only on Hopper (``tests/ops/attention/test_gluon.py`` checks that case on a GPU)."""
    import msa
    from msa.ops.attention.forward import forward_kernel
    k, few, many = (torch.zeros(t, h, 128, dtype=torch.bfloat16, device=DEVICE)
                    for t, h in ((2048, 2), (1024, 8), (1025, 8)))
    assert msa.attention_kernel(few, k, k, backend="reference") == "reference"
    assert msa.attention_kernel(few, k, k, backend="triton") == "query_major"
    assert msa.attention_kernel(few.view(2, 512, 8, 128), k.view(2, 1024, 2, 128),
                                k.view(2, 1024, 2, 128), backend="triton") == "query_major"
    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    assert msa.attention_kernel(many, k, k, backend="triton") == \
        ("gluon" if hopper else "triton")
    assert forward_kernel(many, k, None, 128) == "triton"           # the LSE-only pass
    monkeypatch.setenv("MSA_FORWARD_KERNEL", "triton")
    assert msa.attention_kernel(many, k, k, backend="triton") == "triton"
    with pytest.raises(ValueError, match="backend"):
        msa.attention_kernel(many, k, k, backend="cuda")
    with pytest.raises(ValueError, match="block_size"):
        msa.attention_kernel(many, k, k, block_size=96)
    with pytest.raises(ValueError, match="q"):
        msa.attention_kernel(many[0], k, k)
    for bad in (torch.zeros(1025, 16, dtype=torch.int32), torch.zeros(2, 1025, 16),
                [[0]]):
        with pytest.raises(ValueError, match="topk_indices must be"):
            msa.attention_kernel(many, k, k, topk_indices=bad)


def test_forward_kernel_is_chosen_once_per_call(monkeypatch):
    """Over a plan of several chunks the KV-outer forward chooses its kernel once
    (``selection_kernel``) and its chunks' launches take that choice; the output still
    matches the reference (case "G2-varlen-chunked-B64": chunks of 40 of 84 queries)."""
    import msa.ops.attention.forward as fwd
    chosen, real = [], fwd.forward_kernel
    monkeypatch.setattr(fwd, "forward_kernel", lambda *a: chosen.append(real(*a)) or chosen[-1])
    _check_fp32("G2-varlen-chunked-B64")
    assert len(chosen) == 1
