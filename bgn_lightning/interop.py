"""Make other tools treat every norm layer (BGN included) the way they treat BatchNorm.

BGN is deliberately not a subclass of torch's ``_BatchNorm`` (see :class:`BatchGroupNorm`), so
tools that find "batch norm" by ``isinstance(m, _BatchNorm)`` or by class name skip it. This
module finds norm layers with :func:`bgn_lightning.is_norm_layer` instead:

* :func:`set_norm_mode` / :func:`norm_mode`: put every norm layer into train or eval mode and
  leave every other module alone (attack generation, AdaBN);
* :func:`norm_aware_attack`: torchattacks' ``set_model_training_mode(batchnorm_training=...)``
  for every norm layer, not only classes named ``*BatchNorm*``;
* :func:`keeps_running_stats`: which layers SWA's statistics pass and AdaBN must recompute
  (:class:`bgn_lightning.NormAwareSWA`, in :mod:`bgn_lightning.swa`, is Lightning's SWA using it).

Only torch is imported here; torchattacks is imported when :func:`norm_aware_attack` is called.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from .registry import is_norm_layer

if TYPE_CHECKING:
    from torchattacks.attack import Attack

__all__ = ["keeps_running_stats", "norm_aware_attack", "norm_mode", "set_norm_mode"]

AttackT = TypeVar("AttackT", bound="Attack")

_Modes = list[tuple[nn.Module, bool]]


def _check_model_and_mode(who: str, model: Any, train: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(train, bool):
        raise TypeError(f"{who}: train must be True or False, got {train!r}")


def _module_modes(model: nn.Module) -> _Modes:
    return [(module, module.training) for module in model.modules()]


def _restore_modes(modes: _Modes) -> None:
    for module, training in modes:
        module.training = training


def set_norm_mode(model: nn.Module, train: bool) -> list[nn.Module]:
    """Put every norm layer of ``model`` into training (``train=True``) or eval mode.

    Norm layers are the modules :func:`bgn_lightning.is_norm_layer` recognises (BatchNorm,
    BatchGroupNorm, GroupNorm, InstanceNorm, PositionalNorm, ...), ``model`` itself included;
    each is switched with ``layer.train(train)``. No other module's mode changes.

    Args:
        model: the model (any ``nn.Module``, e.g. a LightningModule).
        train: the mode to put the norm layers into.

    Returns:
        The norm layers whose mode changed (those that were in the other mode), in
        ``model.modules()`` order; ``layer.train(not train)`` on each undoes the call. Use
        :func:`norm_mode` to have it undone for you.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``train`` is not a bool.

    Example::

        model.eval()
        set_norm_mode(model, True)   # AdaBN: norm layers collect target-domain statistics
    """
    _check_model_and_mode("set_norm_mode", model, train)
    changed = [module for module in model.modules() if is_norm_layer(module) and module.training != train]
    for module in changed:
        module.train(train)
    return changed


@contextmanager
def norm_mode(model: nn.Module, train: bool) -> Iterator[list[nn.Module]]:
    """Context manager: norm layers in training or eval mode inside the block, as before after it.

    On entry it calls :func:`set_norm_mode` and yields the layers that call changed; on exit,
    also when the block raises, every module of ``model`` gets back the ``training`` flag it had
    on entry, including modules whose mode the block itself changed (e.g. by ``model.eval()``).

    Args:
        model: the model (any ``nn.Module``).
        train: the mode the norm layers have inside the block.

    Yields:
        The norm layers whose mode was changed on entry.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``train`` is not a bool.

    Example::

        with torch.no_grad(), norm_mode(model, train=False):
            logits = model(x)        # other modules (e.g. dropout) keep their own mode
    """
    _check_model_and_mode("norm_mode", model, train)
    modes = _module_modes(model)
    try:
        yield set_norm_mode(model, train)
    finally:
        _restore_modes(modes)


def norm_aware_attack(attack: AttackT) -> AttackT:
    """Make a torchattacks attack switch every norm layer the way it switches BatchNorm.

    torchattacks' ``attack.set_model_training_mode(model_training, batchnorm_training,
    dropout_training)`` decides what a "batchnorm" is by the class name containing
    ``"BatchNorm"``, so with ``model_training=True, batchnorm_training=False`` a
    :class:`BatchGroupNorm2d` (or GroupNorm, InstanceNorm, ...) stays in training mode during the
    attack and its running statistics are updated by the attack's forwards. This function
    patches ``attack`` in place (and the attacks it holds, e.g. a ``MultiAttack``'s) so that,
    for each call of the attack:

    * on entry: with ``model_training=False`` (torchattacks' default) the whole model is put in
      eval mode, as torchattacks does; with ``model_training=True`` the model is put in training
      mode, then every :func:`bgn_lightning.is_norm_layer` module into
      ``batchnorm_training``'s mode and, unless ``dropout_training``, every module whose class
      name contains ``"Dropout"`` into eval mode (torchattacks' own dropout rule, unchanged);
    * on exit: every module gets back the mode it had before the call. (torchattacks itself
      only calls ``model.train()`` again when the model was training, which also switches
      modules that were in eval mode before — e.g. frozen norm layers — to training, and leaves
      a model that was in eval mode in training mode after a ``model_training=True`` attack.)
    * the targeted modes' label choice (``get_output_with_eval_nograd``) runs the model in eval
      mode and then restores each module's mode, instead of ending with ``model.train()``,
      which would put the norm layers back into training mode in the middle of the attack.

    Args:
        attack: a ``torchattacks.Attack`` (PGD, FGSM, MultiAttack, ...); call
            ``set_model_training_mode`` on it before or after, as usual.

    Returns:
        ``attack`` itself (patched), so calls can be chained. Patching twice is harmless.

    Raises:
        TypeError: if ``attack`` is not a ``torchattacks.Attack``.

    Example::

        atk = norm_aware_attack(torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10))
        atk.set_model_training_mode(model_training=True, batchnorm_training=False)
        x_adv = atk(x, y)    # BGN layers run in eval mode; their running stats stay untouched
    """
    from torchattacks.attack import Attack

    if not isinstance(attack, Attack):
        raise TypeError(f"norm_aware_attack: expected a torchattacks.Attack, got {type(attack).__name__}")
    attacks = {id(atk): atk for atk in (attack, *attack._attacks.values())}
    for atk in attacks.values():
        _patch_attack_modes(atk)
    return attack


def _patch_attack_modes(atk: Attack) -> None:
    """Replace ``atk``'s three mode-switching methods with norm-aware, per-module-restoring ones.

    The replacements keep torchattacks' signatures (``given_training`` is not needed: the modes
    saved on entry say more).
    """
    entry: dict[str, _Modes] = {}  # the modes on entry to the current call

    def change_model_mode(given_training: bool) -> None:
        model = atk.model
        entry["modes"] = _module_modes(model)
        if not atk._model_training:
            model.eval()
            return
        model.train()
        set_norm_mode(model, atk._batchnorm_training)
        if not atk._dropout_training:
            for module in model.modules():
                if "Dropout" in type(module).__name__:
                    module.eval()

    def recover_model_mode(given_training: bool) -> None:
        if "modes" in entry:
            _restore_modes(entry.pop("modes"))

    def get_output_with_eval_nograd(inputs: Tensor) -> Tensor:
        modes = _module_modes(atk.model)
        try:
            atk.model.eval()
            with torch.no_grad():
                return atk.get_logits(inputs)
        finally:
            _restore_modes(modes)

    # object.__setattr__: Attack.__setattr__ scans every value it is given for nested attacks.
    object.__setattr__(atk, "_change_model_mode", change_model_mode)
    object.__setattr__(atk, "_recover_model_mode", recover_model_mode)
    object.__setattr__(atk, "get_output_with_eval_nograd", get_output_with_eval_nograd)


def keeps_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer that keeps running statistics (BN, BGN, tracked IN, ...).

    Those are the layers whose statistics SWA's final pass and AdaBN must recompute: an
    :func:`~bgn_lightning.is_norm_layer` module with a ``running_mean`` tensor, a ``momentum`` and
    ``reset_running_stats()``.
    """
    return (
        is_norm_layer(module)
        and isinstance(getattr(module, "running_mean", None), Tensor)
        and hasattr(module, "momentum")
        and callable(getattr(module, "reset_running_stats", None))
    )
