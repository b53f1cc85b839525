"""Paged KV cache (page = KV block) and the cache step of MSA layers over it.

Pages hold ``page_size = block_size`` tokens, so a logical page id *is* a block id. Per
layer ``l``: ``k_pages[l], v_pages[l] [num_pages, Hkv, page, D]`` and
``ki_pages[l] [num_pages, page, Di]`` (one shared index-key head). A request's
``page_table[b, j]`` is the physical page of its logical page ``j`` in every layer;
physical pages may be scattered, permuted or shared between requests (prefix sharing).
Queries of request ``b`` are the last ``q_len_b`` positions of its ``seq_lens[b]`` tokens
(chunked prefill, decode ``Q = 1``, multi-token decode ``Q > 1``).

``PagedKVCache.attend`` runs steps of up to 16 tokens (decode, multi-token decode) in bf16 or
fp16 on CUDA through the fused ``msa.inference.PagedDecoder``, and other steps through the
gathering ``paged_indexer`` / ``paged_attention`` (``msa.inference.paged_ops``).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..config import MSAConfig, check_block_size
from ..ops.checks import check_config
from ..ops.quant import E4M3, INT4_GROUP, quantize_e4m3, quantize_int4
from .decoder import PagedDecoder
from .paged_ops import paged_attention, paged_indexer


class PagedKVCache:
    """Pages of ``num_layers`` layers plus per-request page lists shared by the layers (a
    small manager for users without a serving engine, and the paged cache of
    ``msa.nn.MSAttention``).

    Args:
        num_pages: pool size (per layer); page_size: tokens per page (= MSA block size);
        num_kv_heads, head_dim: main branch; index_dim: index-key dim; num_layers;
        dtype: of the K/V pages; ``torch.float8_e4m3fn`` stores every token row (one
            head's K or V) in e4m3 with its own fp32 scale (``k_scales``, ``v_scales``),
            quantized on write (non-finite rows are rejected) and dequantized where read;
        index_dtype: of the index-key pages (default: ``dtype``, but bf16 when ``dtype``
            is FP8: e4m3 index keys change the selected set on half the rows,
            docs/inference.md); ``torch.float8_e4m3fn`` adds ``ki_scales``;
        scan_copy: ``"e4m3"`` or ``"int4"``: also keep a copy of the (16-bit or fp32)
            index keys in that format (``scan_pages``, ``scan_scales``, quantized on
            write from the stored keys; ``msa.ops.quant``): the decode scan reads it and
            the index keys re-score its candidates (docs/semantics.md, "FP8 index
            scoring", "INT4 scan copy"); faster at long contexts with few requests only
            (docs/inference.md);
        config: the layers' ``MSAConfig`` (needed by ``attend``; ``for_model`` sets it).
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 index_dim: int, *, num_layers: int = 1, dtype=torch.bfloat16,
                 index_dtype=None, scan_copy: Optional[str] = None, device="cpu",
                 config: Optional[MSAConfig] = None):
        for name, x in (("num_pages", num_pages), ("page_size", page_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("index_dim", index_dim), ("num_layers", num_layers)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must be an int >= 1, got {x!r}")
        check_block_size(page_size, "page_size")           # a page is one block
        if index_dtype is None:               # FP8 K/V keep bf16 index keys by default
            index_dtype = torch.bfloat16 if dtype == E4M3 else dtype
        for name, x in (("dtype", dtype), ("index_dtype", index_dtype)):
            if not isinstance(x, torch.dtype) or not x.is_floating_point or \
                    (x.itemsize == 1 and x != E4M3):
                raise ValueError(f"{name} must be a floating type (float8_e4m3fn for FP8 "
                                 f"pages), got {x}")
        if scan_copy not in (None, "e4m3", "int4") or (scan_copy and index_dtype == E4M3):
            raise ValueError(f"scan_copy must be None, 'e4m3' or 'int4', and None with e4m3 "
                             f"index keys, got {scan_copy!r} with index_dtype {index_dtype}")
        if scan_copy == "int4" and index_dim % (2 * INT4_GROUP):
            raise ValueError(f"scan_copy='int4' needs an index_dim that is a multiple of "
                             f"{2 * INT4_GROUP}, got {index_dim}")
        self.page_size, self.num_layers = page_size, num_layers
        self.k_pages = torch.zeros(num_layers, num_pages, num_kv_heads, page_size, head_dim,
                                   dtype=dtype, device=device)
        self.v_pages = torch.zeros_like(self.k_pages)
        self.ki_pages = torch.zeros(num_layers, num_pages, page_size, index_dim,
                                    dtype=index_dtype, device=device)
        self.k_scales = self.v_scales = self.ki_scales = None   # e4m3 rows: fp32 scales
        if dtype == E4M3:
            self.k_scales = torch.ones(self.k_pages.shape[:-1], device=device)
            self.v_scales = torch.ones_like(self.k_scales)
        if index_dtype == E4M3:
            self.ki_scales = torch.ones(self.ki_pages.shape[:-1], device=device)
        self.scan_copy, self.scan_pages, self.scan_scales = scan_copy, None, None
        if scan_copy == "e4m3":
            self.scan_pages = torch.zeros_like(self.ki_pages, dtype=E4M3)
            self.scan_scales = torch.ones(self.ki_pages.shape[:-1], device=device)
        elif scan_copy == "int4":       # zeros (quantize_int4's layout), unit group scales
            rows = self.ki_pages.shape[:-1]
            self.scan_pages = torch.zeros(*rows, index_dim // 2, dtype=torch.uint8,
                                          device=device)
            self.scan_scales = torch.ones(*rows, index_dim // INT4_GROUP,
                                          dtype=torch.float16, device=device)
        self.free_pages: List[int] = list(range(num_pages))
        self.pages: Dict[int, List[int]] = {}
        self.lengths: Dict[int, int] = {}
        self.config = None if config is None else check_config(config)
        self._written: Dict[tuple, int] = {}          # (layer, request) -> tokens written
        self._step = _Step()
        self._decoders: Dict[tuple, PagedDecoder] = {}

    @classmethod
    def for_model(cls, config: MSAConfig, *, num_layers: int, batch: int, num_pages: int,
                  dtype=torch.bfloat16, scan_copy: Optional[str] = None,
                  device="cpu") -> "PagedKVCache":
        """A cache for ``num_layers`` ``MSAttention`` layers of ``config`` and the requests
        ``0 .. batch-1`` (row ``b`` of the hidden states is request ``b``)."""
        config = check_config(config)
        cache = cls(num_pages, config.block_size, config.num_kv_heads, config.head_dim,
                    config.index_dim, num_layers=num_layers, dtype=dtype,
                    scan_copy=scan_copy, device=device, config=config)
        for r in range(batch):
            cache.allocate(r)
        return cache

    def layer(self, layer: int):
        """``(k_pages, v_pages, ki_pages)`` of one layer (views)."""
        return self.k_pages[layer], self.v_pages[layer], self.ki_pages[layer]

    def scales(self, layer: int):
        """``(k_scales, v_scales, ki_scales)`` of one layer's FP8 pages (``[P, Hkv, page]``,
        ``[P, Hkv, page]``, ``[P, page]`` fp32 views; ``None`` for pages that are not
        FP8)."""
        return tuple(None if x is None else x[layer]
                     for x in (self.k_scales, self.v_scales, self.ki_scales))

    def scan_layer(self, layer: int):
        """``(scan_pages, scan_scales)`` of one layer (views; ``PagedDecoder.run``'s
        ``ki_scan``), or ``None`` without ``scan_copy``."""
        return None if self.scan_pages is None else (self.scan_pages[layer],
                                                     self.scan_scales[layer])

    def allocate(self, request: int) -> None:
        if request in self.pages:
            raise ValueError(f"request {request} already exists")
        self.pages[request], self.lengths[request] = [], 0

    def _check_requests(self, requests) -> None:
        for r in requests:
            if r not in self.pages:
                raise KeyError(f"unknown request {r}: it was never allocated or is freed")

    def free(self, request: int) -> None:
        self._check_requests((request,))
        self.free_pages.extend(self.pages.pop(request))
        del self.lengths[request]
        for key in [key for key in self._written if key[1] == request]:
            del self._written[key]

    def reserve(self, request: int, n: int) -> int:
        """Grow ``request`` by ``n`` tokens (pages taken as needed, in every layer);
        returns the position of the first new token."""
        if request not in self.pages:
            raise KeyError(f"unknown request {request}; call allocate() first")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        start, ps = self.lengths[request], self.page_size
        need = -(-(start + n) // ps) - len(self.pages[request])
        if need > len(self.free_pages):
            raise RuntimeError(f"the page pool is exhausted: request {request} needs "
                               f"{need} more pages, {len(self.free_pages)} are free")
        self.pages[request] += [self.free_pages.pop(0) for _ in range(need)]
        self.lengths[request] = start + n
        return start

    def write(self, layer: int, request: int, start: int, k: torch.Tensor, v: torch.Tensor,
              ki: torch.Tensor) -> None:
        """Write ``t`` tokens of one layer at positions ``start ..`` (reserved before):
        k, v ``[t, Hkv, D]``, ki ``[t, Di]`` (or ``[t, 1, Di]``)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must lie in [0, {self.num_layers}), got {layer}")
        if request not in self.pages:
            raise KeyError(f"unknown request {request}; call allocate() first")
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or \
                    (x.shape[1], x.shape[2]) != (self.k_pages.shape[2], self.k_pages.shape[-1]):
                raise ValueError(f"{name} must be [t, Hkv={self.k_pages.shape[2]}, "
                                 f"D={self.k_pages.shape[-1]}], got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}")
        if not isinstance(ki, torch.Tensor) or ki.numel() != ki.shape[0] * self.ki_pages.shape[-1]:
            raise ValueError(f"ki must be [t, Di={self.ki_pages.shape[-1]}] or [t, 1, Di], got "
                             f"{tuple(ki.shape) if isinstance(ki, torch.Tensor) else ki!r}")
        ki = ki.reshape(ki.shape[0], self.ki_pages.shape[-1])
        t = k.shape[0]
        if not (t == v.shape[0] == ki.shape[0]):
            raise ValueError("k, v and ki must hold the same number of tokens")
        if start + t > self.lengths[request]:
            raise ValueError(f"request {request}: tokens {start}..{start + t} were not "
                             f"reserved (length {self.lengths[request]})")
        written = self._written.get((layer, request), 0)
        if start != written:
            raise ValueError(f"layer {layer}, request {request}: writing at {start} but "
                             f"{written} tokens are written (each layer writes every "
                             f"token once, in order)")
        pos = torch.arange(start, start + t)
        page = torch.tensor(self.pages[request], dtype=torch.long)[pos // self.page_size]
        page, off = page.to(self.k_pages.device), (pos % self.page_size).to(self.k_pages.device)
        fp8 = [(n, x) for n, x, s in (("k", k, self.k_scales), ("v", v, self.v_scales),
                                      ("ki", ki, self.ki_scales), ("ki", ki, self.scan_scales))
               if s is not None]
        for name, x in fp8:
            if not bool(torch.isfinite(x).all()):                # one synchronisation
                raise ValueError(f"{name} holds NaN or inf: an FP8 cache cannot scale it "
                                 f"(layer {layer}, request {request})")
        if self.k_scales is not None:
            (k, ks), (v, vs) = quantize_e4m3(k), quantize_e4m3(v)
            self.k_scales[layer, page, :, off] = ks
            self.v_scales[layer, page, :, off] = vs
        if self.ki_scales is not None:
            ki, kis = quantize_e4m3(ki)
            self.ki_scales[layer, page, off] = kis
        self.k_pages[layer, page, :, off] = k.to(self.k_pages.dtype)
        self.v_pages[layer, page, :, off] = v.to(self.v_pages.dtype)
        self.ki_pages[layer, page, off] = ki.to(self.ki_pages.dtype)
        if self.scan_pages is not None:     # the copy of the stored values
            quantize = quantize_e4m3 if self.scan_copy == "e4m3" else quantize_int4
            x, xs = quantize(ki.to(self.ki_pages.dtype))
            self.scan_pages[layer, page, off] = x
            self.scan_scales[layer, page, off] = xs
        self._written[(layer, request)] = start + t

    def append(self, request: int, k: torch.Tensor, v: torch.Tensor, ki: torch.Tensor,
               layer: int = 0) -> None:
        """Reserve and write ``t`` tokens (one-layer caches)."""
        if self.num_layers != 1:
            raise ValueError("append() serves one-layer caches; use reserve() once per step "
                             "and write() per layer")
        start = self.reserve(request, k.shape[0])
        try:
            self.write(layer, request, start, k, v, ki)
        except (ValueError, IndexError):
            self._unreserve(request, start)                  # nothing was appended
            raise

    def _unreserve(self, request: int, length: int) -> None:
        """Shrink ``request`` back to ``length`` tokens, returning the pages it no longer
        needs."""
        keep = -(-length // self.page_size)
        self.free_pages[:0] = self.pages[request][keep:]
        del self.pages[request][keep:]
        self.lengths[request] = length

    def page_table(self, requests) -> torch.Tensor:
        """``[B, max_pages]`` int32 physical pages (``-1`` past the end)."""
        self._check_requests(requests)
        width = max(1, max(len(self.pages[r]) for r in requests))
        table = torch.full((len(requests), width), -1, dtype=torch.int32)
        for i, r in enumerate(requests):
            table[i, :len(self.pages[r])] = torch.tensor(self.pages[r], dtype=torch.int32)
        return table.to(self.k_pages.device)

    def seq_lens(self, requests) -> torch.Tensor:
        self._check_requests(requests)
        return torch.tensor([self.lengths[r] for r in requests], dtype=torch.int32,
                            device=self.k_pages.device)

    def length(self, layer_idx: int) -> int:
        """Tokens of request 0 written by layer ``layer_idx`` (the layer's past length)."""
        return self._written.get((layer_idx, 0), 0)

    def attend(self, layer_idx: int, q, k, v, qi, ki) -> torch.Tensor:
        """``MSAttention``'s cache step: write the new tokens ``k, v [B, t, Hkv, D]``,
        ``ki [B, t, 1, Di]`` of layer ``layer_idx`` for requests ``0 .. B-1`` and attend
        the new queries ``q [B, t, Hq, D]``, ``qi [B, t, Hi, Di]``; returns
        ``[B, t, Hq, D]``. The first layer of a step reserves the tokens and plans the
        step (page table, lengths, decoder plan) once for all layers."""
        c = self.config
        if c is None:
            raise RuntimeError("attend() needs the layers' MSAConfig: make the cache with "
                               "PagedKVCache.for_model(config, ...)")
        b, t = q.shape[:2]
        reqs = list(range(b))
        if any(r not in self.pages for r in reqs):
            raise ValueError(f"hidden states hold {b} requests, the cache {len(self.pages)}")
        step = self._step
        if not step.open or layer_idx in step.layers or step.t != t:
            step = self._step = _Step(t=t, open=True)             # a new step begins
            starts = [self.reserve(r, t) for r in reqs]
            step.starts = starts
            step.table, step.lens = self.page_table(reqs), self.seq_lens(reqs)
        step.layers.add(layer_idx)
        for r in reqs:
            self.write(layer_idx, r, step.starts[r], k[r], v[r], ki[r, :, 0])
        kp, vp, kip = self.layer(layer_idx)
        ks, vs, kis = self.scales(layer_idx)
        qf, qif = q.reshape(b * t, *q.shape[2:]), qi.reshape(b * t, *qi.shape[2:])
        if q.is_cuda and t <= 16 and q.dtype in (torch.bfloat16, torch.float16):
            if step.decoder is None:
                dec = self._decoder(c, b, t, q)
                dec.plan(step.table, step.lens)                   # once per step
                step.decoder = dec
            out, _ = step.decoder.run(qf, qif, kp, vp, kip, k_scales=ks, v_scales=vs,
                                      ki_scales=kis, ki_scan=self.scan_layer(layer_idx))
            out = out.clone()
        else:
            q_lens = [t] * b
            topk = paged_indexer(qif, kip, step.table, step.lens, q_lens,
                                 block_size=c.block_size, topk=c.topk,
                                 softmax_scale=c.index_scale, ki_scales=kis,
                                 index_precision=self._scan_rule(q))
            out = paged_attention(qf, kp, vp, topk, step.table, step.lens, q_lens,
                                  softmax_scale=c.scale, k_scales=ks, v_scales=vs)
        return out.view(b, t, *q.shape[2:])

    def _scan_rule(self, q) -> str:
        """The selection rule of the unfused path: the scan copy's (``"fp8"``, ``"int4"``),
        except that chunks on the GPU score an int4 copy's keys exactly (the prefill
        kernels have no int4 scan)."""
        if self.scan_copy == "e4m3":
            return "fp8"
        return "int4" if self.scan_copy == "int4" and not q.is_cuda else "input"

    def _decoder(self, c: MSAConfig, b: int, t: int, q) -> PagedDecoder:
        dec = self._decoders.get((b, t, q.dtype))
        if dec is None:
            dec = PagedDecoder(c, max_batch=b, num_q=t, max_pages=self.k_pages.shape[1],
                               device=q.device, dtype=q.dtype)
            self._decoders[(b, t, q.dtype)] = dec
        return dec


class _Step:
    """What the layers of one cache step share: token count, positions, page table,
    lengths, the planned decoder, and which layers attended."""

    def __init__(self, t: int = 0, open: bool = False):
        self.t, self.open, self.layers = t, open, set()
        self.starts, self.table, self.lens, self.decoder = [], None, None, None
