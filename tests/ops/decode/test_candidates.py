"""The re-scoring's candidate merge (``msa.ops.decode.rescore.candidate_keys``) gives the
``K`` largest keys of the scan's lists, in order, whether it gathers the few keys that
reach the ``K``-th list head or falls back to ``top_keys`` (Triton's interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from msa.ops.decode.rescore import candidate_keys  # noqa: E402
from msa.ops.triton_utils import next_pow2  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402

EMPTY = torch.iinfo(torch.int64).min


@triton.jit
def _candidates_kernel(LISTS, OUT, n_lists, LS: tl.constexpr, KR: tl.constexpr,
                       NL_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                       CAP: tl.constexpr):
    top = candidate_keys(LISTS, n_lists, LS, KR, NL_PAD, K, K_PAD, CAP)
    tl.store(OUT + tl.arange(0, K_PAD), top)


def _lists(values: torch.Tensor, ls: int, kr: int) -> torch.Tensor:
    """Lists ``ls`` apart from ``values [n_lists, kr]`` (EMPTY where a value is EMPTY):
    the list's block ids are those of its chunk, each list's largest key first, the rest
    shuffled, like the scan's; the key packs the value above the complemented id."""
    n, kr_ = values.shape
    out = torch.full((n * ls,), EMPTY, dtype=torch.int64)
    g = torch.Generator().manual_seed(n * 31 + kr)
    for p in range(n):
        ids = p * ls + torch.randperm(ls, generator=g)[:kr]
        keys = torch.where(values[p] == EMPTY, EMPTY, (values[p] << 32) | (0x7FFFFFFF - ids))
        order = torch.argsort(keys, descending=True)
        rest = order[1:][torch.randperm(kr - 1, generator=g)]
        out[p * ls:p * ls + kr] = keys[torch.cat([order[:1], rest])]
    return out


def _run(lists, n_lists, ls, kr, k, cap=None):
    k_pad = next_pow2(k)
    out = torch.full((k_pad,), 7, dtype=torch.int64, device=DEVICE)
    _candidates_kernel[(1,)](lists.to(DEVICE), out, n_lists, LS=ls, KR=kr,
                             NL_PAD=next_pow2(n_lists), K=k, K_PAD=k_pad,
                             CAP=cap or 2 * k_pad)
    return out.cpu()


def _expected(lists, k):
    live = lists[lists != EMPTY]
    return torch.sort(live, descending=True).values[:k]


def _reaching(lists, n_lists, ls, k):
    """How many keys reach the ``k``-th largest list head (all live keys with fewer)."""
    heads = lists.view(n_lists, ls)[:, 0]
    tau = torch.sort(heads, descending=True).values[k - 1] if k <= n_lists else EMPTY
    return int(((lists >= tau) & (lists != EMPTY)).sum())


@pytest.mark.parametrize("n_lists,ls,kr,k,gathered", [
    (256, 32, 32, 62, True), (64, 16, 8, 31, True), (5, 8, 8, 31, True),
    (40, 32, 32, 31, False)])
def test_candidates_are_the_largest_keys_in_order(n_lists, ls, kr, k, gathered):
    """Random scores, some lists shorter than ``kr``: the gathering path (with a real
    ``K``-th head, or all keys where there are fewer lists than ``K``) and the sort."""
    g = torch.Generator().manual_seed(n_lists + k)
    values = torch.randint(-2 ** 30, 2 ** 30, (n_lists, kr), generator=g)
    values[::7, kr // 2:] = EMPTY
    lists = _lists(values, ls, kr)
    assert (_reaching(lists, n_lists, ls, k) <= 2 * next_pow2(k)) == gathered
    got, want = _run(lists, n_lists, ls, kr, k), _expected(lists, k)
    assert torch.equal(got[:len(want)], want)
    assert (got[len(want):] == EMPTY).all() or len(want) == k


def test_clustered_keys_fall_back_to_the_sort():
    """The best keys packed into few lists: more than ``CAP`` keys reach the ``K``-th
    head, so the sort runs; the result is the same."""
    n_lists, ls, kr, k = 64, 32, 32, 31
    rank = torch.arange(n_lists * kr).view(n_lists, kr)      # list 0 holds the best keys
    values = (n_lists * kr - rank) * 3
    lists = _lists(values, ls, kr)
    assert _reaching(lists, n_lists, ls, k) > 2 * next_pow2(k)
    assert torch.equal(_run(lists, n_lists, ls, kr, k), _expected(lists, 32))
    # and a cap small enough that random keys fall back too
    g = torch.Generator().manual_seed(5)
    lists = _lists(torch.randint(-2 ** 30, 2 ** 30, (n_lists, kr), generator=g), ls, kr)
    assert _reaching(lists, n_lists, ls, k) > 32
    assert torch.equal(_run(lists, n_lists, ls, kr, k, cap=32)[:k], _expected(lists, k))
