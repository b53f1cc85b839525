"""msa's vLLM drop-ins on vLLM's paged layouts (scattered block tables, prefixes, several
requests, decode of 1-3 tokens) against msa's reference on the same tokens gathered
contiguously; the plugin's patching against a stub of vLLM's module tree."""
import inspect
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

from msa import msa_indexer, msa_sparse_attention  # noqa: E402
from msa.integrations.vllm import ops, plugin  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402

B = 128


def _world(k_lens, hq=4, hkv=2, d=64, di=64, seed=0):
    """Pages of ``len(k_lens)`` requests in a shuffled pool, plus their contiguous keys."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-k // B) for k in k_lens]
    pool = sum(nblocks) + 3
    kv = torch.randn(pool, hkv, B, 2 * d, generator=g)
    ik = torch.randn(pool, B, di, generator=g)
    perm = torch.randperm(pool, generator=g)
    table = torch.zeros(len(k_lens), max(nblocks) + 1, dtype=torch.int32)
    k, v, ki, used = [], [], [], 0
    for r, (n, kl) in enumerate(zip(nblocks, k_lens)):
        pages = perm[used:used + n]
        used += n
        table[r, :n] = pages.to(torch.int32)
        k.append(kv[pages, :, :, :d].permute(0, 2, 1, 3).reshape(-1, hkv, d)[:kl])
        v.append(kv[pages, :, :, d:].permute(0, 2, 1, 3).reshape(-1, hkv, d)[:kl])
        ki.append(ik[pages].reshape(-1, 1, di)[:kl])
    dev = dict(device=DEVICE)
    return (kv.to(**dev), ik.to(**dev), table.to(**dev), torch.cat(k).to(**dev),
            torch.cat(v).to(**dev), torch.cat(ki).to(**dev))


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def _sets(sel):
    return [[set(x for x in row if x >= 0) for row in h] for h in sel.tolist()]


@pytest.mark.parametrize("q_lens,k_lens", [([150, 260], [350, 260]), ([40], [300])])
def test_prefill_selection_and_attention_equal_the_reference(q_lens, k_lens):
    kv, ik, table, k, v, ki, = _world(k_lens)
    hq, hkv, d, topk = 4, 2, 64, 2
    tq = sum(q_lens)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(tq, hq, d, generator=g).to(DEVICE)
    qi = torch.randn(tq, hkv, 64, generator=g).to(DEVICE)
    cu_q, seq = _cu(q_lens), torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    prefix = seq - torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    # selection into a token-major buffer seen head-major, as vLLM's indexer passes it
    buf = torch.full((tq + 5, hkv, topk), 7, dtype=torch.int32, device=DEVICE)
    score = ops.minimax_m3_index_score(qi, ik, table, cu_q, seq, prefix, max(q_lens),
                                       max(k_lens), hkv)
    assert isinstance(score, ops.DeferredScore)
    sel = ops.minimax_m3_index_topk(score, cu_q, prefix, max(q_lens), topk, 0, 1,
                                    out=buf.transpose(0, 1))
    assert sel.data_ptr() == buf.data_ptr() and sel.shape == (hkv, tq, topk)
    assert (buf[tq:] == 7).all()                                  # nothing past total_q
    want = msa_indexer(qi, ki, cu_q, _cu(k_lens), block_size=B, topk=topk,
                       backend="reference")
    assert _sets(sel) == _sets(want)
    # attention over the pages in place; entries past vLLM's valid count are ignored
    noisy = sel.clone()
    noisy[:, :, -1] = torch.where(noisy[:, :, -1] < 0, 0, noisy[:, :, -1])
    out = torch.full_like(q, float("nan"))
    ops.minimax_m3_sparse_attn(q, kv, noisy, table, cu_q, seq, prefix, max(q_lens), hkv,
                               0.125, out)
    ref = msa_sparse_attention(q, k, v, want, cu_q, _cu(k_lens), block_size=B,
                               softmax_scale=0.125, backend="reference")
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("nq", [1, 3])
def test_decode_selection_and_attention_equal_the_reference(nq):
    k_lens = [300, 520]
    kv, ik, table, k, v, ki = _world(k_lens, seed=2)
    hq, hkv, d, topk = 4, 2, 64, 3
    rows = nq * len(k_lens)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(rows, hq, d, generator=g).to(DEVICE)
    qi = torch.randn(rows, hkv, 64, generator=g).to(DEVICE)
    seq = torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    buf = torch.full((rows, hkv, topk), 9, dtype=torch.int32, device=DEVICE)
    sel = ops.minimax_m3_index_decode(qi, ik, table, seq, max(k_lens), topk, 0, 1, hkv, nq,
                                      nq, out=buf.transpose(0, 1))
    cu_q = _cu([nq] * len(k_lens))
    want = msa_indexer(qi, ki, cu_q, _cu(k_lens), block_size=B, topk=topk,
                       backend="reference")
    assert _sets(sel) == _sets(want)
    out = torch.full_like(q, float("nan"))
    ops.minimax_m3_sparse_attn_decode(q, kv, sel, table, seq, hkv, 0.125, out, nq)
    ref = msa_sparse_attention(q, k, v, want, cu_q, _cu(k_lens), block_size=B,
                               softmax_scale=0.125, backend="reference")
    assert (out - ref).abs().max().item() < 1e-4


def test_decode_reads_an_fp8_cache_with_per_token_head_scales():
    """vLLM's e4m3 ``kv_cache`` with ``k_scale`` / ``v_scale [Hkv, tokens]``: the decode
    attention equals the same op on the dequantized cache; scalar scales are refused by
    name (the plugin hands them to vLLM)."""
    from msa.ops.quant import dequantize, quantize_e4m3
    k_lens, nq, hq, hkv, d, topk = [300, 520], 2, 4, 2, 64, 3
    kv, ik, table, *_ = _world(k_lens, seed=4)
    (k8, ks), (v8, vs) = quantize_e4m3(kv[..., :d]), quantize_e4m3(kv[..., d:])
    kv8 = torch.cat([k8, v8], -1)
    kvd = torch.cat([dequantize(k8, ks), dequantize(v8, vs)], -1)

    def per_token(s):                                   # [P, Hkv, 128] -> [Hkv, P * 128]
        return s.transpose(0, 1).reshape(hkv, -1).contiguous()
    rows = nq * len(k_lens)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(rows, hq, d, generator=g).to(DEVICE)
    qi = torch.randn(rows, hkv, 64, generator=g).to(DEVICE)
    seq = torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    sel = ops.minimax_m3_index_decode(qi, ik, table, seq, max(k_lens), topk, 0, 1, hkv, nq,
                                      nq).clone()
    out = torch.full_like(q, float("nan"))
    ops.minimax_m3_sparse_attn_decode(q, kv8, sel, table, seq, hkv, 0.125, out, nq,
                                      k_scale=per_token(ks), v_scale=per_token(vs))
    want = torch.full_like(q, float("nan"))
    ops.minimax_m3_sparse_attn_decode(q, kvd, sel, table, seq, hkv, 0.125, want, nq)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for k_scale, v_scale in ((torch.ones(1), torch.ones(1)), (None, None),
                             (per_token(ks)[:, :-1], per_token(vs)[:, :-1])):
        with pytest.raises(NotImplementedError, match="k_scale"):
            ops.minimax_m3_sparse_attn_decode(q, kv8, sel, table, seq, hkv, 0.125, out, nq,
                                              k_scale=k_scale, v_scale=v_scale)


def test_attention_takes_the_geometry_the_index_top_k_read(monkeypatch):
    """One host read of the lengths per layer step: the selection's writer hands them
    to the attention; other lengths with that selection are an error, another
    selection reads them again."""
    q_lens, k_lens = [100, 60], [300, 60]
    kv, ik, table, *_ = _world(k_lens, seed=5)
    tq, hkv = sum(q_lens), 2
    q = torch.randn(tq, 4, 64, device=DEVICE)
    qi = torch.randn(tq, hkv, 64, device=DEVICE)
    cu_q, seq = _cu(q_lens), torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    prefix = seq - torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    reads = []
    segments = ops._segments
    monkeypatch.setattr(ops, "_segments", lambda *a: reads.append(1) or segments(*a))

    def select():
        score = ops.minimax_m3_index_score(qi, ik, table, cu_q, seq, prefix, 100, 300, hkv)
        return ops.minimax_m3_index_topk(score, cu_q, prefix, 100, 2, 0, 1)
    out = torch.empty_like(q)
    sel = select()
    ops.minimax_m3_sparse_attn(q, kv, sel, table, cu_q.clone(), seq.clone(), prefix, 100,
                               hkv, 0.125, out)
    assert reads == [1]
    ops.minimax_m3_sparse_attn(q, kv, sel.clone(), table, cu_q, seq, prefix, 100, hkv,
                               0.125, out)
    assert reads == [1, 1]                          # nothing handed over: read again
    if DEVICE == "cpu":             # on a GPU the check is a device-side assertion, which
        sel = select()              # ends the process's CUDA context: not testable here
        with pytest.raises(ValueError, match="lengths differ"):
            ops.minimax_m3_sparse_attn(q, kv, sel, table, _cu([90, 70]), seq, prefix, 100,
                                       hkv, 0.125, out)


def test_unsupported_arguments_name_themselves_without_vllm():
    kv, ik, table, *_ = _world([200])
    q = torch.randn(10, 4, 64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="k_scale"):
        ops.minimax_m3_sparse_attn(q, kv, None, table, None, None, None, 10, 2, 1.0, q,
                                   k_scale=torch.ones(1))
    score = ops.minimax_m3_index_score(torch.randn(10, 2, 64, device=DEVICE), ik, table,
                                       _cu([10]), _cu([200])[1:], _cu([190])[1:], 10, 200, 2)
    with pytest.raises(NotImplementedError, match="init_blocks=1"):
        ops.minimax_m3_index_topk(score, _cu([10]), None, 10, 2, 1, 1)
    with pytest.raises(NotImplementedError, match="score tensor"):
        ops.minimax_m3_index_topk(torch.zeros(2, 10, 2), _cu([10]), None, 10, 2, 0, 1)
    sel = torch.zeros(2, 10, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="kv_cache must be"):
        ops.minimax_m3_sparse_attn(q, kv[:, :, :64], sel, table, None, None, None, 10, 2,
                                   1.0, q)
    with pytest.raises(ValueError, match="topk_idx must be"):
        ops.minimax_m3_sparse_attn(q, kv, sel[:, :5], table, None, None, None, 10, 2, 1.0, q)
    with pytest.raises(ValueError, match="topk_idx must be"):
        ops.minimax_m3_sparse_attn_decode(q, kv, sel.float(), table, None, 2, 1.0, q, 1)
    with pytest.raises(ValueError, match="block_table must be"):
        ops.minimax_m3_sparse_attn(q, kv, sel, table[0], None, None, None, 10, 2, 1.0, q)
    with pytest.raises(ValueError, match="decode_query_len=3"):
        ops.minimax_m3_index_decode(torch.zeros(10, 2, 64, device=DEVICE), ik, table,
                                    _cu([10])[1:], 200, 2, 0, 1, 2, 3, 3)
    with pytest.raises(ValueError, match="idx_q must be"):
        ops.minimax_m3_index_decode(torch.zeros(10, 3, 64, device=DEVICE), ik, table,
                                    _cu([10])[1:], 200, 2, 0, 1, 2, 1, 1)
    with pytest.raises(ValueError, match="q must be"):
        ops.minimax_m3_sparse_attn(q[:, :3], kv, sel, table, None, None, None, 10, 2, 1.0, q)


# -- the plugin ----------------------------------------------------------------------


def _stub(fn, record):
    """A function with ``fn``'s parameters that records its call."""
    params = ", ".join(str(p) for p in inspect.signature(fn).parameters.values())
    names = ", ".join(inspect.signature(fn).parameters)
    scope = {"record": record, "torch": torch}
    exec(f"def {fn.__name__}({params}):\n    record.append(('{fn.__name__}', {names}))\n"
         f"    return 'vllm'\n", scope)
    return scope[fn.__name__]


