"""The Gluon FP8 decode attention (msa.ops.decode.gluon): it compiles for Hopper on any
machine (pages by TMA, 16-byte shared loads of the e4m3 tiles, no single-byte ones, no
spills, 16-byte output stores), its relabeled shared-memory views are the slot's bytes,
and on a Hopper GPU it gives what the Triton kernel gives on the same e4m3 pages, and
the fp64 reference on their dequantized values, also when the rows past each query hold
NaN bytes."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from msa.ops.decode.triton import attend_kernel, paged_attend, partial_buffers  # noqa: E402
from msa.ops.quant import dequantize, quantize_e4m3  # noqa: E402
from tests.helpers import gluon_ptx  # noqa: E402

def _sig():
    from msa.ops.decode import gluon as g
    desc = f"tensordesc<fp8e4nv[128, 128],{g.PAGE_L.value!r}>"
    return {"Q": "*bf16", "K_DESC": desc, "V_DESC": desc, "KS": "*fp32", "VS": "*fp32",
            "TOPK_INDICES": "*i32", "PAGE_TABLE": "*i32", "SEQ_LENS": "*i32", "OUT": "*bf16",
            "LSE": "*fp32", "scale_log2": "fp32", "rows_per_page": "i32",
            "rows_per_head": "i32", **{f"stride_{s}": "i32" for s in (
                "qt", "qh", "th", "tq", "tb", "ot", "oh", "lt", "sp", "sh")}}


def test_compiles_for_sm90_to_wide_shared_loads():
    const = dict(NQ=8, HS=4, G=16, TOPK=16, num_warps=4)
    ptx = gluon_ptx("msa.ops.decode.gluon", "fp8_attn_kernel", _sig(), const)
    assert ptx.count("cp.async.bulk.tensor.2d") == 4        # K and V pages by TMA, 2 sites
    assert "ld.shared.v4.b32" in ptx and "ld.shared.u8" not in ptx and \
        "ld.shared.b8" not in ptx
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    assert "cvt.rn.f16x2.e4m3x2" in ptx and "ld.local" not in ptx
    # the output in 16-byte stores (no 2-byte store per element): 32 bytes a thread
    assert ptx.count("st.global.v4.b32") == 2 and "st.global.b16" not in ptx


def test_views_are_the_slot_bytes():
    """Each relabeled view maps (warp, key, column) to the byte the ring slot holds there:
    its key row, and the column ``phys_*`` of the relabeled index, swizzled by chunk."""
    from msa.ops.decode import gluon as g

    def offsets(layout):
        """coordinates -> offset of a shared linear layout (offset bit i: basis i, XOR)"""
        table = {}
        for o in range(1 << len(layout.offset_bases)):
            c = [0, 0, 0]
            for i, basis in enumerate(layout.offset_bases):
                if o >> i & 1:
                    c = [a ^ b for a, b in zip(c, basis)]
            table[tuple(c)] = o
        return table

    gen = torch.Generator().manual_seed(0)
    for view, phys, (key_dim, col_dim) in ((g.K_VIEW.value, g.phys_k, (2, 1)),
                                            (g.V_VIEW.value, g.phys_v, (1, 2))):
        table = offsets(view)
        assert len(table) == 128 * 128
        for _ in range(256):
            w, k, d = (int(torch.randint(0, n, (1,), generator=gen)) for n in (4, 32, 128))
            coords = [w, 0, 0]
            coords[key_dim], coords[col_dim] = k, d
            row, col = w * 32 + k, phys(d)
            assert table[tuple(coords)] == row * 128 + (((col >> 4) ^ (row & 7)) << 4) + \
                (col & 15)
    assert sorted(g.phys_k(d) for d in range(128)) == list(range(128))
    assert sorted(g.phys_v(d) for d in range(128)) == list(range(128))


def _case(nq, lengths, hq, hkv, topk, seed, vllm_layout=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bs, d = 128, 128
    per = max(-(-n // bs) for n in lengths)
    pages = len(lengths) * per + 3
    k = torch.randn(pages, hkv, bs, d, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(pages, hkv, bs, d, device="cuda", generator=g, dtype=torch.bfloat16)
    (k8, ks), (v8, vs) = quantize_e4m3(k), quantize_e4m3(v)
    kw = {}
    if vllm_layout:     # K then V in each row, scales [Hkv, pages * 128] (msa.integrations.vllm)
        kv8 = torch.cat([k8, v8], -1)
        k8, v8 = kv8[..., :d], kv8[..., d:]
        ks, vs = (x.transpose(0, 1).reshape(hkv, -1).contiguous() for x in (ks, vs))
        kw = dict(kv_strides=(kv8.stride(0), kv8.stride(1), kv8.stride(2)),
                  scale_strides=(bs, ks.stride(0)))
    table = torch.randperm(pages, device="cuda", generator=g)[:len(lengths) * per]
    table = table.view(len(lengths), per).to(torch.int32).contiguous()
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    rows = len(lengths) * nq
    q = torch.randn(rows, hq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    # a random selection of earlier blocks (distinct, -1 padded), the local block last
    sel = torch.full((hkv, rows, topk), -1, dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed)
    for r in range(rows):
        pos = lengths[r // nq] - nq + r % nq
        local = pos // bs
        for h in range(hkv):
            earlier = torch.randperm(local, generator=gen)[:topk - 1].tolist()
            sel[h, r, :len(earlier) + 1] = torch.tensor(earlier + [local], dtype=torch.int32)
    return q, k8, ks, v8, vs, table, lens, sel.cuda(), kw


def _poison_past_end(k8, ks, v8, vs, table, lens, vllm_layout):
    """NaN in every K/V byte and scale past each request's last token (its last page):
    no query sees those keys, so nothing may change."""
    for b, n in enumerate(lens.tolist()):
        if n % 128:
            page = int(table[b, (n - 1) // 128])
            for x in (k8, v8):
                x.view(torch.uint8)[page, :, n % 128:] = 0x7F          # e4m3 NaN
            for x in (ks, vs):
                if vllm_layout:
                    x[:, page * 128 + n % 128:(page + 1) * 128] = float("nan")
                else:
                    x[page, :, n % 128:] = float("nan")


def _attend(q, k8, ks, v8, vs, table, lens, sel, nq, hkv, **kw):
    rows, hq, d = q.shape
    out = torch.full_like(q, float("nan"))
    lse = torch.full((rows, hq), float("nan"), device="cuda")
    paged_attend(q, k8, v8, sel, table, lens, batch=len(lens), num_q=nq, num_kv_heads=hkv,
                 out=out, lse=lse, partials=partial_buffers(len(lens), nq, hq, hkv, d,
                                                            sel.shape[2], "cuda"),
                 block_size=128, scale=d ** -0.5, k_scales=ks, v_scales=vs, **kw)
    return out, lse


def _reference(q, k, v, table, lens, sel, nq, pick):
    """fp64 softmax over the selected blocks' visible keys of (row, KV head), rows ``pick``
    (the others zero)."""
    rows, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.zeros(rows, hq, d, dtype=torch.float64)
    lse = torch.zeros(rows, hq, dtype=torch.float64)
    for r in pick.tolist():
        b = r // nq
        pos = int(lens[b]) - nq + r % nq
        for h in range(hkv):
            blocks = [int(x) for x in sel[h, r] if int(x) >= 0]
            kk = torch.cat([k[int(table[b, j]), h] for j in blocks]).double()
            vv = torch.cat([v[int(table[b, j]), h] for j in blocks]).double()
            keep = torch.cat([torch.arange(j * 128, j * 128 + 128) for j in blocks]) <= pos
            s = q[r, h * g:(h + 1) * g].double() @ kk[keep].T * d ** -0.5
            lse[r, h * g:(h + 1) * g] = torch.logsumexp(s, 1)
            out[r, h * g:(h + 1) * g] = torch.softmax(s, 1) @ vv[keep]
    return out, lse


@pytest.mark.gpu
@pytest.mark.parametrize("nq,lengths,hq,hkv,topk,vllm_layout", [
    (8, (5000, 2000, 129, 4000) * 5, 64, 4, 16, False),  # M3 group of 16, partial blocks
    (8, (5000, 2000, 129, 4000) * 5, 64, 4, 16, True),   # the same in vLLM's layout
    (4, (3000, 1300) * 9, 64, 8, 16, False),             # G = 8
    (2, (2600, 700, 128) * 12, 24, 4, 7, False),         # G = 6, 7 blocks, a full local block
    (1, (1000,) * 80, 32, 8, 16, False),                 # G = 4, fewer blocks than the top-k
])
def test_gluon_equals_triton_and_reference(nq, lengths, hq, hkv, topk, vllm_layout,
                                           monkeypatch):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for Hopper")
    q, k8, ks, v8, vs, table, lens, sel, kw = _case(nq, lengths, hq, hkv, topk, nq + hq,
                                                    vllm_layout)
    assert len(lengths) * nq * hkv > 132            # one program per (row, KV head)
    strides = kw.get("kv_strides", (k8.stride(0), k8.stride(1), k8.stride(2)))
    assert attend_kernel(q, k8, v8, hkv, 128, strides, 1, False) == "gluon"
    out, lse = _attend(q, k8, ks, v8, vs, table, lens, sel, nq, hkv, **kw)
    _poison_past_end(k8, ks, v8, vs, table, lens, vllm_layout)
    p_out, p_lse = _attend(q, k8, ks, v8, vs, table, lens, sel, nq, hkv, **kw)
    assert torch.equal(p_out, out) and torch.equal(p_lse, lse)
    monkeypatch.setenv("MSA_DECODE_KERNEL", "triton")
    t_out, t_lse = _attend(q, k8, ks, v8, vs, table, lens, sel, nq, hkv, **kw)
    assert not out.isnan().any() and not lse.isnan().any()
    # bf16 outputs of two fp16-MMA kernels that sum in another order: a few bf16 ulps
    # (largest difference 9.8e-4 at the M3 shape, decode_fp8_gluon_ab_h200_2026-12-04.json)
    torch.testing.assert_close(out.float(), t_out.float(), rtol=1e-2, atol=3e-3)
    torch.testing.assert_close(lse, t_lse, rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), t_out.float().flatten(), 0)
    assert cos > 0.99999
    # the fp64 reference on the dequantized pages, for a few rows (every request's last)
    pick = torch.arange(nq - 1, q.shape[0], nq)[::4]
    if vllm_layout:     # back to [P, Hkv, 128] scales for the dequantization
        p, h = k8.shape[0], k8.shape[1]
        ks, vs = (x.view(h, p, 128).transpose(0, 1) for x in (ks, vs))
    r_out, r_lse = _reference(q.cpu(), dequantize(k8, ks).cpu(), dequantize(v8, vs).cpu(),
                              table.cpu(), lens.cpu(), sel.cpu(), nq, pick)
    torch.testing.assert_close(out[pick].double().cpu(), r_out[pick], rtol=1e-2, atol=3e-3)
    torch.testing.assert_close(lse[pick].double().cpu(), r_lse[pick], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gluon_reads_a_cache_through_pages_of_its_rows(monkeypatch):
    """The transformers decode layout: K/V ``[B, Hkv, Tk, D]`` of a static cache read
    through pages of their blocks (``kv_strides = (BS * D, Tk * D, D)``, page ``b * Hkv *
    NB + j``, scales ``[B, Hkv, Tk]``); the TMA rows span the whole cache (``tma_rows``):
    what the Triton kernel gives on the same bytes."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for Hopper")
    b, hkv, hq, nb, bs, d, topk = 40, 4, 64, 16, 128, 128, 16
    tk = nb * bs
    g = torch.Generator(device="cuda").manual_seed(9)
    (k8, ks), (v8, vs) = (quantize_e4m3(torch.randn(b, hkv, tk, d, device="cuda", generator=g))
                          for _ in range(2))
    table = (torch.arange(b, device="cuda").view(-1, 1) * hkv * nb +
             torch.arange(nb, device="cuda")).to(torch.int32).contiguous()
    lengths = [int(x) for x in torch.randint(300, tk, (b,), generator=torch.Generator())]
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(b, hq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    sel = torch.full((hkv, b, topk), -1, dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    for r, n in enumerate(lengths):
        local = (n - 1) // bs
        for h in range(hkv):
            earlier = torch.randperm(local, generator=gen)[:topk - 1].tolist()
            sel[h, r, :len(earlier) + 1] = torch.tensor(earlier + [local], dtype=torch.int32)
    sel = sel.cuda()
    kw = dict(kv_strides=(bs * d, tk * d, d), scale_strides=(bs, tk))
    assert attend_kernel(q, k8, v8, hkv, bs, kw["kv_strides"], 1, False) == "gluon"
    out, lse = _attend(q, k8, ks, v8, vs, table, lens, sel, 1, hkv, **kw)
    monkeypatch.setenv("MSA_DECODE_KERNEL", "triton")
    t_out, t_lse = _attend(q, k8, ks, v8, vs, table, lens, sel, 1, hkv, **kw)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), t_out.float(), rtol=1e-2, atol=3e-3)
    torch.testing.assert_close(lse, t_lse, rtol=1e-5, atol=1e-5)
