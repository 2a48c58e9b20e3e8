"""Small pieces the three branches' training loops share (no Ray imports).

Records travel to Train workers as plain dicts (`dataclasses.asdict(ImageRecord)`), so a
worker needs nothing from the driver; each worker opens the image files itself.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import nullcontext
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn


def record_dicts(records: Iterable[Any]) -> list[dict[str, Any]]:
    """ImageRecords (or dicts) -> plain dicts for the train loop config."""
    out = []
    for r in records:
        d = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
        d["class_ids"] = [int(c) for c in d["class_ids"]]
        out.append(d)
    return out


def load_rgb(path: str) -> np.ndarray:
    """H x W x 3 uint8 RGB (same as wsis_ray.data.datasets.load_image)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read image {path}: {e}") from e


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HxWx3 -> float CHW in [0, 255] resized to size x size (bilinear). The dense
    branches train and infer at one square size; boxes and maps are rescaled to match."""
    im = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()


def resize_labels(labels: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HxW label map -> int64 size x size (nearest, so 255 = ignore survives)."""
    im = Image.fromarray(labels).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(im).astype(np.int64))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """LR factor: linear warm-up over `warmup` steps, then cosine decay to 5%."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (state dicts are saved without the `module.` prefix)."""
    return getattr(model, "module", model)


def autocast(device: torch.device, amp: bool, cpu_bf16: bool = False):
    """Mixed precision: float16 on GPU (`amp`), bfloat16 on CPU (`cpu_bf16`: only a gain
    on CPUs with native bfloat16, AVX512-BF16 or AMX; elsewhere slower than float32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")


class Meter:
    """Running means of the losses, images/s and CPU s/step since the last `read()`."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0
        self.images = 0
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()  # CPU time of all this process's threads

    def add(self, losses: dict[str, float], images: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.images += images

    def read(self) -> dict[str, float]:
        dt = time.perf_counter() - self.t0
        out = {k: v / max(1, self.n) for k, v in self.sums.items()}
        out["images_per_s"] = self.images / dt if dt > 0 else 0.0
        # CPU seconds per step: unlike wall time, barely moved by other processes' load
        out["cpu_s_per_step"] = (time.process_time() - self.c0) / max(1, self.n)
        self.__init__()
        return out


class Resumable:
    """What a branch's checkpoint holds (model, optimizer, scheduler, scaler, step, report
    history), restored from the last Ray Train checkpoint when there is one and saved with
    every report, so a replaced worker continues where the last checkpoint left off."""

    def __init__(self, model: nn.Module, opt, sched, scaler):
        from wsis_ray import train as rt

        self.model, self.opt, self.sched, self.scaler = model, opt, sched, scaler
        self.step = self.resumed_from = 0
        self.history: list[dict[str, Any]] = []
        state = rt.restore()
        # a loop's own extra state; not the weights and optimizer just loaded, whose
        # tensors would otherwise stay alive beside the model's for the whole loop
        own = ("model", "optimizer", "scheduler", "scaler", "step", "history")
        self.restored: dict[str, Any] = {k: v for k, v in (state or {}).items()
                                         if k not in own}
        if state is not None:
            unwrap(model).load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            self.step = self.resumed_from = state["step"]
            self.history = state["history"]

    def report(self, meter: "Meter", world: int, step: int, steps: int,
               **extra_state: Any) -> None:
        """Report the meter's running figures with a checkpoint at `step` (every worker
        calls it)."""
        from wsis_ray import train as rt

        self.step = step
        m = meter.read()
        m["images_per_s"] *= world
        metrics = dict(m, step=self.step, steps=steps, lr=self.sched.get_last_lr()[0],
                       resumed_from=self.resumed_from, threads=torch.get_num_threads())
        self.history.append(metrics)
        rt.report(metrics, {
            "model": unwrap(self.model).state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "history": self.history, **extra_state})


def step_batches(dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start_step: int = 0, collate_fn=None):
    """The batches of steps start_step, start_step + 1, ... (forever), each a function of
    (seed, rank, step) alone, so a run resumed from a checkpoint at step s trains on exactly
    what the uninterrupted run did from step s on.

    Epoch e shuffles the dataset with its own generator (seed, e), pads it to a multiple of
    `world` and gives rank r every world-th index (DistributedSampler's split); step s is
    batch s mod steps_per_epoch of epoch s // steps_per_epoch, and nothing before it is
    loaded. Before loading step s the global torch RNG is seeded from (seed, rank, s): the
    flips drawn while loading and the model's own random draws (dropout, Mask R-CNN's
    RPN/RoI sampling) then depend on the step, not on what ran before the last restart.
    An epoch's incomplete last batch is dropped unless a rank has fewer items than one
    batch. Items load in the calling process, like a DataLoader with num_workers=0."""
    collate = collate_fn or torch.utils.data.default_collate
    n = len(dataset)
    if n == 0:
        raise ValueError("step_batches: the dataset is empty")
    per_rank = math.ceil(n / world)
    per_epoch = per_rank // batch_size if per_rank >= batch_size else 1
    step = start_step
    while True:
        epoch, first = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            _mix_seed(seed, epoch))).tolist()
        order += order[:per_rank * world - n]
        shard = order[rank::world]
        for k in range(first, per_epoch):
            torch.manual_seed(_mix_seed(seed, rank, step))
            yield collate([dataset[i] for i in shard[k * batch_size:(k + 1) * batch_size]])
            step += 1


def _mix_seed(*values: int) -> int:
    """One 63-bit seed from several integers (numpy's SeedSequence hashing, so nearby
    tuples such as (seed, step) and (seed, step + 1) give unrelated streams)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a state dict under `prefix`, with the prefix removed (e.g. a
    network's "trunk." part, handed on to the next branch)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
