"""Stress selections (hot blocks shared by most queries, block-0 sinks, pools,
spread and recent windows) through the Triton indexer-KL backward and attention
backward, against the fp64 references. On the CPU (interpreter) the patterns are scaled
down; on a GPU they run at MiniMax's test size: 4096 queries, >= 256 visible blocks, top-16,
4 heads."""
import functools

import pytest
import torch

pytest.importorskip("triton")

from tests.helpers import plan_of  # noqa: E402
from tests.helpers.brute import make_case, rel_err  # noqa: E402
from tests.helpers.patterns import pattern_names, topk_pattern  # noqa: E402
from msa.ops.attention.backward import sparse_attn_bwd  # noqa: E402
from msa.ops.attention.naive import (attention_backward_reference,  # noqa: E402
                                     attention_forward_reference)
from msa.ops.indexer.triton import selected_lse  # noqa: E402
from msa.ops.kl.naive import indexer_kl_reference  # noqa: E402
from msa.ops.kl.triton import indexer_kl_bwd  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# (queries, block, base blocks, top-k, heads Hq / Hkv = Hi, head dim)
SIZE = (4096, 128, 256, 16, 16, 4, 64) if GPU else (40, 64, 12, 6, 4, 2, 32)
NAMES = pattern_names(SIZE[3], SIZE[2])


@functools.lru_cache(maxsize=1)
def _case(name):
    q_len, block, base, k, hq, hkv, d = SIZE
    k_len = q_len + (base - 1) * block
    c = make_case((q_len,), (k_len,), hq=hq, hkv=hkv, d=d, hi=hkv, di=d, seed=7, scale=0.7)
    topk = topk_pattern(name, q_len, block, base, k, hkv, seed=1).to(DEVICE)
    x = {n: c[n].to(DEVICE) for n in ("q", "k", "v", "qi", "ki")}
    return c["seg"], topk, x, block, d ** -0.5


def _close(got, ref, tol):
    for a, r in zip(got, ref):
        assert not torch.isnan(a).any()
        assert rel_err(a, r) < tol, rel_err(a, r)


@functools.lru_cache(maxsize=1)
def _kl_inputs_and_reference(name):
    """Teacher and student LSEs and the fp64 reference KL of pattern ``name`` (shared by
    the fast and deterministic tests: the references dominate the GPU run time)."""
    seg, topk, x, block, scale = _case(name)
    q, k, v, qi, ki = (x[n] for n in ("q", "k", "v", "qi", "ki"))
    _, tlse = attention_forward_reference(q, k, v, topk, seg, block_size=block, scale=scale)
    ilse = selected_lse(qi, ki, topk, plan_of(topk, seg, block, qi.shape[1]), scale=scale)
    ref = indexer_kl_reference(q.double(), k.double(), qi.double(), ki.double(), seg, topk,
                               block_size=block, scale=scale, index_scale=scale)
    return tlse, ilse, ref


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("name", NAMES)
def test_kl_backward_on_stress_pattern(name, deterministic):
    seg, topk, x, block, scale = _case(name)
    tlse, ilse, ref = _kl_inputs_and_reference(name)
    got = indexer_kl_bwd(x["q"], x["k"], tlse, x["qi"], x["ki"], ilse, topk,
                         plan_of(topk, seg, block, x["qi"].shape[1], None, 32), scale=scale,
                         index_scale=scale, deterministic=deterministic)
    assert got[0] > 0
    _close(got, ref, 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_attention_backward_on_stress_pattern(name):
    seg, topk, x, block, scale = _case(name)
    q, k, v = (x[n] for n in "qkv")
    out, lse = attention_forward_reference(q, k, v, topk, seg, block_size=block, scale=scale)
    dout = torch.randn_like(out)
    got = sparse_attn_bwd(q, k, v, topk, plan_of(topk, seg, block, k.shape[1], None, 32), out,
                          lse.float(), dout, scale=scale)
    ref = attention_backward_reference(q.double(), k.double(), v.double(), topk, seg,
                                       out.double(), lse.double(), dout.double(),
                                       block_size=block, scale=scale)
    _close(got, ref, 1e-5)
