"""Benchmark: the CCGR stage (SS inference + CCGR + pseudo masks + Parquet) on Ray Data.

Measures images/s, in one run and on the same images and SS weights:
  plain  - the same stage classes called in a plain loop (no Ray),
  ray_1  - Ray Data, one CCGR actor (and on CPU two score-map actors sharing its CPUs,
           stages.run_refine_stage), on a simulated 2-node cluster,
  ray_2  - Ray Data, twice that (one CCGR actor per node).
Prints one JSON line with the figures, the Ray overhead ratio (plain / ray_1 throughput)
and the scaling efficiency (ray_2 / (2 * ray_1)).

    python bench/refine.py [--images 48] [--iterations 200]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--cpus-per-node", type=int, default=2)
    args = ap.parse_args()

    import pyarrow as pa
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from wsis_ray import stages, steps
    from wsis_ray.branches.semseg import PSPNet
    from wsis_ray.config import BackboneConfig, load_config
    from wsis_ray.data.datasets import load_train_dataset
    from wsis_ray.data.groundtruth import load_eval_gt

    tmp = Path(tempfile.mkdtemp(prefix="bench-refine-"))
    cfg = load_config(None, [f"data.root={tmp / 'data'}", f"data.demo_train_images={args.images}",
                             "data.demo_val_images=1", f"ccgr.iterations={args.iterations}"])
    ds = load_train_dataset(cfg.data)
    gt = load_eval_gt(cfg.data, "train", ds.category_ids)
    torch.manual_seed(0)
    net = PSPNet(BackboneConfig(cfg.backbone.name, "none"), ds.num_classes, cfg.ss.bins,
                 cfg.ss.output_stride)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict()}, buf)
    (tmp / "ss.pt").write_bytes(buf.getvalue())
    score_fn = steps.SSScoreFn(str(tmp / "ss.pt"), cfg, ds.num_classes)

    rows, anchors = [], []
    for rec in ds.records:  # one box per instance: its middle, as a MIL box often is
        g = gt[rec.image_id]
        for k, (b, c) in enumerate(zip(g.boxes, g.class_ids)):
            x1, y1, x2, y2 = b
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            rows.append({"image_id": rec.image_id, "bag_id": k, "class_id": int(c),
                         "box": [cx - w / 4, cy - h / 4, cx + w / 4, cy + h / 4], "score": 1.0,
                         "peak_x": cx, "peak_y": cy})
            anchors.append({"image_id": rec.image_id, "class_id": int(c), "x": cx, "y": cy})
    image_rows = stages.image_rows(ds.records, pa.Table.from_pylist(rows, schema=steps.SELECTED_SCHEMA),
                                   pa.Table.from_pylist(anchors))
    n = len(image_rows)

    t0 = time.perf_counter()
    stages.refine_local(image_rows, score_fn, cfg.ccgr, 1, batch_size=cfg.ccgr.batch_images)
    plain = n / (time.perf_counter() - t0)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    cluster.add_node(num_cpus=args.cpus_per_node)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    for actors in (1, 2):
        out = tmp / f"out{actors}"
        stages.run_refine_stage(image_rows[:8], score_fn, cfg.ccgr, 1, str(tmp / "warm"),
                                min_actors=actors, max_actors=actors,
                                batch_size=cfg.ccgr.batch_images)  # start-up not measured
        t0 = time.perf_counter()
        stages.run_refine_stage(image_rows, score_fn, cfg.ccgr, 1, str(out), min_actors=actors,
                                max_actors=actors, batch_size=cfg.ccgr.batch_images)
        results[actors] = n / (time.perf_counter() - t0)
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps({
        "bench": "refine_stage", "images": n, "boxes": len(rows),
        "ccgr_iterations": args.iterations, "cores": os.cpu_count(),
        "plain_images_per_s": round(plain, 2), "ray_1_actor_images_per_s": round(results[1], 2),
        "ray_2_actors_images_per_s": round(results[2], 2),
        "ray_overhead_ratio": round(plain / results[1], 3),
        "scaling_efficiency_2": round(results[2] / (2 * results[1]), 3),
    }))


if __name__ == "__main__":
    main()
