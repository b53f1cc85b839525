"""``to_e4m3`` inside a Triton kernel rounds fp32 to e4m3 exactly as torch does (nearest
even, subnormals included), in the interpreter as on a GPU."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from msa.ops.triton_utils import to_e4m3  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402


@triton.jit
def _round_trip(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, to_e4m3(tl.load(X + o)).to(tl.float32))


def test_to_e4m3_matches_torch():
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(-448, 449, dtype=torch.float32)
    x = torch.cat([*(torch.randn(1024, generator=g) * s for s in (1e-3, 0.02, 1, 30, 120)),
                   grid, grid + 0.5, grid * 2 ** -9, (grid + 0.5) * 2 ** -9,     # ties
                   torch.tensor([0.0, -0.0, 448.0, -448.0, 31.7, 2.0 ** -10])]).clamp(-448, 448)
    x = torch.cat([x, torch.zeros(triton.next_power_of_2(x.numel()) - x.numel())]).to(DEVICE)
    y = torch.full_like(x, float("nan"))
    _round_trip[(1,)](x, y, N=x.numel())
    assert torch.equal(y, x.to(torch.float8_e4m3fn).float())
