"""Fused paged decode and multi-token decode: ``PagedDecoder.plan()`` / ``run()``.

Each of the ``B`` requests decodes ``Q`` query tokens (1: decode, 2..16: multi-token /
speculative) at positions ``seq_len_b - Q + i``, against its paged cache (page = block,
see ``msa.inference.paged``). ``run()`` launches, with no host synchronisation:

1. ``paged_block_max_kernel``: grid (request, page split). Each program reads its pages
   of index keys once through the page table and scores them for all ``Q x Hi`` query
   rows of the request with one MMA per page, writing causal block maxima
   ``M [B*Q, Hi, max_pages]`` (``-inf`` past the end).
2. ``decode_topk_kernel``: top-k of ``M`` per (query, index head) with the reference rule
   (score desc, id asc, local block last, ``-1`` padding) -> head-major
   ``topk [Hi, B*Q, K]``.
3. ``paged_decode_attn_kernel``: grid (query, KV head, split of the K selected blocks):
   the ``G`` query heads of the group are the MMA rows, each selected page is read
   through the page table, online softmax; one split writes the output directly, more
   splits write partials merged by ``paged_decode_combine_kernel`` (LSE combine).

``plan()`` takes the request metadata (page table, lengths), validates it (it may
synchronise), and copies it into preallocated device buffers; ``run()`` reads only those
buffers and writes preallocated outputs, so it can be captured in a CUDA graph once per
batch size and replayed after each ``plan()`` with new lengths and pages. One plan
serves every layer of a step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import MSAConfig
from ..ops.attention.forward import INTERPRETER, LOG2E, _dot, _next_pow2
from ..ops.attention.query_major import online_softmax_block

TARGET_PROGRAMS = 264           # about two waves on a 132-SM GPU


@triton.jit
def paged_block_max_kernel(
        QI, KI, PAGE_TABLE, SEQ_LENS, M, scale, max_pages,
        stride_qt, stride_qh, stride_kp, stride_kt, stride_tb, stride_mc, stride_mh,
        NQ: tl.constexpr, HI: tl.constexpr, ROWS: tl.constexpr, DI: tl.constexpr,
        BS: tl.constexpr, PAGES: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr):
    b = tl.program_id(0)
    n = tl.load(SEQ_LENS + b)
    offs_r = tl.arange(0, ROWS)
    i = offs_r // HI
    h = offs_r % HI
    rmask = offs_r < NQ * HI
    pos = n - NQ + i
    qrow = (b * NQ + i).to(tl.int64)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, DI)
    qi = tl.load(QI + qrow[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    m_off = qrow * stride_mc + h * stride_mh
    for jj in range(PAGES):                 # predicated (not branched): pipelined loads
        j = tl.program_id(1) * PAGES + jj
        live = j * BS < n                   # pages past the end: no loads, M = -inf
        page = tl.load(PAGE_TABLE + b * stride_tb + j, mask=live, other=0).to(tl.int64)
        ki = tl.load(KI + page * stride_kp + offs_n[:, None] * stride_kt + offs_d[None, :],
                     mask=live, other=0.0)
        s = _dot(qi, tl.trans(ki), PRECISION, UPCAST) * scale
        s = tl.where((j * BS + offs_n)[None, :] <= pos[:, None], s, float("-inf"))
        tl.store(M + m_off + j, tl.max(s, 1), mask=rmask & (j < max_pages))


@triton.jit
def decode_topk_kernel(M, SEQ_LENS, TOPK, stride_mc, stride_mh, stride_th, stride_tq,
                       max_pages, NQ: tl.constexpr, BS: tl.constexpr, KSEL: tl.constexpr,
                       KSEL_PAD: tl.constexpr, NB_PAD: tl.constexpr):
    """Top-k of one (query row, index head) from its block maxima, the reference rule:
    ``min(K-1, local)`` earlier blocks by score desc / id asc, then ``local``, then -1."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    local = (tl.load(SEQ_LENS + c // NQ) - NQ + (c % NQ)) // BS
    idx = tl.arange(0, NB_PAD)
    m = tl.load(M + c * stride_mc + h * stride_mh + idx, mask=idx < max_pages,
                other=float("-inf"))
    m = tl.where(m != m, -3.4028234663852886e38, m)            # NaN ranks lowest
    m = tl.where(m == 0, 0.0, m)                                # -0 == +0
    key = tl.where(idx < local, m, float("-inf"))               # earlier blocks only
    offs_k = tl.arange(0, KSEL_PAD)
    out = tl.full((KSEL_PAD,), -1, dtype=tl.int32)
    for r in range(KSEL - 1):
        best = tl.max(key, 0)
        pick = tl.min(tl.where(key == best, idx, NB_PAD), 0)   # ties: smaller id
        pick = tl.where(best > float("-inf"), pick, -1)
        out = tl.where(offs_k == r, pick, out)
        key = tl.where(idx == pick, float("-inf"), key)
    n_ranked = tl.minimum(local, KSEL - 1)
    out = tl.where(offs_k == n_ranked, local, tl.where(offs_k > n_ranked, -1, out))
    tl.store(TOPK + h * stride_th + c * stride_tq + offs_k, out, mask=offs_k < KSEL)


