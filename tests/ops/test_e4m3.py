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


def test_quantize_into_writes_what_quantize_e4m3_gives_at_the_slots():
    from msa.ops.quant import E4M3, quantize_e4m3
    from msa.ops.quant_triton import quantize_into
    g = torch.Generator().manual_seed(1)
    # [B, H, n, D] as transformers hands it: a transposed view; one zero row
    x = (torch.randn(2, 5, 4, 64, generator=g) * 7).transpose(1, 2).to(DEVICE)
    x[0, 1, 2] = 0
    store = torch.zeros(2, 4, 16, 64, dtype=E4M3, device=DEVICE)
    scales = torch.full((2, 4, 16), float("nan"), device=DEVICE)
    quantize_into(x, store, scales, torch.tensor([3], device=DEVICE))
    x8, s = quantize_e4m3(x)
    assert torch.equal(store[:, :, 3:8].view(torch.uint8), x8.view(torch.uint8))
    assert torch.equal(scales[:, :, 3:8], s)
    assert not store[:, :, :3].view(torch.uint8).any()
    assert not store[:, :, 8:].view(torch.uint8).any() and scales[:, :, 8:].isnan().all()


def test_quantize_e4m3_in_chunks_of_rows_equals_one_pass(monkeypatch):
    """Rows quantized ``QUANT_CHUNK`` elements at a time (a chunk smaller than a row, a
    few rows, all of them): the same bytes and scales as the formula over the whole
    tensor, zero and NaN rows included; gradients still reach the input's scales."""
    from msa.ops import quant
    x = torch.randn(3, 5, 7, 64, dtype=torch.bfloat16)
    x[0, 1, 2] = 0
    x[2, 4, 6, 3] = float("nan")
    xf = x.float()
    scale = quant._row_scales(xf, quant.E4M3_MAX)
    want = (xf / scale.unsqueeze(-1)).clamp(-quant.E4M3_MAX, quant.E4M3_MAX)
    want = want.to(quant.E4M3).view(torch.uint8)
    for chunk in (10, 200, 1 << 26):
        monkeypatch.setattr(quant, "QUANT_CHUNK", chunk)
        x8, s = quant.quantize_e4m3(x)
        assert x8.shape == x.shape and s.shape == x.shape[:-1]
        assert torch.equal(x8.view(torch.uint8), want)
        torch.testing.assert_close(s, scale, rtol=0, atol=0, equal_nan=True)
    y = torch.randn(6, 64, requires_grad=True)
    monkeypatch.setattr(quant, "QUANT_CHUNK", 128)
    quant.quantize_e4m3(y)[1].sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
