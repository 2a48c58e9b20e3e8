"""A CPU Mask R-CNN training step (configs/results.yaml's IS branch) three ways; one JSON line.

Baseline measured in the same run: the step with torchvision's RoIAlign in the box and mask
poolers, float32. Against it:
  matmul_fp32 - branches/roi_align.py's RoIAlign (two matrix products per image),
  matmul_bf16 - the same under bfloat16 autocast (train.cpu_bf16).
Same initial weights, the same batches (synthetic images, tests/_branches_synth), one step of
each variant in turn so that drifting machine load hits all alike; steady-state seconds per
step after `--warmup` steps. Also RoIAlign alone, forward + backward, on a box-head-sized
input. Random weights: the step's cost does not depend on them (the number of positive RoIs
does a little, the same for all three).

  PYTHONPATH=. python bench/is_step.py [--steps 8] [--threads 2] [--size 160]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from torchvision import ops  # noqa: E402

from _branches_synth import CLASSES, make_dataset  # noqa: E402
from wsis_ray.branches import instance, roi_align  # noqa: E402
from wsis_ray.branches.common import record_dicts, step_batches  # noqa: E402
from wsis_ray.config import ISConfig  # noqa: E402


def native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def roi_align_ms(fn, x: torch.Tensor, rois: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        x.grad = None
        t = time.perf_counter()
        fn(x, rois, 7, 0.25, 2).sum().backward()
        times.append(time.perf_counter() - t)
    return 1e3 * sum(times[1:]) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ISConfig(backbone="efficientnet_lite0", pretrained="none", min_size=128,
                   max_size=192, batch_size=args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        d = make_dataset(Path(tmp) / "data", n=4 * args.batch, size=args.size)
        data = instance.ISImages(record_dicts(d["records"]),
                                 instance.read_instance_labels(d["pseudo"]), flip=True)
        batches = step_batches(data, args.batch, 0, collate_fn=instance.collate)
        batches = [next(batches) for _ in range(args.warmup + args.steps)]

    torch.manual_seed(0)
    base = instance.build_model(cfg, len(CLASSES), load_weights=False).train()
    tv = copy.deepcopy(base)
    tv.roi_heads.box_roi_pool = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    tv.roi_heads.mask_roi_pool = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
    bf16 = native_bf16()
    variants = {"torchvision_fp32": (tv, nullcontext),
                "matmul_fp32": (copy.deepcopy(base), nullcontext)}
    if bf16:
        variants["matmul_bf16"] = (copy.deepcopy(base),
                                   lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    opts = {k: torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=1e-3,
                               momentum=0.9) for k, (m, _) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    load0 = os.getloadavg()[0]
    for i, (images, targets) in enumerate(batches):
        for k, (model, ctx) in variants.items():
            torch.manual_seed(i)  # the same RPN/RoI sampling draws in every variant
            t = time.perf_counter()
            with ctx():
                loss = sum(model(list(images), list(targets)).values())
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t)
    step_s = {k: sum(v) / len(v) for k, v in times.items()}
    base_s = step_s["torchvision_fp32"]

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 256, args.size // 4, args.size // 4, generator=gen,
                    requires_grad=True)
    xy = torch.rand(512, 2, generator=gen) * args.size * 0.7
    rois = torch.cat([torch.randint(args.batch, (512, 1), generator=gen).float(), xy,
                      xy + torch.rand(512, 2, generator=gen) * args.size * 0.3 + 2], 1)
    tv_ms = roi_align_ms(ops.roi_align, x, rois, 3)
    mm_ms = roi_align_ms(roi_align.roi_align, x, rois, 3)
    print(json.dumps({
        "bench": "is_step", "threads": args.threads, "batch": args.batch,
        "image_size": args.size, "steps": args.steps, "cpu_native_bf16": bf16,
        "step_s": {k: round(v, 3) for k, v in step_s.items()},
        "ratio_vs_torchvision_fp32": {k: round(v / base_s, 3) for k, v in step_s.items()},
        "roi_align_fwd_bwd_ms": {"torchvision": round(tv_ms, 1), "matmul": round(mm_ms, 1),
                                 "ratio": round(mm_ms / tv_ms, 3), "rois": 512,
                                 "feature": list(x.shape)},
        "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