@triton.jit
def paged_decode_attn_kernel(
        Q, K, V, TOPK, PAGE_TABLE, SEQ_LENS, OUT, LSE, PO, PL, scale_log2,
        stride_qt, stride_qh, stride_kp, stride_kh, stride_kt, stride_th, stride_tq,
        stride_tb, stride_ot, stride_oh, stride_lt,
        NQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
        G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, KSEL: tl.constexpr,
        PER_SPLIT: tl.constexpr, NSPLIT: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)            # query row b * NQ + i
    h = tl.program_id(1)
    sp = tl.program_id(2)
    b = c // NQ
    pos = tl.load(SEQ_LENS + b) - NQ + (c % NQ)
    hs = h if HS > 1 else 0
    offs_g = tl.arange(0, G_PAD)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    qt = tl.load(Q + c * stride_qt + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                 mask=gmask[:, None], other=0.0)
    m_i = tl.zeros((G_PAD,), dtype=tl.float32) - float("inf")
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    for jj in range(PER_SPLIT):
        j = sp * PER_SPLIT + jj
        blk = tl.load(TOPK + hs * stride_th + c * stride_tq + j, mask=j < KSEL, other=-1)
        if (blk >= 0) & (blk * BS <= pos):
            page = tl.load(PAGE_TABLE + b * stride_tb + blk).to(tl.int64)
            kmask = blk * BS + offs_n <= pos
            off = page * stride_kp + h * stride_kh + offs_n[:, None] * stride_kt + \
                offs_d[None, :]
            kt = tl.load(K + off, mask=kmask[:, None], other=0.0)
            vt = tl.load(V + off, mask=kmask[:, None], other=0.0)
            m_i, l_i, acc = online_softmax_block(qt, kt, vt, kmask, m_i, l_i, acc,
                                                 scale_log2, PRECISION, UPCAST)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("-inf"))
    if NSPLIT == 1:
        tl.store(OUT + c * stride_ot + (h * G + offs_g)[:, None] * stride_oh
                 + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None])
        tl.store(LSE + c * stride_lt + h * G + offs_g, lse, mask=gmask)
    else:
        base = ((c * HKV + h) * NSPLIT + sp) * G_PAD + offs_g
        tl.store(PO + base[:, None] * D + offs_d[None, :], out)
        tl.store(PL + base, lse)


