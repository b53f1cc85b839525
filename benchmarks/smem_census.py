"""Shared memory each Triton kernel needs per launch configuration, on three GPU
generations, compiled on the CPU (no GPU needed; Triton's bundled ptxas).

    python benchmarks/smem_census.py

Compares against the per-block limits: sm_80 (A100) 163 KB, sm_86/89 (A10, A40, L4,
L40, RTX 30xx/40xx) 99 KB, sm_90 (H100/H200) 227 KB. ``msa.ops.launch`` falls back to the
next configuration at run time when one does not fit; this table says which will run.
Shapes: MSA (16 query heads per KV head, block 128, top-16), bf16.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"          # compile for real targets, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from msa.inference.decode import paged_decode_attn_kernel  # noqa: E402
from msa.ops.attention.backward import sparse_attn_bwd_kernel  # noqa: E402
from msa.ops.attention.forward import sparse_attn_fwd_kernel  # noqa: E402
from msa.ops.attention.query_major import sparse_attn_qmajor_kernel  # noqa: E402
from msa.ops.indexer.triton import indexer_topk_kernel  # noqa: E402
from msa.ops.kl.dense import causal_lse_kernel  # noqa: E402
from msa.ops.kl.triton import indexer_kl_bwd_kernel  # noqa: E402

LIMITS = {80: 166912, 86: 101376, 90: 232448}
INT_ARGS = {"POS", "EDGE_Q", "EDGE_SLOT", "ITEM_H", "ITEM_T0", "ITEM_NK", "ITEM_E0",
            "ITEM_E1", "TILE_Q0", "TILE_N", "TILE_KBASE", "TILE_OFF", "OUT_ID", "TOPK",
            "PAGE_TABLE", "SEQ_LENS", "KBASE", "NBLK"}
FP32_ARGS = {"PL", "LSE", "DELTA", "DK", "DV", "TLSE", "ILSE", "DQI", "DKI", "LOSS"}
FP32_SCALARS = {"scale_log2", "scale", "iscale", "iscale_log2", "coeff"}
HALF = dict(PRECISION="tf32", UPCAST=False)


def shared_bytes(fn, const: dict, target: int, fp32=(), **options):
    """Bytes of shared memory of ``fn`` compiled for ``sm_<target>``: tensor arguments
    bf16 unless named as int32/fp32 above, strides and pointers 16-byte aligned (as
    Triton specialises them at run time); ``fp32``: more fp32 tensor arguments."""
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in const:
            sig[n] = "constexpr"
        elif n == "ITEM_KROW":
            sig[n] = "*i64"
        elif n[0].isupper():
            f32 = n in FP32_ARGS or n in fp32
            sig[n] = "*i32" if n in INT_ARGS else "*fp32" if f32 else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in FP32_SCALARS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", target, 32), options=options
                          ).metadata.shared


def cases():
    for d in (64, 128, 256):
        yield (f"forward D{d}, 64 rows", sparse_attn_fwd_kernel,
               dict(HKV=4, G=16, G_PAD=16, D=d, BS=128, KSEL=16, BLOCK_Q=4, HAS_V=True,
                    KSPLIT=0, **HALF), dict(num_warps=4, num_stages=1))
    for ks, bq in ((64, 4), (64, 2), (64, 1), (32, 4), (32, 2), (32, 1)):
        yield (f"forward D256, {bq * 16} rows, {ks}-key sub-blocks", sparse_attn_fwd_kernel,
               dict(HKV=4, G=16, G_PAD=16, D=256, BS=128, KSEL=16, BLOCK_Q=bq, HAS_V=True,
                    KSPLIT=ks, **HALF), dict(num_warps=4, num_stages=1))
    for d, bq, bn, st in ((128, 4, 128, 3), (128, 4, 128, 1), (128, 2, 128, 1),
                          (128, 1, 128, 1), (64, 4, 128, 3), (256, 2, 64, 1),
                          (256, 1, 64, 1)):
        yield (f"backward D{d}, {bq * 16} rows, {bn} keys, {st} st", sparse_attn_bwd_kernel,
               dict(HKV=4, G=16, G_PAD=16, D=d, BS=128, BLOCK_N=bn, KSEL=16, BLOCK_Q=bq,
                    NSUB=128 // bn, DET=False, **HALF), dict(num_warps=8, num_stages=st))
    # keys on chip / index keys on chip, as the KL's fallback tiers
    tiers = {(True, True): "", (False, True): ", keys per tile",
             (False, False): ", keys and index keys per tile"}
    for d, bts, k1, ki1 in ((128, (16, 8, 4, 2), True, True), (128, (16, 8, 4, 2), False, True),
                            (128, (16, 8, 4), False, False), (256, (4, 2), True, True),
                            (256, (4, 2, 1), False, True), (256, (4, 2), False, False)):
        for bt in bts:
            yield (f"indexer KL D{d}, {bt * 16} rows" + tiers[k1, ki1], indexer_kl_bwd_kernel,
                   dict(G=16, G_PAD=16, NKV=1, D=d, DI=128, BS=128, BLOCK_T=bt,
                        R=max(1, 16 // bt), HI=4, KSEL=16, DENSE=False, DET=False,
                        K_ONCE=k1, KI_ONCE=ki1, **HALF), dict(num_warps=8, num_stages=1))
    for st in (2, 1):
        yield (f"indexer top-k, {st} st", indexer_topk_kernel,
               dict(HI=4, DI=128, BS=128, BLOCK_T=32, KR=16, NRANK=15, **HALF),
               dict(num_warps=4, num_stages=st))
    for d, st in ((128, 2), (256, 2), (256, 1)):
        yield (f"dense warm-up LSE D{d}, {st} st", causal_lse_kernel,
               dict(G=16, G_PAD=16, D=d, BS=128, BLOCK_T=8, **HALF),
               dict(num_warps=4, num_stages=st))
    for d in (128, 256):
        yield (f"query-major D{d}", sparse_attn_qmajor_kernel,
               dict(HKV=4, HS=4, G=16, G_PAD=16, D=d, BS=128, KSEL=16, **HALF),
               dict(num_warps=4, num_stages=2))
        yield (f"paged decode D{d}", paged_decode_attn_kernel,
               dict(NQ=1, HKV=4, HS=4, G=16, G_PAD=16, D=d, BS=128, KSEL=16, PER_SPLIT=4,
                    NSPLIT=4, **HALF), dict(num_warps=4, fp32=("PO",)))


def main(only: str = ""):
    print("| kernel, configuration | sm_80 (163 KB) | sm_86/89 (99 KB) | sm_90 (227 KB) |")
    print("|---|---|---|---|")
    for name, fn, const, options in cases():
        if only not in name:
            continue
        cells = []
        for t, limit in LIMITS.items():
            b = shared_bytes(fn, const, t, **options)
            cells.append(f"{b / 1024:.0f} KB" + ("" if b <= limit else " (no)"))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    import sys
    main(sys.argv[1] if len(sys.argv) > 1 else "")
