"""``python -m msa bench prefill|training|decode|cp|m3|vllm``: GPU benchmarks with same-run
baselines, one JSON (+ optional PNG) per run recording the GPU, versions, commit, date
and command. Each case checks its outputs before it reports a time. ``python -m msa
selections`` (``msa.bench.selections``, CPU) describes the selections the benchmarks'
inputs give, beside a real model's."""
from __future__ import annotations

import argparse

from ..lengths import parse_lengths

CASES = ("prefill", "training", "decode", "cp", "m3", "vllm")
SELECTIONS = ("random", "structured")     # index inputs, msa.bench.selection
BASELINES = ("dense", "fla", "vllm")
# name -> (Hq, Hkv): the MiniMax-M3 shape and smaller GQA groups (D 128, index Hkv x 128,
# block 128, top-16)
SHAPES = {"m3": (64, 4), "g8": (64, 8), "g6": (24, 4), "g4": (32, 8)}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmarks with same-run baselines (JSON + PNG)")
    p.add_argument("case", choices=CASES,
                   help="prefill: indexer + attention forward; training: forward + "
                        "backward step; decode: paged decode with CUDA graphs; cp: context "
                        "parallel (torchrun); m3: MiniMax-M3 layers in transformers; vllm: msa's "
                        "vLLM drop-ins against vLLM's ops (--vllm-ops)")
    p.add_argument("--lengths", default=None, metavar="LIST", type=parse_lengths,
                   help="comma-separated context lengths, e.g. 64k,128k,1m (default per "
                        "case)")
    p.add_argument("--shape", default="m3", metavar="NAME", type=_shapes,
                   help="attention shape: m3 (Hq 64 / Hkv 4, D 128), g8 (64/8), g6 (24/4), "
                        "g4 (32/8); comma-separated for several (default m3)")
    p.add_argument("--baselines", default="all", metavar="LIST", type=_baselines,
                   help="comma-separated baselines to time beside msa: dense, fla, vllm "
                        "(those not installed are skipped and recorded as such), all, or "
                        "none (default all)")
    p.add_argument("--dense-max", type=_positive, default=262144, metavar="T",
                   help="longest context the dense baseline runs on all heads; beyond it "
                        "one KV group is timed and scaled (default 262144)")
    p.add_argument("--fla-max", type=_positive, default=262144, metavar="T",
                   help="longest context fla is timed at (default 262144)")
    p.add_argument("--vllm-max", type=_positive, default=1 << 20, metavar="T",
                   help="longest context vLLM's ops are timed at (default 1048576)")
    p.add_argument("--vllm-ops", default=None, metavar="DIR",
                   help="folder holding vLLM's MiniMax-M3 op files (sparse_attn.py, "
                        "index_topk.py) and their stand-in imports, for the vllm baseline")
    p.add_argument("--index-precision", default="input", metavar="LIST", type=_precisions,
                   help="prefill: index scoring precisions timed in the same run, "
                        "comma-separated: input, fp8 (e4m3 scan + exact re-scoring of the "
                        "candidates); input is always timed (default input)")
    p.add_argument("--selection", default="random", choices=SELECTIONS,
                   help="prefill, training: index inputs: random (uniform selections, the "
                        "default) or structured (local, shared by neighbouring queries, "
                        "with a sink; msa.bench.selection)")
    p.add_argument("--parts", default="step,prefill,eager,decode", metavar="LIST",
                   help="m3: the parts to run after the check, comma-separated: step (a "
                        "sparse layer at 128K), prefill, eager (its memory limit), decode "
                        "(per-token times by cache, graphed decode, PagedDecoder) "
                        "(default all)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the results to this JSON file (default: "
                        "bench_<case>_<gpu>_<date>.json in the current folder)")
    p.add_argument("--png", default=None, metavar="PATH", help="plot (needs matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help="short lengths and few repetitions (a smoke run)")


def _among(what: str, allowed):
    """An argparse type: a comma-separated list of ``allowed`` names, kept as text."""
    def check(text: str) -> str:
        bad = [x for x in text.split(",") if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0]!r} ({', '.join(allowed)})")
        return text
    return check


_precisions = _among("precision", ("input", "fp8"))
_shapes = _among("shape", tuple(SHAPES))
_baselines = _among("baseline", BASELINES + ("all", "none"))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.selection != "random" and args.case not in ("prefill", "training"):
        parser.error(f"--selection applies to prefill and training, not {args.case}")
    import torch
    if not torch.cuda.is_available():
        parser.error("the benchmarks need a CUDA GPU")
    from importlib import import_module
    mod = import_module(f".{args.case}", __name__)
    return mod.run(args)
