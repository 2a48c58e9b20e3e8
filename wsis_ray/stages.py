"""Ray Data stages of a round: SS inference and CCGR refinement, writing Parquet pseudo labels.

    images + selected boxes + peaks
      └─ map_batches(ScoreMaps)   actor pool; the SS branch's softmax score maps (GPU when present)
      └─ map_batches(Refine)      actor pool (min..max: autoscales); CCGR (Eq. 2-3) + pseudo masks
      └─ write_parquet            PSEUDO_LABEL_SCHEMA, plain Arrow types

Both stage callables are ordinary classes, so `refine_local` runs the very same code in a
plain loop (for tests and for measuring Ray's overhead in bench/refine.py).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from wsis_ray import ccgr
from wsis_ray.config import CCGRConfig
from wsis_ray.data.datasets import load_image
from wsis_ray.data.records import (PSEUDO_LABEL_SCHEMA, ImageRecord, encode_mask,
                                   load_torch_state, resolve_fs)

# (images, image_ids) -> one (C+1, H, W) softmax score map per image
ScoreFn = Callable[[list[np.ndarray], list[int]], list[np.ndarray]]


def image_rows(records: list[ImageRecord], boxes: pa.Table, anchors: pa.Table) -> list[dict]:
    """One row per image that has boxes: its record, its boxes (class, score, anchor peak)
    and every anchor (peak) of the image, which the CCGR peak rule needs.

    boxes:   image_id, class_id, box [x1,y1,x2,y2], score, peak_x, peak_y
    anchors: image_id, class_id, x, y  (round 1: the CAM peaks; later: the bags' anchors)
    """
    by_image: dict[int, dict[str, list]] = {}
    for r in boxes.to_pylist():
        d = by_image.setdefault(r["image_id"], {"boxes": [], "class_ids": [], "box_scores": [],
                                                "peaks": []})
        d["boxes"].append([float(v) for v in r["box"]])
        d["class_ids"].append(int(r["class_id"]))
        d["box_scores"].append(float(r["score"]))
        d["peaks"].append([float(r["peak_x"]), float(r["peak_y"])])
    all_peaks: dict[int, list] = {}
    for a in anchors.to_pylist():
        all_peaks.setdefault(a["image_id"], []).append([float(a["class_id"]), float(a["x"]),
                                                        float(a["y"])])
    rows = []
    for rec in records:
        if rec.image_id not in by_image:
            continue
        d = by_image[rec.image_id]
        rows.append({"image_id": rec.image_id, "path": rec.path, "height": rec.height,
                     "width": rec.width, **d,
                     "all_peaks": all_peaks.get(rec.image_id, [])})
    return rows


class ScoreMaps:
    """Stage 1: the SS branch's class score maps (C+1, H, W) for each image in the batch."""

    def __init__(self, make_score_fn: Callable[[], ScoreFn], ray_cpus: float | None = None):
        if ray_cpus:
            torch.set_num_threads(core_share_threads(ray_cpus))
        self.score_fn = make_score_fn()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images = [load_image(ImageRecord(int(i), str(p), int(h), int(w), ()))
                  for i, p, h, w in zip(batch["image_id"], batch["path"], batch["height"],
                                        batch["width"])]
        maps = self.score_fn(images, [int(i) for i in batch["image_id"]])
        out = {k: v for k, v in batch.items() if k != "path"}
        # Each image's boxes and peaks as one (n, width) float array, which Ray Data keeps as
        # a variable-shaped tensor; as they arrive (object arrays of object arrays) Arrow
        # cannot take them, and Ray Data pickles them with a conversion warning in the log.
        for k, width in (("boxes", 4), ("peaks", 2), ("all_peaks", 3)):
            out[k] = _ragged([_rows(v, width) for v in batch[k]])
        # float16 halves what moves between stages; CCGR works in float32 again.
        out["score_maps"] = _ragged([m.astype(np.float16) for m in maps])
        return out


def core_share_threads(cpus: float) -> int:
    """Torch threads for a Ray actor granted `cpus` CPUs: that many of its node's cores,
    fewer where Ray counts more CPUs on the node than it has cores. The local Ray of
    steps.init_ray counts two per core so that Train workers and Data actors fit side by
    side; the two stages here then run side by side too, and at int(cpus) threads each
    they put four threads on two cores, where torch's OpenMP barriers stall (round 1's
    CCGR step of configs/results.yaml on 2 cores: 491 s that way, 224 s at one thread per
    actor, with the same step metrics; the maps move by float rounding, so the IS
    trainings after it are a new draw)."""
    import os

    import ray

    node = ray.get_runtime_context().get_node_id()
    total = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node),
                 0.0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = min(1.0, (cores or 1) / total) if total else 1.0
    return max(1, int(cpus * share))


