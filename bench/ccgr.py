"""CCGR throughput: batched engine vs a naive reference, measured in the same run.

Prints one JSON line. Boxes refined per second at a fixed 200 iterations (convergence
stopping off, so every box costs the full 200 steps) on 256x256 and 512x512 maps, for
- the batched engine (`refine`, all boxes of all images in one call, closed-form gradient),
- the naive reference (`refine_reference`: one box at a time, autograd, Python loop),
- the round job's case: 8 images x 5 boxes per call, with default convergence stopping,
and the ratio. Timings include building the summed-area tables. Both run with
CCGRConfig.num_threads (1) torch threads on CPU. Rates are given per wall second and per
process CPU second (the latter is what the code costs when other processes share the
cores). Memory: peak process RSS (CPU) or peak allocated device memory (CUDA). Picks CUDA
when present.

    PYTHONPATH=. python bench/ccgr.py [--images 64] [--boxes-per-image 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import wsis_ray.ccgr as ccgr_engine
from wsis_ray.ccgr import refine, refine_reference
from wsis_ray.config import CCGRConfig


def synthetic(n_images: int, size: int, boxes_per_image: int, n_classes: int = 4, seed: int = 0,
              device: str = "cpu"):
    """Soft score maps with rectangular/elliptic objects, and boxes covering part of each
    object (what MIL tends to select)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    logits = torch.zeros(n_images, n_classes + 1, size, size)
    logits[:, 0] = 2.0
    boxes, image_index, class_ids = [], [], []
    for i in range(n_images):
        for _ in range(boxes_per_image):
            c = int(torch.randint(n_classes, (1,), generator=g))
            w, h = (0.1 + 0.25 * torch.rand(2, generator=g)) * size
            wh = torch.stack([w, h])
            cx, cy = wh / 2 + torch.rand(2, generator=g) * (size - wh)
            inside = ((xs - cx).abs() / (w / 2)) ** 2 + ((ys - cy).abs() / (h / 2)) ** 2
            logits[i, c + 1] = torch.maximum(logits[i, c + 1], 8 * (1 - inside))
            fx, fy = 0.3 + 0.3 * torch.rand(2, generator=g)
            ox, oy = (torch.rand(2, generator=g) - 0.5) * 0.4
            bx, by = cx + ox * w, cy + oy * h
            boxes.append([bx - fx * w / 2, by - fy * h / 2, bx + fx * w / 2, by + fy * h / 2])
            image_index.append(i)
            class_ids.append(c)
    scores = torch.softmax(logits, 1).to(device)
    return (scores, torch.tensor(boxes, device=device), torch.tensor(image_index, device=device),
            torch.tensor(class_ids, device=device))


def timed(fn, device, repeats=1):
    """Best wall time and best process CPU time of `repeats` runs (on a shared machine the
    CPU time shows what the code costs when other processes take cores away)."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return best, best_cpu, out


def run_size(size, args, device, fixed, default):
    scores, boxes, ii, cc = synthetic(args.images, size, args.boxes_per_image, device=device)
    n = boxes.shape[0]
    refine(scores[:2], boxes[:4], ii[:4] % 2, cc[:4], cfg=fixed)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batched_s, batched_cpu, res = timed(lambda: refine(scores, boxes, ii, cc, cfg=fixed), device,
                                        args.repeats)
    k = args.naive_boxes
    naive_s, naive_cpu, _ = timed(
        lambda: refine_reference(scores, boxes[:k], ii[:k], cc[:k], cfg=fixed), device)
    sel = ii < 8
    per = args.boxes_per_image
    small_sel = sel & (torch.arange(n, device=device) % per < 5)  # 8 images x 5 boxes
    small = (scores[:8], boxes[small_sel], ii[small_sel], cc[small_sel])
    round_s, round_cpu, rres = timed(lambda: refine(*small, cfg=default), device, args.repeats)
    out = {
        "boxes": n,
        "batched_boxes_per_s": round(n / batched_s, 1),
        "batched_boxes_per_cpu_s": round(n / batched_cpu, 1),
        "naive_boxes_per_s": round(k / naive_s, 2),
        "naive_boxes_per_cpu_s": round(k / naive_cpu, 2),
        "ratio": round((n / batched_s) / (k / naive_s), 1),
        "ratio_cpu_time": round((n / batched_cpu) / (k / naive_cpu), 1),
        "round_case_boxes": int(small[1].shape[0]),
        "round_case_boxes_per_s": round(small[1].shape[0] / round_s, 1),
        "round_case_mean_iterations": round(float(rres.iterations.float().mean()), 1),
        "all_ran_200": bool((res.iterations == fixed.iterations).all()),
    }
    pairs = torch.unique(ii * 4 + cc).numel()
    sat_bytes = pairs * (size + 1) ** 2 * 8
    out["sat_mib_total"] = round(sat_bytes / 2 ** 20, 1)  # float64 SATs, built in groups
    out["sat_mib_resident"] = round(min(sat_bytes, ccgr_engine._SAT_CHUNK_BYTES) / 2 ** 20, 1)
    if device == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--boxes-per-image", type=int, default=16)
    p.add_argument("--naive-boxes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fixed = CCGRConfig(iterations=200, tol=0.0, flat_tol=0.0)  # every box runs 200 steps
    default = CCGRConfig()
    result = {"bench": "ccgr", "device": device, "torch_threads": torch.get_num_threads(),
              "engine_threads": default.num_threads,
              "iterations": fixed.iterations, "images": args.images,
              "boxes_per_image": args.boxes_per_image}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    for size in args.sizes:
        result[f"{size}px"] = run_size(size, args, device, fixed, default)
    # whole process, synthetic data of both sizes included
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
