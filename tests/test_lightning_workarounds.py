"""What bgn_lightning._lightning relies on inside Lightning, in both namespaces; and the light import.

Each test names the Lightning behaviour a workaround depends on, so a Lightning upgrade that
changes it fails here first, with the reason, instead of somewhere inside NormSwap.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bgn_lightning import _lightning

NAMESPACES = [pytest.param(ns, id=ns) for ns in _lightning.NAMESPACES]


def _recording_module(pl, calls: list[str]):
    class Recording(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 1)

        def setup(self, stage: str) -> None:
            calls.append("setup")

        def configure_model(self) -> None:
            calls.append("configure_model")

        def configure_optimizers(self):
            calls.append("configure_optimizers")
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def on_load_checkpoint(self, checkpoint) -> None:
            calls.append("on_load_checkpoint")

        def load_state_dict(self, *args, **kwargs):
            calls.append("load_state_dict")
            return super().load_state_dict(*args, **kwargs)

    return Recording


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_shadowed_configure_model_runs_once_before_the_optimizer(namespace, tmp_path):
    """NormSwap converts right after configure_model: Lightning must call the instance attribute."""
    pl = importlib.import_module(namespace)
    calls: list[str] = []
    model = _recording_module(pl, calls)()

    class Install(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            _lightning.call_once_around(pl_module, "configure_model", after=lambda: calls.append("after"))

    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[Install()], default_root_dir=tmp_path).fit(model, data)
    assert calls == ["setup", "configure_model", "after", "configure_optimizers"]
    assert "configure_model" not in vars(model)  # the shadow removed itself
    assert _lightning.is_overridden("configure_model", model)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_load_from_checkpoint_calls_on_load_checkpoint_before_the_weights(namespace, tmp_path):
    """NormSwap.load_model and its instantiator convert in on_load_checkpoint, before load_state_dict."""
    pl = importlib.import_module(namespace)
    calls: list[str] = []
    cls = _recording_module(pl, calls)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": cls().state_dict(), "hyper_parameters": {},
                "pytorch-lightning_version": pl.__version__}, path)
    calls.clear()
    loaded = _lightning.load_with_hook(cls, path, lambda model, ckpt: calls.append("hook"))
    assert type(loaded) is cls
    assert calls[:4] == ["configure_model", "hook", "on_load_checkpoint", "load_state_dict"]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_the_instantiator_allow_list_is_a_set_that_holds_ours(namespace):
    saving = importlib.import_module(f"{namespace}.core.saving")
    assert isinstance(saving._ALLOWED_INSTANTIATORS, set)
    _lightning.allow_instantiator(_lightning.INSTANTIATOR)
    assert _lightning.INSTANTIATOR in saving._ALLOWED_INSTANTIATORS


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_layer_sync_is_an_abc_that_takes_virtual_subclasses(namespace):
    from bgn_lightning import BGNSync

    plugin = BGNSync()
    assert isinstance(plugin, importlib.import_module(f"{namespace}.plugins").LayerSync)


def test_the_core_imports_torch_and_nothing_else():
    heavy = ("lightning", "pytorch_lightning", "torchattacks", "learn2learn", "timm", "torchvision")
    code = ("import sys; from bgn_lightning import BatchGroupNorm2d, convert_norms, norm_layer; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import bgn_lightning, sys; bgn_lightning.NormSwap; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
