"""CCGR on its own, for users who bring their own boxes (paper Eq. 2-3).

    python jobs/refine.py --config configs/demo.yaml --boxes boxes.json \
        --ss-checkpoint RUN/round_1/ss/state.pt --out OUT
    python jobs/refine.py ... --score-maps MAPS_DIR      # precomputed (C+1,H,W) maps

boxes: COCO results JSON ([{"image_id", "category_id", "bbox": [x,y,w,h], "score",
"peak": [x, y] (optional)}]) or Parquet with columns image_id, class_id, box [x1,y1,x2,y2],
score, and optional peak_x, peak_y. Score maps: MAPS_DIR/<image_id>.npy, float (C+1, H, W)
softmax with channel 0 = background, at image resolution.
Writes OUT/pseudo.parquet (the pseudo-label schema) and OUT/pseudo_coco.json, through the
same Ray Data pipeline the round job uses (SS inference actors -> CCGR actors).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from wsis_ray import stages, steps  # noqa: E402
from wsis_ray.config import load_config  # noqa: E402
from wsis_ray.data.datasets import load_train_dataset  # noqa: E402
from wsis_ray.data.records import pseudo_labels_to_coco, read_table, resolve_fs  # noqa: E402


def read_boxes(path: str, category_ids: list[int]) -> pa.Table:
    """User boxes -> the stage's box table (image_id, bag_id, class_id, box, score, peak)."""
    index = {int(c): i for i, c in enumerate(category_ids)}
    if path.endswith(".json"):
        with open(path) as f:
            items = json.load(f)
        rows = []
        for k, r in enumerate(items):
            if int(r["category_id"]) not in index:
                raise SystemExit(f"error: {path} record {k}: category_id {r['category_id']} is "
                                 f"not a dataset category {category_ids}")
            x, y, w, h = r["bbox"]
            px, py = r.get("peak") or (math.nan, math.nan)
            rows.append({"image_id": int(r["image_id"]), "bag_id": k,
                         "class_id": index[int(r["category_id"])], "box": [x, y, x + w, y + h],
                         "score": float(r.get("score", 1.0)), "peak_x": px, "peak_y": py})
        return pa.Table.from_pylist(rows, schema=steps.SELECTED_SCHEMA)
    t = read_table(path)
    n = t.num_rows
    if "peak_x" not in t.column_names:
        t = t.append_column("peak_x", pa.array([math.nan] * n, pa.float32()))
        t = t.append_column("peak_y", pa.array([math.nan] * n, pa.float32()))
    if "bag_id" not in t.column_names:
        t = t.append_column("bag_id", pa.array(range(n), pa.int32()))
    return t.select(steps.SELECTED_SCHEMA.names).cast(steps.SELECTED_SCHEMA)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--boxes", required=True, help="COCO results JSON or Parquet")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ss-checkpoint", help="state.pt of a trained SS branch (round_r/ss/)")
    src.add_argument("--score-maps", help="directory of <image_id>.npy (C+1,H,W) maps")
    p.add_argument("--out", required=True, help="output directory (local or object store)")
    p.add_argument("--round", type=int, default=0, help="round number to record")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    dataset = load_train_dataset(cfg.data)
    boxes = read_boxes(args.boxes, dataset.category_ids)
    known = {r.image_id for r in dataset.records}
    unknown = sorted(set(boxes.column("image_id").to_pylist()) - known)
    if unknown:
        print(f"error: {len(unknown)} box image ids are not in the dataset (first: {unknown[:10]})",
              file=sys.stderr)
        return 2
    anchors = boxes.filter(pa.compute.invert(pa.compute.is_nan(boxes.column("peak_x")))) \
        .select(["image_id", "class_id", "peak_x", "peak_y"]) \
        .rename_columns(["image_id", "class_id", "x", "y"])
    rows = stages.image_rows(dataset.records, boxes, anchors)
    if args.ss_checkpoint:
        score_fn = steps.SSScoreFn(args.ss_checkpoint, cfg, dataset.num_classes)
    else:
        score_fn = stages.PrecomputedScoreFn(args.score_maps)
    steps.init_ray(args.address, cfg)
    fs, out = resolve_fs(args.out)
    fs.create_dir(out, recursive=True)
    out_uri = args.out.rstrip("/")
    info = stages.run_refine_stage(rows, score_fn, cfg.ccgr, args.round, f"{out_uri}/pseudo.parquet",
                                   max_actors=max(1, cfg.train.num_workers),
                                   batch_size=cfg.ccgr.batch_images,
                                   num_gpus=1.0 if cfg.train.use_gpu else 0.0,
                                   cpus_per_actor=cfg.train.cpus_per_worker)
    table = read_table(f"{out_uri}/pseudo.parquet")
    with fs.open_output_stream(f"{out}/pseudo_coco.json") as f:
        f.write(json.dumps(pseudo_labels_to_coco(table, dataset)).encode())
    print(json.dumps({"boxes": table.num_rows, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
