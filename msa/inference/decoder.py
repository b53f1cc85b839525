"""``PagedDecoder``: decode and multi-token decode over a paged cache, plan once per step,
run once per layer.

``plan()`` takes the step's request metadata (page table, lengths), validates it (it may
synchronise) and copies it into preallocated device buffers; ``run()`` reads only those
buffers, launches the fused kernels (``msa.ops.decode.triton.paged_decode``) and writes
preallocated outputs: no host synchronisation and no allocation, so it can be captured
in a CUDA graph once per batch size and replayed after each ``plan()``. Called eagerly on
CUDA, ``run`` does that itself (``msa.inference.step_graphs``): from the second call with
the same pages and batch it copies the query rows into static buffers and replays its
launches from a graph, for a fraction of the launches' host time (docs/inference.md).
One plan serves every layer of a step (the layers share the page table;
``msa.inference.PagedKVCache`` does this for ``MSAttention`` stacks).
"""
from __future__ import annotations

import os

import torch

from ..config import MSAConfig
from ..ops.checks import check_config, check_int4_scales, check_page_scales
from ..ops.quant import E4M3
from .step_graphs import StepGraphs, tensor_key


class PagedDecoder:
    """Decode / multi-token decode over a paged cache with a plan()/run() lifecycle.

    Args:
        config: MSA shapes (``block_size`` = page size, ``topk``, heads, dims, scales).
        max_batch: most requests per step; num_q: query tokens per request (1..16);
        max_pages: page-table width (pages of the longest request); dtype of q/k/v.
        pages_per_program, index_stages: launch parameters of the index kernel (default:
            enough programs for about two waves; Triton's ``num_stages`` 3 over bf16 index
            keys, 5 over e4m3 ones, the faster on an H200: with Triton 3.6 the scan's loop
            keeps one page in flight at 2-4, two at 5-6, three at 7).
        graphs: on CUDA, ``run`` called eagerly (not inside the caller's own CUDA graph
            capture) replays its launches from a CUDA graph from the second call with the
            same pages and batch on (``msa.inference.step_graphs``): the new query rows
            are copied into static buffers first. ``False``: every call launches its
            kernels.

    Buffers (views of the first ``B * Q`` rows are returned by ``run``): ``out
    [max_batch*Q, Hq, D]``, ``lse [max_batch*Q, Hq]`` fp32, ``topk_indices
    [Hi, max_batch*Q, K]`` int32, the index scan's lists, the re-scoring's buffers and the
    split partials.
    """

    def __init__(self, config: MSAConfig, *, max_batch: int, num_q: int, max_pages: int,
                 device, dtype=torch.bfloat16, pages_per_program: int = None,
                 index_stages: int = None, graphs: bool = True):
        from ..ops.decode.select import candidates_width
        from ..ops.decode.triton import partial_buffers
        config = check_config(config)
        if not isinstance(num_q, int) or not 1 <= num_q <= 16:
            raise ValueError(f"num_q must be an int in [1, 16], got {num_q!r}")
        if not isinstance(max_batch, int) or not isinstance(max_pages, int) or \
                max_batch < 1 or max_pages < 1:
            raise ValueError(f"max_batch and max_pages must be ints >= 1, got {max_batch!r}, "
                             f"{max_pages!r}")
        self.cfg, self.num_q, self.max_pages = config, num_q, max_pages
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        c = config
        i32 = dict(dtype=torch.int32, device=self.device)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.page_table = torch.zeros(max_batch, max_pages, **i32)
        self.seq_lens = torch.full((max_batch,), num_q, **i32)
        rows = max_batch * num_q
        self.candidates = torch.empty(rows, c.index_heads,
                                      candidates_width(max_pages, pages_per_program),
                                      dtype=torch.int64, device=self.device)
        self.out = torch.empty(rows, c.num_heads, c.head_dim, dtype=dtype, device=self.device)
        self.lse = torch.empty(rows, c.num_heads, **f32)
        self.topk_indices = torch.empty(c.index_heads, rows, c.topk, **i32)
        self.exact = torch.empty_like(self.candidates)      # re-scored candidates' keys
        self.rescored = torch.zeros(rows, c.index_heads, 2, **i32)    # their counts
        self.partials = partial_buffers(max_batch, num_q, c.num_heads, c.num_kv_heads,
                                        c.head_dim, c.topk, self.device)
        self.batch, self.top_page = 0, -1
        self.pages_per_program, self.index_stages = pages_per_program, index_stages
        self.graphs = StepGraphs(self.device) if graphs and self.device.type == "cuda" \
            else None
        self._static = {}               # query rows copied in for the graphs, per dtype

    def plan(self, page_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Validate (may synchronise) and copy request metadata into the run buffers.

        page_table ``[B, <= max_pages]`` int32/int64 physical pages; seq_lens ``[B]``
        cached tokens per request, queries included (``>= num_q``)."""
        if not isinstance(page_table, torch.Tensor) or page_table.dim() != 2 or \
                page_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"page_table must be a [B, pages] int32/int64 tensor, got "
                             f"{_describe(page_table)}")
        b, w = page_table.shape
        if not 1 <= b <= self.page_table.shape[0] or w > self.max_pages:
            raise ValueError(f"page_table {tuple(page_table.shape)} exceeds the planned "
                             f"max_batch={self.page_table.shape[0]}, max_pages={self.max_pages}")
        if not isinstance(seq_lens, torch.Tensor) or seq_lens.shape != (b,) or \
                seq_lens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq_lens must be a [B={b}] int32/int64 tensor, got "
                             f"{_describe(seq_lens)}")
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
        c = self.cfg
        self._check_attention(q, k_pages, v_pages)
        self._check_tensors({"qi": (qi, (self.batch * self.num_q, c.index_heads, c.index_dim)),
                             "ki_pages": (ki_pages, (None, c.block_size, c.index_dim))})
        if ki_pages.dtype not in (qi.dtype, E4M3):
            raise TypeError(f"dtypes must match: qi/ki_pages {qi.dtype}/{ki_pages.dtype} "
                            f"(index pages may be float8_e4m3fn with their scales)")
        pages = min(k_pages.shape[0], v_pages.shape[0], ki_pages.shape[0])
        if self.top_page >= pages:
            raise IndexError(f"page_table refers to page {self.top_page}, the pools hold "
                             f"{pages} pages")

    def _check_tensors(self, want) -> None:
        """``{name: (tensor, shape)}`` (``None``: any size): type, shape, device, a
        contiguous last dim."""
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

    def _check_attention(self, q, k_pages, v_pages) -> None:
        """The attention's inputs: shapes, devices, strides and dtypes."""
        c, rows = self.cfg, self.batch * self.num_q
        page = (None, c.num_kv_heads, c.block_size, c.head_dim)
        self._check_tensors({"q": (q, (rows, c.num_heads, c.head_dim)),
                             "k_pages": (k_pages, page), "v_pages": (v_pages, page)})
        if k_pages.stride() != v_pages.stride():       # the kernel walks both with k's
            raise ValueError(f"k_pages and v_pages must have the same strides, got "
                             f"{k_pages.stride()} and {v_pages.stride()}")
        kv = {k_pages.dtype, v_pages.dtype}
        if q.dtype != self.out.dtype or (kv != {q.dtype} and kv != {E4M3}):
            raise TypeError(f"dtypes must match: q/k_pages/v_pages/decoder "
                            f"{q.dtype}/{k_pages.dtype}/{v_pages.dtype}/{self.out.dtype} "
                            f"(pages may be float8_e4m3fn with their scales)")

    def run(self, q, qi, k_pages, v_pages, ki_pages, *, k_scales=None, v_scales=None,
            ki_scales=None, ki_scan=None):
        """One decode step of one layer (no host synchronisation; no allocation but the
        static query buffers of the decoder's graphs, on their first use).

        q ``[B*Q, Hq, D]``, qi ``[B*Q, Hi, Di]`` (request-major), pages
        ``k_pages, v_pages [P, Hkv, page, D]``, ``ki_pages [P, page, Di]``; FP8 (e4m3)
        pages come with their row scales ``k_scales, v_scales [P, Hkv, page]``,
        ``ki_scales [P, page]`` fp32 (``msa.ops.quant``; K and V together, the index keys
        on their own; queries stay bf16/fp16/fp32). ``ki_scan = (pages, scales)``: a
        low-precision copy of 16-bit or fp32 ``ki_pages`` that the index scan reads
        instead, e4m3 (``msa.ops.quant.quantize_e4m3`` of each token: ``[P, page, Di]`` and
        fp32 ``[P, page]``) or int4 (``quantize_int4``: ``[P, page, Di / 2]`` uint8 and
        fp16 ``[P, page, Di / 32]``); ``ki_pages`` then score the scan's best ``topk - 1
        + FP8_CANDIDATES`` (e4m3) or ``+ INT4_CANDIDATES`` (int4) blocks again and those
        exact scores rank (docs/semantics.md, "FP8 index scoring", "INT4 scan copy").
        Returns views of the preallocated ``out [B*Q, Hq, D]`` and
        ``topk_indices [Hi, B*Q, K]`` (overwritten by the next ``run``).
        """
        b = self.batch
        if b == 0:
            raise RuntimeError("call plan() before run()")
        self._check(q, qi, k_pages, v_pages, ki_pages)
        scales = (k_scales, v_scales, ki_scales)
        check_page_scales(("k_scales", "v_scales", "ki_scales"),
                          (k_pages, v_pages, ki_pages), scales)
        ki_exact = None
        if ki_scan is not None:
            ki_exact, (ki_pages, kis) = ki_pages, self._check_scan_copy(ki_pages, ki_scan,
                                                                        ki_scales)
            scales = (k_scales, v_scales, kis)
        rows = b * self.num_q
        pages = (k_pages, v_pages, ki_pages, *scales, ki_exact)
        if self.graphs is None or torch.cuda.is_current_stream_capturing():
            self._launch(q, qi, *pages)
        else:
            sq, sqi = self._static_rows(q), self._static_rows(qi)
            key = (b, q.dtype, qi.dtype, os.environ.get("MSA_DECODE_KERNEL"),
                   *(tensor_key(x) for x in pages))
            self.graphs.run(key, lambda: self._launch(sq, sqi, *pages))
        return self.out[:rows], self.topk_indices[:, :rows]

    def _static_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` copied into this decoder's buffer of its shape past the first dim and
        dtype (the graphs read the query rows there)."""
        key = (tuple(x.shape[1:]), x.dtype)
        buf = self._static.get(key)
        if buf is None:
            rows = self.page_table.shape[0] * self.num_q
            buf = self._static[key] = torch.empty(rows, *x.shape[1:], dtype=x.dtype,
                                                  device=self.device)
        buf = buf[:x.shape[0]]
        with torch.no_grad():           # rows that require grad leave no history here
            buf.copy_(x)
        return buf

    def _launch(self, q, qi, k_pages, v_pages, ki_pages, k_scales, v_scales, ki_scales,
                ki_exact) -> None:
        """The step's kernels (``msa.ops.decode.triton.paged_decode``) into the buffers."""
        from ..ops.decode.triton import paged_decode
        c, b, nq = self.cfg, self.batch, self.num_q
        rows = b * nq
        paged_decode(q, qi, k_pages, v_pages, ki_pages, self.page_table, self.seq_lens,
                     batch=b, num_q=nq, max_pages=self.max_pages,
                     num_kv_heads=c.num_kv_heads, candidates=self.candidates[:rows],
                     topk_indices=self.topk_indices[:, :rows], out=self.out[:rows],
                     lse=self.lse[:rows], partials=self.partials,
                     block_size=c.block_size, scale=c.scale, index_scale=c.index_scale,
                     pages_per_program=self.pages_per_program,
                     index_stages=self.index_stages, k_scales=k_scales,
                     v_scales=v_scales, ki_scales=ki_scales, ki_exact=ki_exact,
                     exact=self.exact[:rows], counts=self.rescored)

    def attention_kernel(self, q, k_pages, v_pages) -> str:
        """The attention kernel ``run`` launches for these queries and pages at the planned
        batch: ``"gluon"`` (``msa.ops.decode.gluon``: Hopper, e4m3 pages, one program per
        (query row, KV head)) or ``"triton"`` (``MSA_DECODE_KERNEL=triton`` keeps it)."""
        from ..ops.decode.triton import attend_kernel, decode_splits
        c = self.cfg
        if self.batch == 0:
            raise RuntimeError("call plan() before attention_kernel()")
        self._check_attention(q, k_pages, v_pages)
        nsplit = decode_splits(self.batch * self.num_q, c.num_kv_heads, c.topk)[0]
        return attend_kernel(q, k_pages, v_pages, c.num_kv_heads, c.block_size,
                             (k_pages.stride(0), k_pages.stride(1), k_pages.stride(2)), nsplit,
                             merge=nsplit > 1)

    def scan_kernel(self, qi, ki_pages) -> str:
        """The index-scan kernel ``run`` launches over these index-key pages (with
        ``ki_scan``: over the copy's pages): ``"gluon"`` (``msa.ops.decode.gluon_scan``:
        Hopper, e4m3, int4 or bf16 pages, at most 64 query rows per request, 32 over int4
        pages) or ``"triton"``
        (``MSA_DECODE_KERNEL=triton`` keeps it)."""
        from ..ops.decode.select import scan_kernel
        if self.batch == 0:
            raise RuntimeError("call plan() before scan_kernel()")
        c = self.cfg
        self._check_tensors({"qi": (qi, (self.batch * self.num_q, c.index_heads,
                                         c.index_dim)),
                             "ki_pages": (ki_pages, (None, c.block_size, c.index_dim))})
        return scan_kernel(qi, ki_pages, (ki_pages.stride(0), ki_pages.stride(1)),
                           c.block_size, self.num_q)

    @staticmethod
    def _check_scan_copy(ki_pages, ki_scan, ki_scales):
        """``ki_scan = (pages, scales)``, e4m3 or packed int4, beside 16-bit or fp32
        ``ki_pages``."""
        if ki_pages.dtype == E4M3 or ki_scales is not None:
            raise TypeError("ki_scan goes with 16-bit or fp32 ki_pages (their exact values) "
                            f"and no ki_scales, got ki_pages {ki_pages.dtype}")
        if not isinstance(ki_scan, (tuple, list)) or len(ki_scan) != 2:
            raise TypeError(f"ki_scan must be (pages, scales), got {type(ki_scan).__name__}")
        pages, scales = ki_scan
        di = ki_pages.shape[-1]
        int4 = isinstance(pages, torch.Tensor) and pages.dtype == torch.uint8
        shape = (*ki_pages.shape[:-1], di // 2 if int4 else di)
        if not isinstance(pages, torch.Tensor) or pages.dtype not in (E4M3, torch.uint8) or \
                pages.shape != shape or pages.stride(-1) != 1 or \
                pages.device != ki_pages.device or \
                (not int4 and pages.stride() != ki_pages.stride()):
            got = f"{tuple(pages.shape)} {pages.dtype}" \
                if isinstance(pages, torch.Tensor) else type(pages).__name__
            raise ValueError(f"ki_scan's pages must be float8_e4m3fn like ki_pages "
                             f"{tuple(ki_pages.shape)} (same strides and device) or uint8 "
                             f"packed int4 {list(shape[:-1]) + [di // 2]}, got {got}")
        if int4:
            check_int4_scales("ki_scan scales", pages, scales)
        else:
            check_page_scales(("ki_scan scales",), (pages,), (scales,))
        return pages, scales


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {x.dtype}"
    return type(x).__name__
