"""The decode re-scoring (``msa.ops.decode.rescore``) against its rule in Python: the
candidates of a row are the scan's listed keys that fewer than ``num_candidates`` of the
compared keys (every listed key, or the lists' heads) exceed; each is scored again with
the exact index keys, and those keys give the top-k row (score desc, id asc, the local
block last, ``-1`` padding; Triton's interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")

from msa.ops.decode import rescore as R, select as S  # noqa: E402
from msa.ops.quant import quantize_e4m3  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402
from tests.ops.decode.test_triton import BS, D, HKV, K, _cache  # noqa: E402

EMPTY = torch.iinfo(torch.int64).min


def _expected(cand, lists, qi, ki, table, nc, scale):
    """Per (row, head): the candidates' block ids with their exact scores (fp64), and the
    copy's ``nc`` best listed blocks."""
    ls, n_lists, kr = lists
    want, best = {}, {}
    for c in range(cand.shape[0]):
        for h in range(cand.shape[1]):
            row = cand[c, h, :n_lists * ls].view(n_lists, ls)[:, :kr]
            compared = row[:, :R.compared_keys(n_lists, kr)].reshape(-1)
            listed = row[row != EMPTY]
            best[c, h] = set(S.unpack(listed.sort(descending=True)[0][:nc])[1].tolist())
            keep = listed[(compared[None, :] > listed[:, None]).sum(1) < nc]
            ids = S.unpack(keep)[1]
            pages = ki[table[c, ids].long()].double()                 # [n, page, Di]
            score = (pages @ qi[c, h].double()).amax(1) * scale
            want[c, h] = dict(zip(ids.tolist(), score.tolist()))
    return want, best


def _top_row(keys, local):
    """The top-k row of exact keys (int64 ``pack`` keys) and the local block."""
    ranked = S.unpack(keys.sort(descending=True)[0][:K - 1])[1].tolist()
    ranked += [-1] * (K - 1 - len(ranked))
    n = min(local, K - 1)
    return ranked[:n] + [local] + [-1] * (K - 1 - n)


@pytest.mark.parametrize("per,ranked,cluster,heads,small,programs", [
    (4, True, False, False, 128, 264), (4, False, False, True, 4, 264),
    (16, True, True, True, 128, 1), (2, False, True, False, 128, 1),
    (8, True, False, True, 16, 264)])
