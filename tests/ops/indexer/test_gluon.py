"""The Gluon FP8 index scan (msa.ops.indexer.gluon): it compiles for Hopper on any
machine, and on a Hopper GPU its rows equal the Triton FP8 scan's."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from msa.ops.indexer import gluon  # noqa: E402
from msa.ops.indexer.triton import scan_topk  # noqa: E402
from msa.varlen import make_segments  # noqa: E402
from tests.helpers import compiled_ptx  # noqa: E402


COMPILE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type
from msa.ops.indexer import gluon
keys = torch.zeros(1024, 128, dtype=torch.float8_e4m3fn)
desc = TensorDescriptor.from_tensor(keys, [128, 128], gluon.key_layout())
const = dict(HI=4, DI=128, BS=128, BLOCK_T=32, KR=32, NRANK=31, STAGES=gluon.STAGES,
             BOOK=gluon.book_layout(32), num_warps=4)
sig = {"QI": "*fp8e4nv", "k_desc": mangle_type(desc), "KS": "*fp32", "TILE_Q0": "*i32",
       "TILE_N": "*i32", "TILE_KBASE": "*i32", "TILE_OFF": "*i32", "OUT_ID": "*i32",
       "scale": "fp32", "stride_oh": "i64", "stride_ot": "i64",
       **{k: "constexpr" for k in const}}
src = GluonASTSource(fn=gluon.fp8_scan_kernel, signature=sig, constexprs=const)
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}
                     ).asm["ptx"])
"""


def test_compiles_for_sm90_to_tma_and_wgmma():
    """Compiled in a fresh process (``compiled_ptx``)."""
    ptx = compiled_ptx(COMPILE)
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx
    assert "cp.async.bulk.tensor.2d" in ptx and "setmaxnreg" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,k_lens,hi,topk", [
    ((3000,), (3000,), 4, 32),                       # MiniMax-M3 shape, topk-1+16 kept
    ((700, 1, 2500), (4000, 1, 2500), 4, 16),        # segments with a prefix, one token
    ((1900,), (9000,), 1, 32),                       # one index head
])
def test_rows_equal_the_triton_fp8_scan(q_lens, k_lens, hi, topk):
    if not gluon.supported("cuda", hi, 128, 128):
        pytest.skip("the Gluon scan needs a Hopper GPU")
    g = torch.Generator(device="cuda").manual_seed(sum(q_lens) + hi)
    qi = torch.randn(sum(q_lens), hi, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    ki = torch.randn(sum(k_lens), 1, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    cu = [torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32)
          for x in (q_lens, k_lens)]
    seg = make_segments(sum(q_lens), sum(k_lens), *cu)
    want = scan_topk(qi, ki, seg, 128, topk, 0.088, True, kernel="one_pass")
    got = scan_topk(qi, ki, seg, 128, topk, 0.088, True, kernel="gluon")
    same = (got.sort(-1).values == want.sort(-1).values).all(-1)
    assert same.float().mean() >= 0.999, same.float().mean()
    assert torch.equal(got[..., :1] >= 0, want[..., :1] >= 0)          # every row written