class PrecomputedScoreFn:
    """Score-map factory for maps computed elsewhere: DIR/<image_id>.npy, (C+1, H, W)."""

    def __init__(self, maps_dir: str):
        self.maps_dir = maps_dir.rstrip("/")

    def __call__(self) -> ScoreFn:
        return self.load

    def load(self, images: list[np.ndarray], image_ids: list[int]) -> list[np.ndarray]:
        import io

        fs, root = resolve_fs(self.maps_dir)
        out = []
        for im, i in zip(images, image_ids):
            try:
                with fs.open_input_stream(f"{root}/{i}.npy") as f:
                    m = np.load(io.BytesIO(f.read()))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"score map {self.maps_dir}/{i}.npy of image {i} is "
                                        "missing") from e
            if m.ndim != 3 or m.shape[1:] != im.shape[:2]:
                raise ValueError(f"score map {self.maps_dir}/{i}.npy has shape {m.shape}; "
                                 f"expected (C+1, {im.shape[0]}, {im.shape[1]})")
            out.append(m.astype(np.float32))
        return out


class CachedScoreFn:
    """A ScoreFn that keeps its maps in DIR/<image_id>.npy (float16): read where present,
    computed by `score_fn` and written (under a temporary name, then renamed) where not, so
    the steps that need the same maps again (round 1's CCGR and the Table 3 rows, under
    round.ablations) read them instead of redoing SS inference and the dense CRF. The maps
    come back float16-rounded either way, as the ScoreMaps stage sends them on."""

    def __init__(self, cache_uri: str, score_fn: ScoreFn):
        self.cache_uri, self.score_fn = cache_uri.rstrip("/"), score_fn

    def __call__(self, images: list[np.ndarray], image_ids: list[int]) -> list[np.ndarray]:
        import io

        fs, root = resolve_fs(self.cache_uri)
        maps: list[np.ndarray | None] = []
        for im, i in zip(images, image_ids):
            try:
                with fs.open_input_stream(f"{root}/{i}.npy") as f:
                    m = np.load(io.BytesIO(f.read()))
                maps.append(m if m.shape[1:] == im.shape[:2] else None)
            except FileNotFoundError:
                maps.append(None)
        todo = [k for k, m in enumerate(maps) if m is None]
        if todo:
            fs.create_dir(root, recursive=True)
            computed = self.score_fn([images[k] for k in todo], [image_ids[k] for k in todo])
            for k, m in zip(todo, computed):
                maps[k] = np.asarray(m, np.float16)
                buf = io.BytesIO()
                np.save(buf, maps[k])
                tmp = f"{root}/.tmp-{uuid.uuid4().hex}"
                with fs.open_output_stream(tmp) as f:
                    f.write(buf.getvalue())
                fs.move(tmp, f"{root}/{image_ids[k]}.npy")
        return [m.astype(np.float32) for m in maps]


class Refine:
    """Stage 2: CCGR on every box of the batch in one tensor program, then pseudo masks."""

    def __init__(self, cfg: dict, round_index: int, ray_cpus: float | None = None):
        if ray_cpus:
            torch.set_num_threads(core_share_threads(ray_cpus))
        self.cfg = CCGRConfig(**cfg)
        self.round = round_index

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = refine_batch(batch, self.cfg, self.round)
        return pa.Table.from_pylist(rows, schema=PSEUDO_LABEL_SCHEMA)


