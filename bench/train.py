"""IS branch training under Ray Train vs a plain PyTorch process; one JSON line.

Same data (synthetic 2-class images written here), same model and steps, in one run:
  plain    - the IS training step in this process (no Ray), checkpointing (torch.save of
             the same state) as often as the Train loop does;
  ray_1    - instance.train_loop_per_worker under TorchTrainer, 1 worker with all CPUs;
  ray_2    - the same with 2 workers (gloo DDP), the CPUs split between them (CPU only;
             with --device cuda one worker has the GPU, as the round job runs on one GPU).
With --device cuda both run on the GPU with the loop's mixed precision (train.amp).
Step time = steady-state seconds per step (the first window, with model build and warm-up,
is dropped). Target: ray_1 / plain <= 1.15. CPU seconds per step are reported too: on a
shared machine other processes' load moves wall-clock times by several x, CPU time barely.

  PYTHONPATH=. python bench/train.py [--steps 12] [--size 160] [--batch 4] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from _branches_synth import CLASSES, make_dataset  # noqa: E402
from wsis_ray.branches import instance  # noqa: E402
from wsis_ray.branches.common import (Meter, autocast, grad_scaler,  # noqa: E402
                                      record_dicts, seed_everything, step_batches,
                                      warmup_cosine)
from wsis_ray.config import Config, ISConfig  # noqa: E402


def plain_run(cfg: Config, records, labels_uri: str, out_dir: str,
              dev: torch.device) -> list[dict]:
    """The Train loop's step, written as a plain single-process PyTorch loop."""
    ic, amp = cfg.instance, cfg.train.amp
    seed_everything(cfg.train.seed)
    data = instance.ISImages(record_dicts(records), instance.read_instance_labels(labels_uri),
                             flip=True)
    model = instance.build_model(ic, len(CLASSES)).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=ic.lr, momentum=ic.momentum, weight_decay=ic.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, ic.steps, min(100, ic.steps // 10 + 1)))
    scaler = grad_scaler(dev, amp)
    history, meter = [], Meter()
    batches = step_batches(data, ic.batch_size, cfg.train.seed, collate_fn=instance.collate)
    for step in range(1, ic.steps + 1):
        images, targets = next(batches)
        images = [im.to(dev) for im in images]
        targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
        with autocast(dev, amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        meter.add({"loss": loss.item()}, len(images))
        if step % cfg.train.checkpoint_every == 0 or step == ic.steps:
            history.append(dict(meter.read(), step=step))
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                        "step": step},
                       os.path.join(out_dir, "plain_state.pt"))
    return history


def steady_step_s(history: list[dict], batch: int) -> float:
    """Seconds per step over the windows after the first."""
    rest = history[1:] or history
    return sum(batch / h["images_per_s"] for h in rest) / len(rest)


def steady_cpu_s(history: list[dict]) -> float:
    rest = history[1:] or history
    return sum(h["cpu_s_per_step"] for h in rest) / len(rest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    cpus = os.cpu_count() or 2
    torch.set_num_threads(cpus)
    gpu = args.device == "cuda"

    import ray
    from wsis_ray.train import start_local_ray
    start_local_ray(num_cpus=cpus, num_gpus=1 if gpu else 0, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        d = make_dataset(Path(tmp) / "data", n=args.images, size=args.size)
        cfg = Config()
        cfg.instance = ISConfig(min_size=args.size, max_size=int(args.size * 1.4),
                                batch_size=args.batch, steps=args.steps)
        cfg.train.checkpoint_every = max(1, args.steps // 3)
        cfg.train.use_gpu = gpu
        load0 = os.getloadavg()[0]

        t = time.perf_counter()
        plain = plain_run(cfg, d["records"], d["pseudo"], tmp, torch.device(args.device))
        plain_wall = time.perf_counter() - t

        runs = {}
        for workers in (1,) if gpu else (1, 2):
            cfg.train.num_workers = workers
            cfg.train.cpus_per_worker = cpus / workers
            if workers == 2:  # same global batch: each worker takes half
                cfg.instance.batch_size = max(1, args.batch // 2)
            t = time.perf_counter()
            out = instance.fit_instance(cfg, d["records"], d["pseudo"], CLASSES,
                                        str(Path(tmp) / "ray"), name=f"bench_{workers}")
            runs[workers] = (out["history"], time.perf_counter() - t)
        cfg.instance.batch_size = args.batch

    plain_s = steady_step_s(plain, args.batch)
    ray1_s = steady_step_s(runs[1][0], args.batch)
    # images_per_s of ray_2 is global; no ray_2 on one GPU
    ray2_s = steady_step_s(runs[2][0], args.batch) if 2 in runs else None
    ray2_wall = round(runs[2][1], 1) if 2 in runs else None
    print(json.dumps({
        "bench": "train_is", "device": torch.cuda.get_device_name() if gpu else "cpu",
        "amp": gpu and cfg.train.amp, "image_size": args.size, "batch": args.batch,
        "steps": args.steps, "cpus": cpus, "light_heads": cfg.instance.light_heads,
        "plain_step_s": round(plain_s, 3), "ray_1_worker_step_s": round(ray1_s, 3),
        "ray_vs_plain_ratio": round(ray1_s / plain_s, 3), "target_ratio": 1.15,
        "images_per_s_1_worker": round(args.batch / ray1_s, 2),
        "images_per_s_2_workers": ray2_s and round(args.batch / ray2_s, 2),
        "scaling_2_vs_1": ray2_s and round(ray1_s / ray2_s, 3),
        # CPU seconds per step of the training process (all its threads): robust to other
        # processes' load on a shared machine, where the wall-clock figures are not.
        "plain_cpu_s_per_step": round(steady_cpu_s(plain), 3),
        "ray_1_worker_cpu_s_per_step": round(steady_cpu_s(runs[1][0]), 3),
        "cpu_ratio_ray_vs_plain": round(steady_cpu_s(runs[1][0]) / steady_cpu_s(plain), 3),
        "wall_s": {"plain": round(plain_wall, 1), "ray_1": round(runs[1][1], 1),
                   "ray_2": ray2_wall},
        "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