@pytest.fixture
def vllm_tree(monkeypatch):
    """vLLM's module names with stand-in ops of vLLM 0.33's signatures."""
    record = []
    mods = {}
    for name, fns in plugin.MODULES.items():
        mod = types.ModuleType(name)
        for fn in fns:
            setattr(mod, fn, _stub(ops.OPS[fn], record))
        mods[name] = mod
    for name in ("vllm", "vllm.models", "vllm.models.minimax_m3",
                 "vllm.models.minimax_m3.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(ops, "ORIGINALS", {})
    return mods, record


def test_plugin_is_off_unless_asked(vllm_tree, monkeypatch):
    mods, _ = vllm_tree
    monkeypatch.delenv(plugin.ENV, raising=False)
    plugin.register()
    attn = mods["vllm.models.minimax_m3.common.sparse_attention"]
    assert attn.minimax_m3_sparse_attn is not ops.minimax_m3_sparse_attn


def test_plugin_swaps_every_name_and_keeps_the_originals(vllm_tree, monkeypatch):
    mods, record = vllm_tree
    monkeypatch.setenv(plugin.ENV, "1")
    plugin.register()
    for name, fns in plugin.MODULES.items():
        for fn in fns:
            assert getattr(mods[name], fn) is ops.OPS[fn]
            assert ops.ORIGINALS[fn].__name__ == fn
    assert plugin.install()                           # twice: still the originals kept
    assert ops.ORIGINALS["minimax_m3_sparse_attn"] is not ops.minimax_m3_sparse_attn
    # what msa does not implement goes to vLLM's own function
    q = torch.zeros(1, 4, 64)
    got = ops.minimax_m3_sparse_attn(q, None, None, None, None, None, None, 1, 2, 1.0, q,
                                     k_scale=torch.ones(1), v_scale=torch.ones(1))
    assert got == "vllm" and record[-1][0] == "minimax_m3_sparse_attn"
    got = ops.minimax_m3_index_decode(None, None, None, None, 1, 16, 1, 1, 4, 1, 1)
    assert got == "vllm" and record[-1][0] == "minimax_m3_index_decode"


def test_plugin_refuses_other_signatures(vllm_tree, monkeypatch):
    mods, _ = vllm_tree
    mod = mods["vllm.models.minimax_m3.common.indexer"]
    mod.minimax_m3_index_topk = lambda score, topk, out=None: None
    monkeypatch.setenv(plugin.ENV, "1")
    with pytest.warns(RuntimeWarning, match="minimax_m3_index_topk.*differs"):
        assert not plugin.install()
    assert mods["vllm.models.minimax_m3.common.sparse_attention"].minimax_m3_sparse_attn \
        is not ops.minimax_m3_sparse_attn                 # nothing half-patched


def test_the_entry_point_vllm_loads_names_the_plugin_hook():
    import importlib
    import pathlib
    import tomllib
    root = pathlib.Path(__file__).resolve().parents[2]
    spec = tomllib.loads((root / "pyproject.toml").read_text())
    target = spec["project"]["entry-points"]["vllm.general_plugins"]["msa"]
    module, func = target.split(":")
    assert getattr(importlib.import_module(module), func) is plugin.register
