"""MiniMax-M3 ops with vLLM 0.33's names, signatures and layouts, on msa's kernels.

vLLM's paged layouts (docs/semantics.md, "Other implementations"; block = page = 128):

* ``kv_cache [P, Hkv, 128, 2*D]``: K then V of each token; read in place (K and V are
  strided views: token stride ``2D``, head stride ``128 * 2D``, page stride
  ``Hkv * 128 * 2D``);
* ``index_kv_cache [P, 128, Di]``: one shared index-key head;
* ``block_table [batch, max_blocks]`` int32; ``seq_lens [batch]`` (queries included),
  ``prefix_lens [batch]`` (keys before this chunk), ``cu_seqlens_q [batch + 1]``;
* selections ``[Hkv, total_q, topk]`` int32 (any strides, last dim contiguous): valid
  block ids first (msa: the local block last), then ``-1``.

Prefill: ``minimax_m3_index_score`` returns a ``DeferredScore`` (no ``[H, Tq, blocks]``
score tensor) and ``minimax_m3_index_topk`` runs msa's streamed top-k on it (index keys
gathered from their pages into one packed tensor, ``total_k x Di``, by
``msa.ops.decode.naive.gather_pages``); attention runs the
KV-outer kernel on the pages in place. Decode: ``minimax_m3_index_decode`` and
``minimax_m3_sparse_attn_decode`` are the two halves of msa's fused paged decoder, with
buffers kept per shape (no allocation after the first call: CUDA-graph safe). Prefill
reads the request lengths on the host once per call.

Decode reads an e4m3 KV cache with per-token/head ``k_scale`` / ``v_scale``
``[Hkv, tokens]`` (msa's FP8 decode kernels). What msa does not implement (an FP8 KV
cache in prefill, or in decode with scalar scales; ``init_blocks != 0``,
``local_blocks != 1``, a real score tensor passed to ``minimax_m3_index_topk``) runs
vLLM's own function when the plugin installed these ops (``ORIGINALS``), and raises
``NotImplementedError`` naming the argument otherwise.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple

import torch

BLOCK = 128                                # vLLM's MiniMax-M3 page = sparse block

ORIGINALS: Dict[str, Callable] = {}        # vLLM's functions, filled by the plugin


def _fallback(name: str, why: str, *args, **kwargs):
    _HANDOFF.clear()
    original = ORIGINALS.get(name)
    if original is None:
        raise NotImplementedError(f"msa's {name} does not support {why}")
    return original(*args, **kwargs)


def _host(x: torch.Tensor):
    return [int(v) for v in x.tolist()]


def _check_attention(q, topk_idx, block_table, num_kv_heads: int) -> None:
    """Shapes and dtypes of the attention ops' tensor arguments (no host read)."""
    if q.dim() != 3 or q.shape[1] % num_kv_heads:
        raise ValueError(f"q must be [total_q, Hq, D] with Hq a multiple of num_kv_heads="
                         f"{num_kv_heads}, got {tuple(q.shape)}")
    if topk_idx.dim() != 3 or topk_idx.shape[0] not in (1, num_kv_heads) or \
            topk_idx.shape[1] < q.shape[0] or topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int32 [{num_kv_heads} or 1, >= {q.shape[0]}, "
                         f"topk], got {tuple(topk_idx.shape)} {topk_idx.dtype}")
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 [batch, max_blocks], got "
                         f"{tuple(block_table.shape)} {block_table.dtype}")


def _check_kv_cache(kv_cache: torch.Tensor, num_kv_heads: int, d: int) -> None:
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads or \
            kv_cache.shape[2] != BLOCK or kv_cache.shape[3] != 2 * d:
        raise ValueError(f"kv_cache must be [blocks, {num_kv_heads}, {BLOCK}, {2 * d}] "
                         f"(K then V), got {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")


def _kv_views(kv_cache: torch.Tensor, num_kv_heads: int, d: int):
    """K and V of ``kv_cache [P, Hkv, 128, 2D]`` as ``[rows, Hkv, D]`` views whose row
    ``page * Hkv * 128 + t`` is token ``t`` of ``page`` (no copy)."""
    pages = kv_cache.shape[0]
    rows = (pages - 1) * num_kv_heads * BLOCK + BLOCK if pages else 0
    size, stride = (rows, num_kv_heads, d), (2 * d, BLOCK * 2 * d, 1)
    off = kv_cache.storage_offset()
    return (kv_cache.as_strided(size, stride, off), kv_cache.as_strided(size, stride, off + d))


