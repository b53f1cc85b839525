"""Fused decode of a MiniMax-M3 sparse layer on transformers' own cache tensors.

The cache holds ``keys, values [B, Hkv, Tk, D]`` and ``idx_keys [B, 1, Tk, Di]``
(contiguous). Cut into blocks of ``BS`` tokens they are pages: K/V page ``b*Hkv*NB + j``
(page stride ``BS*D``, head stride ``Tk*D``) and index-key page ``b*NB + j`` (stride
``BS*Di``), ``NB = ceil(Tk / BS)``; that addressing holds for batch 1 with any ``Tk``
and for larger batches when ``Tk`` is a multiple of ``BS`` (a static cache sized so).
``msa.ops.decode.triton.paged_decode`` then reads the blocks in place: no copy of the
cache, no host synchronisation, the same kernels and selection rule as
``msa.inference.PagedDecoder``. An FP8 cache (``fp8_cache.py``) adds row scales ``[B,
Hkv, Tk]`` (page stride ``BS``, head stride ``Tk``) and, for e4m3 index keys, ``[B, 1,
Tk]`` (page ``b*NB + j`` at ``(b*NB + j) * BS``).
"""
from __future__ import annotations

from typing import Dict

import torch

from ...config import MSAConfig
from ...inference.decoder import PagedDecoder
from ...ops.checks import HAS_TRITON, TRITON_INTERPRET


def use_fused_decode(q, key, config: MSAConfig, training: bool, mode: str,
                     backend: str) -> bool:
    """``q [B, Tq, Hq, D]``, ``key [B, Hkv, Tk, D]``: CUDA tensors (CPU ones in Triton's
    interpreter with ``backend="triton"``), inference, up to 16 new tokens."""
    b, tq = q.shape[:2]
    tk = key.shape[2]
    device_ok = q.is_cuda or (TRITON_INTERPRET and backend == "triton")
    return (HAS_TRITON and device_ok and backend != "reference" and not training
            and mode == "sparse" and 1 <= tq <= 16 and q.dtype != torch.float64
            and key.is_contiguous() and (b == 1 or tk % config.block_size == 0))


_BUFFERS: Dict[tuple, PagedDecoder] = {}     # preallocated outputs per shape
_TABLES: Dict[tuple, tuple] = {}


def _tables(b: int, hkv: int, nb: int, device):
    """K/V and index-key page tables ``[B, NB]`` int32 of the cache rows (cached)."""
    key = (b, hkv, nb, str(device))
    if key not in _TABLES:
        j = torch.arange(nb, dtype=torch.int32, device=device)
        rows = torch.arange(b, dtype=torch.int32, device=device).view(-1, 1)
        _TABLES.clear()
        _TABLES[key] = ((rows * hkv * nb + j).contiguous(), (rows * nb + j).contiguous())
    return _TABLES[key]


@torch.compiler.disable                   # under torch.compile: launched as is, not traced
def fused_decode(module, q, qi, key, value, ki, config: MSAConfig,
                 position_ids, scales=None) -> torch.Tensor:
    """``q [B, Tq, Hq, D]``, ``qi [B, Tq, Hi, Di]``, ``key, value [B, Hkv, Tk, D]``
    (contiguous), ``ki [B, Tk, 1, Di]`` (a view of ``idx_keys [B, 1, Tk, Di]``) ->
    ``[B, Tq, Hq, D]``. The real length is ``position_ids[..., -1] + 1`` (read on the
    device), or ``Tk``. ``scales``: an FP8 cache's ``(k_scales, v_scales [B, Hkv, Tk],
    ki_scales [B, 1, Tk] or None)`` for e4m3 ``key, value`` (and ``ki``)."""
    from ...ops.checks import check_fp8_device
    from ...ops.decode.triton import paged_decode
    c = config
    b, tq = q.shape[:2]
    hkv, tk, d = key.shape[1], key.shape[2], key.shape[3]
    di = ki.shape[-1]
    if ki.stride(1) != di or ki.stride(0) != tk * di or ki.stride(-1) != 1:
        raise ValueError("msa: the index-key cache must be a contiguous [B, 1, Tk, Di] tensor")
    bs = c.block_size
    nb = -(-tk // bs)
    rows = b * tq
    kbuf = (b, tq, c, q.dtype, str(q.device))
    buf = _BUFFERS.get(kbuf)              # a decoder's buffers (its plan is not used)
    if buf is None or buf.max_pages < nb:
        buf = PagedDecoder(c, max_batch=b, num_q=tq,
                           max_pages=max(nb, 2 * (buf.max_pages if buf else nb)),
                           device=q.device, dtype=q.dtype)
        _BUFFERS[kbuf] = buf
    kv_table, ki_table = _tables(b, hkv, nb, q.device)
    if position_ids is None:
        seq_lens = torch.full((b,), tk, dtype=torch.int32, device=q.device)
    else:
        last = position_ids.reshape(-1, position_ids.shape[-1])[:, -1]
        seq_lens = (last + 1).to(torch.int32).expand(b).contiguous()
    out, topk = buf.out[:rows], buf.topk_indices[:, :rows]
    ks, vs, kis = scales or (None, None, None)
    if scales is not None:
        check_fp8_device("cache (fp8_static_cache)", key)
    paged_decode(q.reshape(rows, *q.shape[2:]), qi.reshape(rows, *qi.shape[2:]), key, value,
                 ki, kv_table, seq_lens, batch=b, num_q=tq, max_pages=nb, num_kv_heads=hkv,
                 candidates=buf.candidates[:rows], topk_indices=topk, out=out,
                 lse=buf.lse[:rows], partials=buf.partials, block_size=bs,
                 scale=c.scale, index_scale=c.index_scale, kv_strides=(bs * d, tk * d, d),
                 ki_strides=(bs * di, di), ki_page_table=ki_table, mask_tail=True,
                 k_scales=ks, v_scales=vs, ki_scales=kis, scale_strides=(bs, tk))
    module.msa_last_kl = None
    return out.view(b, tq, *out.shape[1:]).clone()
