"""Round-0 seeds (paper, "Iterative optimization and its initialization"), as Ray steps.

    CAM classifier (Ray Train) -> response maps + PRM peaks (Ray Data)      peaks.parquet
    proposals (Ray Data, cached)                                             proposals.parquet
    AffinityNet (Ray Train) -> random walk -> semantic labels (Ray Data)     semantic/<id>.png
    bags from peaks, proposals and semantic labels (Eq. 4)                   bags.parquet

Each step is a function `(cfg, dataset, run, split="train")` that does nothing when the run
directory already holds it (`RunDir.is_done`) and commits its artefacts when finished, so
a killed run continues where it stopped and the round job can call the steps in order.
Training-split artefacts live in RUN/seeds/, the evaluation split's in RUN/seeds/<split>/.

CLI:  python -m wsis_ray.seeds [--config configs/demo.yaml] --run-dir RUN [--set k=v ...]
prints one JSON line with the figures on the evaluation split: peak recall and peaks per
instance, proposal recall at IoU 0.5/0.7, bag recall, and the mIoU of the AffinityNet pseudo
semantic labels next to plain CAM thresholding.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import time
from typing import Any

import numpy as np

from wsis_ray import affinity, bags, peaks, proposals
from wsis_ray.config import Config, load_config
from wsis_ray.data.records import (BAGS_SCHEMA, PEAKS_SCHEMA, PROPOSALS_SCHEMA,
                                   load_torch_state, read_table, write_table_atomic)
from wsis_ray.run import RunDir

CAM_THRESHOLDS = tuple(np.round(np.arange(0.05, 0.55, 0.05), 2))


def _dir(split: str) -> str:
    return "seeds" if split == "train" else f"seeds/{split}"


# What each round-0 step reads (by step name, "{d}" = this split's directory): a step is
# redone once one of these was recomputed with other content (RunDir.is_done's `inputs`).
SEED_INPUTS = {
    "peaks": ["seeds/cam"],
    "affinity": ["seeds/cam", "seeds/peaks"],        # the trunk and the train CAMs
    "semantic": ["seeds/affinity", "{d}/peaks"],     # AffinityNet on this split's CAMs
    "bags": ["{d}/proposals", "{d}/peaks", "{d}/semantic"],
    "metrics": ["seeds/cam", "seeds/affinity"] + [f"seeds/val/{n}" for n in
                                                  ("peaks", "proposals", "semantic", "bags")],
}


def _inputs(step: str) -> list[str]:
    d, name = step.rsplit("/", 1)
    return [n.format(d=d) for n in SEED_INPUTS.get(name, [])]


def _records(dataset) -> list[dict]:
    return [dataclasses.asdict(r) for r in dataset.records]


def _storage(cfg: Config, run: RunDir) -> str:
    return cfg.train.storage_path or run.uri_of("ray_train")


def _save_state(run: RunDir, rel: str, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    run.write_bytes(rel, buf.getvalue())


def _actors(cfg: Config):
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(cpus, 4)))


# -- CAM ----------------------------------------------------------------------------------

def train_cam(cfg: Config, dataset, run: RunDir, split: str = "train") -> None:
    """Train the CAM classifier on image-level labels (Ray Train) -> seeds/cam/state.pt."""
    from wsis_ray.train import fit, load_result_state

    step, rel = "seeds/cam", "seeds/cam/state.pt"
    if run.is_done(step, _inputs(step)):
        return
    t0 = time.time()
    loop_config = {
        "records": _records(dataset), "num_classes": dataset.num_classes,
        "backbone": dataclasses.asdict(cfg.backbone), "cam": dataclasses.asdict(cfg.cam),
        "seed": cfg.train.seed, "checkpoint_every": cfg.train.checkpoint_every,
    }
    storage = _storage(cfg, run)
    result = fit(peaks.train_loop_per_worker, loop_config, cfg.train,
                 run.train_name("seeds-cam", storage), storage)
    state = load_result_state(result)
    _save_state(run, rel, {"model": state["model"], "classes": list(dataset.classes),
                           "cam": dataclasses.asdict(cfg.cam),
                           "backbone": dataclasses.asdict(cfg.backbone)})
    run.commit(step, [rel], {"loss": float(result.metrics.get("loss", float("nan"))),
                             "steps": int(state["step"])}, time.time() - t0,
               inputs=_inputs(step))


class _CamPredictor:
    """Ray Data actor: response maps and peaks for a batch of image records."""

    def __init__(self, state_uri: str, cam: dict):
        import torch

        from wsis_ray.config import BackboneConfig

        state = load_torch_state(state_uri)
        self.cam = cam  # peak settings of this run (the network's own are in the state)
        self.model = peaks.CAMNet(BackboneConfig(**state["backbone"]), len(state["classes"]),
                                  state["cam"]["pooling"], state["cam"]["peak_window"])
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.size = state["cam"]["image_size"]
        torch.set_grad_enabled(False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        recs = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        images = [peaks.load_record_image(_plain(r)) for r in recs]
        responses = peaks.predict_response(self.model, images, self.size,
                                           scales=self.cam["scales"])
        out: dict[str, list] = {k: [] for k in ("image_id", "class_ids", "shape", "response",
                                                "peaks")}
        c = self.cam
        threshold = c["peak_threshold"] if c["peak_threshold"] == "median" else float(
            c["peak_threshold"])
        for rec, im, r in zip(recs, images, responses):
            cls = [int(x) for x in rec["class_ids"]]
            pk = peaks.find_peaks(r, cls, c["peak_window"], threshold, im.shape[:2],
                                  c["peak_upsample"], c["peak_min_relative"])
            out["image_id"].append(int(rec["image_id"]))
            out["class_ids"].append(cls)
            out["shape"].append(list(r.shape))
            out["response"].append(np.asarray(r, np.float16).tobytes())
            out["peaks"].append(json.dumps(pk))
        return out


def _plain(rec: dict) -> dict:
    """A record row from Ray Data (numpy scalars/arrays) -> ImageRecord fields."""
    return {"image_id": int(rec["image_id"]), "path": str(rec["path"]),
            "height": int(rec["height"]), "width": int(rec["width"]),
            "class_ids": tuple(int(c) for c in rec["class_ids"])}


def cam_outputs(cfg: Config, dataset, run: RunDir, split: str = "train") -> None:
    """Response maps and PRM peaks of every image (Ray Data actors running the trained
    CAM) -> <dir>/cams.parquet (float16 responses) and <dir>/peaks.parquet."""
    import ray

    d = _dir(split)
    step = f"{d}/peaks"
    if run.is_done(step, _inputs(step)):
        return
    t0 = time.time()
    rows = (ray.data.from_items(_records(dataset))
            .map_batches(_CamPredictor, fn_constructor_kwargs={
                "state_uri": run.uri_of("seeds/cam/state.pt"),
                "cam": dataclasses.asdict(cfg.cam)},
                batch_size=16, compute=_actors(cfg))
            .take_all())
    rows.sort(key=lambda r: r["image_id"])
    responses = [np.frombuffer(r["response"], np.float16).reshape(r["shape"]) for r in rows]
    write_table_atomic(peaks.cams_table([r["image_id"] for r in rows],
                                        [list(r["class_ids"]) for r in rows], responses),
                       run.uri_of(f"{d}/cams.parquet"))
    flat = [(r["image_id"], *p) for r in rows for p in json.loads(r["peaks"])]
    import pyarrow as pa
    table = pa.table({
        "image_id": [f[0] for f in flat], "class_id": [f[1] for f in flat],
        "x": [f[2] for f in flat], "y": [f[3] for f in flat], "score": [f[4] for f in flat],
    }, schema=PEAKS_SCHEMA)
    write_table_atomic(table, run.uri_of(f"{d}/peaks.parquet"))
    run.commit(step, [f"{d}/cams.parquet", f"{d}/peaks.parquet"],
               {"peaks": len(flat), "images": len(rows)}, time.time() - t0,
               inputs=_inputs(step))


# -- proposals ----------------------------------------------------------------------------

def _proposal_batch(batch: dict[str, np.ndarray], method: str, max_proposals: int,
                    min_size: int, mcg_dir: str) -> dict[str, list]:
    from pathlib import Path

    out: dict[str, list] = {"image_id": [], "boxes": [], "objectness": []}
    for iid, path in zip(batch["image_id"], batch["path"]):
        if method == "mcg":
            boxes, scores = proposals.load_mcg(Path(mcg_dir) / f"{Path(str(path)).stem}.mat",
                                               max_proposals)
        else:
            from wsis_ray.data.datasets import load_image
            boxes, scores = proposals.selective_search(load_image(str(path)), max_proposals,
                                                       min_size)
        out["image_id"].append(int(iid))
        out["boxes"].append(boxes.tolist())
        out["objectness"].append(scores.tolist())
    return out


def compute_proposals(cfg: Config, dataset, run: RunDir, split: str = "train") -> None:
    """Proposals with objectness B_S for every image, once (Ray Data tasks) ->
    <dir>/proposals.parquet; a re-run with the same run directory reuses it."""
    import ray

    d = _dir(split)
    step = f"{d}/proposals"
    if run.is_done(step, _inputs(step)):
        return
    if cfg.proposals.method not in ("selective_search", "mcg"):
        raise ValueError(f"proposals.method must be selective_search or mcg, "
                         f"got {cfg.proposals.method!r}")
    t0 = time.time()
    p = cfg.proposals
    items = [{"image_id": r.image_id, "path": r.path} for r in dataset.records]
    rows = (ray.data.from_items(items)
            .map_batches(_proposal_batch, batch_size=8, fn_kwargs={
                "method": p.method, "max_proposals": p.max_proposals,
                "min_size": p.min_size, "mcg_dir": p.mcg_dir})
            .take_all())
    rows.sort(key=lambda r: r["image_id"])
    table = _proposals_table(rows)
    write_table_atomic(table, run.uri_of(f"{d}/proposals.parquet"))
    counts = [len(r["objectness"]) for r in rows]
    run.commit(step, [f"{d}/proposals.parquet"],
               {"images": len(rows), "mean_proposals": float(np.mean(counts)) if counts else 0},
               time.time() - t0, inputs=_inputs(step))


def _proposals_table(rows: list[dict]):
    import pyarrow as pa

    return pa.table({
        "image_id": [int(r["image_id"]) for r in rows],
        "boxes": [[[float(v) for v in b] for b in r["boxes"]] for r in rows],
        "objectness": [[float(v) for v in r["objectness"]] for r in rows],
    }, schema=PROPOSALS_SCHEMA)


def read_proposals(uri: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """image_id -> (boxes (N, 4) float32, objectness (N,) float32) from proposals.parquet."""
    out = {}
    for row in read_table(uri).to_pylist():
        boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
        out[row["image_id"]] = (boxes, np.asarray(row["objectness"], np.float32))
    return out


def read_peaks(uri: str) -> dict[int, list[tuple]]:
    """image_id -> [(class_id, x, y, score)] from peaks.parquet."""
    out: dict[int, list[tuple]] = {}
    for row in read_table(uri).to_pylist():
        out.setdefault(row["image_id"], []).append(
            (row["class_id"], row["x"], row["y"], row["score"]))
    return out


# -- AffinityNet --------------------------------------------------------------------------

def train_affinity(cfg: Config, dataset, run: RunDir, split: str = "train") -> None:
    """Train AffinityNet on the CAMs' confident regions (Ray Train) ->
    seeds/affinity/state.pt. The trunk starts from the CAM's (backbone.share_trunk)."""
    from wsis_ray.train import fit, load_result_state

    step, rel = "seeds/affinity", "seeds/affinity/state.pt"
    if run.is_done(step, _inputs(step)):
        return
    t0 = time.time()
    init = None
    if cfg.backbone.share_trunk:
        cam_state = load_torch_state(run.uri_of("seeds/cam/state.pt"))["model"]
        init = {k[len("trunk."):]: v for k, v in cam_state.items() if k.startswith("trunk.")}
    loop_config = {
        "records": _records(dataset), "cams_uri": run.uri_of("seeds/cams.parquet"),
        "backbone": dataclasses.asdict(cfg.backbone),
        "affinity": dataclasses.asdict(cfg.affinity), "init_trunk": init,
        "seed": cfg.train.seed, "checkpoint_every": cfg.train.checkpoint_every,
    }
    storage = _storage(cfg, run)
    result = fit(affinity.train_loop_per_worker, loop_config, cfg.train,
                 run.train_name("seeds-affinity", storage), storage)
    state = load_result_state(result)
    _save_state(run, rel, {"model": state["model"], "affinity": dataclasses.asdict(cfg.affinity),
                           "backbone": dataclasses.asdict(cfg.backbone)})
    m = result.metrics or {}
    run.commit(step, [rel], {k: float(m[k]) for k in ("loss", "bg", "fg", "neg") if k in m},
               time.time() - t0, inputs=_inputs(step))


