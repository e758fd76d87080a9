"""NormSwap under real 2-process CPU DDP (gloo), launched the way users run it: a script with
``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` that Lightning re-launches per rank."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bgn_lightning import BatchGroupNorm2d, NormSwap

SCRIPT = textwrap.dedent(
    '''
    import importlib
    import json
    import sys
    from pathlib import Path

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    pl = importlib.import_module(sys.argv[3])  # lightning.pytorch or pytorch_lightning

    from bgn_lightning import BGNSync, NormSwap, is_norm_layer

    out = Path(sys.argv[1])
    sync = sys.argv[2] == "sync"
    plugins = [BGNSync()] if sys.argv[2] == "plugin" else []


    class Net(pl.LightningModule):
        def __init__(self, width: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3),
            )
            # pretrained-looking BN statistics, to be pooled when auto-G is fixed
            self.net[1].running_mean.uniform_(-1, 1)
            self.net[1].running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def on_train_start(self):
            self.wrapped = type(self.trainer.strategy.model).__name__

        def configure_optimizers(self):
            self.optimized = [id(p) for p in self.parameters()]
            return torch.optim.SGD(self.parameters(), lr=0.1)


    if __name__ == "__main__":
        pl.seed_everything(0)
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 3, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
        model = Net()
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out, filename="last")
        trainer = pl.Trainer(
            strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
            enable_progress_bar=False, enable_model_summary=False, plugins=plugins, callbacks=[
                NormSwap("bgn", sync=sync, num_groups="auto"), checkpoint],
        )
        trainer.fit(model, DataLoader(data, batch_size=8))
        norm = model.net[1]
        rank = trainer.global_rank
        report = {
            "world_size": trainer.world_size,
            "wrapped": model.wrapped,
            "norm_type": type(norm).__name__,
            "is_norm": is_norm_layer(norm),
            "batchnorm_left": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
            "num_groups": norm.num_groups,
            "optimizer_is_model": model.optimized == [id(p) for p in model.parameters()],
            "steps": trainer.global_step,
        }
        tensors = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save(tensors, out / f"rank{rank}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps(report))
    '''
)


def run_ddp(tmp_path, mode: str, namespace: str = "lightning.pytorch") -> list[dict]:
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, str(script), str(tmp_path), mode, namespace], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def check_ddp_run(tmp_path, reports: list[dict], norm_type: str, groups: int = 2) -> None:
    for report in reports:
        assert report["world_size"] == 2
        assert report["wrapped"] == "DistributedDataParallel"
        assert report["norm_type"] == norm_type and report["is_norm"]
        assert not report["batchnorm_left"]
        assert report["optimizer_is_model"]
        assert report["num_groups"] == groups  # auto: C * N / 32 = 8 * 8 / 32, fixed after the DDP wrap
        assert report["steps"] == 4  # 32 samples / 2 ranks / batch 8, 2 epochs
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in states[0].items():
        if "running" not in key:  # running stats are per rank after the last local batch
            torch.testing.assert_close(states[1][key], value, msg=key)
    assert not torch.equal(states[0]["net.1.weight"], torch.ones(8))
    # the checkpoint rebuilds the swapped model in this (single) process
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["NormSwap"]["kwargs"] == {"num_groups": "auto"}
    assert ckpt["state_dict"]["net.1.running_mean"].shape == (groups,)


def test_ddp_fit_with_auto_groups(tmp_path):
    reports = run_ddp(tmp_path, "plain")
    check_ddp_run(tmp_path, reports, "BatchGroupNorm2d")
    swap = NormSwap.from_checkpoint(tmp_path / "last.ckpt")
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(8))
    swap.convert(model)
    state = torch.load(tmp_path / "last.ckpt")["state_dict"]
    model[0].load_state_dict({k[len("net.1."):]: v for k, v in state.items() if k.startswith("net.1.")})
    assert isinstance(model[0], BatchGroupNorm2d) and model[0].num_groups == 2


@pytest.mark.skipif(importlib.util.find_spec("bgn_lightning.sync") is None,
                    reason="bgn_lightning.sync (SyncBatchGroupNorm) is not in the tree yet")
def test_ddp_fit_with_sync_batchgroupnorm(tmp_path):
    reports = run_ddp(tmp_path, "sync")
    # synchronized statistics pool both ranks' batches: auto-G sees the global batch, 8 * 16 / 32
    check_ddp_run(tmp_path, reports, reports[0]["norm_type"], groups=4)
    assert reports[0]["norm_type"] != "BatchGroupNorm2d"


def test_ddp_in_a_pytorch_lightning_trainer_with_the_bgnsync_plugin(tmp_path):
    """The ``pytorch_lightning`` copy of Lightning takes NormSwap and BGNSync (its own LayerSync check)."""
    pytest.importorskip("pytorch_lightning")
    reports = run_ddp(tmp_path, "plugin", namespace="pytorch_lightning")
    # auto-G saw the global batch (8 * 16 / 32): the statistics were synchronized while fitting;
    # like Lightning's sync_batchnorm, the plugin reverts the layers when fitting ends
    check_ddp_run(tmp_path, reports, "BatchGroupNorm2d", groups=4)
