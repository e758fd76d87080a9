"""Genotypes: the discrete cells DARTS derives from alpha, their JSON form and their checks.

A genotype holds a normal and a reduce cell. A cell with ``k`` intermediate nodes lists two
``(op, input)`` pairs per node (``2k`` pairs in node order); inputs ``0`` and ``1`` are the cell's
two inputs (the outputs of the previous two cells), ``2 + i`` is intermediate node ``i``, and node
``i`` may only read states ``< 2 + i``. ``*_concat`` lists the states concatenated into the cell's
output (DARTS: every intermediate node).

JSON (``genotype.json``)::

    {"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ...], "normal_concat": [2, 3, 4, 5],
     "reduce": [["max_pool_3x3", 0], ...], "reduce_concat": [2, 3, 4, 5]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tasks.common.validate import check_choice

__all__ = ["Genotype", "derive_cell", "entropy", "load_genotype"]

Edge = tuple[str, int]


@dataclass(frozen=True)
class Genotype:
    """A normal and a reduce cell (see the module docstring).

    Attributes:
        normal: ``(op, input)`` pairs of the normal cell, two per node.
        normal_concat: states concatenated into the normal cell's output.
        reduce: ``(op, input)`` pairs of the reduce cell.
        reduce_concat: states concatenated into the reduce cell's output.
    """

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def nodes(self, cell: str) -> int:
        """Intermediate nodes of ``cell`` (``normal`` or ``reduce``)."""
        return len(getattr(self, cell)) // 2

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (lists)."""
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def __str__(self) -> str:
        def cell(edges: tuple[Edge, ...]) -> str:
            return " | ".join(
                " + ".join(f"{op}({j})" for op, j in edges[2 * i : 2 * i + 2]) for i in range(len(edges) // 2)
            )

        return f"normal: {cell(self.normal)}; reduce: {cell(self.reduce)}"

    @classmethod
    def from_dict(
        cls, data: Any, ops: Sequence[str], max_nodes: int | None = None, source: str = "genotype"
    ) -> Genotype:
        """Parse and check the JSON form.

        Args:
            data: the parsed JSON.
            ops: the ops of the space (``none`` is never part of a derived cell).
            max_nodes: the most intermediate nodes a cell may have (the network's), if bounded.
            source: what to call it in errors (e.g. the file name).

        Raises:
            ValueError: naming the bad field and the rule: a missing or extra key, a pair that is
                not ``[op, input]``, an op outside the space, an input a node cannot read, an odd
                number of pairs, more nodes than ``max_nodes``, a bad concat list.
        """
        keys = ("normal", "normal_concat", "reduce", "reduce_concat")
        if not isinstance(data, dict) or set(data) != set(keys):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{source}: a genotype is an object with keys {', '.join(keys)}; got {got}")
        allowed = [op for op in ops if op != "none"]
        parsed: dict[str, Any] = {}
        for cell in ("normal", "reduce"):
            edges = data[cell]
            if not isinstance(edges, list) or not edges or len(edges) % 2:
                raise ValueError(
                    f"{source}: {cell} must be a non-empty list of [op, input] pairs, two per node"
                )
            nodes = len(edges) // 2
            if max_nodes is not None and nodes > max_nodes:
                raise ValueError(
                    f"{source}: the {cell} cell has {nodes} nodes, more than the network's {max_nodes} "
                    f"(--model.nodes)"
                )
            pairs = []
            for k, edge in enumerate(edges):
                node = k // 2
                ok = isinstance(edge, list) and len(edge) == 2 and isinstance(edge[0], str)
                ok = ok and isinstance(edge[1], int) and not isinstance(edge[1], bool)
                if not ok:
                    raise ValueError(f"{source}: {cell}[{k}] must be an [op, input] pair, got {edge!r}")
                op, j = edge
                check_choice("op", op, allowed, owner=f"{source}: {cell}[{k}]",
                             problem=f"op {op!r} is not in the space")  # fmt: skip
                if not 0 <= j < 2 + node:
                    raise ValueError(
                        f"{source}: {cell}[{k}]: node {node} can read inputs 0..{node + 1}, got {j}"
                    )
                pairs.append((op, j))
            concat = data[f"{cell}_concat"]
            valid = isinstance(concat, list) and concat and len(set(concat)) == len(concat)
            if not valid or not all(isinstance(c, int) and 0 <= c < 2 + nodes for c in concat):
                raise ValueError(
                    f"{source}: {cell}_concat must list distinct states in 0..{nodes + 1}, got {concat!r}"
                )
            parsed[cell], parsed[f"{cell}_concat"] = tuple(pairs), tuple(concat)
        return cls(**parsed)


def load_genotype(path: str | os.PathLike[str], ops: Sequence[str], max_nodes: int | None = None) -> Genotype:
    """Read and check a ``genotype.json`` (a bare genotype, or a ``results.json`` holding one).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for malformed JSON or a genotype :meth:`Genotype.from_dict` rejects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--genotype {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(
            f"--genotype {path}: not a genotype JSON file (binary data; a checkpoint? pass the genotype.json "
            "beside a search's results.json)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if isinstance(data, dict) and "genotype" in data and "normal" not in data:
        data = data["genotype"]
    return Genotype.from_dict(data, ops, max_nodes, source=str(path))


def derive_cell(weights: Tensor, ops: Sequence[str], nodes: int) -> tuple[Edge, ...]:
    """DARTS' discretisation of one cell: per node, the two inputs with the strongest non-``none`` op.

    An input's strength is its largest softmax weight over the ops other than ``none``; each of the
    two kept inputs takes that op. Ties go to the lower index.

    Args:
        weights: ``softmax(alpha)`` of the cell, ``(edges, len(ops))``, edges in node order (node ``i``
            has ``2 + i`` edges).
        ops: the column names.
        nodes: intermediate nodes.

    Raises:
        ValueError: when the shape does not fit ``nodes`` and ``ops`` or no op but ``none`` exists.
    """
    edges = sum(2 + i for i in range(nodes))
    if tuple(weights.shape) != (edges, len(ops)):
        raise ValueError(f"derive_cell: weights must be ({edges}, {len(ops)}) for {nodes} nodes, "
                         f"got {tuple(weights.shape)}")  # fmt: skip
    keep = [k for k, op in enumerate(ops) if op != "none"]
    if not keep:
        raise ValueError("derive_cell: the space has no op other than 'none'")
    w = weights.detach().float().cpu()[:, keep]
    gene: list[Edge] = []
    start = 0
    for i in range(nodes):
        block = w[start : start + 2 + i]
        best, arg = block.max(dim=1)
        order = sorted(range(2 + i), key=lambda j: (-float(best[j]), j))[:2]
        gene += [(ops[keep[int(arg[j])]], j) for j in order]
        start += 2 + i
    return tuple(gene)


def entropy(weights: Tensor) -> Tensor:
    """Mean entropy (nats) of the rows of a softmax matrix: ``log(len(ops))`` is uniform, 0 is one-hot."""
    return -(weights * torch.log(weights.clamp_min(1e-12))).sum(dim=-1).mean()
