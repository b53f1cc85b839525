"""Which MMA instructions each Triton kernel compiles to (GPU).

    python benchmarks/ptx_census.py

Runs the forward, indexer top-k, selected LSE, attention backward and indexer-KL
backward once at the MSA shape (T=16K, bf16) with a fresh Triton cache, then counts in
each kernel's PTX the Hopper warpgroup MMAs (``wgmma.mma_async``) and the per-warp MMAs
(``mma.sync``, the only kind below Hopper). Triton emits wgmma only for dot operands of
64-row multiples; docs/benchmarks.md uses this census to explain the backward's layout.
"""
from __future__ import annotations

import os
import pathlib
import tempfile

cache = tempfile.mkdtemp(prefix="msa_ptx_")
os.environ["TRITON_CACHE_DIR"] = cache          # before triton compiles anything

import torch  # noqa: E402

import msa  # noqa: E402
from msa.ops.attention.backward import sparse_attn_bwd  # noqa: E402
from msa.ops.attention.forward import sparse_attn_fwd  # noqa: E402
from msa.ops.indexer.triton import selected_lse  # noqa: E402
from msa.ops.kl.triton import indexer_kl_bwd  # noqa: E402
from msa.varlen import Segments  # noqa: E402

from bench_prefill import BS, D, HKV, HQ, planted_topics, selection  # noqa: E402


def main(T=16384, dev="cuda"):
    kw = dict(block_size=BS, scale=D ** -0.5)
    q = torch.randn(T, HQ, D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(T, HKV, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    seg = Segments([0], [T], [0], [T], T, T)
    topk = selection(T, "random", dev)
    out, lse = sparse_attn_fwd(q, k, v, topk, seg, **kw)
    sparse_attn_bwd(q, k, v, topk, seg, out, lse, torch.randn_like(out), **kw)
    qi, ki = planted_topics(T, dev)
    cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
    msa.msa_indexer(qi, ki, cu, cu, block_size=BS, topk=topk.shape[-1])
    ilse = selected_lse(qi, ki, topk, seg, **kw)
    indexer_kl_bwd(q, k, lse, qi, ki, ilse, topk, seg, **kw, index_scale=D ** -0.5)
    torch.cuda.synchronize()
    for ptx in sorted(pathlib.Path(cache).glob("*/*.ptx")):
        text = ptx.read_text()
        print(f"{ptx.stem:32s} wgmma={text.count('wgmma.mma_async'):4d} "
              f"mma.sync={text.count('mma.sync'):4d}")


if __name__ == "__main__":
    main()