def _segments(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor):
    """Host geometry of a prefill batch: queries are the last ``q_len`` of ``seq_len``."""
    from ...varlen import Segments
    cu = _host(cu_seqlens_q)
    k_len = _host(seq_lens)[:len(cu) - 1]
    q_len = [b - a for a, b in zip(cu[:-1], cu[1:])]
    k_base = [0]
    for n in k_len[:-1]:
        k_base.append(k_base[-1] + n)
    for r, (ql, kl) in enumerate(zip(q_len, k_len)):
        if not 0 <= ql <= kl:
            raise ValueError(f"request {r}: {ql} queries but seq_lens says {kl} tokens")
    return Segments(cu[:-1], q_len, k_base, k_len, cu[-1], sum(k_len))


class _Handoff(NamedTuple):
    """The geometry ``minimax_m3_index_topk`` read, for the ``minimax_m3_sparse_attn``
    call that consumes the selection it wrote (vLLM calls them in turn, per layer)."""

    where: tuple                      # (data_ptr, shape, strides) of the selection
    seg: object                       # msa.varlen.Segments
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor


_HANDOFF: list = []                   # at most one pending _Handoff


def _where(sel: torch.Tensor) -> tuple:
    return sel.data_ptr(), tuple(sel.shape), tuple(sel.stride())


def _geometry(topk_idx, cu_seqlens_q, seq_lens):
    """The prefill geometry: handed over by the index top-k that wrote ``topk_idx``
    (no host read; the lengths are checked equal on the device, asynchronously), else
    read from the tensors (one host synchronisation)."""
    hand = _HANDOFF.pop() if _HANDOFF else None
    n = len(hand.seg.q_len) if hand is not None else 0
    if hand is not None and hand.where == _where(topk_idx) and \
            cu_seqlens_q.shape[0] > n and seq_lens.shape[0] >= n:
        ok = (cu_seqlens_q[:n + 1] == hand.cu_seqlens_q[:n + 1]).all() & \
            (seq_lens[:n] == hand.seq_lens[:n]).all()
        msg = "msa: the selection's lengths differ from cu_seqlens_q / seq_lens"
        if ok.device.type == "cpu":
            if not bool(ok):
                raise ValueError(msg)
        else:
            torch._assert_async(ok, msg)
        return hand.seg
    return _segments(cu_seqlens_q, seq_lens)


