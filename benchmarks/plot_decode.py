"""Plot decode latency vs context (log-log) from bench_decode.py's JSON.

    python benchmarks/plot_decode.py benchmarks/results/decode_h100_2026-11-26.json docs/decode_h100.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    d = json.load(open(src))
    rows = [r for r in d["results"] if "ours_ms" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, q in zip(axes, (1, 8)):
        for b, color in zip((1, 8, 64), ("C0", "C1", "C2")):
            pts = sorted((r["T"], r) for r in rows if r["B"] == b and r["Q"] == q)
            if not pts:
                continue
            t = [p[0] for p in pts]
            ax.plot(t, [p[1]["ours_ms"] * 1e3 for p in pts], "o-", color=color,
                    label=f"MSA, batch {b}")
            ax.plot(t, [p[1]["dense_ms"] * 1e3 for p in pts], "s--", color=color, alpha=.6,
                    label=f"dense SDPA, batch {b}")
            ax.plot(t, [p[1]["floor_ms"] * 1e3 for p in pts], ":", color=color, alpha=.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_title(f"decode step, Q={q} (dotted: MSA HBM floor)")
        ax.grid(alpha=.3)
    axes[0].set_ylabel("us per layer (CUDA graph)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{d['meta']['gpu']}, MSA shape, bf16")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
