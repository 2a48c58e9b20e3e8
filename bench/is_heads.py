"""IS branch on CPU: `light_heads` vs torchvision's default box/mask heads; one JSON line.
With --body NAME instead: the light-heads ResNet-18 from scratch (the demo's IS branch)
vs light heads on NAME with ImageNet weights (frozen BatchNorm, top 3 stages trained).
With --fpn-channels N: the demo's light-heads ResNet-18 with its FPN (and so its RPN and
RoI heads' input) 256 channels wide, torchvision's default, vs N wide.

Same batch (4 synthetic 160 px images), one torch thread, SGD steps in this process,
alternating the two models so drifting machine load hits both alike. Reports CPU seconds
per training step (robust on a shared machine) and wall seconds.

  PYTHONPATH=. python bench/is_heads.py [--steps 3] [--repeats 2] [--size 160]
  PYTHONPATH=. python bench/is_heads.py --body efficientnet_lite0
  PYTHONPATH=. python bench/is_heads.py --fpn-channels 128 --size 128
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from _branches_synth import make_dataset  # noqa: E402
from wsis_ray.branches import instance  # noqa: E402
from wsis_ray.branches.common import record_dicts  # noqa: E402
from wsis_ray.config import ISConfig  # noqa: E402


def time_steps(cfg: ISConfig, batch, steps: int) -> tuple[float, float, int]:
    torch.manual_seed(0)
    model = instance.build_model(cfg, 2).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)
    cpu, wall = [], []
    for _ in range(steps + 1):  # the first step warms up
        c, t = time.process_time(), time.perf_counter()
        loss = sum(model(list(batch[0]), list(batch[1])).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    n_params = sum(p.numel() for p in model.parameters())
    return sum(cpu[1:]) / steps, sum(wall[1:]) / steps, n_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--body", help="compare ResNet-18 from scratch with this ImageNet body")
    ap.add_argument("--fpn-channels", type=int, help="compare FPN width 256 with this width")
    args = ap.parse_args()
    size = dict(min_size=args.size, max_size=int(args.size * 1.4))
    if args.fpn_channels:
        base, other = "fpn256", f"fpn{args.fpn_channels}"
        variants = {base: ISConfig(light_heads=True, **size),
                    other: ISConfig(light_heads=True, fpn_channels=args.fpn_channels, **size)}
    elif args.body:
        base, other = "resnet18_scratch", f"{args.body}_imagenet"
        variants = {base: ISConfig(light_heads=True, **size),
                    other: ISConfig(light_heads=True, backbone=args.body,
                                    pretrained="imagenet", **size)}
    else:
        base, other = "default", "light"
        variants = {base: ISConfig(light_heads=False, **size),
                    other: ISConfig(light_heads=True, **size)}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        d = make_dataset(Path(tmp), n=4, size=args.size)
        data = instance.ISImages(record_dicts(d["records"]),
                                 instance.read_instance_labels(d["pseudo"]), flip=False)
        batch = instance.collate([data[i] for i in range(4)])
    res = {k: [] for k in variants}
    params = {}
    for _ in range(args.repeats):
        for name, cfg in variants.items():
            cpu, wall, params[name] = time_steps(cfg, batch, args.steps)
            res[name].append((cpu, wall))
    mean = {k: [sum(x) / len(x) for x in zip(*v)] for k, v in res.items()}
    print(json.dumps({
        "bench": "is_heads", "image_size": args.size, "batch": 4, "threads": 1,
        f"{base}_cpu_s_per_step": round(mean[base][0], 3),
        f"{other}_cpu_s_per_step": round(mean[other][0], 3),
        f"cpu_ratio_{other}_vs_{base}": round(mean[other][0] / mean[base][0], 3),
        f"{base}_wall_s_per_step": round(mean[base][1], 3),
        f"{other}_wall_s_per_step": round(mean[other][1], 3),
        "params_m": {k: round(v / 1e6, 1) for k, v in params.items()},
    }))


if __name__ == "__main__":
    main()
