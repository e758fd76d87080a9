"""A PNG drawing of a genotype's two cells (matplotlib only, no graphviz)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .genotype import Edge, Genotype

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["draw_genotype"]

RAD = 0.15
"""Curvature of the op edges (matplotlib's ``arc3`` ``rad``)."""


def _draw_cell(ax: Axes, edges: tuple[Edge, ...], concat: tuple[int, ...], title: str) -> None:
    nodes = len(edges) // 2
    pos = {0: (0.0, 1.0), 1: (0.0, -1.0)}
    for i in range(nodes):
        pos[2 + i] = (1.0 + i, 0.8 if i % 2 == 0 else -0.8)
    out = (2.0 + nodes, 0.0)
    names = {0: "c_{k-2}", 1: "c_{k-1}", **{2 + i: str(i) for i in range(nodes)}}
    for k, (op, j) in enumerate(edges):
        src, dst = pos[j], pos[2 + k // 2]
        ax.annotate(
            "",
            xy=dst,
            xytext=src,
            arrowprops={
                "arrowstyle": "-|>",
                "color": "tab:blue",
                "connectionstyle": f"arc3,rad={RAD}",
                "shrinkA": 14,
                "shrinkB": 14,
            },
        )
        # the midpoint of matplotlib's arc3 curve: half of ``rad`` times the chord, perpendicular to it
        dx, dy = dst[0] - src[0], dst[1] - src[1]
        mid = (0.5 * (src[0] + dst[0]) + 0.5 * RAD * dy, 0.5 * (src[1] + dst[1]) - 0.5 * RAD * dx)
        ax.text(
            *mid,
            op,
            fontsize=7,
            ha="center",
            va="center",
            color="tab:blue",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
        )
    for state in concat:
        ax.annotate(
            "",
            xy=out,
            xytext=pos[state],
            arrowprops={"arrowstyle": "-|>", "color": "0.6", "shrinkA": 14, "shrinkB": 14},
        )
    for state, (x, y) in pos.items():
        color = "tab:green" if state < 2 else "tab:blue"
        ax.text(
            x,
            y,
            names[state],
            ha="center",
            va="center",
            fontsize=9,
            color="white",
            bbox={"boxstyle": "round,pad=0.4", "fc": color, "ec": "none"},
        )
    ax.text(
        *out,
        "c_{k}",
        ha="center",
        va="center",
        fontsize=9,
        color="white",
        bbox={"boxstyle": "round,pad=0.4", "fc": "tab:orange", "ec": "none"},
    )
    ax.set_xlim(-0.6, out[0] + 0.6)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")  # the label positions assume equal data and display scales
    ax.set_title(title)
    ax.axis("off")


def draw_genotype(genotype: Genotype, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Draw the normal and reduce cells of ``genotype`` one above the other; write a PNG to ``path``.

    Inputs ``c_{k-2}``, ``c_{k-1}`` (green), intermediate nodes (blue, each with its two op-labelled
    input edges) and the output ``c_{k}`` (orange, fed by the concatenated states, grey edges).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 1.6 * (3.2 + max(genotype.nodes("normal"), genotype.nodes("reduce")))
    fig, axes = plt.subplots(2, 1, figsize=(width, 2 * 1.6 * 2.6 + 0.6))
    _draw_cell(axes[0], genotype.normal, genotype.normal_concat, "normal cell")
    _draw_cell(axes[1], genotype.reduce, genotype.reduce_concat, "reduction cell")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
