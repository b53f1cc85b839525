"""Helpers shared by the Triton kernels of every op (imported by kernel modules only).

* ``INTERPRETER``: kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``);
* ``LOG2E``: softmax runs in base 2, ``exp(x) = exp2(x * LOG2E)``;
* ``next_pow2``: padded sizes for ``tl.arange``;
* ``precision(dtype)`` and ``upcast(dtype)``: the ``dot`` flags of a kernel's input dtype;
* ``dot``: ``tl.dot`` with those flags;
* ``online_softmax_step``: one key block of an online softmax;
* ``rank_key``: the block-score key of the top-k rule (docs/semantics.md, "Selection");
* ``rank_rows``: places of a row's entries by score desc, id asc (kept sets, candidates);
* ``to_e4m3``: fp32 -> e4m3 rounded to nearest even, as ``torch`` converts;
* ``dequant_rows``: e4m3 rows times their fp32 row scales (FP8 pages, ``msa.ops.quant``);
* ``load_item`` / ``query_program``: a KV-outer work item, a per-(query, KV head) program.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)          # usable inside kernels
INTERPRETED = tl.constexpr(INTERPRETER)


def next_pow2(x: int) -> int:
    """Smallest power of two ``>= x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs, tensor cores else."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """Triton 3.6's interpreter computes bf16 dots wrongly: upcast there only."""
    return INTERPRETER and dtype == torch.bfloat16


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation (``precision`` / ``upcast`` flags)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def online_softmax_step(qt, kt, vt, kmask, m_i, l_i, acc, scale_log2,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_V: tl.constexpr):
    """One key block of an online softmax in base 2.

    Rows ``qt [M, D]`` against keys ``kt [N, D]`` (``kmask [M, N]`` or ``[1, N]``: allowed)
    and values ``vt [N, D]``; running row max ``m_i`` (``-inf`` until a key is seen), sum
    ``l_i`` of ``exp2(s - m_i)`` and unnormalised output ``acc [M, D]``. Rows with nothing
    allowed so far keep ``m_i = -inf``, ``l_i = 0``, ``acc = 0``. ``HAS_V=False`` skips
    the values (LSE only).
    """
    s = dot(qt, tl.trans(kt), PRECISION, UPCAST) * scale_log2
    m_new, alpha, p, l_i = softmax_update(tl.where(kmask, s, float("-inf")), m_i, l_i)
    if HAS_V:
        acc = acc * alpha[:, None] + dot(p.to(vt.dtype), vt, PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def softmax_update(s, m_i, l_i):
    """The running max and sum of an online softmax in base 2 after scores ``s [M, N]``
    (``-inf``: not allowed) -> ``(m_new, alpha, p, l_new)``: ``alpha [M]`` rescales what
    was accumulated, ``p = exp2(s - m_new)``; rows with nothing allowed keep ``-inf``, 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def rank_key(m):
    """Block max -> ranking key of the top-k rule: NaN as the most negative fp32, -0 as +0
    (ties are then broken by the smaller block id by the caller)."""
    m = tl.where(m != m, -3.4028234663852886e38, m)
    return tl.where(m == 0.0, 0.0, m)


@triton.jit
def rank_rows(vals, ids, W: tl.constexpr):
    """Per row of ``vals, ids [R, W]`` each entry's place in the order score desc, id asc
    among the row's entries with ``ids >= 0`` (the others rank nothing). A loop, not
    unrolled: ``W`` is up to 64."""
    slots = tl.arange(0, W)
    rank = tl.zeros_like(ids)
    for i in range(W):
        pick = slots[None, :] == i
        vi = tl.max(tl.where(pick, vals, float("-inf")), 1)
        ii = tl.max(tl.where(pick, ids, -2147483647), 1)
        first = (vi[:, None] > vals) | ((vi[:, None] == vals) & (ii[:, None] < ids))
        rank += ((ii >= 0)[:, None] & first).to(tl.int32)
    return rank


@triton.jit
def to_e4m3(x):
    """fp32 ``x`` (``|x| <= 448``) -> e4m3, nearest even. Triton 3.6's interpreter rounds
    this conversion wrongly (31.7 -> 16), so there the rounding is done in fp32 first:
    steps of ``2^(e-3)`` in binade ``e``, ``2^-9`` below ``2^-6``."""
    if INTERPRETED:
        a = tl.abs(x)
        step = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0) - 3.0)
        y = a / step
        r = tl.floor(y + 0.5)
        r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
        x = tl.where(x < 0, -r, r) * step
    return x.to(tl.float8e4nv)


@triton.jit
def dequant_rows(x, SCALES, offs, mask, DTYPE: tl.constexpr):
    """e4m3 rows ``x [N, D]`` times their scales ``SCALES + offs [N]`` (rows off ``mask``:
    scale 0, never read), as ``DTYPE``."""
    s = tl.load(SCALES + offs, mask=mask, other=0.0)
    return (x.to(tl.float32) * s[:, None]).to(DTYPE)


@triton.jit
def load_item(ITEM_H, ITEM_KROW, ITEM_T0, ITEM_NK, ITEM_E0, ITEM_E1, pid):
    """Work item ``pid`` of a plan: (head, first key row, key offset, keys, edge range)."""
    return (tl.load(ITEM_H + pid), tl.load(ITEM_KROW + pid).to(tl.int64),
            tl.load(ITEM_T0 + pid), tl.load(ITEM_NK + pid), tl.load(ITEM_E0 + pid),
            tl.load(ITEM_E1 + pid))


@triton.jit
def query_program(q0, HKV: tl.constexpr, HS: tl.constexpr):
    """A per-(query, KV head) program's query (chunk-relative ``ql``, global ``qg``), KV
    head ``h`` and top-k head ``hs``."""
    pid = tl.program_id(0)
    ql = (pid // HKV).to(tl.int64)
    h = pid % HKV
    return ql, q0 + ql, h, h if HS > 1 else 0
