"""A multi-node ``bgn-task`` run: two "nodes" x one CPU process on localhost, launched by torchrun
(Lightning's ``TorchElasticEnvironment``), with ``--sync-norm``: BGN's statistics see the global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from bgn_lightning.functional import auto_num_groups

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "classification", "--accelerator", "cpu", "--devices", "1", "--trainer.num_nodes", "2",
    "--trainer.strategy", "ddp", "--sync-norm", "--batch-size", "4", "--max-epochs", "1",
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--threads", "1",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_pool_bgn_statistics_over_the_global_batch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    nodes = []
    for rank in (0, 1):  # two torchrun agents, one per "node", as two machines would run them
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                    str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                    str(port)]  # fmt: skip
        command = [*torchrun, "-m", "tasks.runner.cli", *RUN, "--output", str(out)]
        nodes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["distributed"] == {
        "world_size": 2, "num_nodes": 2, "devices_per_node": 1, "global_batch_size": 8,
        "sync_norm": True, "cluster_environment": "TorchElasticEnvironment",
    }  # fmt: skip
    assert "norm statistics: synchronised across 2 processes" in logs[0]
    # auto-G was fixed at the first training forward from the batch its statistics saw: the
    # global one (2 x 4), not one node's 4
    name, groups = next(iter(record["num_groups"]["per_layer"].items()))
    state = torch.load(record["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    channels = state[f"{name}.weight"].numel()
    numel = channels * 8 * 8  # the first norm layer sees the 8 x 8 digits at full resolution
    assert auto_num_groups(8, channels, numel) != auto_num_groups(4, channels, numel)
    assert groups == auto_num_groups(8, channels, numel)
    assert state[f"{name}.running_mean"].numel() == groups
