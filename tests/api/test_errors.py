"""Every public function rejects bad input with an error naming the argument."""
import pytest
import torch

import msa
from msa.varlen import make_segments


def _packed(tq=10, tk=20, hq=4, hkv=2, d=64, hi=2, dtype=torch.float32):
    return dict(q=torch.randn(tq, hq, d, dtype=dtype), k=torch.randn(tk, hkv, d, dtype=dtype),
                v=torch.randn(tk, hkv, d, dtype=dtype), qi=torch.randn(tq, hi, 64, dtype=dtype),
                ki=torch.randn(tk, 1, 64, dtype=dtype),
                cu_q=torch.tensor([0, tq], dtype=torch.int32),
                cu_k=torch.tensor([0, tk], dtype=torch.int32))


def _attn(c, topk=None, **kw):
    topk = torch.zeros(2, c["q"].shape[0], 1, dtype=torch.int32) if topk is None else topk
    return msa.msa_sparse_attention(c["q"], c["k"], c["v"], topk, c["cu_q"], c["cu_k"],
                                    block_size=64, **kw)


@pytest.mark.parametrize("field,value,exc,match", [
    ("num_heads", 6, ValueError, "num_kv_heads"),
    ("head_dim", 96, ValueError, "head_dim"),
    ("block_size", 32, ValueError, "block_size"),
    ("topk", 0, ValueError, "topk"),
    ("topk", 65, ValueError, "topk"),
    ("num_index_heads", 3, ValueError, "num_index_heads"),
    ("index_head_dim", 100, ValueError, "index_head_dim"),
    ("softmax_scale", -1.0, ValueError, "softmax_scale"),
    ("kl_loss_coeff", float("nan"), ValueError, "kl_loss_coeff"),
])
def test_config_rejects(field, value, exc, match):
    with pytest.raises(exc, match=match):
        msa.MSAConfig(**{field: value})


def test_config_defaults_are_minimax_m3():
    cfg = msa.MSAConfig()
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.index_heads, cfg.index_dim,
            cfg.block_size, cfg.topk) == (64, 4, 128, 4, 128, 128, 16)
    assert cfg.scale == 128 ** -0.5 and cfg.index_scale == 128 ** -0.5


