"""The normalization registry: names, dims, kwargs, user layers, is_norm_layer."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from torch import nn

from bgn_lightning import (
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    PositionalNorm,
    available_norms,
    build_norm,
    is_norm_layer,
    norm_layer,
    register_norm,
)
from bgn_lightning import registry as registry_module


def test_builtin_names() -> None:
    assert available_norms()[:7] == ["bn", "bgn", "gn", "ln", "in", "pn", "none"]


@pytest.mark.parametrize(
    ("name", "dim", "expected"),
    [
        ("bn", 1, nn.BatchNorm1d), ("bn", 2, nn.BatchNorm2d), ("bn", 3, nn.BatchNorm3d),
        ("bgn", 1, BatchGroupNorm1d), ("bgn", 2, BatchGroupNorm2d), ("bgn", 3, BatchGroupNorm3d),
        ("gn", 2, nn.GroupNorm), ("ln", 2, nn.GroupNorm),
        ("in", 1, nn.InstanceNorm1d), ("in", 2, nn.InstanceNorm2d), ("in", 3, nn.InstanceNorm3d),
        ("pn", 2, PositionalNorm), ("none", 2, nn.Identity),
    ],
)
def test_build_norm_types_and_forward(name: str, dim: int, expected: type[nn.Module]) -> None:
    layer = build_norm(name, 48, dim=dim)
    assert type(layer) is expected
    x = torch.randn(4, 48, *([3] * dim))
    assert layer(x).shape == x.shape
    if name != "none":
        assert is_norm_layer(layer)


def test_group_norm_defaults_and_layer_norm_semantics() -> None:
    assert build_norm("gn", 64).num_groups == 32
    assert build_norm("gn", 48).num_groups == 24  # 32 reduced to a divisor of 48
    with pytest.raises(ValueError, match="num_groups=8 must divide the layer's C=20"):  # never silently 5
        build_norm("gn", 20, num_groups=8)
    assert build_norm("gn", 64, num_groups="auto").num_groups == 32
    ln = build_norm("ln", 6)
    assert ln.num_groups == 1 and ln.weight.shape == (6,)
    instance = build_norm("in", 6)
    assert instance.affine


def test_kwargs_pass_through_and_group_rules() -> None:
    bgn = build_norm("bgn", 16, num_groups=4, eps=1e-3, momentum=None)
    assert (bgn.num_groups, bgn.eps, bgn.momentum) == (4, 1e-3, None)
    assert build_norm("bgn", 16).auto_groups
    for name in ("bn", "ln", "in", "pn", "none"):
        build_norm(name, 16, num_groups="auto")  # a sweep default: accepted and ignored
        with pytest.raises(ValueError, match="has no num_groups"):
            build_norm(name, 16, num_groups=4)
    # Norms without running stats accept MAML's transductive flag.
    for name in ("gn", "ln", "pn", "none"):
        build_norm(name, 16, track_running_stats=False)
    assert build_norm("bn", 16, track_running_stats=False).running_mean is None


def test_errors_list_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'; known norms: bn, bgn, gn"):
        build_norm("batchnorm", 8)
    with pytest.raises(ValueError, match="unknown norm"):
        norm_layer("nope")
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        build_norm("bn", 8, dim=4)
    with pytest.raises(ValueError, match="num_features"):
        build_norm("bn", 0)


def test_norm_layer_fits_torchvision_and_pickles() -> None:
    factory = norm_layer("bgn", num_groups="auto")
    model = torchvision.models.resnet18(num_classes=10, norm_layer=factory)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, BatchGroupNorm2d) for m in model.modules()) == 20
    model(torch.randn(2, 3, 32, 32))
    assert pickle.loads(pickle.dumps(factory))(8).num_features == 8


def test_register_user_norm_class_and_function() -> None:
    @register_norm("test_scale_norm")
    class ScaleNorm(nn.Module):
        def __init__(self, num_features: int, eps: float = 1e-5) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(num_features))
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / (x.norm(dim=1, keepdim=True) + self.eps) * self.scale.view(1, -1, 1, 1)

    try:
        layer = build_norm("test_scale_norm", 4, eps=0.1)
        assert isinstance(layer, ScaleNorm) and layer.eps == 0.1
        assert is_norm_layer(layer)
        assert "test_scale_norm" in available_norms()
        with pytest.raises(ValueError, match="already registered"):
            register_norm("test_scale_norm")(ScaleNorm)

        @register_norm("test_scale_norm", overwrite=True)
        def make(num_features: int, dim: int, **kwargs: object) -> nn.Module:
            return nn.GroupNorm(2, num_features)

        assert isinstance(build_norm("test_scale_norm", 4), nn.GroupNorm)
    finally:
        registry_module._REGISTRY.pop("test_scale_norm", None)


def test_is_norm_layer_rejects_other_modules() -> None:
    assert not is_norm_layer(nn.Conv2d(3, 3, 1))
    assert not is_norm_layer(nn.Identity())
    assert is_norm_layer(nn.SyncBatchNorm(4))
    assert is_norm_layer(nn.LayerNorm(4))


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone after it (names and recognised norm types)."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    monkeypatch.setattr(registry_module, "_NORM_TYPES", set(registry_module._NORM_TYPES))


@pytest.mark.usefixtures("scratch_registry")
def test_factory_function_records_no_norm_type() -> None:
    """A factory returning a container must not make every such container a norm layer."""

    @register_norm("test_seq_norm")
    def make(num_features: int, dim: int, **kwargs: object) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(num_features), nn.ReLU())

    block = build_norm("test_seq_norm", 4)
    assert not is_norm_layer(block)
    assert not is_norm_layer(nn.Sequential())
    assert is_norm_layer(block[0])  # the BatchNorm inside still is one


@pytest.mark.usefixtures("scratch_registry")
def test_factory_function_types_recognised_by_class() -> None:
    class Unregistered(nn.Module):
        def __init__(self, num_features: int) -> None:
            super().__init__()
            self.num_features = num_features

    class Declared(Unregistered):
        pass

    @register_norm("test_known_class")  # returns a class the registry already owns
    def make_gn(num_features: int, dim: int, **kwargs: object) -> nn.Module:
        return nn.GroupNorm(1, num_features)

    @register_norm("test_unknown_class")
    def make_unregistered(num_features: int, dim: int, **kwargs: object) -> nn.Module:
        return Unregistered(num_features)

    @register_norm("test_declared_class", norm_types=[Declared])
    def make_declared(num_features: int, dim: int, **kwargs: object) -> nn.Module:
        return Declared(num_features)

    assert is_norm_layer(build_norm("test_known_class", 4))
    assert not is_norm_layer(build_norm("test_unknown_class", 4))
    assert is_norm_layer(build_norm("test_declared_class", 4))
    assert not is_norm_layer(Unregistered(4))  # declaring a subclass does not cover its base


def test_norm_types_must_be_module_classes() -> None:
    with pytest.raises(TypeError, match=r"norm_types entries must be nn.Module subclasses, got 'x'"):
        register_norm("test_bad_types", norm_types=("x",))
    with pytest.raises(TypeError, match="got <class 'int'>"):
        register_norm("test_bad_types", norm_types=(int,))
    assert "test_bad_types" not in available_norms()


def test_user_norm_without_shared_arguments_works_in_sweeps() -> None:
    """The README's promise: every registry norm takes num_groups="auto" and track_running_stats."""
    from bgn_lightning.registry import _REGISTRY

    class MyNorm(nn.Module):
        def __init__(self, num_features: int, eps: float = 1e-5) -> None:
            super().__init__()
            self.eps = eps

    register_norm("test_plain_norm")(MyNorm)
    try:
        layer = build_norm("test_plain_norm", 8, num_groups="auto", track_running_stats=False, eps=1e-3)
        assert isinstance(layer, MyNorm) and layer.eps == 1e-3
        with pytest.raises(ValueError, match=r"test_plain_norm: has no num_groups to set \(got num_groups=4"):
            build_norm("test_plain_norm", 8, num_groups=4)
        with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'"):
            build_norm("test_plain_norm", 8, momentum=0.1)  # a real mistake still fails
    finally:
        _REGISTRY.pop("test_plain_norm")


def test_gn_explicit_groups_must_divide_channels() -> None:
    assert build_norm("gn", 48).num_groups == 24  # auto: 32 reduced to a divisor
    assert build_norm("gn", 48, num_groups=16).num_groups == 16
    with pytest.raises(ValueError, match="gn: num_groups=7 must divide the layer's C=48; valid: 1, 2, 3, 4"):
        build_norm("gn", 48, num_groups=7)
