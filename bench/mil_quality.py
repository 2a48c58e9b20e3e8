"""Which stage loses pseudo-box quality before CCGR: the bags or the MIL branch's choice.

For round r of a run directory whose training images have ground truth (the demo), it
scores one box per bag of the round (seeds/bags.parquet for round 1, round_{r-1}/bags.parquet
after) three ways, and prints one JSON line with the pseudo-box mAP^b_0.5 of each on the
training images:
  eq4_top   - the bag's best-ranked proposal (Eq. 4 in round 1; the CAM baseline's box),
  mil       - the MIL branch's choice (round_r/boxes.parquet, what CCGR starts from),
  bag_best  - the bag's proposal with the highest IoU with a ground-truth instance of the
              bag's class: what a perfect MIL branch could pick from these bags.
Every box gets score 1 for the comparison (the MIL scores are also reported with their own
ranking), so the three differ only in the box chosen. bag_best >> mil means the MIL branch
loses the quality; bag_best low means the peaks, proposals or bags do.

    PYTHONPATH=. python bench/mil_quality.py --run-dir runs/results [--round 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsis_ray import seeds, steps  # noqa: E402
from wsis_ray.data.records import read_table  # noqa: E402
from wsis_ray.proposals import box_iou  # noqa: E402


def best_proposal(props: np.ndarray, gt_boxes: np.ndarray) -> int:
    """Row of `props` with the highest IoU with any of `gt_boxes` (0 when there are none)."""
    if not len(gt_boxes):
        return 0
    return int(box_iou(props, gt_boxes).max(1).argmax())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--round", type=int, default=1)
    args = ap.parse_args()

    ctx = steps.Context.of_run_dir(args.run_dir)
    run = ctx.run
    if not ctx.train_gt:
        sys.exit("error: this needs ground truth for the training images (e.g. the demo)")
    t0 = time.time()
    proposals = seeds.read_proposals(run.uri_of("seeds/proposals.parquet"))
    bags = read_table(steps.bags_uri(ctx, args.round)).to_pylist()
    top, best = [], []
    for b in bags:
        gt = ctx.train_gt.get(b["image_id"])
        if gt is None:
            continue
        boxes = proposals[b["image_id"]][0][np.asarray(b["proposal_indices"], np.int64)]
        same = gt.boxes[(np.asarray(gt.class_ids) == b["class_id"]) & ~np.asarray(gt.iscrowd)]
        row = {"image_id": b["image_id"], "class_id": b["class_id"], "score": 1.0}
        top.append(dict(row, box=[float(v) for v in boxes[0]]))
        best.append(dict(row, box=[float(v) for v in boxes[best_proposal(boxes, same)]]))
    mil = read_table(run.uri_of(f"round_{args.round}/boxes.parquet")).to_pylist()
    ap50 = lambda rows: round(100 * steps.box_ap(ctx, rows), 1)  # noqa: E731
    out = {"bench": "mil_quality", "run_dir": args.run_dir, "round": args.round,
           "bags": len(top), "mil_boxes": len(mil),
           "mAP_b@0.5": {"eq4_top": ap50(top), "mil": ap50([dict(m, score=1.0) for m in mil]),
                         "bag_best": ap50(best)},
           "mil_own_scores_mAP_b@0.5": ap50(mil)}
    out["mil_over_bag_best"] = round(out["mAP_b@0.5"]["mil"] / max(out["mAP_b@0.5"]["bag_best"],
                                                                   1e-9), 3)
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