@pytest.mark.parametrize("cu_q,cu_k,frag,match", [
    ([0, 4, 10], [0, 20], None, "same length"),
    ([1, 10], [0, 20], None, r"cu_seqlens_q\[0\]"),
    ([0, 6, 5, 10], [0, 5, 10, 20], None, "non-decreasing"),
    ([0, 9], [0, 20], None, "total_q"),
    ([0, 10], [0, 19], None, "total_k"),
    ([0, 8, 10], [0, 4, 20], None, "k_len=4 < q_len=8"),
    ([0, 5, 10], [0, 10, 20], [0, 2], "fragment_indices"),
    ([0, 5, 10], [0, 10, 20], [0], "fragment_indices must have"),
])
def test_inconsistent_cu_seqlens(cu_q, cu_k, frag, match):
    f = None if frag is None else torch.tensor(frag, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        make_segments(10, 20, torch.tensor(cu_q, dtype=torch.int32),
                      torch.tensor(cu_k, dtype=torch.int32), fragment_indices=f)


def test_cu_seqlens_dtype_rank_and_max_seqlen():
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32 or int64"):
        make_segments(10, 20, torch.tensor([0.0, 10.0]), torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="cu_seqlens_k must be 1-D"):
        make_segments(10, 20, torch.tensor([0, 10]), torch.tensor([[0, 20]]))
    with pytest.raises(ValueError, match="max_seqlen_q"):
        make_segments(10, 20, torch.tensor([0, 10]), torch.tensor([0, 20]), max_seqlen_q=5)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        make_segments(10, 20, torch.tensor([0, 10]), torch.tensor([0, 20]), max_seqlen_k=19)


def test_attention_rejects_bad_tensors():
    c = _packed()
    with pytest.raises(ValueError, match="q must be"):
        msa.msa_sparse_attention(c["q"][0], c["k"], c["v"], None, c["cu_q"], c["cu_k"])
    with pytest.raises(ValueError, match="q heads .* multiple of k heads"):
        _attn(dict(c, k=torch.randn(20, 3, 64), v=torch.randn(20, 3, 64)))
    with pytest.raises(ValueError, match="head dim must be one of"):
        _attn(dict(c, q=torch.randn(10, 4, 32), k=torch.randn(20, 2, 32),
                   v=torch.randn(20, 2, 32)))
    with pytest.raises(TypeError, match="dtypes must match"):
        _attn(dict(c, v=c["v"].double()))
    with pytest.raises(TypeError, match="k must be float"):
        _attn(dict(c, k=c["k"].int()))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        _attn(dict(c, v=torch.randn(20, 1, 64)))
    with pytest.raises(ValueError, match="needs cu_seqlens_q and cu_seqlens_k"):
        msa.msa_sparse_attention(c["q"], c["k"], c["v"], None)
    with pytest.raises(ValueError, match="softmax_scale"):
        _attn(c, softmax_scale=float("inf"))
    with pytest.raises(ValueError, match="block_size"):
        msa.msa_sparse_attention(c["q"], c["k"], c["v"], None, c["cu_q"], c["cu_k"],
                                 block_size=100)


def test_attention_rejects_bad_topk():
    c = _packed()
    with pytest.raises(TypeError, match="topk_indices must be int32 or int64"):
        _attn(c, torch.zeros(2, 10, 1))
    with pytest.raises(ValueError, match=r"topk_indices must have shape \[H, total_q=10, K\]"):
        _attn(c, torch.zeros(3, 10, 1, dtype=torch.int32))
    with pytest.raises(ValueError,
                       match=r"topk_indices must hold 1..64 slots per row \(K\), got K=65"):
        _attn(c, torch.zeros(2, 10, 65, dtype=torch.int32))
    with pytest.raises(ValueError, match="got K=0"):
        _attn(c, torch.zeros(2, 10, 0, dtype=torch.int32))
    with pytest.raises(IndexError, match=r"topk_indices\[1, 4, 0\] = 1 is out of range"):
        t = torch.zeros(2, 10, 1, dtype=torch.int32)
        t[1, 4, 0] = 1                      # 20 keys = 1 block of 64
        _attn(c, t)
    with pytest.raises(IndexError, match="out of range"):
        _attn(c, torch.full((2, 10, 1), -3, dtype=torch.int32))
    with pytest.raises(ValueError, match="repeats a block id"):
        _attn(c, torch.zeros(2, 10, 2, dtype=torch.int32))


def test_batched_layout_errors():
    q, k = torch.randn(2, 8, 4, 64), torch.randn(2, 4, 2, 64)
    with pytest.raises(ValueError, match="k length 4 < q length 8"):
        msa.msa_sparse_attention(q, k, k, torch.zeros(2, 2, 8, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="k batch 3"):
        msa.msa_sparse_attention(q, torch.randn(3, 8, 2, 64), torch.randn(3, 8, 2, 64), None)
    with pytest.raises(ValueError, match="packed layout"):
        msa.msa_sparse_attention(q, q[:, :, :2], q[:, :, :2], None,
                                 cu_seqlens_q=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"topk_indices must have shape \[B=2"):
        msa.msa_sparse_attention(q, q[:, :, :2], q[:, :, :2],
                                 torch.zeros(2, 2, 7, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"q is batched \[B, T, H, D\], so k must be 4-D"):
        msa.msa_sparse_attention(q, k[0], k[0], None)
    with pytest.raises(ValueError, match=r"q is packed \[total_q, H, D\], so k must be 3-D"):
        msa.msa_sparse_attention(q[0], k, k, None, cu_seqlens_q=torch.tensor([0, 8]),
                                 cu_seqlens_k=torch.tensor([0, 4]))


def test_indexer_rejects_bad_input():
    c = _packed()
    args = (c["qi"], c["ki"], c["cu_q"], c["cu_k"])
    with pytest.raises(ValueError, match="ki must have 1 or Hi=2 heads"):
        msa.msa_indexer(c["qi"], torch.randn(20, 3, 64), c["cu_q"], c["cu_k"])
    with pytest.raises(ValueError, match="ki head dim"):
        msa.msa_indexer(c["qi"], torch.randn(20, 1, 128), c["cu_q"], c["cu_k"])
    with pytest.raises(ValueError, match="topk"):
        msa.msa_indexer(*args, topk=0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lse_temperature"):
            msa.msa_indexer(*args, lse_temperature=bad)
    with pytest.raises(ValueError, match="ki is on"):
        msa.msa_indexer(c["qi"], torch.randn(20, 1, 64, device="meta"), c["cu_q"], c["cu_k"])


def test_kl_and_composite_reject_bad_input():
    c = _packed()
    base = (c["q"], c["k"], c["qi"], c["ki"])
    with pytest.raises(ValueError, match="qi must have 1 or Hkv=2 index heads"):
        msa.msa_indexer_kl(c["q"], c["k"], torch.randn(10, 4, 64), c["ki"], None, c["cu_q"],
                           c["cu_k"])
    with pytest.raises(ValueError, match="qi/ki tokens"):
        msa.msa_indexer_kl(c["q"], c["k"], c["qi"][:5], c["ki"], None, c["cu_q"], c["cu_k"])
    with pytest.raises(ValueError, match="loss_coeff"):
        msa.msa_indexer_kl(*base, None, c["cu_q"], c["cu_k"], loss_coeff=float("nan"))
    with pytest.raises(ValueError, match=r"topk_indices must have shape \[H, total_q=10, K\] "
                                         r"with H in \[2\]"):
        msa.msa_indexer_kl(*base, torch.zeros(1, 10, 1, dtype=torch.int32), c["cu_q"],
                           c["cu_k"], block_size=64)
    with pytest.raises(ValueError, match="mode"):
        msa.msa_attention(c["q"], c["k"], c["v"], c["qi"], c["ki"], c["cu_q"], c["cu_k"],
                          mode="fast")


def test_topk_check_kernel_matches_torch_flags():
    """The one-pass GPU check (run here by Triton's interpreter) flags exactly the rows the
    torch check flags: out-of-range entries and repeated ids, any K, int32 and int64."""
    pytest.importorskip("triton")
    from msa.ops.topk_check import topk_flags
    g = torch.Generator().manual_seed(0)
    for k, dtype in [(1, torch.int32), (5, torch.int64), (16, torch.int32), (64, torch.int32)]:
        limit = torch.randint(1, 80, (37,), generator=g)
        for case in ("ok", "bad", "dup", "both"):
            t = torch.full((2, 37, k), -1, dtype=dtype)
            for h in range(2):
                for q in range(37):
                    n = min(k, int(limit[q]))
                    t[h, q, :n] = torch.randperm(int(limit[q]), generator=g)[:n].to(dtype)
            if case in ("bad", "both"):
                t[1, 5, 0] = int(limit[5]) if case == "bad" else -2
            if case in ("dup", "both") and k > 1:
                t[0, 30, k - 1] = t[0, 30, 0].clamp_min(0)
                t[0, 30, 0] = t[0, 30, k - 1]
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            view = t.transpose(0, 1).contiguous().transpose(0, 1)      # strided input
            got = topk_flags(view.to(dev), limit.to(dev))
            want = (case in ("bad", "both"), case in ("dup", "both") and k > 1)
            assert got == want, (k, dtype, case)


@pytest.mark.gpu
def test_attention_rejects_bad_topk_on_gpu():
    """CUDA top-k ids go through the one-pass Triton check; the errors are the same."""
    c = {n: x.cuda() for n, x in _packed(dtype=torch.bfloat16).items()}
    with pytest.raises(IndexError, match=r"topk_indices\[1, 4, 0\] = 1 is out of range"):
        t = torch.zeros(2, 10, 1, dtype=torch.int32, device="cuda")
        t[1, 4, 0] = 1
        _attn(c, t)
    with pytest.raises(IndexError, match="out of range"):
        _attn(c, torch.full((2, 10, 1), -3, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="repeats a block id"):
        _attn(c, torch.zeros(2, 10, 2, dtype=torch.int32, device="cuda"))
    ok = torch.tensor([[[0, -1]] * 10] * 2, dtype=torch.int64, device="cuda")
    assert _attn(c, ok).shape == c["q"].shape


def _attention_args(c):
    return (c["q"], c["k"], c["v"], c["qi"], c["ki"], c["cu_q"], c["cu_k"])


@pytest.mark.parametrize("field,value,match", [
    ("head_dim", 128, r"config.head_dim=128 does not match the tensors: q head dim = 64"),
    ("num_heads", 8, r"config.num_heads=8 does not match the tensors: q heads = 4"),
    ("num_kv_heads", 1, r"config.num_kv_heads=1 does not match the tensors: k heads = 2"),
    ("num_index_heads", 1, r"config.num_index_heads=1 does not match the tensors: qi heads"),
    ("index_head_dim", 128, r"config.index_head_dim=128 does not match the tensors: qi head"),
])
def test_config_must_match_the_tensors(field, value, match):
    base = dict(num_heads=4, num_kv_heads=2, head_dim=64, index_head_dim=64, block_size=64,
                topk=2)
    base[field] = value
    if field == "num_heads":
        base["num_kv_heads"] = 2
    with pytest.raises(ValueError, match=match):
        msa.msa_attention(*_attention_args(_packed()), config=msa.MSAConfig(**base))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(topk=True), TypeError, r"topk must be an int, got True"),
    (dict(num_heads=64.0), TypeError, r"num_heads must be an int, got 64.0"),
    (dict(num_heads="64"), TypeError, r"num_heads must be an int, got '64'"),
    (dict(block_size=128.0), TypeError, r"block_size must be an int"),
    (dict(num_index_heads=4.0), TypeError, r"num_index_heads must be an int"),
    (dict(softmax_scale="0.1"), TypeError, r"softmax_scale must be a float"),
])
def test_config_field_types(kw, exc, match):
    with pytest.raises(exc, match=match):
        msa.MSAConfig(**kw)


def test_config_must_be_an_msaconfig():
    with pytest.raises(TypeError, match=r"config must be an msa.MSAConfig, got dict "
                                        r"\(write MSAConfig\(\*\*dict\) for a dict\)"):
        msa.msa_attention(*_attention_args(_packed()), config=dict(num_heads=4))


def test_cu_seqlens_as_lists_and_numpy_are_accepted():
    np = pytest.importorskip("numpy")
    c = _packed()
    topk = torch.zeros(2, 10, 1, dtype=torch.int32)
    ref = msa.msa_sparse_attention(c["q"], c["k"], c["v"], topk, c["cu_q"], c["cu_k"],
                                   block_size=64)
    for cu_q, cu_k in (([0, 10], [0, 20]), (np.array([0, 10]), np.array([0, 20])),
                       ((0, 10), (0, 20))):
        out = msa.msa_sparse_attention(c["q"], c["k"], c["v"], topk, cu_q, cu_k,
                                       block_size=64)
        assert torch.equal(out, ref)
    with pytest.raises(TypeError, match="cu_seqlens_q must hold integers"):
        msa.msa_sparse_attention(c["q"], c["k"], c["v"], topk, [0.0, 10.0], [0, 20])
    with pytest.raises(TypeError, match="cu_seqlens_k must be a 1-D int32/int64 tensor"):
        msa.msa_sparse_attention(c["q"], c["k"], c["v"], topk, [0, 10], "0,20")
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        msa.msa_sparse_attention(c["q"], c["k"], c["v"], topk, [0, 10], [0, 20],
                                 max_seqlen_q=10.0)


def test_batched_topk_with_no_slots_is_rejected_clearly():
    q, k = torch.randn(2, 8, 4, 64), torch.randn(2, 8, 2, 64)
    with pytest.raises(ValueError, match=r"topk_indices must have shape \[B=2, H, Tq=8, K\] "
                                         r"with H in \[1, 2\], 1 <= K <= 64"):
        msa.msa_sparse_attention(q, k, k, torch.zeros(2, 2, 8, 0, dtype=torch.int32))


def test_batched_topk_heads_named_in_the_callers_layout():
    """Three selection heads for 2 KV heads: the message gives the batched shape passed."""
    q, k = torch.randn(2, 8, 4, 64), torch.randn(2, 8, 2, 64)
    with pytest.raises(ValueError, match=r"with H in \[1, 2\], .* got \(2, 3, 8, 1\)"):
        msa.msa_sparse_attention(q, k, k, torch.zeros(2, 3, 8, 1, dtype=torch.int32))
    qi, ki = torch.randn(2, 8, 2, 64), torch.randn(2, 8, 1, 64)
    with pytest.raises(ValueError, match=r"with H in \[2\], .* got \(2, 1, 8, 1\)"):
        msa.msa_indexer_kl(q, k, qi, ki, topk_indices=torch.zeros(2, 1, 8, 1, dtype=torch.int32),
                           block_size=64)


def test_backend_triton_on_cpu_tensors_says_so(monkeypatch):
    pytest.importorskip("triton")
    from msa.ops import checks
    monkeypatch.setattr(checks, "TRITON_INTERPRET", False)   # as on a machine without tests
    c = _packed()
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors, got cpu "
                                           r"tensors: use backend='reference'"):
        _attn(c, backend="triton")


@pytest.mark.parametrize("name", ["q", "k", "v", "qi", "ki"])
def test_check_finite_rejects_nan_and_inf(name):
    c = _packed()
    c[name] = c[name].clone()
    c[name][1, 0, 3] = float("nan") if name in ("q", "qi") else float("inf")
    with pytest.raises(ValueError, match=rf"^{name} holds NaN or inf \(check_finite=True\)"):
        msa.msa_attention(*_attention_args(c), check_finite=True)
    msa.msa_attention(*_attention_args(c))                   # off by default: it runs
    if name in ("qi", "ki"):
        with pytest.raises(ValueError, match=name):
            msa.msa_indexer(c["qi"], c["ki"], c["cu_q"], c["cu_k"], block_size=64, topk=2,
                            check_finite=True)
    else:
        with pytest.raises(ValueError, match=name):
            _attn(c, check_finite=True)


@pytest.mark.parametrize("flag", ["return_lse", "deterministic"])
def test_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        _attn(_packed(), **{flag: "yes"})


def test_fp8_on_a_gpu_without_fp8_is_named(monkeypatch):
    """FP8 pages or FP8 index scoring on a GPU below compute capability 8.9: a clear error
    naming the argument (not a compiler failure)."""
    import types
    from msa.ops.checks import check_fp8_device
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    gpu = types.SimpleNamespace(is_cuda=True, device="cuda:0")
    with pytest.raises(RuntimeError, match="k_pages: FP8 .* 8.9 .* A100 is 8.0"):
        check_fp8_device("k_pages", gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device("k_pages", gpu)                        # Hopper: fine
    check_fp8_device("k_pages", torch.zeros(1))             # CPU (reference path): fine
