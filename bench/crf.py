"""What the dense CRF (`crf.iterations`) adds to the SS maps' cost; one JSON line.

Baseline measured in the same run: the SS branch's inference (EfficientNet-Lite0 PSPNet at
output stride 8, as configs/results.yaml, random weights: the cost does not depend on
them) on the same images. Both on one torch thread, as in the CCGR actors, alternating so
drifting machine load hits both alike; CPU seconds per image (robust on a shared machine)
and wall seconds.

  PYTHONPATH=. python bench/crf.py [--images 16] [--classes 4] [--size 176x160] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from wsis_ray import crf
from wsis_ray.branches import semseg
from wsis_ray.config import BackboneConfig, CRFConfig, SSConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--size", default="176x160", help="W x H of the images")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--iterations", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.images)]
    ss = SSConfig(output_stride=8)
    model = semseg.PSPNet(BackboneConfig("efficientnet_lite0", "none"), args.classes, ss.bins,
                          ss.output_stride).eval()
    cfg = CRFConfig(iterations=args.iterations)
    timings = {"ss": [], "crf": []}
    for _ in range(args.repeats):
        for name in ("ss", "crf"):
            c0, t0 = time.process_time(), time.perf_counter()
            maps = semseg.predict_scores(model, images, ss.image_size)
            if name == "crf":
                c0, t0 = time.process_time(), time.perf_counter()  # the CRF alone
                maps = [crf.refine(im, m, cfg) for im, m in zip(images, maps)]
            timings[name].append((time.process_time() - c0, time.perf_counter() - t0))
    best = {k: min(v) for k, v in timings.items()}  # the least disturbed repeat
    n = args.images
    print(json.dumps({
        "bench": "crf", "images": n, "size": args.size, "channels": args.classes + 1,
        "crf": {"iterations": cfg.iterations, "radius": cfg.radius, "stride": cfg.stride},
        "ss_cpu_s_per_image": round(best["ss"][0] / n, 4),
        "crf_cpu_s_per_image": round(best["crf"][0] / n, 4),
        "ss_wall_s_per_image": round(best["ss"][1] / n, 4),
        "crf_wall_s_per_image": round(best["crf"][1] / n, 4),
        "crf_over_ss_cpu": round(best["crf"][0] / best["ss"][0], 2),
    }))


if __name__ == "__main__":
    main()