@triton.jit
def paged_decode_combine_kernel(PO, PL, OUT, LSE, stride_ot, stride_oh, stride_lt,
                                HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                                D: tl.constexpr, NSPLIT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    c = pid // HKV
    h = pid % HKV
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    base = pid * NSPLIT * G_PAD
    m = tl.zeros((G_PAD,), dtype=tl.float32) - float("inf")
    for s in range(NSPLIT):
        m = tl.maximum(m, tl.load(PL + base + s * G_PAD + offs_g))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wsum = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    for s in range(NSPLIT):
        w = tl.exp(tl.load(PL + base + s * G_PAD + offs_g) - m_safe)
        wsum += w
        acc += w[:, None] * tl.load(PO + (base + s * G_PAD + offs_g)[:, None] * D
                                    + offs_d[None, :])
    gmask = offs_g < G
    tl.store(OUT + c * stride_ot + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             (acc / tl.maximum(wsum, 1e-30)[:, None]).to(OUT.dtype.element_ty),
             mask=gmask[:, None])
    tl.store(LSE + c * stride_lt + h * G + offs_g,
             tl.where(wsum > 0, m_safe + tl.log(wsum), float("-inf")), mask=gmask)


class PagedDecoder:
    """Decode / multi-token decode over a paged cache with a plan()/run() lifecycle.

    Args:
        config: MSA shapes (``block_size`` = page size, ``topk``, heads, dims, scales).
        max_batch: most requests per step; num_q: query tokens per request (1..16);
        max_pages: page-table width (pages of the longest request); dtype of q/k/v.
        pages_per_program, index_stages: launch parameters of the index kernel (default:
            enough programs for about two waves; 3 pipeline stages).
    """

    def __init__(self, config: MSAConfig, *, max_batch: int, num_q: int, max_pages: int,
                 device, dtype=torch.bfloat16, pages_per_program: int = None,
                 index_stages: int = 3):
        if not 1 <= num_q <= 16:
            raise ValueError(f"num_q must lie in [1, 16], got {num_q}")
        if max_batch < 1 or max_pages < 1:
            raise ValueError(f"max_batch and max_pages must be >= 1, got {max_batch}, "
                             f"{max_pages}")
        self.cfg, self.num_q, self.max_pages = config, num_q, max_pages
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        c = config
        i32 = dict(dtype=torch.int32, device=self.device)
        self.page_table = torch.zeros(max_batch, max_pages, **i32)
        self.seq_lens = torch.full((max_batch,), num_q, **i32)
        rows = max_batch * num_q
        self.block_max = torch.empty((rows, c.index_heads, max_pages), dtype=torch.float32,
                                     device=self.device)
        self.out = torch.empty(rows, c.num_heads, c.head_dim, dtype=dtype, device=self.device)
        self.lse = torch.empty(rows, c.num_heads, dtype=torch.float32, device=self.device)
        self.topk = torch.empty(c.index_heads, rows, c.topk, **i32)
        self.batch, self.top_page = 0, -1
        self.pages_per_program, self.index_stages = pages_per_program, index_stages

    def plan(self, page_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Validate (may synchronise) and copy request metadata into the run buffers.

        page_table ``[B, <= max_pages]`` int32/int64 physical pages; seq_lens ``[B]``
        cached tokens per request, queries included (``>= num_q``)."""
        if page_table.dim() != 2 or page_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"page_table must be [B, pages] int32/int64, got "
                             f"{tuple(page_table.shape)} {page_table.dtype}")
        b, w = page_table.shape
        if not 1 <= b <= self.page_table.shape[0] or w > self.max_pages:
            raise ValueError(f"page_table {tuple(page_table.shape)} exceeds the planned "
                             f"max_batch={self.page_table.shape[0]}, max_pages={self.max_pages}")
        if seq_lens.shape != (b,):
            raise ValueError(f"seq_lens must be [B={b}], got {tuple(seq_lens.shape)}")
        lens = seq_lens.to(page_table.device).long()
        bs = self.cfg.block_size
        bad = ((lens < self.num_q) | (lens > w * bs)).nonzero()
        if bad.numel():
            r = int(bad[0])
            raise ValueError(f"seq_lens[{r}]={int(lens[r])} must lie in [num_q={self.num_q}, "
                             f"{w * bs}] (page_table width {w} x page {bs})")
        used = torch.arange(w, device=page_table.device) < (-(-lens // bs)).view(-1, 1)
        bad = ((page_table < 0) & used).any(1).nonzero()
        if bad.numel():
            raise IndexError(f"request {int(bad[0])}: page_table holds a negative page")
        top = int(torch.where(used, page_table, -1).max())
        self.page_table[:b, :w].copy_(page_table)
        self.seq_lens[:b].copy_(seq_lens)
        self.batch, self.top_page = b, top

    def _check(self, q, qi, k_pages, v_pages, ki_pages) -> None:
        """Shapes, dtypes and devices only (host metadata: no synchronisation)."""
        c, rows = self.cfg, self.batch * self.num_q
        want = {"q": (q, (rows, c.num_heads, c.head_dim)),
                "qi": (qi, (rows, c.index_heads, c.index_dim)),
                "k_pages": (k_pages, (None, c.num_kv_heads, c.block_size, c.head_dim)),
                "v_pages": (v_pages, (None, c.num_kv_heads, c.block_size, c.head_dim)),
                "ki_pages": (ki_pages, (None, c.block_size, c.index_dim))}
        for name, (x, shape) in want.items():
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
            if x.dim() != len(shape) or any(w is not None and w != s
                                            for w, s in zip(shape, x.shape)):
                raise ValueError(f"{name} must be {list(shape)} (None: any), got "
                                 f"{list(x.shape)}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device}, the decoder on {self.device}")
            if x.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dim")
        if len({q.dtype, k_pages.dtype, v_pages.dtype}) != 1 or qi.dtype != ki_pages.dtype:
            raise TypeError(f"dtypes must match: q/k_pages/v_pages {q.dtype}/"
                            f"{k_pages.dtype}/{v_pages.dtype}, qi/ki_pages {qi.dtype}/"
                            f"{ki_pages.dtype}")
        pages = min(k_pages.shape[0], v_pages.shape[0], ki_pages.shape[0])
        if self.top_page >= pages:
            raise IndexError(f"page_table refers to page {self.top_page}, the pools hold "
                             f"{pages} pages")

    def run(self, q, qi, k_pages, v_pages, ki_pages):
        """One decode step of one layer (no host synchronisation).

        q ``[B*Q, Hq, D]``, qi ``[B*Q, Hi, Di]`` (request-major), pages
        ``k_pages, v_pages [P, Hkv, page, D]``, ``ki_pages [P, page, Di]``.
        Returns views of the preallocated ``out [B*Q, Hq, D]`` and ``topk [Hi, B*Q, K]``.
        """
        c, b, nq = self.cfg, self.batch, self.num_q
        if b == 0:
            raise RuntimeError("call plan() before run()")
        self._check(q, qi, k_pages, v_pages, ki_pages)
        rows = b * nq
        hkv, hi, g = c.num_kv_heads, c.index_heads, c.num_heads // c.num_kv_heads
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        upcast = INTERPRETER and q.dtype == torch.bfloat16
        m = self.block_max[:rows]
        per = self.pages_per_program or \
            max(1, min(16, _next_pow2(-(-b * self.max_pages // TARGET_PROGRAMS))))
        paged_block_max_kernel[(b, triton.cdiv(self.max_pages, per))](
            qi, ki_pages, self.page_table, self.seq_lens, m, c.index_scale, self.max_pages,
            qi.stride(0), qi.stride(1), ki_pages.stride(0), ki_pages.stride(1),
            self.page_table.stride(0), m.stride(0), m.stride(1),
            NQ=nq, HI=hi, ROWS=max(16, _next_pow2(nq * hi)), DI=qi.shape[-1],
            BS=c.block_size, PAGES=per, PRECISION=prec, UPCAST=upcast, num_warps=4,
            num_stages=self.index_stages)
        topk = self.topk[:, :rows]
        nb_pad = _next_pow2(self.max_pages)
        decode_topk_kernel[(rows, hi)](
            m, self.seq_lens, topk, m.stride(0), m.stride(1), topk.stride(0), topk.stride(1),
            self.max_pages, NQ=nq, BS=c.block_size, KSEL=c.topk,
            KSEL_PAD=_next_pow2(c.topk), NB_PAD=nb_pad, num_warps=8 if nb_pad > 4096 else 4)
        nsplit = max(1, min(c.topk, TARGET_PROGRAMS // (rows * hkv)))
        per_split = -(-c.topk // nsplit)
        nsplit = -(-c.topk // per_split)
        g_pad = max(16, _next_pow2(g))
        out, lse = self.out[:rows], self.lse[:rows]
        po = pl = out                           # unused when nsplit == 1
        if nsplit > 1:
            po = torch.empty(rows * hkv * nsplit * g_pad * c.head_dim, dtype=torch.float32,
                             device=self.device)
            pl = torch.empty(rows * hkv * nsplit * g_pad, dtype=torch.float32,
                             device=self.device)
        paged_decode_attn_kernel[(rows, hkv, nsplit)](
            q, k_pages, v_pages, topk, self.page_table, self.seq_lens, out, lse, po, pl,
            c.scale * LOG2E, q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1),
            k_pages.stride(2), topk.stride(0), topk.stride(1), self.page_table.stride(0),
            out.stride(0), out.stride(1), lse.stride(0),
            NQ=nq, HKV=hkv, HS=hi, G=g, G_PAD=g_pad, D=c.head_dim, BS=c.block_size,
            KSEL=c.topk, PER_SPLIT=per_split, NSPLIT=nsplit, PRECISION=prec, UPCAST=upcast,
            num_warps=4)
        if nsplit > 1:
            paged_decode_combine_kernel[(rows * hkv,)](
                po, pl, out, lse, out.stride(0), out.stride(1), lse.stride(0),
                HKV=hkv, G=g, G_PAD=g_pad, D=c.head_dim, NSPLIT=nsplit, num_warps=4)
        return out, topk