def _valid_first(topk_idx: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """vLLM's rule: only the first ``min(topk, pos // 128 + 1)`` entries of a row count;
    the rest become ``-1`` (int32, contiguous)."""
    k = topk_idx.shape[-1]
    n = torch.clamp(q_pos.long() // BLOCK + 1, max=k)
    slot = torch.arange(k, device=topk_idx.device)
    keep = slot.view(1, 1, -1) < n.view(1, -1, 1)
    return torch.where(keep, topk_idx, -1).to(torch.int32).contiguous()


# -- prefill -----------------------------------------------------------------------


def minimax_m3_sparse_attn(q, kv_cache, topk_idx, block_table, cu_seqlens_q, seq_lens,
                           prefix_lens, max_query_len, num_kv_heads, sm_scale, output,
                           k_scale=None, v_scale=None):
    """Prefill attention: ``q [total_q, Hq, D]`` over the pages of ``kv_cache`` selected
    by ``topk_idx [Hkv, total_q, topk]`` -> written into ``output [total_q, Hq, D]``."""
    if k_scale is not None or v_scale is not None:
        return _fallback("minimax_m3_sparse_attn", "an FP8 KV cache (k_scale / v_scale)",
                         q, kv_cache, topk_idx, block_table, cu_seqlens_q, seq_lens,
                         prefix_lens, max_query_len, num_kv_heads, sm_scale, output,
                         k_scale=k_scale, v_scale=v_scale)
    from ...ops.attention.forward import sparse_attn_fwd
    from ...ops.geometry import block_rows, paged_rows
    from ...ops.plan import build_plan
    from ...ops.workspace import forward_chunk, item_queries
    _check_attention(q, topk_idx, block_table, num_kv_heads)
    total_q, hq, d = q.shape
    _check_kv_cache(kv_cache, num_kv_heads, d)
    if total_q == 0:
        return output
    seg = _geometry(topk_idx[:, :total_q], cu_seqlens_q, seq_lens)
    rows = paged_rows(block_rows(seg, BLOCK, q.device), seg, block_table,
                      num_kv_heads * BLOCK)
    idx = _valid_first(topk_idx[:, :total_q], rows.q_pos)
    plan = build_plan(idx, seg, block_size=BLOCK, heads=num_kv_heads,
                      chunk=forward_chunk(hq, d, q.element_size(), idx.shape[-1]), rows=rows,
                      q_per_item=item_queries(hq // num_kv_heads))
    k, v = _kv_views(kv_cache, num_kv_heads, d)
    sparse_attn_fwd(q, k, v, idx, plan, scale=float(sm_scale), out=output, query_major=False)
    return output


class DeferredScore(NamedTuple):
    """What ``minimax_m3_index_score`` was asked for; ``minimax_m3_index_topk`` computes
    the selection from it without ever storing the scores."""

    idx_q: torch.Tensor
    index_kv_cache: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    prefix_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_kv_heads: int


def minimax_m3_index_score(idx_q, index_kv_cache, block_table, cu_seqlens_q, seq_lens,
                           prefix_lens, max_query_len, max_seq_len, num_kv_heads):
    """No work: a ``DeferredScore`` for ``minimax_m3_index_topk`` (the caller in vLLM's
    indexer passes the score only to it)."""
    if idx_q.shape[1] != num_kv_heads:
        raise ValueError(f"idx_q has {idx_q.shape[1]} index heads, num_kv_heads is "
                         f"{num_kv_heads} (MiniMax-M3: one index head per KV head)")
    return DeferredScore(idx_q, index_kv_cache, block_table, cu_seqlens_q, seq_lens,
                         prefix_lens, max_query_len, max_seq_len, num_kv_heads)


def minimax_m3_index_topk(score, cu_seqlens_q, prefix_lens, max_query_len, topk,
                          init_blocks, local_blocks, out=None):
    """Prefill selection ``[Hkv, total_q, topk]`` int32 (into ``out[:, :total_q]`` when
    given): msa's streamed top-k over the index keys in the pages."""
    args = (score, cu_seqlens_q, prefix_lens, max_query_len, topk, init_blocks, local_blocks)
    if not isinstance(score, DeferredScore):
        return _fallback("minimax_m3_index_topk", "a score tensor (pair it with msa's "
                         "minimax_m3_index_score)", *args, out=out)
    if init_blocks != 0 or local_blocks != 1:
        s = score
        real = ORIGINALS.get("minimax_m3_index_score")
        if real is None or "minimax_m3_index_topk" not in ORIGINALS:
            raise NotImplementedError(f"msa forces exactly one local block and no initial "
                                      f"blocks; got init_blocks={init_blocks}, "
                                      f"local_blocks={local_blocks}")
        _HANDOFF.clear()
        scores = real(s.idx_q, s.index_kv_cache, s.block_table, s.cu_seqlens_q, s.seq_lens,
                      s.prefix_lens, s.max_query_len, s.max_seq_len, s.num_kv_heads)
        return ORIGINALS["minimax_m3_index_topk"](scores, *args[1:], out=out)
    from ...ops.checks import check_block_and_topk
    from ...ops.decode.naive import gather_pages
    from ...ops.indexer.triton import indexer_topk
    check_block_and_topk(BLOCK, topk)
    _HANDOFF.clear()
    seg = _segments(cu_seqlens_q, score.seq_lens)
    ki = gather_pages(score.index_kv_cache.unsqueeze(1), score.block_table, seg.k_len)
    qi = score.idx_q[:seg.total_q]
    sel = indexer_topk(qi, ki, seg, block_size=BLOCK, topk=topk,
                       scale=qi.shape[-1] ** -0.5)
    if out is not None:
        out[:, :seg.total_q].copy_(sel)
        sel = out[:, :seg.total_q]
    _HANDOFF.append(_Handoff(_where(sel), seg, cu_seqlens_q, score.seq_lens))
    return sel


# -- decode ------------------------------------------------------------------------


_BUFFERS: Dict[tuple, tuple] = {}


def _scratch(key: tuple, make):
    """Scratch tensors of one decode shape, made once (stable addresses for CUDA graphs)."""
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = make()
    return buf


def _candidates(rows: int, hi: int, pages: int, device) -> torch.Tensor:
    from ...ops.decode.select import candidates_width
    return _scratch(("candidates", rows, hi, pages, str(device)), lambda: torch.empty(
        rows, hi, candidates_width(pages), dtype=torch.int64, device=device))


def _attend_buffers(rows: int, hq: int, hkv: int, d: int, topk: int, device):
    """``lse [rows, Hq]`` and the split partials of ``paged_attend`` (``po, pl, done``)."""
    from ...ops.decode.triton import partial_buffers
    return _scratch(("attend", rows, hq, hkv, d, topk, str(device)), lambda: (
        torch.empty(rows, hq, dtype=torch.float32, device=device),
        *partial_buffers(rows, 1, hq, hkv, d, topk, device)))


def minimax_m3_index_decode(idx_q, index_kv_cache, block_table, seq_lens, max_seq_len, topk,
                            init_blocks, local_blocks, num_kv_heads, decode_query_len,
                            max_decode_query_len, out=None, score_out=None):
    """Decode selection ``[Hkv, total_q, topk]`` int32 (into ``out[:, :total_q]`` when
    given) for ``decode_query_len`` new tokens per request, scanning the index keys of
    every page of ``block_table`` up to each request's length."""
    if init_blocks != 0 or local_blocks != 1 or score_out is not None:
        why = "score_out" if score_out is not None else \
            f"init_blocks={init_blocks}, local_blocks={local_blocks}"
        return _fallback("minimax_m3_index_decode", why, idx_q, index_kv_cache, block_table,
                         seq_lens, max_seq_len, topk, init_blocks, local_blocks,
                         num_kv_heads, decode_query_len, max_decode_query_len, out=out,
                         score_out=score_out)
    from ...ops.decode.select import paged_select
    if idx_q.dim() != 3 or idx_q.shape[1] != num_kv_heads:
        raise ValueError(f"idx_q must be [total_q, num_kv_heads={num_kv_heads}, Di], got "
                         f"{tuple(idx_q.shape)}")
    total_q, hi, di = idx_q.shape
    nq = int(decode_query_len)
    if nq < 1 or total_q % nq:
        raise ValueError(f"decode_query_len={decode_query_len} must divide the {total_q} "
                         f"decode queries")
    pages = block_table.shape[1]
    sel = out[:, :total_q] if out is not None else \
        torch.empty(hi, total_q, topk, dtype=torch.int32, device=idx_q.device)
    if total_q == 0:
        return sel
    paged_select(idx_q, index_kv_cache, block_table, seq_lens, batch=total_q // nq,
                 num_q=nq, max_pages=pages,
                 candidates=_candidates(total_q, hi, pages, idx_q.device), topk_indices=sel,
                 block_size=BLOCK, index_scale=di ** -0.5, mask_tail=False)
    return sel


def minimax_m3_sparse_attn_decode(q, kv_cache, topk_idx, block_table, seq_lens, num_kv_heads,
                                  sm_scale, output, decode_query_len, k_scale=None,
                                  v_scale=None):
    """Decode attention of ``q [total_q, Hq, D]`` (``decode_query_len`` tokens per
    request) over ``topk_idx [Hkv, total_q, topk]`` -> written into ``output``."""
    scales = _decode_scales(kv_cache, k_scale, v_scale, num_kv_heads)
    if scales is None:
        return _fallback("minimax_m3_sparse_attn_decode", "an FP8 KV cache without "
                         "per-token/head k_scale / v_scale [Hkv, tokens] (fp32, token stride "
                         "1)", q, kv_cache, topk_idx, block_table, seq_lens, num_kv_heads,
                         sm_scale, output, decode_query_len, k_scale=k_scale, v_scale=v_scale)
    from ...ops.decode.triton import paged_attend
    _check_attention(q, topk_idx, block_table, num_kv_heads)
    total_q, hq, d = q.shape
    _check_kv_cache(kv_cache, num_kv_heads, d)
    if total_q == 0:
        return output
    nq = int(decode_query_len)
    topk = topk_idx.shape[-1]
    lse, *partials = _attend_buffers(total_q, hq, num_kv_heads, d, topk, q.device)
    page_stride = num_kv_heads * BLOCK * 2 * d
    paged_attend(q, kv_cache, kv_cache[..., d:], topk_idx[:, :total_q], block_table,
                 seq_lens, batch=total_q // nq, num_q=nq, num_kv_heads=num_kv_heads,
                 out=output, lse=lse, partials=partials, block_size=BLOCK,
                 scale=float(sm_scale), kv_strides=(page_stride, BLOCK * 2 * d, 2 * d),
                 **scales)
    return output


def _decode_scales(kv_cache, k_scale, v_scale, num_kv_heads: int):
    """``paged_attend``'s FP8 arguments from vLLM's: ``{}`` for a 16-bit cache without
    scales; for an e4m3 cache, per-token/head scales ``[Hkv, >= pages * 128]`` fp32 (token
    ``page * 128 + t``; token stride 1, one head stride for both) as ``k_scales``,
    ``v_scales`` with their (page, head) strides. ``None`` for what msa does not read (a
    scalar scale, an e4m3 cache without scales, other layouts)."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if k_scale is None and v_scale is None:
        return None if fp8 else {}
    if not fp8 or k_scale is None or v_scale is None:
        return None
    ok = (k_scale.dim() == 2 and k_scale.shape == v_scale.shape
          and k_scale.shape[0] == num_kv_heads and k_scale.shape[1] >= kv_cache.shape[0] * BLOCK
          and k_scale.dtype == v_scale.dtype == torch.float32
          and k_scale.device == v_scale.device == kv_cache.device
          and k_scale.stride(1) == v_scale.stride(1) == 1
          and k_scale.stride(0) == v_scale.stride(0))
    return dict(k_scales=k_scale, v_scales=v_scale, scale_strides=(BLOCK, k_scale.stride(0))) \
        if ok else None


OPS = {f.__name__: f for f in (minimax_m3_sparse_attn, minimax_m3_sparse_attn_decode,
                               minimax_m3_index_score, minimax_m3_index_topk,
                               minimax_m3_index_decode)}

