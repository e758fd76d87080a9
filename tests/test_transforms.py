"""BGN under ``torch.func`` transforms (grad, grad of grad, vmap): the composite path is used and
matches the float64 reference, on the kernel path's machines and on the native one alike."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from bgn_lightning import BatchGroupNorm2d
from tests.reference import reference_bgn

pytestmark = pytest.mark.usefixtures("bgn_path")

CASES = [(4, False), (32, False), (32, True), (4, True)]  # (G, channels_last) for C = 8, 4x4


def _input(channels_last: bool, *batch: int) -> torch.Tensor:
    x = torch.randn(*batch, 8, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last) if channels_last and len(batch) == 1 else x


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: v.detach() + 0.1 * torch.randn(v.shape, dtype=v.dtype, generator=g)
            for k, v in module.named_parameters()}


@pytest.mark.parametrize(("groups", "channels_last"), CASES)
def test_grad_and_second_order_grad_match_the_reference(groups: int, channels_last: bool) -> None:
    # A functional MAML step differentiates through a gradient: grad of a function of grad.
    layer = BatchGroupNorm2d(8, groups, track_running_stats=False).double()
    params, x = _params(layer), _input(channels_last, 4)

    def loss(p, x):
        return (functional_call(layer, p, (x,)) ** 3).sum()

    def loss_ref(p, x):
        return (reference_bgn(x, groups, p["weight"], p["bias"], layer.eps)[0] ** 3).sum()

    def grad_norm(fn):
        return lambda p, x: sum((g ** 2).sum() for g in grad(fn)(p, x).values())

    for got, want in ((grad(loss)(params, x), grad(loss_ref)(params, x)),
                      (grad(grad_norm(loss))(params, x), grad(grad_norm(loss_ref))(params, x))):
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize(("groups", "channels_last"), CASES)
def test_vmap_over_episodes_normalizes_each_with_its_own_statistics(groups: int, channels_last: bool) -> None:
    layer = BatchGroupNorm2d(8, groups, track_running_stats=False).double()
    params, xs = _params(layer), _input(channels_last, 3, 4)
    got = vmap(lambda x: functional_call(layer, params, (x,)))(xs)
    want = torch.stack([reference_bgn(x, groups, params["weight"], params["bias"], layer.eps)[0] for x in xs])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("groups", "channels_last"), CASES)
def test_input_gradient_in_eval_mode(groups: int, channels_last: bool) -> None:
    # Adversarial attacks written with torch.func: d loss / d x through running statistics.
    layer = BatchGroupNorm2d(8, groups).double()
    x = _input(channels_last, 4)
    layer(x * 2 + 1)
    layer.eval()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    got = grad(lambda x: (functional_call(layer, params, (x,)) ** 2).sum())(x)
    leaf = x.clone().requires_grad_()
    (layer(leaf) ** 2).sum().backward()
    torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-10)
