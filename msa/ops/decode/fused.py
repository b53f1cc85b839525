"""A decode step in one launch when the attention merges the scan's lists itself (few
query rows, e.g. one token over 1M tokens): the scan programs and the attention programs
share one grid (``paged_decode_fused_kernel``), so the attention starts as soon as the
last scan program ends, with no launch between them.

Each program first takes a ticket from an atomic counter, in the order programs start.
The first ``n_scan`` tickets scan a page chunk (``msa.ops.decode.select.scan_chunk``)
and then count themselves done; the others each attend one split
(``msa.ops.decode.triton.attend_split``): they load their query, wait until every scan
program is done, then merge their row and attend. A program only ever waits for
programs that took a ticket before it, which are running or finished, so the wait needs
no co-residency and cannot hang, whatever the GPU or the order in which it starts
programs. The three counters (tickets, scans done, waits passed) follow the split
counts in ``partials[2]``; each is reset by the last program to use it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .select import scan_chunk, scan_launch, scan_stages
from .triton import attend_launch, attend_split

WARPS = 4               # the scan's warps (the attention merges with them too)
MAXNREG = 128           # registers per thread: four programs per SM, as the scan alone


@triton.jit
def paged_decode_fused_kernel(
        QI, KI, KIS, KI_TABLE, SEQ_LENS, CAND, index_scale, stride_iqt, stride_iqh,
        stride_ikp, stride_ikt, stride_itb, stride_icc, stride_ich,
        Q, K, V, KS, VS, TOPK_INDICES, CAND_, PAGE_TABLE, SEQ_LENS_, OUT, LSE, PO, PL, DONE,
        scale_log2, n_lists, stride_qt, stride_qh, stride_kp, stride_kh, stride_kt,
        stride_th, stride_tq, stride_cc, stride_ch, stride_tb, stride_ot, stride_oh,
        stride_lt, stride_sp, stride_sh, COUNTS, n_scan, chunks, n_attend,
        S_NQ: tl.constexpr, S_HI: tl.constexpr, S_ROWS: tl.constexpr, S_DI: tl.constexpr,
        S_BS: tl.constexpr, S_PAGES: tl.constexpr, S_KR: tl.constexpr,
        S_PRECISION: tl.constexpr, S_UPCAST: tl.constexpr, S_RANK: tl.constexpr,
        S_MASK_TAIL: tl.constexpr, S_FP8: tl.constexpr,
        NQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
        G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr,
        TOPK_PAD: tl.constexpr, PER_SPLIT: tl.constexpr, PER_PAD: tl.constexpr,
        NSPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        MERGE: tl.constexpr, LS: tl.constexpr, KR: tl.constexpr, NL_PAD: tl.constexpr,
        FP8: tl.constexpr, STAGES: tl.constexpr):
    """Ticket ``t < n_scan``: scan chunk ``t % chunks`` of request ``t // chunks``; else
    split ``a % NSPLIT`` of KV head ``a // NSPLIT % HKV`` of query row
    ``a // (NSPLIT * HKV)``, ``a = t - n_scan`` (``COUNTS [3]`` int32: tickets, scans
    done, waits passed)."""
    t = tl.atomic_add(COUNTS, 1, sem="relaxed")
    if t == n_scan + n_attend - 1:              # the last ticket: ready for the next step
        tl.store(COUNTS, 0)
    if t < n_scan:
        scan_chunk(QI, KI, KIS, KI_TABLE, SEQ_LENS, CAND, index_scale, t // chunks,
                   t % chunks, stride_iqt, stride_iqh, stride_ikp, stride_ikt, stride_itb,
                   stride_icc, stride_ich, S_NQ, S_HI, S_ROWS, S_DI, S_BS, S_PAGES, S_KR,
                   S_PRECISION, S_UPCAST, S_RANK, S_MASK_TAIL, S_FP8)
        tl.debug_barrier()                      # every thread's lists stored ...
        tl.atomic_add(COUNTS + 1, 1, sem="release")                 # ... then released
    else:
        a = t - n_scan
        attend_split(
            Q, K, V, KS, VS, TOPK_INDICES, CAND_, PAGE_TABLE, SEQ_LENS_, OUT, LSE, PO, PL,
            DONE, scale_log2, n_lists, (a // (NSPLIT * HKV)).to(tl.int64),
            a // NSPLIT % HKV, a % NSPLIT, COUNTS + 1, n_scan, n_attend, stride_qt,
            stride_qh, stride_kp, stride_kh, stride_kt, stride_th, stride_tq, stride_cc,
            stride_ch, stride_tb, stride_ot, stride_oh, stride_lt, stride_sp, stride_sh, NQ,
            HKV, HS, G, G_PAD, D, BS, TOPK, TOPK_PAD, PER_SPLIT, PER_PAD, NSPLIT, PRECISION,
            UPCAST, MERGE, LS, KR, NL_PAD, FP8, STAGES, True)


def paged_decode_fused(q, qi, k, v, ki, page_table, seq_lens, *, batch: int, num_q: int,
                       max_pages: int, num_kv_heads: int, candidates, topk_indices, out,
                       lse, partials, block_size: int, scale: float, index_scale: float,
                       kv_strides=None, ki_strides=None, ki_page_table=None,
                       mask_tail: bool = False, pages_per_program: int = None,
                       index_stages: int = None, k_scales=None, v_scales=None,
                       ki_scales=None, scale_strides=None) -> None:
    """``msa.ops.decode.triton.paged_decode`` in one launch, for steps whose attention is
    split (``decode_splits(...) > 1``, which ``paged_decode`` checks); same arguments
    (``partials[2]`` holds the counters: ``partial_buffers``)."""
    ki_table = page_table if ki_page_table is None else ki_page_table
    chunks, scan_args, scan_consts, lists = scan_launch(
        qi, ki, ki_table, seq_lens, candidates, batch=batch, num_q=num_q,
        max_pages=max_pages, topk=topk_indices.shape[2], block_size=block_size,
        index_scale=index_scale, ki_strides=ki_strides, mask_tail=mask_tail,
        pages_per_program=pages_per_program, ki_scales=ki_scales)
    grid, args, consts = attend_launch(
        q, k, v, topk_indices, page_table, seq_lens, batch=batch, num_q=num_q,
        num_kv_heads=num_kv_heads, out=out, lse=lse, partials=partials,
        block_size=block_size, scale=scale, kv_strides=kv_strides, k_scales=k_scales,
        v_scales=v_scales, scale_strides=scale_strides, merge=(candidates, *lists))
    n_scan, n_attend = batch * chunks, grid[0] * grid[1] * grid[2]
    counts = partials[2][-3:]
    paged_decode_fused_kernel[(n_scan + n_attend,)](
        *scan_args, *args, counts, n_scan, chunks, n_attend,
        **{f"S_{name}": value for name, value in scan_consts.items()}, **consts,
        num_warps=WARPS, maxnreg=MAXNREG,
        num_stages=index_stages or scan_stages(ki_scales is not None))
