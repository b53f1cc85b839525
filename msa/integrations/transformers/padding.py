"""Padded batches as packed varlen sequences.

transformers hands every attention layer the mask its mask interface made. For
``attn_implementation="msa"`` that interface (``msa_mask``) returns ``None`` when no row
is padded (one host synchronisation per forward, as transformers' own SDPA mask does)
and otherwise a ``Padding``: the 2D padding mask ``[B, L]`` (``L`` = cached + new
tokens, True = a real token). Every layer of the forward gets the same object, so the
packing geometry is read from the device once per forward.

Packing keeps each row's real tokens in order: the row's keys are its real cached and
new tokens, its queries its real new tokens. The real tokens of a row must be one
contiguous run ending with its new tokens (left padding, and right padding of a prompt;
not generation past right padding, which would leave a hole). RoPE is relative, so a
padded row then computes what it computes alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ...varlen import Segments, cu_seqlens_from_lengths


@dataclass
class Packing:
    """Where the real tokens of a padded batch go: ``q_index [total_q]`` into the
    flattened ``[B * Tq]`` query rows, ``k_index [total_k]`` into ``[B * Tk]`` key rows,
    and the varlen metadata ``cu_seqlens_q``, ``cu_seqlens_k`` (int32, device)."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_q: int
    max_k: int
    segments: Segments                 # the same geometry on the host


class Padding:
    """The padding mask ``[B, L]`` (bool) of one forward, shared by its layers."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.to(torch.bool)
        self._host = None
        self._packings: Dict[Tuple[int, int], Packing] = {}

    def packing(self, tq: int, tk: int) -> Packing:
        """The packing of ``tq`` new tokens per row against ``tk`` key slots (``tk >= L``:
        slots past ``L`` are unused, as in a static cache)."""
        key = (tq, tk)
        if key not in self._packings:
            self._packings[key] = self._build(tq, tk)
        return self._packings[key]

    def _build(self, tq: int, tk: int) -> Packing:
        if self._host is None:
            self._host = self.mask.cpu()                   # the one synchronisation
        m = self._host
        b, length = m.shape
        if tk < length or tq > length:
            raise ValueError(f"msa: the padding mask covers {length} tokens, the layer sees "
                             f"{tq} queries and {tk} keys")
        q_idx, k_idx, q_lens, k_lens = [], [], [], []
        for r in range(b):
            keys = torch.nonzero(m[r]).flatten()
            queries = torch.nonzero(m[r, length - tq:]).flatten()
            n = queries.numel()
            contiguous = not keys.numel() or int(keys[-1] - keys[0]) + 1 == keys.numel()
            if not contiguous or (n and not torch.equal(keys[keys.numel() - n:],
                                                        queries + (length - tq))):
                raise ValueError(
                    f"msa: row {r} of the padded batch has padding between real tokens; "
                    f"MSA needs each row's real tokens in one run ending with its new "
                    f"tokens: pad on the left (or the right of a prompt), not in between")
            q_idx.append(queries + r * tq)
            k_idx.append(keys + r * tk)
            q_lens.append(n)
            k_lens.append(keys.numel())
        dev = self.mask.device
        q_start = [sum(q_lens[:r]) for r in range(b)]
        k_start = [sum(k_lens[:r]) for r in range(b)]
        seg = Segments(q_start, q_lens, k_start, k_lens, sum(q_lens), sum(k_lens))
        return Packing(torch.cat(q_idx).to(dev), torch.cat(k_idx).to(dev),
                       cu_seqlens_from_lengths(q_lens, dev), cu_seqlens_from_lengths(k_lens, dev),
                       max(q_lens, default=0), max(k_lens, default=0), seg)


def pack(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, T, ...]`` -> the rows ``index`` of ``[B*T, ...]``."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)


def unpack(x: torch.Tensor, index: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """Packed rows ``x [n, ...]`` back to ``[B, T, ...]`` (zeros at padding)."""
    out = x.new_zeros((b * t, *x.shape[1:]))
    return out.index_copy(0, index, x).view(b, t, *x.shape[1:])


def msa_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
             mask_function=None, attention_mask=None, **kwargs):
    """Mask interface of ``attn_implementation="msa"``: ``None`` without padding, else a
    ``Padding`` (see module docstring)."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or \
            attention_mask.dim() != 2:
        return attention_mask
    mask = attention_mask.to(torch.bool)
    if kv_offset:
        mask = mask[:, kv_offset:]
    if bool(mask.all()):                                   # one synchronisation
        return None
    return Padding(mask)
