"""DARTS' search network (MixedOps weighted by softmax(alpha)) and the derived network, from registry norms.

Both stack ``cells`` cells after a 3x3 stem; the cells at ``cells // 3`` and ``2 * cells // 3``
are reduction cells (stride 2, channels doubled). A cell reads the outputs of the previous two
cells (preprocessed to ``C`` channels: a 1x1 ReLU-conv-norm, or a :class:`FactorizedReduce` after
a reduction) and concatenates its intermediate nodes. Search-time conventions of DARTS: the norms
inside cells are non-affine, and each pooling op is followed by an extra non-affine norm; the
stem's norm is affine. The derived network's norms are all affine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.common.validate import check_int

from .genotype import Edge, Genotype, derive_cell
from .ops import FactorizedReduce, NormLayer, ReLUConvBN, build_op

__all__ = [
    "EvalCell",
    "EvalNetwork",
    "MixedOp",
    "SearchCell",
    "SearchNetwork",
    "drop_path",
    "reduction_cells",
]


def reduction_cells(cells: int) -> set[int]:
    """Indices of the reduction cells of a ``cells``-cell network (DARTS: at 1/3 and 2/3 depth)."""
    return {cells // 3, 2 * cells // 3}


class MixedOp(nn.Module):
    """``sum_k w_k op_k(x)`` over the space's ops, ``w = softmax(alpha)`` of the edge.

    Args:
        C: channels in and out.
        stride: 1 or 2.
        ops: op names.
        norm_layer: registry norm factory (built non-affine).
    """

    def __init__(self, C: int, stride: int, ops: Sequence[str], norm_layer: NormLayer) -> None:
        super().__init__()
        self.ops = nn.ModuleList()
        for name in ops:
            op = build_op(name, C, C, stride, False, norm_layer)
            if "pool" in name:
                op = nn.Sequential(op, norm_layer(C, affine=False))
            self.ops.append(op)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """The weighted sum; ``weights`` has one entry per op."""
        return sum(w * op(x) for w, op in zip(weights, self.ops, strict=True))  # type: ignore[return-value]


def _preprocess0(
    C_prev_prev: int, C: int, reduction_prev: bool, affine: bool, norm_layer: NormLayer
) -> nn.Module:
    if reduction_prev:
        return FactorizedReduce(C_prev_prev, C, affine, norm_layer)
    return ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine, norm_layer)


class SearchCell(nn.Module):
    """A cell of the search network: every node sums MixedOps over all earlier states.

    Args:
        nodes: intermediate nodes.
        C_prev_prev: channels of the cell two back.
        C_prev: channels of the previous cell.
        C: channels of each node.
        reduction: stride 2 on the edges from the two inputs.
        reduction_prev: the previous cell reduced (the input two back is twice as large).
        ops: op names.
        norm_layer: registry norm factory.
    """

    def __init__(
        self, nodes: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool,
        ops: Sequence[str], norm_layer: NormLayer,
    ) -> None:  # fmt: skip
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.preprocess0 = _preprocess0(C_prev_prev, C, reduction_prev, False, norm_layer)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, False, norm_layer)
        self.edges = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1, ops, norm_layer)
            for i in range(nodes)
            for j in range(2 + i)
        )

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        """The concatenated nodes; ``weights`` is ``softmax(alpha)``, one row per edge."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.nodes):
            node = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)  # type: ignore[arg-type]
        return torch.cat(states[2:], dim=1)


def _stem(in_channels: int, C: int, norm_layer: NormLayer) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), norm_layer(C, affine=True))


Built = tuple[nn.Module, int]
"""A cell and its output channels."""


def _cells(
    channels: int, cells: int, stem_channels: int, cell: Callable[[int, int, int, bool, bool], Built]
) -> tuple[nn.ModuleList, int]:
    """A network's ``cells`` cells, each reading the previous two, those at :func:`reduction_cells`
    reducing (channels doubled), and the last one's output channels.

    ``cell(C_prev_prev, C_prev, C, reduction, reduction_prev)`` builds one (the search's or the
    derived network's) and says its output channels.
    """
    out = nn.ModuleList()
    C, C_prev_prev, C_prev, reduction_prev = channels, stem_channels, stem_channels, False
    for i in range(cells):
        reduction = i in reduction_cells(cells)
        C = C * 2 if reduction else C
        built, C_out = cell(C_prev_prev, C_prev, C, reduction, reduction_prev)
        out.append(built)
        C_prev_prev, C_prev, reduction_prev = C_prev, C_out, reduction
    return out, C_prev