class _SemanticPredictor:
    """Ray Data actor: AffinityNet random walk of one batch's CAMs -> label PNG bytes."""

    def __init__(self, state_uri: str, walk: dict):
        import torch

        from wsis_ray.config import BackboneConfig

        state = load_torch_state(state_uri)
        # the random walk's settings are this run's; the input size is the network's own,
        # scaled by infer_scale (a finer affinity grid for small images)
        size = max(32, round(state["affinity"]["image_size"] * walk["infer_scale"]))
        self.cfg = {**walk, "image_size": size}
        self.model = affinity.AffinityNet(BackboneConfig(**state["backbone"]))
        self.model.load_state_dict(state["model"])
        self.model.eval()
        torch.set_grad_enabled(False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import cv2

        c = self.cfg
        out: dict[str, list] = {"image_id": [], "png": []}
        for vals in zip(*batch.values()):
            row = dict(zip(batch, vals))
            rec = _plain(row)
            cam = peaks.normalized_cam(
                np.frombuffer(row["response"], np.float16).reshape(
                    [int(s) for s in row["shape"]]), rec["class_ids"])
            label, _ = affinity.semantic_labels(
                self.model, peaks.load_record_image(rec), cam, rec["class_ids"],
                c["image_size"], c["radius"], c["beta"], c["walk_iterations"], c["bg_power"],
                c["ignore_margin"])
            ok, png = cv2.imencode(".png", label)
            out["image_id"].append(rec["image_id"])
            out["png"].append(png.tobytes())
        return out


def semantic_labels(cfg: Config, dataset, run: RunDir, split: str = "train") -> None:
    """Pseudo semantic labels (AffinityNet random walk of the CAMs, Ray Data actors) ->
    <dir>/semantic/<image_id>.png (uint8: 0 background, c+1 class c, 255 ignore)."""
    import ray

    d = _dir(split)
    step = f"{d}/semantic"
    if run.is_done(step, _inputs(step)):
        return
    t0 = time.time()
    cams = {row["image_id"]: row for row in read_table(run.uri_of(f"{d}/cams.parquet")).to_pylist()}
    items = [{**dataclasses.asdict(r), "class_ids": list(r.class_ids),
              "shape": cams[r.image_id]["shape"], "response": cams[r.image_id]["response"]}
             for r in dataset.records]
    rows = (ray.data.from_items(items)
            .map_batches(_SemanticPredictor, fn_constructor_kwargs={
                "state_uri": run.uri_of("seeds/affinity/state.pt"),
                "walk": dataclasses.asdict(cfg.affinity)},
                batch_size=8, compute=_actors(cfg))
            .take_all())
    for r in rows:
        run.write_bytes(f"{d}/semantic/{int(r['image_id'])}.png", bytes(r["png"]))
    run.commit(step, [f"{d}/semantic"], {"images": len(rows)}, time.time() - t0,
               inputs=_inputs(step))


def read_semantic(run: RunDir, image_id: int, split: str = "train") -> np.ndarray:
    import cv2

    with run.fs.open_input_stream(run.path(f"{_dir(split)}/semantic/{image_id}.png")) as f:
        data = np.frombuffer(f.read(), np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)


# -- bags ---------------------------------------------------------------------------------

def make_bags(cfg: Config, dataset, run: RunDir, split: str = "train") -> None:
    """Peak bags ranked by Eq. 4 against the semantic labels -> <dir>/bags.parquet."""
    import pyarrow as pa

    d = _dir(split)
    step = f"{d}/bags"
    if run.is_done(step, _inputs(step)):
        return
    t0 = time.time()
    props = read_proposals(run.uri_of(f"{d}/proposals.parquet"))
    pks = read_peaks(run.uri_of(f"{d}/peaks.parquet"))
    rows, totals = [], {"fallback": 0, "dropped": 0}
    for rec in dataset.records:
        boxes, obj = props.get(rec.image_id, (np.zeros((0, 4), np.float32), np.zeros(0)))
        out, stats = bags.peak_bags(boxes, obj, pks.get(rec.image_id, []),
                                    read_semantic(run, rec.image_id, split), cfg.bags.size,
                                    cfg.bags.background_weight, cfg.bags.exclusive)
        for k in totals:
            totals[k] += stats[k]
        for i, b in enumerate(out):
            rows.append({"image_id": rec.image_id, "bag_id": i, "class_id": b.class_id,
                         "peak_x": b.peak[0], "peak_y": b.peak[1], "source_box": None,
                         "proposal_indices": b.proposal_indices.tolist()})
    write_table_atomic(pa.Table.from_pylist(rows, schema=BAGS_SCHEMA),
                       run.uri_of(f"{d}/bags.parquet"))
    run.commit(step, [f"{d}/bags.parquet"], {"bags": len(rows), **totals}, time.time() - t0,
               inputs=_inputs(step))


def read_bags(uri: str) -> dict[int, list[bags.Bag]]:
    out: dict[int, list[bags.Bag]] = {}
    for row in read_table(uri).to_pylist():
        out.setdefault(row["image_id"], []).append(bags.Bag(
            row["class_id"], np.asarray(row["proposal_indices"], np.int32),
            peak=(row["peak_x"], row["peak_y"]) if row["peak_x"] is not None else None,
            source_box=np.asarray(row["source_box"]) if row["source_box"] else None))
    return out


# -- figures ------------------------------------------------------------------------------

def semantic_gt(gt) -> np.ndarray:
    """Instance ground truth -> semantic label map (0 bg, c+1, 255 void)."""
    label = np.zeros((gt.height, gt.width), np.uint8)
    for m, c, crowd in zip(gt.masks, gt.class_ids, gt.iscrowd):
        label[m] = affinity.IGNORE if crowd else c + 1
    if gt.void is not None:
        label[gt.void] = affinity.IGNORE
    return label


def figures(cfg: Config, dataset, run: RunDir, gt: dict, split: str) -> dict[str, Any]:
    """Peak, proposal and bag recall and pseudo-label mIoU of one split's seed artefacts."""
    import cv2

    d = _dir(split)
    ids = [r.image_id for r in dataset.records if r.image_id in gt]
    pks = read_peaks(run.uri_of(f"{d}/peaks.parquet"))
    props = read_proposals(run.uri_of(f"{d}/proposals.parquet"))
    bgs = read_bags(run.uri_of(f"{d}/bags.parquet"))
    cams = peaks.read_cams(run.uri_of(f"{d}/cams.parquet"), normalize=True)
    g = [gt[i] for i in ids]
    valid = [~x.iscrowd for x in g]
    out = peaks.peak_recall([pks.get(i, []) for i in ids], [x.masks[v] for x, v in zip(g, valid)],
                            [x.class_ids[v] for x, v in zip(g, valid)])
    boxes = [props.get(i, (np.zeros((0, 4)), None))[0] for i in ids]
    gt_boxes = [x.boxes[v] for x, v in zip(g, valid)]
    rec = proposals.proposal_recall(boxes, gt_boxes)
    out.update({f"proposal_{k}": v for k, v in rec.items() if k != "gt_instances"})
    out["bag_recall"] = bags.bag_recall([bgs.get(i, []) for i in ids], boxes, gt_boxes,
                                        [x.class_ids[v] for x, v in zip(g, valid)])
    n = dataset.num_classes + 1
    conf_aff = np.zeros((n, n + 1), np.int64)
    conf_cam = {t: np.zeros((n, n + 1), np.int64) for t in CAM_THRESHOLDS}
    for i, x in zip(ids, g):
        target = semantic_gt(x)
        cls = dataset.by_id(i).class_ids
        conf_aff += affinity.confusion(read_semantic(run, i, split), target, n)
        cam = peaks.resize_maps(cams[i], (x.height, x.width)).numpy()
        for t in CAM_THRESHOLDS:
            conf_cam[t] += affinity.confusion(affinity.cam_threshold_labels(cam, cls, t),
                                              target, n)
    cam_miou = {t: affinity.mean_iou(c) for t, c in conf_cam.items()}
    best = max(cam_miou, key=cam_miou.get)
    out["miou_affinity"] = affinity.mean_iou(conf_aff)
    out["miou_cam"] = cam_miou[best]
    out["cam_threshold"] = float(best)
    return {k: round(float(v), 4) for k, v in out.items()}


# -- the whole round 0 --------------------------------------------------------------------

TRAIN_STEPS = (train_cam, cam_outputs, compute_proposals, train_affinity, semantic_labels,
               make_bags)
SPLIT_STEPS = (cam_outputs, compute_proposals, semantic_labels, make_bags)


def run_seeds(cfg: Config, run: RunDir, evaluate: bool = True) -> dict[str, Any]:
    """All round-0 steps on the training split, then (if ground truth is available and
    `evaluate`) the same inference steps and the figures on the evaluation split."""
    from wsis_ray.data.datasets import load_eval_dataset, load_train_dataset
    from wsis_ray.data.groundtruth import load_eval_gt

    dataset = load_train_dataset(cfg.data)
    for step in TRAIN_STEPS:
        step(cfg, dataset, run)
    if not evaluate:
        return {}
    if run.is_done("seeds/metrics", _inputs("seeds/metrics")):
        return run.metrics("seeds/metrics")
    t0 = time.time()
    val = load_eval_dataset(cfg.data, "val")
    labelled = dataclasses.replace(val, records=[r for r in val.records if r.class_ids])
    for step in SPLIT_STEPS:
        step(cfg, labelled, run, "val")
    gt = load_eval_gt(cfg.data, "val", dataset.category_ids)
    metrics = {"split": "val", "images": len(labelled), **figures(cfg, labelled, run, gt, "val")}
    manifest = run.manifest()["steps"]
    metrics["seconds"] = {k: round(v.get("seconds") or 0, 1) for k, v in manifest.items()
                          if k.startswith("seeds/")}
    metrics["seconds"]["seeds/metrics"] = round(time.time() - t0, 1)
    run.write_text("seeds/metrics.json", json.dumps(metrics, indent=1))
    run.commit("seeds/metrics", ["seeds/metrics.json"], metrics, time.time() - t0,
               inputs=_inputs("seeds/metrics"))
    return metrics


def run(cfg: Config, run_dir: str | RunDir, evaluate: bool = True) -> dict[str, Any]:
    """ARCHITECTURE.md's entry point: `run_seeds` on a run directory path or RunDir."""
    return run_seeds(cfg, run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir), evaluate)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="YAML config (defaults if omitted)")
    ap.add_argument("--run-dir", default=None, help="run directory (default: cfg.run_dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config field, e.g. cam.steps=50")
    ap.add_argument("--force", action="store_true",
                    help="continue a run directory made with another config")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation split")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    import ray

    if not ray.is_initialized():
        from wsis_ray.train import start_local_ray

        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            start_local_ray(log_to_driver=False)
    run_dir = RunDir(cfg.run_dir)
    run_dir.check_config(cfg, force=args.force)
    t0 = time.time()
    metrics = run_seeds(cfg, run_dir, evaluate=not args.no_eval)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(metrics), flush=True)
    return metrics


if __name__ == "__main__":
    main()
