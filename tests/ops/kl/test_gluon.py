"""The KL with the Gluon teacher (msa.ops.kl.gluon): the kernel compiles for Hopper on any
machine; the student half reading the teacher's rows runs in the interpreter against the
fp64 reference (teacher rows from torch); on a Hopper GPU the whole KL equals the Triton
kernel's and the reference."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import msa.ops.kl.gluon as kl_gluon  # noqa: E402
import msa.ops.kl.triton as kl_triton  # noqa: E402
from tests.helpers import DEVICE, gluon_ptx, kl_case, nan_empty  # noqa: E402

SIG = {"Q": "*bf16", "K": "*bf16", "PT": "*fp32", "TLSE": "*fp32", "POS": "*i32",
       "EDGE_Q": "*i32", "ITEM_H": "*i32", "ITEM_KROW": "*i32", "ITEM_T0": "*i32",
       "ITEM_NK": "*i32", "ITEM_E0": "*i32", "ITEM_E1": "*i32", "q0": "i32", "edge0": "i32",
       "scale_log2": "fp32", "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32",
       "stride_kh": "i32", "stride_tl": "i32"}


@pytest.mark.parametrize("g,gp", [(16, 16), (6, 8), (1, 1)], ids=["G16", "G6-padded", "G1"])
def test_teacher_compiles_for_sm90_to_gathers_and_wgmma(g, gp):
    """A group of 6 takes 8 rows per query (8 queries per tile), its padding rows masked;
    one head per query (64 queries per tile) loads no tile ahead, which would spill."""
    const = dict(G=g, D=128, BS=128, BLOCK_Q=64 // gp, STAGES=kl_gluon.STAGES,
                 LOAD_WARPS=kl_gluon.LOAD_WARPS, num_warps=4, GP=gp)
    ptx = gluon_ptx("msa.ops.kl.gluon", "teacher_kernel", SIG, const)
    assert "cp.async.cg.shared.global" in ptx and "cp.async.mbarrier.arrive" in ptx
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in ptx
    assert ptx.count("wgmma.mma_async") == 32      # S^T = K Q^T: two halves, two warpgroups
    assert "setmaxnreg" in ptx and "ld.local" not in ptx          # no spills


FUSED_SIG = {"Q": "*bf16", "K": "*bf16", "QI": "*bf16", "KI": "*bf16", "TLSE": "*fp32",
             "ILSE": "*fp32", "DQI": "*fp32", "DZ": "*bf16", "LOSS": "*fp32", "POS": "*i32",
             "EDGE_Q": "*i32", "ITEM_H": "*i32", "ITEM_KROW": "*i32", "ITEM_T0": "*i32",
             "ITEM_NK": "*i32", "ITEM_E0": "*i32", "ITEM_E1": "*i32", "q0": "i32",
             "edge0": "i32", "scale_log2": "fp32", "iscale": "fp32", "coeff": "fp32",
             "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32",
             "stride_tl": "i32", "stride_it": "i32", "stride_ih": "i32", "stride_kit": "i32",
             "stride_lh": "i32"}


def test_fused_kl_compiles_for_sm90_to_student_wgmma_and_atomics():
    """Teacher and student in one kernel: per tile the teacher's ``S^T`` (n64), per 8 or
    16 queries the student's ``z^T = KI qi^T`` and ``dqi^T = KI^T dz`` (n8; n16 at 16
    queries a tile; at 4 queries a tile, G = 16, once per two tiles), ``dqi`` by fp32
    atomics; no local memory in the PTX."""
    consts = [dict(G=g, D=128, DI=128, BS=128, BLOCK_Q=64 // gp, NS=64 // gp * pair, HI=4,
                   STAGES=kl_gluon.STAGES, LOAD_WARPS=kl_gluon.LOAD_WARPS, num_warps=4, GP=gp,
                   PAIR=pair, REGS=216 if pair > 1 else 200, LOAD_REGS=56 if pair > 1 else 72)
              for g, gp, pair in ((16, 16, 2), (6, 8, 1), (4, 4, 1))]
    for c, ptx in zip(consts, gluon_ptx("msa.ops.kl.gluon", "kl_kernel", FUSED_SIG, consts)):
        n = c["NS"]
        assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in ptx
        assert f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16" in ptx
        # 2 warpgroups x (S per tile, z and dqi per PAIR tiles: 16 instructions each)
        assert ptx.count("wgmma.mma_async") == 2 * 16 * (c["PAIR"] + 2)
        assert "atom.global.gpu.relaxed.add.f32" in ptx
        assert "setmaxnreg" in ptx and "ld.local" not in ptx


def plan_items(plan, q0):
    """Each work item of ``plan``: ``(h, krow, t0, nk, e0, e1, queries)`` (the queries of
    its edges, from ``q0``)."""
    for i in range(plan.num_items):
        h, krow, t0, nk, e0, e1 = (int(x[i]) for x in (
            plan.item_h, plan.item_krow, plan.item_t0, plan.item_nk, plan.item_e0,
            plan.item_e1))
        yield h, krow, t0, nk, e0, e1, q0 + plan.edge_q[e0:e1].long()


def torch_teacher(q, k, teacher_lse, q_pos, plan, q0, pt, *, scale_log2, block_size):
    """``kl_gluon.launch``'s contract in torch (fp64): each edge's teacher row (edge ``e``
    of the chunk at row ``e - plan.edge0``)."""
    g = q.shape[1] // k.shape[1]
    scale = scale_log2 / kl_triton.LOG2E
    pt.zero_()
    for h, krow, t0, nk, e0, e1, qs in plan_items(plan, q0):
        heads = slice(h * g, (h + 1) * g)
        s = scale * torch.einsum("ngd,kd->ngk", q[qs, heads].double(),
                                 k[krow:krow + nk, h].double())
        lse = teacher_lse[qs, heads].double()
        p = torch.exp(s - torch.where(lse.isinf(), torch.inf, lse)[..., None])
        visible = t0 + torch.arange(nk, device=q.device) <= q_pos[qs, None].long()
        pt[e0 - plan.edge0:e1 - plan.edge0, :nk] = torch.where(visible, p.mean(1), 0.0).to(pt.dtype)


@pytest.mark.parametrize("det", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,frag", [
    ((33, 1, 50), (200, 64, 300), 4, 2, (0, 1, 1)),          # fragments, one-token segment
    ((40,), (300,), 16, 1, None),                             # a group of 16
])
def test_student_half_from_teacher_rows_matches_reference(q_lens, k_lens, hq, hkv, frag, det,
                                                          monkeypatch):
    """The Triton kernel's ``PT_IN`` half fed the teacher rows (torch here, NaN-filled
    buffer first: a row it read unwritten would poison the result), chunked."""
    monkeypatch.setattr(kl_gluon, "launch", lambda *a, **kw: torch_teacher(
        *a[:6], a[6].fill_(float("nan")), **kw))
    run, (rl, rq, rk) = kl_case(q_lens, k_lens, hq, hkv, frag)
    loss, dqi, dki = run("gluon", chunk=17, det=det)
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dqi.double(), rq, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(dki.double(), rk, rtol=1e-4, atol=1e-8)
    assert loss > 0


def torch_kl(q, k, qi, ki2, teacher_lse, indexer_lse, q_pos, plan, q0, dqi, dz, loss, *,
             scale_log2, index_scale, coeff, block_size):
    """``kl_gluon.launch_kl``'s contract in torch (fp64): the teacher rows, then per edge
    ``dz = coeff (p_student - p_teacher)`` into its row of ``dz``, ``index_scale dz @ ki``
    added to ``dqi`` and the loss terms (times ``coeff``) to ``loss``."""
    pt = torch.empty(plan.num_edges, block_size, dtype=torch.float64, device=q.device)
    torch_teacher(q, k, teacher_lse, q_pos, plan, q0, pt, scale_log2=scale_log2,
                  block_size=block_size)
    dz.zero_()
    for h, krow, t0, nk, e0, e1, qs in plan_items(plan, q0):
        keys = ki2[krow:krow + nk].double()
        lps = index_scale * qi[qs, h].double() @ keys.T - indexer_lse[h, qs].double()[:, None]
        visible = t0 + torch.arange(nk, device=q.device) <= q_pos[qs, None].long()
        ps = torch.where(visible, lps.exp(), 0.0)
        p_t = pt[e0 - plan.edge0:e1 - plan.edge0, :nk]
        loss += coeff * torch.where(p_t > 0, p_t * (p_t.clamp_min(1e-300).log() - lps),
                                    0.0).sum().to(loss.dtype)
        d = (coeff * (ps - p_t)).to(dz.dtype)
        dz[e0 - plan.edge0:e1 - plan.edge0, :nk] = d
        dqi[qs, h] += (index_scale * d.double() @ keys).to(dqi.dtype)


@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,frag", [
    ((33, 1, 50), (200, 64, 300), 8, 2, (0, 1, 1)),          # fragments, one-token segment
    ((40,), (300,), 16, 1, None),                             # a group of 16
])
def test_fused_path_matches_reference(q_lens, k_lens, hq, hkv, frag, monkeypatch):
    """The orchestration of the fused kernel (``launch_kl`` in torch here, the ``dz``
    buffer NaN-filled first): its ``dqi``, loss and ``dz`` rows, then the ``dki`` pass,
    chunked, equal the reference; deterministic mode keeps the split path."""
    fused = []
    monkeypatch.setattr(kl_gluon, "fuses", lambda *a: True)
    monkeypatch.setattr(kl_gluon, "launch_kl", lambda *a, **kw: fused.append(1) or torch_kl(
        *a[:10], a[10].fill_(float("nan")), *a[11:], **kw))
    monkeypatch.setattr(kl_gluon, "launch", lambda *a, **kw: torch_teacher(
        *a[:6], a[6].fill_(float("nan")), **kw))
    run, (rl, rq, rk) = kl_case(q_lens, k_lens, hq, hkv, frag)
    loss, dqi, dki = run("gluon", chunk=17)
    assert fused
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dqi.double(), rq, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(dki.double(), rk, rtol=1e-4, atol=1e-8)
    fused.clear()
    run("gluon", chunk=17, det=True)
    assert not fused


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,frag", [
    ((3000,), (3000,), 64, 4, None),                          # MiniMax-M3: G = 16
    ((2000,), (2000,), 64, 8, None),                          # G = 8
    ((700, 1, 900), (4000, 1, 2500), 32, 8, None),            # G = 4, prefixes
    ((500, 300), (1500, 900), 16, 8, (0, 1)),                 # G = 2, fragments
    ((600,), (1800,), 4, 4, None),                            # G = 1
    ((1500,), (3000,), 24, 4, None),                          # G = 6: 8 rows per query
    ((900, 1), (900, 700), 21, 7, None),                      # G = 3, a one-token segment
])
def test_gluon_teacher_kl_equals_triton_and_reference(q_lens, k_lens, hq, hkv, frag,
                                                      monkeypatch):
    run, (rl, rq, rk) = kl_case(q_lens, k_lens, hq, hkv, frag, kk=16, block=128,
                              dtype=torch.bfloat16, seed=sum(q_lens), d=128)
    q = torch.empty(1, hq, 128, device=DEVICE, dtype=torch.bfloat16)
    if not kl_gluon.supported(q, q[:, :hkv], hkv, 128):
        pytest.skip("the Gluon teacher needs a Hopper GPU")
    assert kl_triton.kl_kernel(q, q[:, :hkv], hkv, 128) == "gluon"     # head dim 128 cases
    nan_empty(kl_triton, monkeypatch)            # every pt row written before it is read
    a, b, b2 = run("triton"), run("gluon"), run("gluon", chunk=1000)
    for x, y, r in zip(b, a, (rl, rq, rk)):
        assert not x.isnan().any()
        cos = torch.nn.functional.cosine_similarity(x.double().flatten(), y.double().flatten(), 0)
        assert cos > 0.99999, cos
        cos = torch.nn.functional.cosine_similarity(x.double().flatten(), r.flatten(), 0)
        assert cos > 0.999, cos
    torch.testing.assert_close(b[0].double(), rl, rtol=2e-2, atol=0)
    for x, y in zip(b, b2):                                        # chunking changes nothing
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-6)
    d, d2, dt = run("gluon", det=True), run("gluon", det=True), run("triton", det=True)
    for x, y, z in zip(d, d2, dt):
        assert torch.equal(x, y)                                   # bitwise repeatable
        cos = torch.nn.functional.cosine_similarity(x.double().flatten(), z.double().flatten(), 0)
        assert cos > 0.99999, cos


def test_indexer_kl_kernel_names_the_kl_that_runs(monkeypatch):
    """``msa.indexer_kl_kernel``: the reference without Triton's backend or with one index
    key head per index head, the Gluon teacher on Hopper where it applies, else Triton;
    with q / k trained on Hopper the attention backward's rows (not deterministic, not
    under ``MSA_KL_KERNEL=forward``)."""
    import msa
    q = torch.zeros(300, 64, 128, dtype=torch.bfloat16, device=DEVICE)
    k = torch.zeros(300, 4, 128, dtype=torch.bfloat16, device=DEVICE)
    qi, ki = q[:, :4], k[:, :1]
    assert msa.indexer_kl_kernel(q, k, qi, ki, backend="reference") == "reference"
    assert msa.indexer_kl_kernel(q, k, qi, k, backend="triton") == "reference"   # Hi keys
    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    assert msa.indexer_kl_kernel(q, k, qi, ki, backend="triton") == \
        ("gluon" if hopper else "triton")
    batched = [x.view(3, 100, *x.shape[1:]) for x in (q, k, qi, ki)]
    assert msa.indexer_kl_kernel(*batched, backend="triton") == ("gluon" if hopper else "triton")
    six = torch.zeros(300, 24, 128, dtype=torch.bfloat16, device=DEVICE)      # G = 6
    assert msa.indexer_kl_kernel(six, k, qi, ki, backend="triton") == \
        ("gluon" if hopper else "triton")
    wide = torch.zeros(300, 260, 128, dtype=torch.bfloat16, device=DEVICE)    # G = 65
    assert msa.indexer_kl_kernel(wide, k, qi, ki, backend="triton") == "triton"
    trained = [x.detach().requires_grad_(True) for x in (q, k, qi, ki)]
    assert msa.indexer_kl_kernel(*trained, backend="triton") == \
        ("attention_backward" if hopper else "triton")       # msa.ops.kl.deferred
    assert msa.indexer_kl_kernel(*trained, backend="triton", deterministic=True) == \
        ("gluon" if hopper else "triton")
    monkeypatch.setenv("MSA_KL_KERNEL", "forward")           # the KL kept in the forward
    assert msa.indexer_kl_kernel(*trained, backend="triton") == ("gluon" if hopper else "triton")
    monkeypatch.setenv("MSA_KL_KERNEL", "triton")
    assert msa.indexer_kl_kernel(q, k, qi, ki, backend="triton") == "triton"
    with pytest.raises(ValueError, match="block_size"):
        msa.indexer_kl_kernel(q, k, qi, ki, block_size=96)
    with pytest.raises(ValueError, match="qi"):
        msa.indexer_kl_kernel(q, k, qi[:5], ki)
    with pytest.raises(ValueError, match="backend"):
        msa.indexer_kl_kernel(q, k, qi, k, backend="cuda")
    with pytest.raises(ValueError, match="heads"):
        msa.indexer_kl_kernel(q[:, :6], k, qi, ki)                   # 6 q heads, 4 KV heads
    with pytest.raises(TypeError, match="k"):
        msa.indexer_kl_kernel(q, k.float(), qi, ki)


def test_gluon_teacher_where_it_cannot_run_says_so():
    run, _ = kl_case((40,), (300,), 16, 1)
    with pytest.raises(ValueError, match="kernel must be"):
        run("cuda")
    if DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("the teacher runs on Hopper")
    with pytest.raises(NotImplementedError, match="Gluon KL teacher runs on Hopper"):
        run("gluon")
