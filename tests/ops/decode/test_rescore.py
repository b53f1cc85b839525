"""The decode re-scoring (``msa.ops.decode.rescore``) against its rule in Python: the
candidates of a row are the scan's listed keys that fewer than ``num_candidates`` of the
compared keys (every listed key, or the lists' heads) exceed, and each list comes back
as its candidates' exact keys, ranked (Triton's interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")

from msa.ops.decode import rescore as R, select as S  # noqa: E402
from msa.ops.quant import quantize_e4m3  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402
from tests.ops.decode.test_triton import BS, D, HKV, K, _cache  # noqa: E402

EMPTY = torch.iinfo(torch.int64).min


def _expected(cand, lists, qi, ki, table, nc, kr_out, scale):
    """Per (row, head, list): the candidates' block ids and exact scores, ranked (score
    desc, id asc), all of them; per (row, head): the candidates' ids and the
    copy's ``nc`` best listed blocks."""
    ls, n_lists, kr = lists
    want, kept, best = {}, {}, {}
    for c in range(cand.shape[0]):
        for h in range(cand.shape[1]):
            row = cand[c, h, :n_lists * ls].view(n_lists, ls)[:, :kr]
            compared = row[:, :R.compared_keys(n_lists, kr)].reshape(-1)
            listed = row[row != EMPTY]
            best[c, h] = set(S.unpack(listed.sort(descending=True)[0][:nc])[1].tolist())
            for lst in range(n_lists):
                keys = row[lst][row[lst] != EMPTY]
                keep = keys[(compared[None, :] > keys[:, None]).sum(1) < nc]
                ids = S.unpack(keep)[1]
                kept.setdefault((c, h), set()).update(ids.tolist())
                pages = ki[table[c, ids].long()].double()                 # [n, page, Di]
                score = ((pages @ qi[c, h].double()).amax(1) * scale).tolist()
                want[c, h, lst] = sorted(zip(score, ids.tolist()),
                                         key=lambda x: (-x[0], x[1]))
    return want, kept, best


@pytest.mark.parametrize("per,ranked,cluster,heads", [
    (4, True, False, False), (4, False, False, True), (16, True, True, True),
    (2, False, True, False), (8, True, False, True)])
def test_rescore_scores_the_listed_keys_few_compared_keys_exceed(per, ranked, cluster, heads,
                                                                 monkeypatch):
    """Ranked lists (the scan's best of each chunk) and unranked ones (whole chunks, the
    largest first); ``cluster``: one chunk's keys scaled up, so that its list holds more
    candidates than the merge reads of it (or a whole list of them); ``heads``: the
    lists' heads compared (a bound of 8 compared keys), else every listed key. Outputs
    poisoned first; with 4 extra candidates instead of 16, so that some listed keys are
    left out."""
    monkeypatch.setattr(R, "FP8_CANDIDATES", 4)
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
    exact = torch.full_like(cand, 5)
    ki8, kis = quantize_e4m3(ki)
    lists = S.paged_scan(qi, ki8, table, lens, cand, batch=len(lengths), num_q=1,
                         max_pages=table.shape[1], topk=nc + 1, block_size=BS,
                         index_scale=scale, pages_per_program=per, ki_scales=kis)
    assert (lists[2] < per) == (per == 16)            # lists of the best 8 of a chunk
    out = R.paged_rescore(cand, lists, qi, ki, table, exact, num_q=1, topk=K,
                          block_size=BS, index_scale=scale, scan_dtype=ki8.dtype)
    ls, n_lists, kr_out = out
    assert (ls, n_lists, kr_out) == (lists[0], lists[1], min(R.next_pow2(K - 1), ls))
    want, kept, best = _expected(cand.cpu(), lists, qi.cpu(), ki.cpu(), table.cpu(), nc,
                                 kr_out, scale)
    sizes = []
    for (c, h, lst), w in want.items():
        sizes.append(len(w))
        w = w[:kr_out]
        got = exact[c, h, lst * ls:][:kr_out].cpu()
        score, ids = S.unpack(got)
        assert ids.tolist() == [i for _, i in w] + [-1] * (kr_out - len(w)), (c, h, lst)
        torch.testing.assert_close(score[:len(w)], torch.tensor([s for s, _ in w]),
                                   rtol=1e-5, atol=1e-6)
    for key, ids in best.items():               # the copy's best blocks are candidates
        assert len(ids) == nc and ids <= kept[key]
        assert heads or ids == kept[key]        # and only they, all keys compared
    n_kept = sum(len(x) for x in kept.values())
    assert n_kept < (cand.cpu() != EMPTY).sum()     # some listed keys are left out
    assert (n_kept > nc * len(best)) == heads       # more than the best: heads compared
    assert max(sizes) >= (min(kr_out + 1, ls) if cluster else 2)
