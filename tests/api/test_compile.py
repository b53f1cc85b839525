"""torch.compile traces the MSA ops without graph breaks (fullgraph=True)."""
import torch

import msa


def _fn(q, k, v, qi, ki, cu_q=None, cu_k=None):
    topk = msa.msa_indexer(qi, ki, cu_q, cu_k, block_size=64, topk=3)
    return msa.msa_sparse_attention(q, k, v, topk, cu_q, cu_k, block_size=64)


def _inputs(shape_q, shape_k, g):
    q = torch.randn(*shape_q, 4, 64, generator=g, requires_grad=True)
    k = torch.randn(*shape_k, 2, 64, generator=g, requires_grad=True)
    v = torch.randn(*shape_k, 2, 64, generator=g, requires_grad=True)
    qi = torch.randn(*shape_q, 2, 64, generator=g)
    ki = torch.randn(*shape_k, 1, 64, generator=g)
    return q, k, v, qi, ki


def test_compiled_batched_forward_backward_match_eager():
    g = torch.Generator().manual_seed(0)
    q, k, v, qi, ki = _inputs((2, 100), (2, 200), g)
    compiled = torch.compile(_fn, fullgraph=True, backend="aot_eager")
    out_c = compiled(q, k, v, qi, ki)
    out_e = _fn(q, k, v, qi, ki)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    dout = torch.randn_like(out_e)
    gc = torch.autograd.grad(out_c, [q, k, v], dout)
    ge = torch.autograd.grad(out_e, [q, k, v], dout)
    for a, b in zip(gc, ge):      # same math; fp32 accumulation order may differ
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_packed_varlen():
    g = torch.Generator().manual_seed(1)
    q, k, v, qi, ki = _inputs((70,), (330,), g)
    cu_q = torch.tensor([0, 30, 70], dtype=torch.int32)
    cu_k = torch.tensor([0, 130, 330], dtype=torch.int32)
    compiled = torch.compile(_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, qi, ki, cu_q, cu_k),
                               _fn(q, k, v, qi, ki, cu_q, cu_k), rtol=0, atol=0)


def test_compiled_on_gpu_uses_triton_kernels():
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(2)
    q, k, v, qi, ki = (x.detach().cuda().bfloat16() for x in _inputs((1, 700), (1, 700), g))
    compiled = torch.compile(_fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, qi, ki), _fn(q, k, v, qi, ki), rtol=0, atol=0)