class SearchNetwork(nn.Module):
    """DARTS' supernet: ``cells`` search cells sharing one alpha per cell type.

    Parameters: :meth:`arch_parameters` (``alphas_normal``, ``alphas_reduce``, each
    ``(edges, len(ops))``, initialised ``1e-3 * N(0, 1)`` as DARTS) and :meth:`weight_parameters`
    (everything else); the two are disjoint.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels.
        channels: ``C`` of the first cells (doubled at each reduction).
        cells: number of cells.
        nodes: intermediate nodes per cell.
        ops: op names (the columns of alpha).
        norm_layer: registry norm factory (non-affine in cells, affine in the stem).
        stem_multiplier: the stem outputs ``stem_multiplier * channels``.

    Raises:
        ValueError: for fewer than 3 cells, fewer than 1 node or an unknown op.
    """

    def __init__(
        self, num_classes: int, in_channels: int, channels: int, cells: int, nodes: int, ops: Sequence[str],
        norm_layer: NormLayer, stem_multiplier: int = 3,
    ) -> None:  # fmt: skip
        super().__init__()
        _check_shape(channels, cells, nodes)
        self.ops = tuple(ops)
        self.nodes = nodes
        self.stem = _stem(in_channels, stem_multiplier * channels, norm_layer)

        def cell(C_prev_prev: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool) -> Built:
            search = SearchCell(nodes, C_prev_prev, C_prev, C, reduction, reduction_prev, ops, norm_layer)
            return search, nodes * C

        self.cells, C_out = _cells(channels, cells, stem_multiplier * channels, cell)
        self.classifier = nn.Linear(C_out, num_classes)
        edges = sum(2 + i for i in range(nodes))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(edges, len(ops)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(ops)))

    def arch_parameters(self) -> list[nn.Parameter]:
        """alpha: ``[alphas_normal, alphas_reduce]``."""
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but alpha."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def arch_weights(self) -> dict[str, Tensor]:
        """``softmax(alpha)`` per cell type: ``{"normal": ..., "reduce": ...}``."""
        return {
            "normal": F.softmax(self.alphas_normal, dim=-1),
            "reduce": F.softmax(self.alphas_reduce, dim=-1),
        }

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images ``(N, in_channels, H, W)``."""
        weights = self.arch_weights()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights["reduce" if cell.reduction else "normal"])
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def genotype(self) -> Genotype:
        """The discrete cells DARTS derives from the current alpha (:func:`derive_cell`)."""
        weights = self.arch_weights()
        concat = tuple(range(2, 2 + self.nodes))
        return Genotype(
            normal=derive_cell(weights["normal"], self.ops, self.nodes),
            normal_concat=concat,
            reduce=derive_cell(weights["reduce"], self.ops, self.nodes),
            reduce_concat=concat,
        )


def _check_shape(channels: int, cells: int, nodes: int) -> None:
    if channels < 1 or channels % 2:
        raise ValueError(f"channels must be a positive even int (FactorizedReduce halves), got {channels!r}")
    if cells < 3:
        raise ValueError(f"cells must be >= 3 (two of them reduce), got {cells!r}")
    check_int("nodes", nodes, expected=">= 1")


def drop_path(x: Tensor, drop_prob: float) -> Tensor:
    """Zero whole samples of ``x`` with probability ``drop_prob``, rescaling the others (DARTS' drop path)."""
    keep = 1.0 - drop_prob
    mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
    return x * mask / keep


class EvalCell(nn.Module):
    """A derived cell: each node sums two ops of the genotype.

    Args:
        edges: the cell's ``(op, input)`` pairs, two per node.
        concat: states concatenated into the output.
        C_prev_prev: channels of the cell two back.
        C_prev: channels of the previous cell.
        C: channels of each node.
        reduction: stride 2 on the edges from the two inputs.
        reduction_prev: the previous cell reduced.
        norm_layer: registry norm factory (affine).
    """

    def __init__(
        self, edges: Sequence[Edge], concat: Sequence[int], C_prev_prev: int, C_prev: int, C: int,
        reduction: bool, reduction_prev: bool, norm_layer: NormLayer,
    ) -> None:  # fmt: skip
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = _preprocess0(C_prev_prev, C, reduction_prev, True, norm_layer)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, True, norm_layer)
        self.inputs = [j for _, j in edges]
        self.concat = list(concat)
        self.ops = nn.ModuleList(
            build_op(op, C, C, 2 if reduction and j < 2 else 1, True, norm_layer) for op, j in edges
        )

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float = 0.0) -> Tensor:
        """The concatenated states; drop path (training only) on every op but identities."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            node = 0
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.inputs[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], nn.Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)  # type: ignore[arg-type]
        return torch.cat([states[i] for i in self.concat], dim=1)


class EvalNetwork(nn.Module):
    """The derived network: the genotype's cells stacked as DARTS' ``NetworkCIFAR`` (no auxiliary head).

    Args:
        genotype: the cells.
        num_classes: classifier outputs.
        in_channels: image channels.
        channels: ``C`` of the first cells.
        cells: number of cells.
        norm_layer: registry norm factory (every norm affine).
        stem_multiplier: the stem outputs ``stem_multiplier * channels``.

    Raises:
        ValueError: for fewer than 3 cells or odd channels.
    """

    def __init__(
        self, genotype: Genotype, num_classes: int, in_channels: int, channels: int, cells: int,
        norm_layer: NormLayer, stem_multiplier: int = 3,
    ) -> None:  # fmt: skip
        super().__init__()
        _check_shape(channels, cells, 1)
        self.drop_prob = 0.0
        self.stem = _stem(in_channels, stem_multiplier * channels, norm_layer)

        def cell(C_prev_prev: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool) -> Built:
            kind = "reduce" if reduction else "normal"
            edges, concat = getattr(genotype, kind), getattr(genotype, f"{kind}_concat")
            derived = EvalCell(edges, concat, C_prev_prev, C_prev, C, reduction, reduction_prev, norm_layer)
            return derived, len(concat) * C

        self.cells, C_out = _cells(channels, cells, stem_multiplier * channels, cell)
        self.classifier = nn.Linear(C_out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images ``(N, in_channels, H, W)``; drop path at ``self.drop_prob`` in training."""
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, self.drop_prob)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))
