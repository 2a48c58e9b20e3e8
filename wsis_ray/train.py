"""The one Ray Train launcher every trained network goes through (CAM, affinity, MIL, SS, IS).

A network's module provides `train_loop_per_worker(config: dict)` that reads like plain
PyTorch; inside it, `restore()` returns the last checkpointed state (Train V2 resumes through
`ray.train.get_checkpoint()`, there is no `resume_from_checkpoint`), and `report()` reports
metrics and, when given a state, a checkpoint. `fit()` wraps it in a `TorchTrainer`, so a
user scales from one CPU process to a GPU cluster by changing `TrainConfig` only.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch

from wsis_ray.config import TrainConfig

STATE_FILE = "state.pt"


def fit(train_loop: Callable[[dict], None], loop_config: dict[str, Any], cfg: TrainConfig,
        name: str, storage_path: str):
    """Run `train_loop` under a TorchTrainer; returns the ray.train.Result.

    num_workers=0 runs the loop in the driver process (local mode, for debugging).
    A worker that dies is replaced up to `cfg.max_failures` times and the loop resumes
    from its last checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def restore() -> dict[str, Any] | None:
    """The state saved by the last `report(..., state=...)` of this run, or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    """Report metrics from every worker (a barrier: all call it equally often); rank 0
    attaches a checkpoint of `state` when one is given."""
    import ray.train
    from ray.train import Checkpoint

    rank = ray.train.get_context().get_world_rank()
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save(state, os.path.join(d, STATE_FILE))
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def load_result_state(result) -> dict[str, Any]:
    """The final state saved by a finished `fit()`."""
    if result.checkpoint is None:
        raise RuntimeError(f"training run {result.path} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
