"""Normalization layers: :class:`BatchGroupNorm` (+ 1d/2d/3d) and :class:`PositionalNorm`."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (
    RunningStatsFrom,
    _batch_group_norm,
    auto_num_groups,
    check_norm_batch_size,
    check_num_groups,
    check_running_stats_from,
)

__all__ = [
    "BatchGroupNorm",
    "BatchGroupNorm1d",
    "BatchGroupNorm2d",
    "BatchGroupNorm3d",
    "NormBatchSize",
    "PositionalNorm",
]

NumGroups = int | Literal["auto"]


class NormBatchSize:
    """The ``norm_batch_size`` (ghost batches) of a layer with batch statistics: checked when set.

    Shared by :class:`BatchGroupNorm` and :mod:`bgn_lightning.ghost`'s BatchNorms; what ``b`` means
    is described there.
    """

    _norm_batch_size: int | None = None
    running_stats_from: RunningStatsFrom = "first"

    def _init_norm_batch_size(self, norm_batch_size: int | None,
                              running_stats_from: RunningStatsFrom) -> None:
        check_running_stats_from(running_stats_from, type(self).__name__)
        self.norm_batch_size = norm_batch_size
        self.running_stats_from = running_stats_from

    @property
    def norm_batch_size(self) -> int | None:
        """``b``: samples per set of batch statistics in training (ghost batches); ``None``: the batch."""
        return self._norm_batch_size

    @norm_batch_size.setter
    def norm_batch_size(self, value: int | None) -> None:
        check_norm_batch_size(value, type(self).__name__)
        self._norm_batch_size = value

    def statistics_batch_size(self, batch_size: int) -> int:
        """The samples one set of training statistics covers for a batch of ``batch_size``: ``min(b, N)``."""
        b = self._norm_batch_size
        return batch_size if b is None else min(b, batch_size)

    def _ghost_repr(self) -> str:
        """``", norm_batch_size=2, running_stats_from='first'"`` when ``b`` is set, else ``""``."""
        if self._norm_batch_size is None:
            return ""
        return f", norm_batch_size={self._norm_batch_size}, running_stats_from={self.running_stats_from!r}"


class BatchGroupNorm(NormBatchSize, nn.Module):
    """Batch Group Normalization (Zhou et al., 2020) for inputs of shape ``(N, C, *S)``.

    The flattened ``(C, *S)`` features of each sample are split into ``G`` contiguous groups;
    each group is normalized with the mean and biased variance of its values over the whole
    batch, then a per-channel affine transform is applied (``C`` weights and biases, like
    BatchNorm). ``G = C`` is BatchNorm; ``N = 1, G = 1`` is ``GroupNorm(1, C)``.

    Args:
        num_features: ``C``.
        num_groups: ``G`` or ``"auto"``. Auto fixes ``G`` at the first training forward as the
            valid value closest to ``C * N / reference_batch_size`` (see
            :func:`bgn_lightning.functional.auto_num_groups`); the choice is shown in ``repr``,
            saved in the ``state_dict`` and restored by ``load_state_dict``.
        eps: added to the variance.
        momentum: running-statistics factor; ``None`` for a cumulative moving average.
        affine: learn a per-channel weight and bias.
        track_running_stats: keep ``G`` running means/variances and use them in eval mode.
        reference_batch_size: the batch size whose statistics auto-``G`` imitates.
        norm_batch_size: ``b``, ghost batches: in training, every run of ``b`` consecutive samples
            is normalized with its own statistics (the last run is smaller when ``b`` does not
            divide the batch), which is what each of ``N / b`` devices with ``b`` samples computes
            without synchronized statistics: the paper's per-device batch. ``None`` (default): the
            whole batch. Auto-``G`` follows ``b``. Eval mode is unchanged. Settable later
            (:func:`bgn_lightning.set_norm_batch_size` sets it on a whole model).
        values_per_statistic: auto-``G`` targets this many values per statistic in every layer
            (``G = b * D / V``, the valid ``G`` closest on a log scale) instead of following
            ``reference_batch_size``; ``None``: the reference-batch rule.
        running_stats_from: with ghost batches, what the running statistics follow: ``"first"``
            (the first run's statistics: what DDP's default buffer broadcast keeps, the first
            device's) or ``"mean"`` (the mean over runs of each run's mean and unbiased variance).

    Not a subclass of torch's ``_BatchNorm``, so tools that turn every ``_BatchNorm`` into
    ``SyncBatchNorm`` leave it alone; use :func:`bgn_lightning.is_norm_layer` to find norm layers.
    """

    _expected_dims: tuple[int, ...] | None = None

    def __init__(
        self,
        num_features: int,
        num_groups: NumGroups = "auto",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        reference_batch_size: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        norm_batch_size: int | None = None,
        running_stats_from: RunningStatsFrom = "first",
        values_per_statistic: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self._init_norm_batch_size(norm_batch_size, running_stats_from)
        if values_per_statistic is not None and (
            isinstance(values_per_statistic, bool) or not isinstance(values_per_statistic, int)
            or values_per_statistic < 2
        ):
            raise ValueError(
                f"{name}: values_per_statistic must be an int >= 2 or None, got {values_per_statistic!r}"
            )
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if num_groups != "auto":
            check_num_groups(num_groups, num_features, num_features * num_groups, name)
        if isinstance(reference_batch_size, bool) or not isinstance(reference_batch_size, int) \
                or reference_batch_size < 1:
            raise ValueError(
                f"{name}: reference_batch_size must be a positive int, got {reference_batch_size!r}"
            )
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        if eps <= 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.auto_groups = num_groups == "auto"
        self.num_groups: int | None = None if self.auto_groups else int(num_groups)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.reference_batch_size = reference_batch_size
        self.values_per_statistic = values_per_statistic
        # D = C*prod(S) seen in training when the group layout depends on the spatial size
        # (G does not divide C): the running statistics are then tied to that size.
        self.feature_numel: int | None = None
        # (input shape[1:], training, G, feature_numel) last validated, and its D: inputs like it
        # skip the checks (per-call overhead, see benchmarks/norm_speed.py).
        self._validated: tuple[tuple[Any, ...], int] | None = None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            g = self.num_groups or 0  # empty until auto-G is fixed
            self.register_buffer("running_mean", torch.zeros(g, **factory))
            self.register_buffer("running_var", torch.ones(g, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- state -------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Zero the running means, set running variances to one and the batch counter to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, weight to ones and bias to zeros."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _set_num_groups(self, num_groups: int) -> None:
        """Fix ``G`` (auto mode) and size the running buffers in place.

        In-place ``resize_`` keeps the buffer objects, so wrappers holding references to them
        (DDP's buffer broadcast) stay valid.
        """
        self.num_groups = num_groups
        if self.track_running_stats:
            self.running_mean.resize_(num_groups).zero_()
            self.running_var.resize_(num_groups).fill_(1)

    def _adopt_shared_num_groups(self) -> None:
        """Take ``G`` from the running buffers when a copy sharing them has fixed it.

        learn2learn's ``clone_module`` (MAML) copies a layer's ``__dict__`` but shares its buffer
        tensors: the clone fixes ``G`` in its own ``__dict__`` and sizes the shared buffers in
        place. The original (and every later clone) must then use that ``G`` and those
        statistics, not fix ``G`` again (which would reset them) or act as if untrained.
        """
        if self.num_groups is None and self.track_running_stats and self.running_mean.numel():
            self.num_groups = self.running_mean.numel()

    def fix_num_groups(self, batch_size: int, feature_numel: int) -> int:
        """Return ``G``, fixing it first (auto mode) for a batch of this size and feature size.

        Called by :meth:`forward` on the first batch that needs statistics (with the samples one
        set of statistics covers: ``b`` under ghost batches); a fixed ``G`` is returned unchanged.

        Args:
            batch_size: the samples one set of statistics covers.
            feature_numel: ``D = C * prod(S)`` of one sample.
        """
        self._adopt_shared_num_groups()
        if self.num_groups is None:
            self._set_num_groups(
                auto_num_groups(batch_size, self.num_features, feature_numel, self.reference_batch_size,
                                self.values_per_statistic)
            )
        return self.num_groups

    def get_extra_state(self) -> dict[str, Any]:
        """The chosen ``G`` and the feature size the running statistics are tied to."""
        self._adopt_shared_num_groups()
        return {"num_groups": self.num_groups, "feature_numel": self.feature_numel}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved (``G`` is already fixed by then)."""
        self.feature_numel = state.get("feature_numel")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        extra_key = prefix + "_extra_state"
        saved_groups = None
        if extra_key in state_dict:
            saved_groups = state_dict[extra_key].get("num_groups")
        if saved_groups is None and self.track_running_stats and prefix + "running_mean" in state_dict:
            saved_groups = state_dict[prefix + "running_mean"].numel() or None
        if saved_groups is not None and saved_groups != self.num_groups:
            if self.auto_groups:
                self._set_num_groups(int(saved_groups))
            else:
                error_msgs.append(
                    f"{type(self).__name__} {prefix!r}: checkpoint has num_groups={saved_groups}, "
                    f"the layer was built with num_groups={self.num_groups}"
                )
                return
        n_missing = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A plain BatchNorm state dict has no extra state: loading one (G = C) is fine.
        if extra_key in missing_keys[n_missing:]:
            missing_keys.remove(extra_key)

    # -- forward -----------------------------------------------------------------------------
    def _check_input_dim(self, x: Tensor) -> None:
        if self._expected_dims is not None and x.dim() not in self._expected_dims:
            want = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(
                f"{type(self).__name__}: expected {want} input, got shape {tuple(x.shape)}"
            )
        if x.dim() < 2:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape (N, C, *S), got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` of shape ``(N, C, *S)``."""
        name = type(self).__name__
        if self.num_groups is None:
            self._adopt_shared_num_groups()
        key = (x.shape[1:], self.training, self.num_groups, self.feature_numel)
        if self._validated is not None and self._validated[0] == key:
            g, d = self.num_groups, self._validated[1]
        else:
            self._check_input_dim(x)
            if x.shape[1] != self.num_features:
                raise ValueError(
                    f"{name}: input has C={x.shape[1]} channels (shape {tuple(x.shape)}), "
                    f"the layer was built with num_features={self.num_features}"
                )
            d = math.prod(x.shape[1:])
            use_batch_stats = self.training or not self.track_running_stats
            if self.num_groups is None and not use_batch_stats:
                # Eval before any training step: no statistics exist yet; behave like a
                # freshly initialised BatchNorm in eval mode (running mean 0, variance 1).
                zeros = x.new_zeros(self.num_features)
                return F.batch_norm(x, zeros, torch.ones_like(zeros), self.weight, self.bias,
                                    False, 0.0, self.eps)
            g = self.fix_num_groups(self.statistics_batch_size(x.shape[0]), d)
            if d % g or (g > self.num_features and g % self.num_features):  # format only on error
                check_num_groups(g, self.num_features, d, f"{name} (input {tuple(x.shape)})")
            if self.track_running_stats and self.num_features % g != 0:
                if self.feature_numel is None and self.training:
                    self.feature_numel = d
                elif self.feature_numel is not None and self.feature_numel != d:
                    raise ValueError(
                        f"{name}: num_groups={g} does not divide C={self.num_features}, so the "
                        f"running statistics belong to inputs with C*prod(S)={self.feature_numel}; "
                        f"got input {tuple(x.shape)} (C*prod(S)={d}). Use the training spatial size, "
                        f"or a num_groups that divides C"
                    )
            self._validated = ((x.shape[1:], self.training, g, self.feature_numel), d)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return self._normalize(x, g, d, name)

    def _normalize(self, x: Tensor, num_groups: int, feature_numel: int, name: str) -> Tensor:
        """Apply the op to a validated input (``SyncBatchGroupNorm`` applies the synchronized one)."""
        return _batch_group_norm(
            x,
            num_groups=num_groups,
            feature_numel=feature_numel,
            running_mean=self.running_mean if self.track_running_stats else None,
            running_var=self.running_var if self.track_running_stats else None,
            weight=self.weight,
            bias=self.bias,
            training=self.training or not self.track_running_stats,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked,
            where=name,
            chunk=self._norm_batch_size if self.training else None,
            running_average=self.running_stats_from == "mean",
        )

    def extra_repr(self) -> str:
        if self.num_groups is None:
            groups = "auto (fixed at the first training batch)"
        else:
            groups = f"{self.num_groups}" + (" (auto)" if self.auto_groups else "")
        ghost = self._ghost_repr()
        if self.values_per_statistic is not None:
            ghost += f", values_per_statistic={self.values_per_statistic}"
        return (
            f"{self.num_features}, num_groups={groups}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}{ghost}"
        )


class BatchGroupNorm1d(BatchGroupNorm):
    """:class:`BatchGroupNorm` for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _expected_dims = (2, 3)


class BatchGroupNorm2d(BatchGroupNorm):
    """:class:`BatchGroupNorm` for ``(N, C, H, W)`` inputs."""

    _expected_dims = (4,)


class BatchGroupNorm3d(BatchGroupNorm):
    """:class:`BatchGroupNorm` for ``(N, C, D, H, W)`` inputs."""

    _expected_dims = (5,)


class PositionalNorm(nn.Module):
    """Positional Normalization (Li et al., 2019): normalize over channels at each position.

    For ``(N, C, *S)`` inputs, every position of every sample gets the mean and variance of its
    ``C`` values; a per-channel affine transform follows. Computed with the native layer-norm
    kernel on a channels-last view.

    Args:
        num_features: ``C``.
        eps: added to the variance.
        affine: learn a per-channel weight and bias.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"PositionalNorm: num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` of shape ``(N, C, *S)`` over ``C`` at every position."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"PositionalNorm: expected input (N, {self.num_features}, *S), got {tuple(x.shape)}"
            )
        y = F.layer_norm(x.movedim(1, -1), (self.num_features,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
