"""Plot train_retrieval.py's loss curves (dense twin vs MSA) and the indexer KL.

    python benchmarks/plot_training.py train.json docs/train_retrieval.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    d = json.load(open(src))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, style in (("dense", "--"), ("msa", "-")):
        log = d["runs"][name]["log"]
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], style, label=name)
        if name == "msa":
            ax2.plot([r["step"] for r in log], [sum(r["kl"]) for r in log], label="KL (sum)")
    w = d["meta"]["warmup"]
    for a in (ax, ax2):
        a.axvline(w, color="gray", lw=0.8)
        a.set_xlabel("step")
        a.grid(alpha=.3)
    ax.set_ylabel("copy loss")
    ax.set_yscale("log")
    ax.set_title(f"dense warm-up at {d['meta']['warmup_length']} tokens | "
                 f"then up to {d['meta']['length']}", fontsize=10)
    ax2.set_yscale("log")
    ax2.set_title("MSA indexer KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
