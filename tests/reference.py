"""A float64 reference of Batch Group Normalization written straight from the formula.

Deliberately naive (loops over groups, explicit sums) so it shares no code path with the op.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference_bgn(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BGN in float64: returns (y, per-group mean, per-group biased variance)."""
    x = x.double()
    n, c = x.shape[:2]
    flat = x.reshape(n, -1)
    d = flat.shape[1]
    size = d // num_groups
    y = torch.empty_like(flat)
    means, variances = [], []
    for g in range(num_groups):
        block = flat[:, g * size:(g + 1) * size]
        count = block.numel()
        mean = block.sum() / count
        var = ((block - mean) ** 2).sum() / count
        y[:, g * size:(g + 1) * size] = (block - mean) / torch.sqrt(var + eps)
        means.append(mean)
        variances.append(var)
    y = y.reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y, torch.stack(means), torch.stack(variances)