def refine_batch(batch: dict[str, np.ndarray], cfg: CCGRConfig, round_index: int) -> list[dict]:
    """Refine all boxes of a batch of images; return PSEUDO_LABEL_SCHEMA rows."""
    maps = [torch.from_numpy(np.asarray(s, dtype=np.float32)) for s in batch["score_maps"]]
    boxes, img_idx, cls, own_peak, scores = [], [], [], [], []
    pk_img, pk_cls, pk_xy = [], [], []
    for i in range(len(maps)):
        for b, c, s, p in zip(batch["boxes"][i], batch["class_ids"][i], batch["box_scores"][i],
                              batch["peaks"][i]):
            boxes.append(np.asarray(b, dtype=np.float32))
            img_idx.append(i)
            cls.append(int(c))
            scores.append(float(s))
            own_peak.append(np.asarray(p, dtype=np.float32))
        for c, x, y in batch["all_peaks"][i]:
            pk_img.append(i)
            pk_cls.append(int(c))
            pk_xy.append((x, y))
    if not boxes:
        return []
    before = torch.from_numpy(np.stack(boxes))
    image_index = torch.tensor(img_idx)
    class_ids = torch.tensor(cls)
    if cfg.enabled:
        result = ccgr.refine(
            maps, before, image_index, class_ids,
            peak_xy=torch.from_numpy(np.stack(own_peak)),
            peaks=(torch.tensor(pk_img, dtype=torch.long), torch.tensor(pk_cls, dtype=torch.long),
                   torch.tensor(pk_xy, dtype=torch.float64).reshape(-1, 2)),
            cfg=cfg, record_every=cfg.record_every or None)
        after, loss, iters, reasons = (result.boxes, result.loss.tolist(),
                                       result.iterations.tolist(), result.stop_reason)
        traj = result.trajectory
    else:
        after = before
        loss = ccgr.eq3_loss(maps, _clip(before, maps, img_idx), image_index, class_ids,
                             cfg.context_scale).tolist()
        iters, reasons = [0] * len(boxes), ["disabled"] * len(boxes)
        traj = None
    kept = dedupe(after, torch.tensor(scores), image_index, class_ids, cfg.dedupe_iou)
    masks = ccgr.pseudo_masks(maps, after[kept], image_index[kept], class_ids[kept],
                              cfg.mask_threshold)
    rows = []
    for m, k in enumerate(kept.tolist()):
        h, w = maps[img_idx[k]].shape[-2:]
        rows.append({
            "image_id": int(batch["image_id"][img_idx[k]]), "class_id": cls[k],
            "box_before": before[k].tolist(), "box_after": after[k].tolist(),
            "score": scores[k], "rle_counts": encode_mask(masks[m]),
            "height": int(h), "width": int(w), "round": round_index,
            "ccgr_loss": float(loss[k]), "ccgr_iterations": int(iters[k]),
            "stop_reason": reasons[k],
            "box_trajectory": None if traj is None else traj[:, k].tolist(),
        })
    return rows


