"""A PNG drawing of a genotype's two cells (matplotlib only, no graphviz).

Layout: every state of a cell sits on one ellipse (inputs on the left, the output ``c_{k}`` on
the right, intermediate nodes alternating along the top and bottom arcs), and edges are straight.
Points on an ellipse are in convex position, so no edge passes behind a node; each op label is
placed along its edge where it overlaps no node and no other label (checked on the rendered
text), so labels stay readable in crowded cells.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .genotype import Edge, Genotype

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.transforms import Bbox

__all__ = ["CellDrawing", "draw_genotype"]

_LABEL_POSITIONS = (0.5, 0.38, 0.62, 0.28, 0.72, 0.2, 0.8)
"""Where along an edge (0: source, 1: destination) a label may go, in order of preference."""


@dataclass
class CellDrawing:
    """What :func:`_draw_cell` placed: state positions, straight edges, node and label extents.

    Attributes:
        positions: state -> ``(x, y)``; ``-1`` is the output ``c_{k}``.
        edges: ``(source state, destination state)`` of every drawn edge (op and concat edges).
        nodes: state -> the node box's display extent.
        labels: the op labels' display extents.
    """

    positions: dict[int, tuple[float, float]]
    edges: list[tuple[int, int]] = field(default_factory=list)
    nodes: dict[int, Bbox] = field(default_factory=dict)
    labels: list[Bbox] = field(default_factory=list)


def _positions(nodes: int) -> dict[int, tuple[float, float]]:
    """States on an ellipse: ``c_{k-2}`` and even nodes on the top arc, ``c_{k-1}`` and odd nodes
    on the bottom arc (left to right), the output (``-1``) at the right end."""
    top = [0, *range(2, 2 + nodes, 2)]
    bottom = [1, *range(3, 2 + nodes, 2)]
    a, b = 1.1 * (1 + max(len(top), len(bottom))), 1.5
    pos: dict[int, tuple[float, float]] = {-1: (a, 0.0)}
    for states, sign in ((top, 1.0), (bottom, -1.0)):
        for i, state in enumerate(states):
            angle = math.radians(165 - 150 * i / len(states))
            pos[state] = (a * math.cos(angle), sign * b * math.sin(angle))
    return pos


def _overlap(box: Bbox, others: list[Bbox]) -> float:
    """Total area ``box`` shares with ``others`` (display units)."""
    total = 0.0
    for other in others:
        w = min(box.x1, other.x1) - max(box.x0, other.x0)
        h = min(box.y1, other.y1) - max(box.y0, other.y0)
        total += max(w, 0.0) * max(h, 0.0)
    return total


def _draw_cell(ax: Axes, edges: tuple[Edge, ...], concat: tuple[int, ...], title: str) -> CellDrawing:
    nodes = len(edges) // 2
    drawing = CellDrawing(_positions(nodes))
    pos = drawing.positions
    a = pos[-1][0]
    ax.set_xlim(-a - 0.9, a + 0.9)
    ax.set_ylim(-2.0, 2.0)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.axis("off")
    ax.apply_aspect()  # the final data-to-display transform: label extents are measured with it
    names = {-1: "c_{k}", 0: "c_{k-2}", 1: "c_{k-1}", **{2 + i: str(i) for i in range(nodes)}}
    colours = {-1: "tab:orange", 0: "tab:green", 1: "tab:green"}
    renderer = ax.figure.canvas.get_renderer()
    for state, (x, y) in pos.items():
        text = ax.text(x, y, names[state], ha="center", va="center", fontsize=9, color="white", zorder=3,
                       bbox={"boxstyle": "round,pad=0.4", "fc": colours.get(state, "tab:blue"), "ec": "none"})
        drawing.nodes[state] = text.get_window_extent(renderer).expanded(1.15, 1.3)
    arrow = {"arrowstyle": "-|>", "shrinkA": 15, "shrinkB": 15, "connectionstyle": "arc3,rad=0"}
    for state in concat:
        ax.annotate("", xy=pos[-1], xytext=pos[state], zorder=1, arrowprops={**arrow, "color": "0.65"})
        drawing.edges.append((state, -1))
    for k, (op, j) in enumerate(edges):
        src, dst = pos[j], pos[2 + k // 2]
        ax.annotate("", xy=dst, xytext=src, zorder=2, arrowprops={**arrow, "color": "tab:blue"})
        drawing.edges.append((j, 2 + k // 2))
        drawing.labels.append(_place_label(ax, op, src, dst, drawing, renderer))
    return drawing


def _place_label(
    ax: Axes, op: str, src: tuple[float, float], dst: tuple[float, float], drawing: CellDrawing, renderer: Any
) -> Bbox:
    """Put ``op`` on the edge ``src -> dst`` where it overlaps nothing placed (else least); its extent."""
    text = ax.text(0, 0, op, fontsize=7, ha="center", va="center", color="tab:blue", zorder=4,
                   bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.9})
    placed = [*drawing.nodes.values(), *drawing.labels]
    best: tuple[float, tuple[float, float]] | None = None
    for t in _LABEL_POSITIONS:
        xy = (src[0] + t * (dst[0] - src[0]), src[1] + t * (dst[1] - src[1]))
        text.set_position(xy)
        overlap = _overlap(text.get_window_extent(renderer), placed)
        if best is None or overlap < best[0]:
            best = (overlap, xy)
        if overlap == 0.0:
            break
    assert best is not None
    text.set_position(best[1])
    return text.get_window_extent(renderer)


def draw_genotype(genotype: Genotype, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Draw the normal and reduce cells of ``genotype`` one above the other; write a PNG to ``path``.

    Inputs ``c_{k-2}``, ``c_{k-1}`` (green), intermediate nodes (blue, each with its two op-labelled
    input edges) and the output ``c_{k}`` (orange, fed by the concatenated states, grey edges).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = max(genotype.nodes("normal"), genotype.nodes("reduce"))
    half_width = _positions(nodes)[-1][0] + 0.9  # the axes' x-range is twice this, the y-range 4
    scale = 0.8  # inches per unit
    fig = plt.figure(figsize=(2 * half_width * scale + 0.4, 2 * 4 * scale + 1.2))
    # fixed axes boxes (no layout engine), so what _draw_cell measures is what is saved
    box = {"left": 0.02, "right": 0.98, "bottom": 0.02, "top": 0.9, "hspace": 0.15}
    axes = fig.subplots(2, 1, gridspec_kw=box)
    if title:
        fig.suptitle(title)
    _draw_cell(axes[0], genotype.normal, genotype.normal_concat, "normal cell")
    _draw_cell(axes[1], genotype.reduce, genotype.reduce_concat, "reduction cell")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
