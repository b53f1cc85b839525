"""Heatmaps of evaluation grids (PNG; matplotlib is optional: ``pip install matplotlib``)."""
from __future__ import annotations

import importlib.util
from typing import List, Sequence


def require_matplotlib(option: str = "--png") -> None:
    """Fail early, before any work, when plotting was asked for without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"{option} needs matplotlib: pip install matplotlib "
                         f"(or pip install 'msa[bench]')")


def heatmaps(panels: Sequence[dict], path: str) -> None:
    """One PNG with a heatmap per panel: ``dict(grid=[[value]] (rows x cols, in [0, 1]),
    rows=[labels], cols=[labels], xlabel, ylabel, title)``, values written in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(panels)
    ncols = max(len(p["cols"]) for p in panels)
    nrows = max(len(p["rows"]) for p in panels)
    fig, axes = plt.subplots(1, n, figsize=((1.2 + 0.9 * ncols) * n, 1.4 + 0.5 * nrows),
                             squeeze=False)
    for ax, p in zip(axes[0], panels):
        im = ax.imshow(p["grid"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(p["cols"])), p["cols"])
        ax.set_yticks(range(len(p["rows"])), p["rows"])
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel(p["ylabel"])
        ax.set_title(p["title"])
        for i, row in enumerate(p["grid"]):
            for j, val in enumerate(row):
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def grid_of(cells: List, value: str, row: str, col: str) -> dict:
    """``dict(grid, rows, cols)`` of the attribute ``value`` of ``cells`` by ``row`` x ``col``."""
    rows = sorted({getattr(c, row) for c in cells})
    cols = sorted({getattr(c, col) for c in cells})
    grid = [[next(getattr(c, value) for c in cells
                  if getattr(c, row) == r and getattr(c, col) == k) for k in cols]
            for r in rows]
    return dict(grid=grid, rows=rows, cols=cols)
