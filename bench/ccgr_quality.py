"""Which stage loses pseudo-label quality: CCGR on a finished round's MIL boxes, with the
round's own SS score maps and with oracle score maps made from the ground truth.

For round r of a run directory whose training images have ground truth (the demo), it
refines round_r/boxes.parquet (the MIL boxes, with the round's peaks) on
  ss      - the round's SS branch (what the round job did),
  oracle  - the one-hot ground-truth semantic map blurred by a Gaussian (sigma px) and
            renormalised: a "good SS branch" with soft edges,
each under the paper's peak rule (ccgr.peak_region 0), the region rule (peak_region 0.5:
duplicate and background peaks ignored) and no peak rule, and prints one JSON line with
pseudo-box mAP^b_0.5 on
the training images before (MIL) and after CCGR. If CCGR lifts the MIL boxes on the oracle
maps but not on the SS maps, the SS branch is what limits it.

With --plot PNG it also draws the Figure 5 analog for both score maps (pseudo-box mAP^b_0.5
vs CCGR iteration, paper's rule).

With --gt-start N it instead starts CCGR at the ground-truth boxes of the first N training
images (no peak rule) and reports, per score map, the fraction still at IoU >= 0.5 with
where they started and how many grew / shrank: whether a map has its Eq. 3 optimum at the
objects at all, independently of the MIL boxes. Also per map: of the boxes that left their
object, the share whose Eq. 3 loss is lower where they stopped (the objective moved them,
not the optimiser), and the share of pseudo masks right at IoU >= 0.5 when cut with the
ground-truth box and with the refined box (is the box or the map what limits the masks).

    PYTHONPATH=. python bench/ccgr_quality.py --run-dir runs/demo [--round 1] [--sigma 2]
                                              [--plot fig5.png]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsis_ray import stages, steps  # noqa: E402
from wsis_ray.data.datasets import load_image  # noqa: E402
from wsis_ray.data.records import read_table  # noqa: E402
from wsis_ray.seeds import semantic_gt  # noqa: E402


def oracle_maps(ctx: steps.Context, sigma: float):
    """image_id -> (C+1, H, W) blurred one-hot ground truth (void pixels as background)."""
    import cv2

    c = ctx.train.num_classes

    def fn(images, image_ids):
        out = []
        for i in image_ids:
            label = semantic_gt(ctx.train_gt[int(i)]).astype(np.int64)
            label[label == 255] = 0
            onehot = np.eye(c + 1, dtype=np.float32)[label].transpose(2, 0, 1)
            if sigma > 0:
                onehot = np.stack([cv2.GaussianBlur(m, (0, 0), sigma) for m in onehot])
            out.append(onehot / onehot.sum(0, keepdims=True))
        return out
    return fn


def cached(fn, rows, batch=16):
    """Score maps computed once per image, so every variant refines the same maps."""
    maps = {}
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        for row, s in zip(chunk, fn([load_image(r["path"]) for r in chunk],
                                    [r["image_id"] for r in chunk])):
            maps[row["image_id"]] = s

    class Fixed:
        def __call__(self):
            return lambda images, image_ids: [maps[int(i)] for i in image_ids]
    return Fixed()


def plot(curves: dict[str, dict[int, float]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"ss": "the round's SS score maps", "oracle": "oracle maps (blurred ground truth)"}
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", label=labels[name])
    ax.set_xlabel("CCGR iteration")
    ax.set_ylabel("pseudo-box mAP$^b_{0.5}$ (train)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gt_start(ctx: steps.Context, sources: dict, n: int, cfg) -> dict:
    """CCGR from each ground-truth box of the first n training images, on each score map."""
    import torch
    from torchvision.ops import box_iou

    from wsis_ray import ccgr

    recs = [r for r in ctx.train.records if r.image_id in ctx.train_gt][:n]
    boxes, image_index, class_ids, gt_masks = [], [], [], []
    for k, rec in enumerate(recs):
        gt = ctx.train_gt[rec.image_id]
        for b, c, crowd, m in zip(gt.boxes, gt.class_ids, gt.iscrowd, gt.masks):
            if not crowd:
                boxes.append(b), image_index.append(k), class_ids.append(int(c))
                gt_masks.append(m.astype(bool))
    start = torch.as_tensor(np.asarray(boxes), dtype=torch.float64)
    index, classes = torch.tensor(image_index), torch.tensor(class_ids)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731

    def masks_right(maps, b) -> float:
        """Share of pseudo masks cut by boxes b (the round's rule) at IoU >= 0.5 with the
        instance's own mask."""
        cut = ccgr.pseudo_masks(maps, b, index, classes, cfg.mask_threshold)
        return round(float(np.mean([(m & g).sum() >= 0.5 * max(1, (m | g).sum())
                                    for m, g in zip(cut, gt_masks)])), 3)

    out = {"bench": "ccgr_quality_gt_start", "images": len(recs), "instances": len(boxes)}
    for name, fn in sources.items():
        maps = [torch.as_tensor(np.asarray(m)) for m in
                fn([load_image(r) for r in recs], [r.image_id for r in recs])]
        end = ccgr.refine(maps, start, index, classes, cfg=cfg).boxes.to(torch.float64)
        iou = box_iou(end, start).diagonal()
        ratio = area(end) / area(start)
        moved = iou < 0.5
        # Did the boxes leave the objects because Eq. 3 is lower elsewhere on this map (the
        # objective), or despite it (the optimiser)?
        loss_start, loss_end = (ccgr.eq3_loss(maps, b, index, classes, cfg.context_scale)
                                for b in (start, end))
        out[name] = {"iou_ge_0.5": round(float((iou >= 0.5).double().mean()), 3),
                     "mean_iou": round(float(iou.mean()), 3),
                     "grew_over_1.5x": round(float((ratio > 1.5).double().mean()), 3),
                     "shrank_below_0.67x": round(float((ratio < 0.67).double().mean()), 3),
                     "moved_with_lower_eq3_loss": round(float(
                         (loss_end[moved] < loss_start[moved]).double().mean()), 3)
                     if moved.any() else None,
                     "masks_right_gt_box": masks_right(maps, start),
                     "masks_right_refined_box": masks_right(maps, end)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--sigma", type=float, default=2.0)
    ap.add_argument("--plot", help="write the Figure 5 analog (both score maps) to this PNG")
    ap.add_argument("--gt-start", type=int, default=0, metavar="N",
                    help="start CCGR at the ground-truth boxes of N training images instead")
    args = ap.parse_args()

    ctx = steps.Context.of_run_dir(args.run_dir)
    run, cfg = ctx.run, ctx.cfg
    if not ctx.train_gt:
        sys.exit("error: this needs ground truth for the training images (e.g. the demo)")
    r, rd = args.round, f"round_{args.round}"
    t0 = time.time()
    sources = {"ss": steps.SSScoreFn(run.uri_of(f"{rd}/ss/state.pt"), cfg,
                                     ctx.train.num_classes)(),
               "oracle": oracle_maps(ctx, args.sigma)}
    if args.gt_start:  # the MIL boxes are not needed
        print(json.dumps(gt_start(ctx, sources, args.gt_start, cfg.ccgr)
                         | {"run_dir": args.run_dir, "round": r, "sigma": args.sigma,
                            "seconds": round(time.time() - t0, 1)}), flush=True)
        return
    boxes = read_table(run.uri_of(f"{rd}/boxes.parquet"))
    rows = stages.image_rows(ctx.train.records, boxes, steps.anchors_table(ctx, r))
    out = {"bench": "ccgr_quality", "run_dir": args.run_dir, "round": r, "boxes": boxes.num_rows,
           "sigma": args.sigma}
    rules = {"paper_rule": (0.0, False), "region_rule": (0.5, False), "no_peak_rule": (0.0, True)}
    curves: dict[str, dict[int, float]] = {}
    for name, fn in sources.items():
        make = cached(fn, rows)
        for rule, (region, drop) in rules.items():
            use = [dict(x, all_peaks=[]) for x in rows] if drop else rows
            every = 20 if args.plot and rule == "paper_rule" else 0
            c = replace(cfg.ccgr, peak_region=region, record_every=every)
            table = stages.refine_local(use, make, c, r, batch_size=16).to_pylist()
            if every:
                curves[name] = {it: round(100 * steps.box_ap(
                    ctx, [dict(p, box=p["box_trajectory"][k]) for p in table]), 1)
                    for k, it in enumerate(range(0, c.iterations + 1, every))}
            before = steps.box_ap(ctx, table, "box_before")
            out.setdefault("mil_box_mAP_b@0.5", round(100 * before, 1))
            reasons: dict[str, int] = {}
            for p in table:
                reasons[p["stop_reason"]] = reasons.get(p["stop_reason"], 0) + 1
            after = steps.box_ap(ctx, table, "box_after")
            out[f"{name}/{rule}"] = {"ccgr_box_mAP_b@0.5": round(100 * after, 1),
                                     "stop_reasons": reasons}
    if args.plot:
        out["curves"] = curves
        plot(curves, args.plot, f"{args.run_dir} {rd}: CCGR on MIL boxes")
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
