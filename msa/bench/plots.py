"""Plots of ``msa bench`` results (matplotlib): time against context length, msa next to
its same-run baselines. ``python -m msa.bench.plots RESULTS.json OUT.png`` redraws one."""
from __future__ import annotations

import json
import sys


def _series(results: dict):
    """``[(title, {label: [(T, ms)]})]`` of a results dict."""
    case = results["meta"]["case"]
    panels = []
    if case in ("prefill", "training"):
        keys = {"prefill": [("msa e2e", "e2e_ms"), ("msa attention", "attention_ms"),
                            ("fla attention", "fla_attention_ms"), ("vLLM e2e", "vllm_e2e_ms")],
                "training": [("msa attention fwd+bwd", "attention_fwd_bwd_ms"),
                             ("msa step", "step_ms"), ("fla fwd+bwd", "fla_fwd_bwd_ms")]}[case]
        dense = "dense" if case == "prefill" else "dense_fwd_bwd"
        for shape, block in results["shapes"].items():
            lines = {}
            for label, key in keys + [("best dense", dense)]:
                pts = []
                for r in block["rows"]:
                    x = r.get(key)
                    x = x.get("best") if isinstance(x, dict) else x
                    if isinstance(x, (int, float)):
                        pts.append((r["T"], x))
                if pts:
                    lines[label] = pts
            panels.append((f"{case}, shape {shape}", lines))
    elif case == "m3":
        pts = [(r["T"], r["prefill_ms"]) for r in results.get("prefill", [])
               if isinstance(r.get("prefill_ms"), float)]
        panels.append(("MiniMax-M3 prefill in transformers (msa)", {"msa": pts}))
    return panels


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if results["meta"]["case"] == "decode":
        cases = results["cases"]
        labels = [f"{c['context'] // 1024}K x{c['batch']} x{c['num_q']}" for c in cases]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bars = [("msa", [c["msa_us"] for c in cases]),
                ("vLLM", [c.get("vllm_us", 0) for c in cases]),
                ("HBM floor", [c["floor_us"] for c in cases])]
        for i, (name, ys) in enumerate(bars):
            ax.bar([j + 0.27 * i for j in range(len(cases))], ys, width=0.27, label=name)
        ax.set_xticks([j + 0.27 for j in range(len(cases))], labels)
        ax.set_ylabel("us per layer step")
        ax.legend()
        ax.set_title(f"decode, {results['meta']['gpu']}")
    else:
        panels = _series(results)
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4),
                                 squeeze=False)
        for ax, (title, lines) in zip(axes[0], panels):
            for label, pts in lines.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms")
            ax.set_title(f"{title}, {results['meta']['gpu']}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m msa.bench.plots RESULTS.json OUT.png")
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])
