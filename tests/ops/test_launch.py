"""Launch configurations that fit the GPU's shared memory (``msa.ops.launch``)."""
import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources  # noqa: E402

from tests.helpers.brute import make_case, rel_err  # noqa: E402
from tests.helpers import plan_of, random_topk  # noqa: E402
from msa.ops import launch  # noqa: E402
from msa.ops.launch import launch_fitting, smaller_tiles  # noqa: E402


class FakeKernel:
    """Stands for a Triton kernel: needs ``64 KB x rows/64 x stages`` of shared memory and
    raises ``OutOfResources`` above ``limit``, as a compiled Triton kernel does."""

    __name__ = "fake_kernel"

    def __init__(self, limit):
        self.limit, self.calls = limit, []

    def __getitem__(self, grid):
        def run(*args, BLOCK_Q, num_stages, G_PAD, **kw):
            need = 65536 * BLOCK_Q * G_PAD // 64 * num_stages
            self.calls.append((BLOCK_Q, num_stages))
            if need > self.limit:
                raise OutOfResources(need, self.limit, "shared memory")
            args[0].fill_(BLOCK_Q * 10 + num_stages)
        return run


def test_smaller_tiles_order():
    assert smaller_tiles("BLOCK_Q", 4, 16, 3) == [
        {"BLOCK_Q": 4, "num_stages": 3}, {"BLOCK_Q": 4, "num_stages": 1},
        {"BLOCK_Q": 2, "num_stages": 1}, {"BLOCK_Q": 1, "num_stages": 1}]
    assert smaller_tiles("BLOCK_T", 64, 1, 1) == [
        {"BLOCK_T": 64, "num_stages": 1}, {"BLOCK_T": 32, "num_stages": 1},
        {"BLOCK_T": 16, "num_stages": 1}]


def test_first_fitting_configuration_is_used_and_remembered():
    launch._CHOICE.clear()
    k = FakeKernel(limit=100_000)          # 64 rows x 1 stage = 65536 fits, 2 stages do not
    out = torch.zeros(1)
    cfgs = smaller_tiles("BLOCK_Q", 4, 16, 2)
    assert launch_fitting(k, (1,), (out,), cfgs, G_PAD=16) == {"BLOCK_Q": 4, "num_stages": 1}
    assert k.calls == [(4, 2), (4, 1)] and out.item() == 41
    k.calls.clear()
    launch_fitting(k, (1,), (out,), cfgs, G_PAD=16)
    assert k.calls == [(4, 1)]             # the failing configuration is not retried
    k.calls.clear()
    launch_fitting(k, (1,), (out,), cfgs, G_PAD=8)  # other fixed arguments: tried afresh
    assert k.calls == [(4, 2)]             # 4 x 8 rows, 2 stages = 65536 fits


def test_no_fitting_configuration_raises_a_clear_error():
    launch._CHOICE.clear()
    k = FakeKernel(limit=1000)
    out = torch.full((1,), -1.0)
    with pytest.raises(RuntimeError, match=r"fake_kernel does not fit .*needs 16384 \(shared "
                                           r"memory; the limit is 1000 bytes\).*reference"):
        launch_fitting(k, (1,), (out,), smaller_tiles("BLOCK_Q", 4, 16, 2), G_PAD=16)
    assert out.item() == -1.0              # nothing ran
    with pytest.raises(ValueError, match="at least one"):
        launch_fitting(k, (1,), (out,), [], G_PAD=16)


@pytest.mark.gpu
def test_backward_falls_back_from_a_configuration_that_does_not_fit():
    """128 query rows x 3 stages need 233 KB of shared memory at D=128, more than any GPU
    allows (H100: 227 KB): the Triton backward must fall back and still be right (asked for
    by name: on sm_90 ``auto`` picks the Gluon kernel, which has no such configurations)."""
    from msa.ops.attention.backward import sparse_attn_bwd
    from msa.ops.attention.naive import (attention_backward_reference,
                                         attention_forward_reference)
    launch._CHOICE.clear()
    c = make_case((300,), (300,), hq=16, hkv=1, d=128, seed=5)
    seg = c["seg"]
    topk = random_topk(seg, 1, 2, 128, seed=6).cuda()
    q, k, v = (c[n].cuda().bfloat16() for n in "qkv")
    out, lse = attention_forward_reference(q, k, v, topk, seg, block_size=128,
                                           scale=128 ** -0.5)
    dout = torch.randn_like(out)
    got = sparse_attn_bwd(q, k, v, topk, plan_of(topk, seg, 128, 1), out, lse.float(), dout,
                          scale=128 ** -0.5, block_q=8, num_stages=3, kernel="triton")
    chosen = [i for key, i in launch._CHOICE.items() if key[0] == "sparse_attn_bwd_kernel"]
    assert len(chosen) == 1 and chosen[0] >= 1     # H100: {"BLOCK_Q": 8, "num_stages": 1}
    ref = attention_backward_reference(q.double(), k.double(), v.double(), topk, seg,
                                       out.double(), lse.double(), dout.double(),
                                       block_size=128, scale=128 ** -0.5)
    for a, r in zip(got, ref):
        cos = torch.nn.functional.cosine_similarity(a.double().flatten(), r.flatten(), dim=0)
        assert cos > 0.999 and rel_err(a, r) < 2e-2          # as the other bf16 tests
