"""Plot ``bench_prefill.py`` results: time vs sequence length, log-log.

    python benchmarks/plot_prefill.py benchmarks/results/prefill_h200_2026-11-26.json docs/prefill_h200.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    d = json.load(open(src))
    res = d["results"]
    T = [r["T"] for r in res]
    series = {
        "MSA end to end (indexer + attention)": [r["e2e"]["ms"] for r in res],
        "MSA indexer top-k": [r["indexer_topk"]["ms"] for r in res],
        "MSA attention, random selection": [r["random"]["ms"] for r in res],
        "fla parallel_nsa, same selection": [r["random"].get("fla_ms") for r in res],
        "dense causal SDPA, cuDNN": [r.get("cudnn", {}).get("ms") for r in res],
        "dense causal SDPA, FlashAttention-2": [r.get("fa2", {}).get("ms") for r in res],
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, ys), style in zip(series.items(), ["o-", "s--", "^-", "v:", "d-", "x-"]):
        pts = [(t, y) for t, y in zip(T, ys) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("forward time (ms)")
    m = d["meta"]
    ax.set_title(f"MSA prefill, {m['gpu']}, Hq=64 Hkv=4 D=128 top-16 bf16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
