"""The one Ray Train launcher every trained network goes through (CAM, affinity, MIL, SS, IS).

A network's module provides `train_loop_per_worker(config: dict)` that reads like plain
PyTorch; inside it, `restore()` returns the last checkpointed state (Train V2 resumes through
`ray.train.get_checkpoint()`, there is no `resume_from_checkpoint`), and `report()` reports
metrics and, when given a state, a checkpoint. `fit()` wraps it in a `TorchTrainer`, so a
user scales from one CPU process to a GPU cluster by changing `TrainConfig` only.

Fault tolerance: `FailureConfig(max_failures)` replaces a dead worker group and the loop
starts again from `restore()`, i.e. from the last `report(..., state)`; the loops draw their
batches with `branches.common.step_batches`, so the resumed run trains on what the
uninterrupted one would have. Workers die for real, and also on a Ray 2.60 without a State
API: its PlacementGroupCleaner then took an empty answer for a dead controller and removed
the live run's placement group (docs/results-history.md, 2026-11-30 late night); a local
Ray started with `start_local_ray()` serves that API.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from wsis_ray.config import TrainConfig

STATE_FILE = "state.pt"

# Local mode (num_workers=0) keeps only an in-memory pointer to the last checkpoint
# directory, so `report()` must not hand it a temporary directory; `fit()` sets this.
_LOCAL_CHECKPOINT_ROOT: str | None = None


def start_local_ray(**init_kwargs: Any) -> None:
    """Start a local Ray whose processes reach its own State API (`init_kwargs` go to
    `ray.init`: num_cpus, log_to_driver, ...).

    Ray Train starts one PlacementGroupCleaner per run; every second it asks the State API
    (served by the dashboard) whether the Train controller is alive, to free the run's
    placement group if it is not. Without a dashboard that question fails: a warning every
    ~2 s of every training (1,247 lines in one MIL step), the cleaner's thread dies of
    "multiple active Ray instances" when a second local Ray runs on the machine, and an
    empty answer, wherever the query landed, is taken for a dead controller: the cleaner
    removes the live run's placement group, killing its worker mid-step (seen twice). So
    the local Ray gets its dashboard, on a free loopback port, and RAY_API_SERVER_ADDRESS,
    set before `ray.init` so that the raylet and every worker inherit it, points the State
    API client at that port rather than at whichever Ray it would find first.

    Ray Train's preemption watcher (an actor per training that polls for node drains, i.e.
    spot preemption on a cluster) has nothing to watch on one machine, and its creation
    logs a core-worker error line in every training (ray-project/ray#53727): off here,
    unless RAY_TRAIN_ENABLE_PREEMPTION_WATCHER says otherwise. Clusters keep it."""
    import socket

    import ray

    with socket.socket() as s:  # a free port; the dashboard binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, **init_kwargs)


def _abs_storage(storage_path: str) -> str:
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


def _progress_callback(name: str):
    """A Train callback that prints one progress line per report on the driver side
    (it runs in the Train controller, whose output Ray forwards to the driver)."""
    from ray.train import UserCallback

    class Progress(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            print(progress_line(name, metrics[0] if metrics else {}), flush=True)

    return Progress()


def progress_line(name: str, m: dict[str, Any]) -> str:
    parts = [f"[{name}] step {m.get('step', '?')}/{m.get('steps', '?')}"]
    for k, v in m.items():
        if k in ("step", "steps") or not isinstance(v, (int, float)):
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def fit(train_loop: Callable[[dict], None], loop_config: dict[str, Any], cfg: TrainConfig,
        name: str, storage_path: str, progress: bool = True):
    """Run `train_loop` under a TorchTrainer; returns the ray.train.Result.

    num_workers=0 runs the loop in the driver process (local mode, for debugging).
    A worker that dies is replaced up to `cfg.max_failures` times and the loop resumes
    from its last checkpoint.
    """
    global _LOCAL_CHECKPOINT_ROOT
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path = _abs_storage(storage_path)
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
            callbacks=[_progress_callback(name)] if progress and cfg.num_workers > 0 else None,
        ),
    )
    if cfg.num_workers > 0:
        return trainer.fit()
    if "://" in storage_path:
        raise ValueError("train.num_workers=0 (local mode) needs a local storage_path, "
                         f"got {storage_path}")
    _LOCAL_CHECKPOINT_ROOT = os.path.join(storage_path, name)
    try:
        return trainer.fit()
    finally:
        _LOCAL_CHECKPOINT_ROOT = None


def world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) in local mode."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def device() -> torch.device:
    """This worker's device (its GPU when use_gpu, else CPU)."""
    import ray.train.torch

    try:
        return ray.train.torch.get_device()
    except Exception:  # local mode without torch distributed set up
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    if _LOCAL_CHECKPOINT_ROOT is not None:
        print(progress_line(os.path.basename(_LOCAL_CHECKPOINT_ROOT), metrics), flush=True)
    if state is None:
        ray.train.report(metrics)
        return
    if _LOCAL_CHECKPOINT_ROOT is not None:  # local mode: keep the directory
        d = os.path.join(_LOCAL_CHECKPOINT_ROOT, f"checkpoint_{time.strftime('%Y%m%d-%H%M%S')}"
                                                 f"_{metrics.get('step', 0):08d}")
        os.makedirs(d, exist_ok=True)
        torch.save(state, os.path.join(d, STATE_FILE))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        _prune_local(_LOCAL_CHECKPOINT_ROOT, keep=2)  # as CheckpointConfig(num_to_keep=2)
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save(state, os.path.join(d, STATE_FILE))
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def _prune_local(root: str, keep: int) -> None:
    import shutil

    dirs = sorted(d for d in os.listdir(root) if d.startswith("checkpoint_"))
    for d in dirs[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def should_checkpoint(step: int, steps: int, every: int) -> bool:
    """Checkpoint every `every` steps and at the last step (steps are 1-based)."""
    return step == steps or (every > 0 and step % every == 0)


def crash_once(config: dict[str, Any], step: int) -> None:
    """Fault-injection hook for tests: with `crash_at_step` and `crash_marker` in the loop
    config, the worker of rank `crash_rank` (default 0) dies hard at that step the first
    time only (the marker file records that it happened)."""
    at, marker = config.get("crash_at_step"), config.get("crash_marker")
    if at is None or step != at or not marker or os.path.exists(marker):
        return
    if world()[0] != config.get("crash_rank", 0):
        return
    with open(marker, "w") as f:
        f.write(str(step))
    sys.stdout.flush()
    os._exit(1)


def load_result_state(result) -> dict[str, Any]:
    """The final state saved by a finished `fit()`."""
    if result.checkpoint is None:
        raise RuntimeError(f"training run {result.path} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
