"""The steps of the round job (jobs/round.py), one function each, in the paper's order.

Each step reads artefacts of earlier steps from the run directory, writes its own (atomic
names), and returns `(artefacts, metrics)`; `run_step` commits them to the manifest, so a
killed job re-run with the same command continues after the last committed step.
"""
from __future__ import annotations

import functools
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from wsis_ray.config import Config
from wsis_ray.data.datasets import (ImageLabelDataset, load_eval_dataset, load_image,
                                    load_train_dataset)
from wsis_ray.data.groundtruth import InstanceGT, load_eval_gt
from wsis_ray.data.records import (BAGS_SCHEMA, PEAKS_SCHEMA, decode_mask, read_table,
                                   write_table_atomic)
from wsis_ray.run import RunDir

Step = Callable[["Context"], tuple[list[str], dict[str, Any]]]

SELECTED_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("bag_id", pa.int32()), ("class_id", pa.int32()),
    ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32()),
    ("peak_x", pa.float32()), ("peak_y", pa.float32()),
])


@dataclass
class Context:
    cfg: Config
    run: RunDir
    train: ImageLabelDataset
    val: ImageLabelDataset
    val_gt: dict[int, InstanceGT]
    train_gt: dict[int, InstanceGT] | None
    started: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: Config, run: RunDir) -> "Context":
        """Load and validate the datasets before any work starts (errors name the records)."""
        skipped = run.path("skipped_records.jsonl") if "://" not in run.uri else None
        train = load_train_dataset(cfg.data, skipped_out=skipped)
        val = load_eval_dataset(cfg.data, "val")
        val_gt = load_eval_gt(cfg.data, "val", train.category_ids)
        try:  # ground truth of the training images, for pseudo-label quality figures only
            train_gt = load_eval_gt(cfg.data, "train", train.category_ids)
        except Exception:
            train_gt = None
        return cls(cfg, run, train, val, val_gt, train_gt)

    @property
    def storage(self) -> str:
        """Where Ray Train keeps checkpoints (shared storage on a cluster)."""
        return self.cfg.train.storage_path or self.run.uri_of("ray_train")


def init_ray(address: str | None, cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        # More logical CPUs than cores: Train workers and Ray Data actors coexist (FACTS.md).
        ray.init(num_cpus=max(4, (os.cpu_count() or 2) * 2), include_dashboard=False)


# -- plan ----------------------------------------------------------------------------------

def plan(cfg: Config) -> list[tuple[str, Step]]:
    """The ordered steps for this config."""
    if cfg.round.supervision == "full":
        return [("full/is", train_is_full), ("full/eval", functools.partial(evaluate_round, "full")),
                ("final", functools.partial(finalize, "full")), ("report", write_report)]
    from wsis_ray import seeds

    steps: list[tuple[str, Step]] = [(f"seeds/{name}", fn) for name, fn in seeds.STEPS]
    for r in range(1, cfg.round.rounds + 1):
        rd = f"round_{r}"
        steps += [(f"{rd}/ss", functools.partial(train_ss, r))]
        if cfg.round.no_mil:
            steps += [(f"{rd}/boxes", functools.partial(boxes_from_masks, r))]
        else:
            steps += [(f"{rd}/mil", functools.partial(train_mil, r))]
        steps += [(f"{rd}/ccgr", functools.partial(refine, r)),
                  (f"{rd}/is", functools.partial(train_is, r)),
                  (f"{rd}/eval", functools.partial(evaluate_round, rd))]
        if r < cfg.round.rounds:
            steps += [(f"{rd}/update", functools.partial(update, r))]
    steps += [("final", functools.partial(finalize, f"round_{cfg.round.rounds}")),
              ("report", write_report)]
    return steps


def run_step(ctx: Context, name: str, fn: Step, total: int | None = None) -> None:
    run = ctx.run
    if run.is_done(name):
        print(f"[skip] {name} (committed in {run.uri}/manifest.json)", flush=True)
        return
    print(f"[start] {name}  elapsed {_fmt(time.time() - ctx.started)}", flush=True)
    t0 = time.time()
    artefacts, metrics = fn(ctx)
    seconds = time.time() - t0
    run.commit(name, artefacts, metrics, seconds)
    ctx.seconds[name] = seconds
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(f"[done] {name} in {_fmt(seconds)}  {json.dumps(shown)[:300]}", flush=True)


def _fmt(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def previous(ctx: Context, r: int, what: str) -> str:
    """Round r's input `what` ("bags" or "semantic"): the seeds for round 1, else the
    previous round's update."""
    return f"seeds/{what}" + (".parquet" if what == "bags" else "") if r == 1 else \
        f"round_{r - 1}/{what}" + (".parquet" if what == "bags" else "")


def latest_trunk(ctx: Context, r: int) -> str | None:
    """The trunk weights a branch starts from when backbone.share_trunk (paper: shared
    convolutional layers; trained sequentially, each branch starts from the latest)."""
    if not ctx.cfg.backbone.share_trunk:
        return None
    for rel in ([f"round_{r}/mil/trunk.pt", f"round_{r}/ss/trunk.pt"] +
                [f"round_{q}/{b}/trunk.pt" for q in range(r - 1, 0, -1) for b in ("mil", "ss")] +
                ["seeds/cam/trunk.pt"]):
        if ctx.run.exists(rel):
            return ctx.run.uri_of(rel)
    return None
