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
    if results["meta"]["case"] == "decode":        # one panel per case: bars differ 10x
        cases = results["cases"]
        fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6),
                                 squeeze=False)
        for ax, c in zip(axes[0], cases):
            per = "_per_layer" if "msa_us_per_layer" in c else ""
            fp8 = c.get("fp8", {}).get("kv", {})
            bars = [("msa bf16", c[f"msa_us{per}"]), ("msa FP8 K/V", fp8.get(f"msa_us{per}")),
                    ("vLLM bf16", c.get(f"vllm_us{per}")),
                    ("vLLM FP8 K/V", c.get(f"vllm_fp8_kv_us{per}")),
                    ("floor bf16", c["floor_us"]), ("floor FP8 K/V", fp8.get("floor_us"))]
            bars = [(n, y) for n, y in bars if y]
            ax.bar(range(len(bars)), [y for _, y in bars],
                   color=[f"C{i}" for i in range(len(bars))])
            ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=30, ha="right",
                          fontsize=8)
            ax.set_ylabel("us per layer" + (" (graph of 8 steps)" if per else ""))
            ax.set_title(f"{c['context'] // 1024}K x {c['batch']} x {c['num_q']}, "
                         f"{results['meta']['gpu']}", fontsize=9)
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
