"""Brute-force fp64 oracles for tests: loop over queries, build full masks (small T only)."""
from __future__ import annotations


import torch

from msa.varlen import Segments, cu_seqlens_from_lengths, make_segments


def make_case(q_lens, k_lens, *, hq=4, hkv=2, d=64, hi=None, hki=1, di=64,
              fragment_indices=None, dtype=torch.float32, seed=0, scale=1.0):
    """Random packed inputs. ``k_lens[b]`` are KV *segment* lengths (``cu_seqlens_k`` diffs)."""
    g = torch.Generator().manual_seed(seed)
    hi = hkv if hi is None else hi
    cu_q, cu_k = cu_seqlens_from_lengths(q_lens), cu_seqlens_from_lengths(k_lens)
    tq, tk = sum(q_lens), sum(k_lens)
    frag = None if fragment_indices is None else torch.tensor(fragment_indices, dtype=torch.int32)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(q=rnd(tq, hq, d), k=rnd(tk, hkv, d), v=rnd(tk, hkv, d), qi=rnd(tq, hi, di),
                ki=rnd(tk, hki, di), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                fragment_indices=frag,
                seg=make_segments(tq, tk, cu_q, cu_k, fragment_indices=frag))


def allowed_mask(seg: Segments, b: int, topk_rows: torch.Tensor, block: int) -> torch.Tensor:
    """``[q_len, k_len]`` bool: selected block AND t <= pos. topk_rows ``[q_len, K]``."""
    ql, kl = seg.q_len[b], seg.k_len[b]
    t = torch.arange(kl)
    pos = torch.arange(kl - ql, kl)
    sel = torch.zeros(ql, kl, dtype=torch.bool)
    for i in range(ql):
        for L in topk_rows[i].tolist():
            if L >= 0:
                sel[i, L * block:(L + 1) * block] = True
    return sel & (t.view(1, -1) <= pos.view(-1, 1))


def brute_attention(q, k, v, topk, seg: Segments, block: int, scale: float):
    """fp64 masked dense attention, differentiable. topk ``[Hs, total_q, K]``."""
    hq, hkv = q.shape[1], k.shape[1]
    outs, lses = [], []
    for b in range(seg.num_segments):
        s0, ql, base, kl = seg.q_start[b], seg.q_len[b], seg.k_base[b], seg.k_len[b]
        if ql == 0:
            continue
        qb = q[s0:s0 + ql].double()
        kb = k[base:base + kl].double().repeat_interleave(hq // hkv, 1)
        vb = v[base:base + kl].double().repeat_interleave(hq // hkv, 1)
        x = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        masks = torch.stack([allowed_mask(seg, b, topk[h, s0:s0 + ql], block)
                             for h in range(topk.shape[0])])
        masks = masks.repeat_interleave(hq // topk.shape[0], 0)
        x = x.masked_fill(~masks, float("-inf"))
        lse = torch.logsumexp(x, -1)                                     # [H, ql]
        p = torch.exp(x - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
        p = torch.where(masks, p, torch.zeros_like(p))
        outs.append(torch.einsum("hqk,khd->qhd", p, vb))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def brute_indexer(qi, ki, seg: Segments, block: int, topk: int, scale: float, temp=1.0):
    """Per query: ranked list of (score, id), selected set and selected LSE (fp64)."""
    hi = qi.shape[1]
    results = []                                      # [(h, q)] -> (ids list, lse)
    for b in range(seg.num_segments):
        s0, ql, base, kl = seg.q_start[b], seg.q_len[b], seg.k_base[b], seg.k_len[b]
        for i in range(ql):
            pos = kl - ql + i
            local = pos // block
            row = []
            for h in range(hi):
                kh = ki[base:base + pos + 1, min(h, ki.shape[1] - 1)].double()
                s = (kh @ qi[s0 + i, h].double()) * scale
                maxes = [s[L * block:(L + 1) * block].max().item() for L in range(local)]
                ranked = sorted(range(local), key=lambda L: (-maxes[L], L))
                ids = ranked[:min(topk - 1, local)] + [local]
                chosen = torch.cat([s[L * block:min((L + 1) * block, pos + 1)] for L in ids])
                row.append((ids, torch.logsumexp(chosen / temp, 0).item(), maxes))
            results.append(row)
    return results


def brute_kl(q, k, qi, ki, topk, seg: Segments, block, scale, iscale, coeff=1.0):
    """Explicit KL loss (fp64, differentiable w.r.t. qi, ki; teacher detached).

    topk ``[Hi, total_q, K]`` or None for dense causal sets."""
    hq, hkv, hi = q.shape[1], k.shape[1], qi.shape[1]
    total = 0.0
    for b in range(seg.num_segments):
        s0, ql, base, kl = seg.q_start[b], seg.q_len[b], seg.k_base[b], seg.k_len[b]
        if ql == 0:
            continue
        if topk is None:
            t = torch.arange(kl)
            m = (t.view(1, -1) <= torch.arange(kl - ql, kl).view(-1, 1))
            masks = m.unsqueeze(0).expand(hi, ql, kl)
        else:
            masks = torch.stack([allowed_mask(seg, b, topk[h, s0:s0 + ql], block)
                                 for h in range(hi)])
        with torch.no_grad():
            kb = k[base:base + kl].double().repeat_interleave(hq // hkv, 1)
            x = torch.einsum("qhd,khd->hqk", q[s0:s0 + ql].double(), kb) * scale
            mq = masks.repeat_interleave(hq // hi, 0)
            pt = torch.softmax(x.masked_fill(~mq, float("-inf")), -1).nan_to_num(0.0)
            pt = pt.view(hi, hq // hi, ql, kl).mean(1)
        kib = ki[base:base + kl].double()
        kib = kib.expand(kl, hi, kib.shape[-1]) if kib.shape[1] == 1 else kib
        z = torch.einsum("qhd,khd->hqk", qi[s0:s0 + ql].double(), kib) * iscale
        logps = torch.log_softmax(z.masked_fill(~masks, float("-inf")), -1)
        term = torch.where(pt > 0, pt * (torch.log(pt.clamp_min(1e-300)) - logps),
                           torch.zeros_like(pt))
        total = total + term.sum()
    return coeff / (hi * q.shape[0]) * total


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