def test_rescore_ranks_the_listed_keys_few_compared_keys_exceed(per, ranked, cluster, heads,
                                                                small, programs, monkeypatch):
    """Ranked lists (the scan's best of each chunk) and unranked ones (whole chunks, the
    largest first); ``cluster``: one chunk's keys scaled up, so that its list holds many
    candidates; ``heads``: the lists' heads compared (a bound of 8 compared keys), else
    every listed key; ``small``: the final merge's small tile (4: rows with more
    candidates take the large one; 16: some rows fit it, some do not);
    ``programs``: 1 gives each program several pages.
    Outputs poisoned first; with 4 extra candidates instead of 16, so that some listed
    keys are left out; run twice (the counts of finished programs reset)."""
    monkeypatch.setattr(R, "FP8_CANDIDATES", 4)
    monkeypatch.setattr(R, "SMALL", small)
    monkeypatch.setattr(R, "PROGRAMS", programs)
    if heads:
        monkeypatch.setattr(R, "COMPARED", 8)
    if not ranked:
        monkeypatch.setattr(S, "rank_in_scan", lambda rows: False)
    lengths = (5000, 2600)
    k, v, ki, table = _cache(lengths, 130, seed=31 + per)
    table = torch.where(table < 0, 0, table)
    if cluster:                             # blocks 8-15 of request 0 score highest
        ki[table[0, 8:16].long()] *= 3
    g = torch.Generator().manual_seed(per)
    qi = torch.randn(len(lengths), HKV, D, generator=g).to(DEVICE)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    nc, scale = R.num_candidates(K), D ** -0.5
    width = S.candidates_width(table.shape[1], per)
    cand = torch.full((len(lengths), HKV, width), 7, dtype=torch.int64, device=DEVICE)
    ki8, kis = quantize_e4m3(ki)
    lists = S.paged_scan(qi, ki8, table, lens, cand, batch=len(lengths), num_q=1,
                         max_pages=table.shape[1], topk=nc + 1, block_size=BS,
                         index_scale=scale, pages_per_program=per, ki_scales=kis)
    assert (lists[2] < per) == (per == 16)            # lists of the best 8 of a chunk
    want, best = _expected(cand.cpu(), lists, qi.cpu(), ki.cpu(), table.cpu(), nc, scale)
    counts = torch.zeros(len(lengths), HKV, 2, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        exact = torch.full_like(cand, 5)
        topk = torch.full((HKV, len(lengths), K), -7, dtype=torch.int32, device=DEVICE)
        R.paged_rescore(cand, lists, qi, ki, table, lens, exact, counts, topk, num_q=1,
                        block_size=BS, index_scale=scale, scan_dtype=ki8.dtype)
        assert (counts[..., 1] == 0).all()              # the last program reset them
        for (c, h), w in want.items():
            n = int(counts[c, h, 0])
            keys = exact[c, h, :n].cpu()
            score, ids = S.unpack(keys)
            assert n == len(w) and sorted(ids.tolist()) == sorted(w), (c, h)
            torch.testing.assert_close(score, torch.tensor([w[i] for i in ids.tolist()],
                                                           dtype=torch.float32),
                                       rtol=1e-5, atol=1e-6)
            local = (lengths[c] - 1) // BS
            assert topk[h, c].tolist() == _top_row(keys, local), (c, h)
            assert best[c, h] <= set(w) and len(best[c, h]) == nc
            assert heads or best[c, h] == set(w)    # only they, every key compared
    n_kept = sum(len(w) for w in want.values())
    assert n_kept < (cand.cpu() != EMPTY).sum()     # some listed keys are left out
    assert (n_kept > nc * len(best)) == heads       # more than the best: heads compared
    if small < 128:             # rows past the small tile (and, at 16, rows within it)
        assert counts[..., 0].max() > small >= (counts[..., 0].min() if small == 16 else 0)


def test_rescore_names_bad_buffers():
    """Buffers of the wrong dtype or shape name the argument."""
    cand = torch.zeros(1, HKV, 64, dtype=torch.int64)
    qi = torch.zeros(1, HKV, D)
    topk = torch.zeros(HKV, 1, K, dtype=torch.int32)
    args = (cand, (4, 16, 4), qi, torch.zeros(16, BS, D), torch.zeros(1, 64, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32))
    kw = dict(num_q=1, block_size=BS, index_scale=1.0, scan_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="exact must be int64"):
        R.paged_rescore(*args, cand.int(), torch.zeros(1, HKV, 2, dtype=torch.int32), topk, **kw)
    with pytest.raises(ValueError, match="counts must be int32"):
        R.paged_rescore(*args, cand.clone(), torch.zeros(1, HKV, 3, dtype=torch.int32), topk,
                        **kw)


def test_decode_with_a_scan_copy_names_missing_buffers():
    """``paged_decode`` with ``ki_exact`` and no re-scoring buffers names them."""
    from msa.ops.decode.triton import paged_decode
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="needs the exact and counts"):
        paged_decode(x, x, x, x, x, x, x, batch=1, num_q=1, max_pages=1, num_kv_heads=1,
                     candidates=x, topk_indices=x, out=x, lse=x, partials=None,
                     block_size=BS, scale=1.0, index_scale=1.0, ki_exact=x, exact=x)


def test_rescored_decode_of_requests_with_few_or_no_earlier_blocks():
    """Requests whose only block is their own (no candidate), with one earlier block, or
    fewer earlier blocks than ``topk``, beside a long one: the decoder over an e4m3 copy
    equals the reference rule, twice in a row (the finished-program counts reset)."""
    from msa.ops.decode import paged_decode_reference
    from tests.ops.decode.test_fp8 import rescore_case
    lengths = (40, 100, 300, 3000)
    k, v, ki, table, lens, q, qi, cfg, dec = rescore_case(lengths, 60, 5, 6, HKV, 1, 8)
    ki8, kis = quantize_e4m3(ki)
    r_out, _, r_topk = paged_decode_reference(
        q, qi, k, v, ki, table, lens, num_q=1, topk=8, scale=cfg.scale,
        index_scale=cfg.index_scale, index_precision="fp8")
    for _ in range(2):
        dec.topk_indices.fill_(-7)
        out, topk = dec.run(q, qi, k, v, ki, ki_scan=(ki8, kis))
        assert torch.equal(topk, r_topk)
        torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    assert (dec.rescored[:len(lengths), :, 0] == 0).any()      # a row with no candidate
    assert (dec.rescored[..., 1] == 0).all()
