"""The BGN op against a float64 reference, gradcheck, and the auto-G rule."""

from __future__ import annotations

import re

import pytest
import torch

from bgn_lightning.functional import auto_num_groups, batch_group_norm, valid_num_groups
from tests.reference import reference_bgn

# (shape, G): G < C, G = C, G > C, odd sizes, 1-D and 3-D inputs, (N, C) inputs.
CASES = [
    ((4, 8, 5, 5), 2),
    ((4, 8, 5, 5), 8),
    ((4, 8, 6, 6), 16),
    ((4, 8, 6, 6), 72),
    ((3, 6, 7, 5), 3),
    ((2, 6, 3, 3), 9 * 6),
    ((5, 12, 9), 4),
    ((5, 12, 9), 36),
    ((6, 10), 5),
    ((6, 10), 10),
    ((2, 4, 3, 4, 5), 2),
    ((2, 4, 3, 4, 5), 8),
    ((1, 6, 4, 4), 1),
    ((7, 6, 2, 2), 4),  # G does not divide C: groups straddle channels
]


@pytest.mark.parametrize(("shape", "groups"), CASES)
def test_forward_backward_match_reference(shape: tuple[int, ...], groups: int) -> None:
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    w = torch.randn(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    y = batch_group_norm(x, groups, weight=w, bias=b, training=True, eps=1e-5)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_()
    y_ref, _, _ = reference_bgn(x_ref, groups, w_ref, b_ref, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("shape", "groups"), [((3, 4, 3, 3), 2), ((3, 4, 2, 2), 4), ((2, 2, 2, 2), 8),
                                               ((4, 6, 5), 3), ((3, 6, 2, 2), 4)])
def test_gradcheck(shape: tuple[int, ...], groups: int) -> None:
    torch.manual_seed(1)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_group_norm(x, groups, weight=w, bias=b, training=True), (x, w, b)
    )
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: batch_group_norm(x, groups, weight=w, bias=b, training=True), (x, w, b)
    )


def test_eval_uses_running_stats_per_group() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    rm = torch.randn(3, dtype=torch.float64)
    rv = torch.rand(3, dtype=torch.float64) + 0.5
    y = batch_group_norm(x, 3, rm, rv, training=False, eps=1e-3)
    xg = x.reshape(4, 3, -1)
    expected = ((xg - rm[:, None]) / torch.sqrt(rv[:, None] + 1e-3)).reshape(x.shape)
    torch.testing.assert_close(y, expected)


def test_running_stat_update_and_cumulative_average() -> None:
    torch.manual_seed(3)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    xs = [torch.randn(5, 8, 3, 3, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    for x in xs:
        batch_group_norm(x, 4, rm, rv, training=True, momentum=0.3)
    exp_m, exp_v = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    n = 5 * 8 * 9 // 4
    for x in xs:
        _, m, v = reference_bgn(x, 4, None, None, 1e-5)
        exp_m = 0.7 * exp_m + 0.3 * m
        exp_v = 0.7 * exp_v + 0.3 * v * n / (n - 1)
    torch.testing.assert_close(rm, exp_m)
    torch.testing.assert_close(rv, exp_v)

    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for i, x in enumerate(xs, start=1):
        batch_group_norm(x, 4, rm, rv, training=True, momentum=None,
                         num_batches_tracked=torch.tensor(i))
    stats = [reference_bgn(x, 4, None, None, 1e-5) for x in xs]
    torch.testing.assert_close(rm, torch.stack([s[1] for s in stats]).mean(0))
    torch.testing.assert_close(rv, torch.stack([s[2] * n / (n - 1) for s in stats]).mean(0))


@pytest.mark.parametrize(
    ("shape", "groups", "message"),
    [
        ((4, 8, 5, 5), 3, "must divide"),
        ((4, 8, 5, 5), 0, "positive int"),
        ((4, 4, 3, 1), 6, "multiple of C"),
        ((8,), 1, "(N, C, *S)"),
        ((1, 4, 1, 1), 4, "more than 1 value"),
    ],
)
def test_bad_input_raises_value_error(shape: tuple[int, ...], groups: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        batch_group_norm(torch.randn(shape), groups, training=True)


def test_valid_num_groups() -> None:
    assert valid_num_groups(6, 6 * 4) == [1, 2, 3, 6, 12, 24]
    assert valid_num_groups(4, 4 * 9) == [1, 2, 4, 12, 36]


# (N, C, H, W) -> expected auto G with the default reference batch size 32.
AUTO_TABLE = [
    ((32, 64, 8, 8), 64),  # reference batch: BatchNorm's statistics
    ((2, 64, 8, 8), 4),  # 64 * 2 / 32
    ((8, 64, 8, 8), 16),
    ((1, 64, 8, 8), 2),
    ((1, 16, 8, 8), 1),  # target 0.5 -> 1
    ((128, 64, 8, 8), 256),  # large batch: split channels by position
    ((64, 16, 3, 3), 48),  # target 32 is no valid G (16 * k, k | 9): 48 is closest on a log scale
    ((4, 24, 4, 4), 3),
    ((2, 10, 1, 1), 1),  # target 0.625: 1 beats 2 (log distance)
    ((1, 3, 1, 1), 1),  # G = 3 would leave one value per statistic
]


@pytest.mark.parametrize(("shape", "expected"), AUTO_TABLE)
def test_auto_num_groups_table(shape: tuple[int, int, int, int], expected: int) -> None:
    n, c, h, w = shape
    assert auto_num_groups(n, c, c * h * w) == expected


def test_auto_num_groups_reference_batch_size() -> None:
    assert auto_num_groups(16, 64, 64 * 16, reference_batch_size=16) == 64
    with pytest.raises(ValueError, match="reference_batch_size"):
        auto_num_groups(16, 64, 64, reference_batch_size=0)