def dedupe(boxes: torch.Tensor, scores: torch.Tensor, image_index: torch.Tensor,
           class_ids: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices (ascending) of the boxes kept by per-image, per-class NMS at `iou` on the
    refined boxes (highest score first); all of them when iou <= 0 (the paper)."""
    from torchvision.ops import batched_nms

    if iou <= 0 or len(boxes) == 0:
        return torch.arange(len(boxes))
    groups = image_index.long() * (int(class_ids.max()) + 1) + class_ids.long()
    return batched_nms(boxes.float(), scores.float(), groups, iou).sort().values


def _clip(boxes: torch.Tensor, maps: list[torch.Tensor], img_idx: list[int]) -> torch.Tensor:
    """Boxes clipped to their images (eq3_loss needs boxes inside the image)."""
    hw = torch.tensor([maps[i].shape[-2:] for i in img_idx], dtype=boxes.dtype)
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(min=0).minimum(hw[:, 1:2])
    out[:, 1::2] = out[:, 1::2].clamp(min=0).minimum(hw[:, 0:1])
    return out


def _rows(rows: Any, width: int) -> np.ndarray:
    """A sequence of equal-length rows (lists or arrays; possibly none) as (n, width) float64."""
    return np.array([np.asarray(r, dtype=np.float64) for r in rows],
                    dtype=np.float64).reshape(-1, width)


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def run_refine_stage(rows: list[dict], make_score_fn: Callable[[], ScoreFn], cfg: CCGRConfig,
                     round_index: int, out_uri: str, *, min_actors: int = 1,
                     max_actors: int = 2, batch_size: int = 8, num_gpus: float = 0.0,
                     cpus_per_actor: float = 1.0) -> dict[str, Any]:
    """Run the two stages on Ray Data and write the pseudo labels as Parquet under `out_uri`
    (a directory). Written under a temporary name first and renamed when complete, so a
    killed stage never leaves a directory that looks finished."""
    import ray.data
    from ray.data import ActorPoolStrategy

    t0 = time.time()
    fs, out_path = resolve_fs(out_uri)
    parent = out_path.rsplit("/", 1)[0]
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    fs.create_dir(tmp, recursive=True)
    # On CPU the score maps (SS inference and the dense CRF) cost several times the CCGR
    # after them, and one map actor kept its CCGR actor waiting with a core idle (README
    # "Results"): there, two map actors per CCGR actor share its CPUs. A GPU map actor holds
    # a whole GPU, so on GPUs the stages stay one to one.
    maps_per_refine, map_cpus = (1, cpus_per_actor) if num_gpus else (2, cpus_per_actor / 2)
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(ScoreMaps, fn_constructor_kwargs={"make_score_fn": make_score_fn,
                                                          "ray_cpus": map_cpus},
                        batch_size=batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(min_size=maps_per_refine * min_actors,
                                                  max_size=maps_per_refine * max_actors),
                        num_gpus=num_gpus, num_cpus=map_cpus)
    ds = ds.map_batches(Refine, fn_constructor_kwargs={"cfg": asdict(cfg),
                                                       "round_index": round_index,
                                                       "ray_cpus": cpus_per_actor},
                        batch_size=batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
                        num_cpus=cpus_per_actor)
    ds.write_parquet(tmp, filesystem=fs)
    if fs.get_file_info(out_path).type != 0:  # a previous, uncommitted attempt
        fs.delete_dir(out_path)
    fs.move(tmp, out_path)
    return {"images": len(rows), "seconds": time.time() - t0}


def refine_local(rows: list[dict], make_score_fn: Callable[[], ScoreFn], cfg: CCGRConfig,
                 round_index: int, batch_size: int = 8) -> pa.Table:
    """The same two stages in a plain loop, without Ray."""
    scorer, refiner = ScoreMaps(make_score_fn), Refine(asdict(cfg), round_index)
    tables = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = {k: _ragged([r[k] for r in chunk]) if isinstance(chunk[0][k], list)
                 else np.array([r[k] for r in chunk]) for k in chunk[0]}
        tables.append(refiner(scorer(batch)))
    return pa.concat_tables(tables) if tables else PSEUDO_LABEL_SCHEMA.empty_table()


class Select:
    """MIL branch forward on a batch of images -> the best proposal of every bag."""

    def __init__(self, state_uri: str, backbone: dict, mil_cfg: dict, num_classes: int,
                 num_threads: int | None = None):
        from wsis_ray.branches import mil
        from wsis_ray.config import BackboneConfig, MILConfig

        if num_threads:
            torch.set_num_threads(num_threads)
        state = load_torch_state(state_uri)
        self.cfg = MILConfig(**mil_cfg)
        self.model = mil.load_model(state["model"], BackboneConfig(**backbone), self.cfg,
                                    num_classes)
        if torch.cuda.is_available():
            self.model = self.model.cuda()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from wsis_ray.branches import mil

        inputs = [json.loads(x) for x in batch["inputs"]]
        with torch.no_grad():
            chosen = mil.select_boxes(
                self.model, [load_image(str(p)) for p in batch["path"]],
                [np.asarray(x["boxes"], np.float32).reshape(-1, 4) for x in inputs],
                [[(b, c, np.asarray(idx, np.int64)) for b, c, idx in x["bags"]] for x in inputs],
                self.cfg.image_size)
        rows = [json.dumps(dict(c, image_id=int(i), box=[float(v) for v in c["box"]]))
                for i, image_rows in zip(batch["image_id"], chosen) for c in image_rows]
        return {"row": np.asarray(rows, dtype=object)}


def run_select_stage(records: list[ImageRecord], inputs: dict[int, dict[str, Any]],
                     state_uri: str, backbone: dict, mil_cfg: dict, num_classes: int, *,
                     max_actors: int = 2, batch_size: int = 8, num_gpus: float = 0.0,
                     cpus_per_actor: float = 1.0) -> list[dict]:
    """One box per bag (the MIL branch's choice) for every record with bags, on a Ray Data
    actor pool. inputs: `mil.read_mil_inputs(...)`. Rows sorted by (image_id, bag_id)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    items = [{"image_id": r.image_id, "path": r.path, "inputs": json.dumps({
        "boxes": inputs[r.image_id]["boxes"].tolist(),
        "bags": [[int(b), int(c), np.asarray(idx).tolist()]
                 for b, c, idx in inputs[r.image_id]["bags"]]})}
             for r in records if inputs.get(r.image_id, {}).get("bags")]
    if not items:
        return []
    ds = ray.data.from_items(items).map_batches(
        Select, fn_constructor_kwargs={"state_uri": state_uri, "backbone": backbone,
                                       "mil_cfg": mil_cfg, "num_classes": num_classes,
                                       "num_threads": max(1, int(cpus_per_actor))},
        batch_size=batch_size, batch_format="numpy", num_gpus=num_gpus, num_cpus=cpus_per_actor,
        compute=ActorPoolStrategy(min_size=1, max_size=max_actors))
    rows = [json.loads(r["row"]) for r in ds.take_all()]
    return sorted(rows, key=lambda r: (r["image_id"], r["bag_id"]))


class Predict:
    """IS branch forward pass on a batch of images -> COCO results rows (RLE masks)."""

    def __init__(self, checkpoint_uri: str, score_threshold: float, category_ids: list[int],
                 num_threads: int | None = None):
        from wsis_ray.branches import instance

        if num_threads:
            torch.set_num_threads(num_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, _ = instance.load_checkpoint(checkpoint_uri, device=device)
        self.threshold = score_threshold
        self.category_ids = category_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from wsis_ray.branches import instance

        images = [load_image(str(p)) for p in batch["path"]]
        outputs = instance.predict(self.model, images, score_threshold=self.threshold)
        rows = instance.to_coco_results([int(i) for i in batch["image_id"]], outputs,
                                        self.category_ids)
        return {"result": np.array([json.dumps(r) for r in rows], dtype=object)}


def run_predict_stage(records: list[ImageRecord], checkpoint_uri: str, score_threshold: float,
                      category_ids: list[int], *, max_actors: int = 2, batch_size: int = 4,
                      num_gpus: float = 0.0, cpus_per_actor: float = 1.0) -> list[dict]:
    """Predict every record's image with the IS checkpoint on a Ray Data actor pool."""
    import ray.data
    from ray.data import ActorPoolStrategy

    if not records:
        return []
    ds = ray.data.from_items([{"image_id": r.image_id, "path": r.path} for r in records])
    ds = ds.map_batches(Predict, fn_constructor_kwargs={
        "checkpoint_uri": checkpoint_uri, "score_threshold": score_threshold,
        "category_ids": list(category_ids), "num_threads": max(1, int(cpus_per_actor))},
        batch_size=batch_size, batch_format="numpy", num_gpus=num_gpus, num_cpus=cpus_per_actor,
        compute=ActorPoolStrategy(min_size=1, max_size=max_actors))
    return [json.loads(r["result"]) for r in ds.take_all()]
