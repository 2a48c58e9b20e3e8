"""Instance segmentation evaluation: mAP^r and mAP^b (paper, "Evaluation metrics").

Two protocols, reported side by side:

* VOC style, as IRN and BESTIE compute it with chainercv's `eval_instance_segmentation_voc`
  (re-implemented here: chainercv no longer imports on current numpy). Per class,
  predictions are sorted by score; each is matched to the ground truth of highest IoU; it
  is a hit if that IoU >= the threshold and the ground truth was not hit before, otherwise a
  false positive; a match to a crowd / difficult ground truth counts as neither. AP is the
  area under the monotone precision envelope (use_07_metric=False). Void pixels (VOC's 255
  border band) are removed from predictions before IoU. mAP^r at IoU 0.25, 0.5, 0.7, 0.75;
  mAP^b at 0.5 (box IoU in continuous coordinates).
* COCO style, as CIM reports it: pycocotools COCOeval (iouType segm and bbox) with
  iouThrs = [0.25, 0.5, 0.7, 0.75], 101 recall points, maxDets 100, one area range (all).
  Predictions get the same void removal.

A class without (non-crowd) ground truth has no AP and is left out of both means.

Beside them, class-agnostic AP^r and AP^b at 0.5 (VOC style, every class merged into one):
how well the model finds objects' extents whatever class it names. A model far better
class-agnostic than per class is limited by classification, not by its masks.

Predictions are COCO results JSON: [{"image_id", "category_id", "score",
"segmentation": {"size": [H, W], "counts": RLE}, "bbox": [x, y, w, h]}]; bbox defaults to
the mask's box.

CLI: python -m wsis_ray.evaluate --gt GT --pred PRED.json [--out metrics.json]
     GT is a COCO instances JSON, or a VOC2012 root with --image-set (default val) and
     --classes (default the 20 VOC classes); VOC image ids are those of `load_voc`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from wsis_ray.data.groundtruth import InstanceGT

MASK_IOUS = (0.25, 0.5, 0.7, 0.75)
BOX_IOUS = (0.5,)
COCO_IOUS = (0.25, 0.5, 0.7, 0.75)


# ---------------------------------------------------------------------------- IoU

def mask_iou(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """(P, H, W) x (G, H, W) bool -> (P, G) IoU, void pixels removed from both."""
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros((len(pred), len(gt)))
    p = pred.reshape(len(pred), -1)
    g = gt.reshape(len(gt), -1)
    if void is not None:
        keep = ~void.reshape(-1)
        p, g = p & keep, g & keep
    p32, g32 = p.astype(np.float32), g.astype(np.float32)
    inter = p32 @ g32.T
    union = p32.sum(1)[:, None] + g32.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[x1, y1, x2, y2] continuous boxes (no +1): (P, 4) x (G, 4) -> (P, G)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# ---------------------------------------------------------------------------- matching

def match_image(iou: np.ndarray, gt_crowd: np.ndarray, thresh: float) -> np.ndarray:
    """chainercv's rule for one image and class; predictions in descending score order.
    Returns per prediction 1 (hit), 0 (false positive) or -1 (ignored: matched a crowd /
    difficult ground truth)."""
    match = np.zeros(iou.shape[0], np.int8)
    if iou.shape[1] == 0:
        return match
    best = iou.argmax(axis=1)
    best[iou.max(axis=1) < thresh] = -1
    taken = np.zeros(iou.shape[1], bool)
    for i, g in enumerate(best):
        if g < 0:
            continue
        if gt_crowd[g]:
            match[i] = -1
        elif not taken[g]:
            match[i] = 1
        taken[g] = True
    return match


def precision_recall(scores: np.ndarray, matches: np.ndarray, n_pos: int):
    """Cumulative precision and recall over predictions sorted by score (ignored ones
    dropped). recall is None when the class has no ground truth."""
    order = np.argsort(-scores, kind="stable")
    m = matches[order]
    m = m[m >= 0]
    tp = np.cumsum(m == 1)
    fp = np.cumsum(m == 0)
    prec = tp / np.maximum(tp + fp, 1)
    rec = tp / n_pos if n_pos > 0 else None
    return prec, rec


def voc_ap(prec: np.ndarray, rec: np.ndarray | None) -> float:
    """Area under the monotone precision envelope (chainercv, use_07_metric=False)."""
    if rec is None:
        return math.nan
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def interpolated_ap(prec: np.ndarray, rec: np.ndarray | None, points: int = 101) -> float:
    """COCO's 101-point interpolated AP of the same curve (for cross-checking)."""
    if rec is None:
        return math.nan
    env = np.maximum.accumulate(prec[::-1])[::-1] if len(prec) else prec
    idx = np.searchsorted(rec, np.linspace(0, 1, points), side="left")
    q = np.array([env[i] if i < len(env) else 0.0 for i in idx])
    return float(q.mean())


@dataclass
class _Pred:
    masks: np.ndarray    # (P, H, W) bool
    boxes: np.ndarray    # (P, 4) xyxy
    classes: np.ndarray  # (P,) 0-based
    scores: np.ndarray   # (P,)


def _decode_predictions(gt: dict[int, InstanceGT], results: list[dict],
                        category_ids: Sequence[int]) -> dict[int, list[dict]]:
    index = {int(c): i for i, c in enumerate(category_ids)}
    by_image: dict[int, list[dict]] = {}
    bad_img = sorted({r["image_id"] for r in results if r["image_id"] not in gt})
    if bad_img:
        raise ValueError(f"{len(bad_img)} result image id(s) have no ground truth (first: {bad_img[:10]}); "
                         "predict on the evaluation split and keep its image ids")
    bad_cat = sorted({r["category_id"] for r in results if r["category_id"] not in index})
    if bad_cat:
        raise ValueError(f"result category ids {bad_cat[:10]} are not dataset categories {list(category_ids)}")
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    return by_image


def _image_predictions(g: InstanceGT, rs: list[dict], index: dict[int, int]) -> _Pred:
    h, w = g.height, g.width
    masks = np.zeros((len(rs), h, w), bool)
    boxes = np.zeros((len(rs), 4))
    for i, r in enumerate(rs):
        seg = r.get("segmentation")
        if seg is not None:
            if list(seg["size"]) != [h, w]:
                raise ValueError(f"image {g.image_id}: result mask size {seg['size']} != ground truth {[h, w]}")
            counts = seg["counts"]
            rle = {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            masks[i] = mask_utils.decode(rle).astype(bool)
        if r.get("bbox") is not None:
            x, y, bw, bh = r["bbox"]
            boxes[i] = [x, y, x + bw, y + bh]
        elif seg is not None:
            ys, xs = np.nonzero(masks[i].any(1))[0], np.nonzero(masks[i].any(0))[0]
            if len(xs):
                boxes[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return _Pred(masks, boxes, np.array([index[int(r["category_id"])] for r in rs], np.int64),
                 np.array([float(r["score"]) for r in rs]))


def collect_matches(gt: dict[int, InstanceGT], results: list[dict], category_ids: Sequence[int],
                    mask_ious: Sequence[float] = MASK_IOUS, box_ious: Sequence[float] = BOX_IOUS):
    """Per class: scores, per-threshold match arrays (mask and box) and the number of
    non-crowd ground truths. Decodes one image at a time (memory stays per-image)."""
    k = len(category_ids)
    index = {int(c): i for i, c in enumerate(category_ids)}
    by_image = _decode_predictions(gt, results, category_ids)
    has_masks = all(r.get("segmentation") is not None for r in results)
    scores: list[list[np.ndarray]] = [[] for _ in range(k)]
    mm = {t: [[] for _ in range(k)] for t in mask_ious}
    bm = {t: [[] for _ in range(k)] for t in box_ious}
    n_pos = np.zeros(k, np.int64)
    for iid, g in gt.items():
        for c in range(k):
            n_pos[c] += int(((g.class_ids == c) & ~g.iscrowd).sum())
        rs = by_image.get(iid, [])
        if not rs:
            continue
        p = _image_predictions(g, rs, index)
        for c in np.unique(p.classes):
            sel = np.flatnonzero(p.classes == c)
            sel = sel[np.argsort(-p.scores[sel], kind="stable")]
            gsel = np.flatnonzero(g.class_ids == c)
            scores[c].append(p.scores[sel])
            crowd = g.iscrowd[gsel]
            if has_masks:
                miou = mask_iou(p.masks[sel], g.masks[gsel], g.void)
                for t in mask_ious:
                    mm[t][c].append(match_image(miou, crowd, t))
            biou = box_iou(p.boxes[sel], g.boxes[gsel])
            for t in box_ious:
                bm[t][c].append(match_image(biou, crowd, t))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    scores_c = [cat(s) for s in scores]
    mask_m = {t: [cat(v).astype(np.int8) for v in mm[t]] for t in mask_ious} if has_masks else {}
    box_m = {t: [cat(v).astype(np.int8) for v in bm[t]] for t in box_ious}
    return scores_c, mask_m, box_m, n_pos


def _summ(aps: list[float]) -> dict:
    valid = [a for a in aps if not math.isnan(a)]
    return {"ap": [None if math.isnan(a) else a for a in aps],
            "mean": float(np.mean(valid)) if valid else None}


# ---------------------------------------------------------------------------- COCOeval

def coco_eval(gt: dict[int, InstanceGT], results: list[dict], category_ids: Sequence[int],
              iou_thresholds: Sequence[float] = COCO_IOUS) -> dict:
    """pycocotools COCOeval for segm and bbox at the given IoU thresholds (101-point AP,
    maxDets 100, area range all). Per class and mean over classes with ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats = [{"id": int(c), "name": str(c)} for c in category_ids]
    images = [{"id": int(i), "height": g.height, "width": g.width} for i, g in gt.items()]
    anns = []
    for iid, g in gt.items():
        for m, c, crowd, b in zip(g.masks, g.class_ids, g.iscrowd, g.boxes):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": int(iid), "category_id": int(category_ids[c]),
                         "segmentation": rle, "area": float(m.sum()), "iscrowd": int(crowd),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    dts = []
    for r in results:
        g = gt[r["image_id"]]
        seg = r.get("segmentation")
        rle = None
        if seg is not None:
            counts = seg["counts"]
            rle = {"size": list(seg["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            if g.void is not None:  # the same void removal as the VOC-style protocol
                m = mask_utils.decode(rle).astype(bool) & ~g.void
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        bbox = r.get("bbox")
        if bbox is None and rle is not None:
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
        dts.append({"id": len(dts) + 1, "image_id": int(r["image_id"]), "category_id": int(r["category_id"]),
                    "score": float(r["score"]), "segmentation": rle, "bbox": list(bbox), "iscrowd": 0,
                    "area": float(mask_utils.area(rle)) if rle is not None else float(bbox[2] * bbox[3])})
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": cats}
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": images, "annotations": dts, "categories": cats}
        coco_dt.createIndex()
        iou_types = ["bbox"] + (["segm"] if all(d["segmentation"] is not None for d in dts) else [])
        for iou_type in iou_types:
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.iouThrs = np.array(iou_thresholds, dtype=np.float64)
            ev.params.maxDets = [100]
            ev.params.areaRng = [[0, 1e10]]
            ev.params.areaRngLbl = ["all"]
            ev.params.catIds = [int(c) for c in category_ids]
            ev.evaluate()
            ev.accumulate()
            prec = ev.eval["precision"]  # [T, R, K, A, M]; K in sorted category-id order
            k_of = {c: k for k, c in enumerate(sorted(int(c) for c in category_ids))}
            per_t = {}
            for ti, t in enumerate(iou_thresholds):
                aps = []
                for cid in category_ids:
                    p = prec[ti, :, k_of[int(cid)], 0, 0]
                    aps.append(float(p.mean()) if (p > -1).all() else math.nan)
                per_t[_key(t)] = _summ(aps)
            out[iou_type] = per_t
    return out


def _key(t: float) -> str:
    return f"{t:g}"


# ---------------------------------------------------------------------------- entry points

def evaluate(gt: dict[int, InstanceGT], results: list[dict], category_ids: Sequence[int],
             class_names: Sequence[str] | None = None, mask_ious: Sequence[float] = MASK_IOUS,
             box_ious: Sequence[float] = BOX_IOUS, coco: bool = True,
             class_agnostic: bool = True) -> dict:
    """VOC-style mAP^r / mAP^b and the COCOeval variant, and (class_agnostic) the
    class-agnostic AP at 0.5; see the module docstring. Values are fractions in [0, 1]; a
    class without ground truth has AP None."""
    names = list(class_names) if class_names is not None else [str(c) for c in category_ids]
    scores, mask_m, box_m, n_pos = collect_matches(gt, results, category_ids, mask_ious, box_ious)
    voc: dict = {"mask": {}, "box": {}}
    for kind, table in (("mask", mask_m), ("box", box_m)):
        for t, per_class in table.items():
            voc[kind][_key(t)] = _summ([voc_ap(*precision_recall(scores[c], per_class[c], int(n_pos[c])))
                                        for c in range(len(category_ids))])
    if class_agnostic and gt:
        voc["class_agnostic"] = agnostic_ap(gt, results, category_ids)
    excluded = [names[c] for c in range(len(category_ids)) if n_pos[c] == 0]
    metrics = {
        "protocol": "VOC style (chainercv semantics, area under the precision envelope); "
                    "COCOeval (101-point, maxDets 100) beside it",
        "num_images": len(gt),
        "num_gt": int(n_pos.sum()),
        "num_predictions": len(results),
        "classes": [{"category_id": int(cid), "name": names[c], "num_gt": int(n_pos[c])}
                    for c, cid in enumerate(category_ids)],
        "excluded_classes": excluded,
        "voc": voc,
    }
    if coco and gt:
        metrics["coco"] = coco_eval(gt, results, category_ids)
    metrics["summary"] = _summary(metrics)
    return metrics


def agnostic_ap(gt: dict[int, InstanceGT], results: list[dict],
                category_ids: Sequence[int]) -> dict:
    """VOC-style AP at IoU 0.5 with every class merged into one: {"mask": AP^r, "box": AP^b}
    (mask None without masks in the results)."""
    one = int(category_ids[0])
    gt1 = {i: replace(g, class_ids=np.zeros_like(g.class_ids)) for i, g in gt.items()}
    res1 = [dict(r, category_id=one) for r in results]
    scores, mask_m, box_m, n_pos = collect_matches(gt1, res1, [one], (0.5,), (0.5,))
    ap = lambda m: voc_ap(*precision_recall(scores[0], m[0.5][0], int(n_pos[0])))  # noqa: E731
    return {"mask": ap(mask_m) if mask_m else None, "box": ap(box_m)}


def _summary(metrics: dict) -> dict:
    s = {}
    for t, v in metrics["voc"]["mask"].items():
        s[f"mAP_r@{t}"] = v["mean"]
    for t, v in metrics["voc"]["box"].items():
        s[f"mAP_b@{t}"] = v["mean"]
    agn = metrics["voc"].get("class_agnostic")
    if agn:
        if agn["mask"] is not None:
            s["class_agnostic_AP_r@0.5"] = agn["mask"]
        s["class_agnostic_AP_b@0.5"] = agn["box"]
    for iou_type, per_t in metrics.get("coco", {}).items():
        for t, v in per_t.items():
            s[f"coco_{iou_type}@{t}"] = v["mean"]
    return s


def _fmt(v) -> str:
    return "   -" if v is None else f"{100 * v:5.1f}"


def format_table(metrics: dict) -> str:
    """Per-class AP (percent) and the means, VOC style then COCOeval."""
    cols = [("voc", "mask", t, f"AP^r@{t}") for t in metrics["voc"]["mask"]]
    cols += [("voc", "box", t, f"AP^b@{t}") for t in metrics["voc"]["box"]]
    for iou_type in ("segm", "bbox"):
        for t in metrics.get("coco", {}).get(iou_type, {}):
            if iou_type == "segm" or t == "0.5":
                cols.append(("coco", iou_type, t, f"C-{iou_type}@{t}"))
    width = max([len("class")] + [len(c["name"]) for c in metrics["classes"]]) + 2
    head = "class".ljust(width) + " n_gt " + " ".join(c[3].rjust(max(6, len(c[3]))) for c in cols)
    lines = [head, "-" * len(head)]
    for ci, c in enumerate(metrics["classes"] + [None]):
        if c is None:
            label, n = f"mean ({len(metrics['classes']) - len(metrics['excluded_classes'])})", metrics["num_gt"]
            vals = [metrics[p][k][t]["mean"] for p, k, t, _ in cols]
            lines.append("-" * len(head))
        else:
            label, n = c["name"], c["num_gt"]
            vals = [metrics[p][k][t]["ap"][ci] for p, k, t, _ in cols]
        lines.append(label.ljust(width) + f"{n:5d} " + " ".join(_fmt(v).rjust(max(6, len(cn[3])))
                                                               for v, cn in zip(vals, cols)))
    lines.append(f"{metrics['num_images']} images, {metrics['num_gt']} ground-truth instances, "
                 f"{metrics['num_predictions']} predictions. AP^r/AP^b: VOC style (area under the precision "
                 "envelope); C-*: COCOeval (101-point).")
    agn = metrics["voc"].get("class_agnostic")
    if agn:
        lines.append("Class-agnostic (all classes as one): " + (
            f"AP^r@0.5 {_fmt(agn['mask']).strip()}, " if agn["mask"] is not None else "")
            + f"AP^b@0.5 {_fmt(agn['box']).strip()}.")
    if metrics["excluded_classes"]:
        lines.append("No ground truth, left out of the means: " + ", ".join(metrics["excluded_classes"]))
    return "\n".join(lines)


def load_gt(gt_path: str | Path, image_set: str = "val", classes: str | None = None):
    """(ground truth, category ids, class names) from a COCO JSON or a VOC2012 root."""
    from wsis_ray.data.datasets import VOC_CLASSES, _read_classes
    from wsis_ray.data.groundtruth import load_coco_gt, load_voc_gt

    p = Path(gt_path)
    if p.is_dir():
        names = _read_classes(classes) if classes else list(VOC_CLASSES)
        return load_voc_gt(p, image_set, names), list(range(1, len(names) + 1)), names
    cats = sorted(json.loads(p.read_text())["categories"], key=lambda c: c["id"])
    ids = [int(c["id"]) for c in cats]
    return load_coco_gt(p, ids), ids, [str(c["name"]) for c in cats]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="mAP^r / mAP^b of COCO-format instance predictions.")
    ap.add_argument("--gt", required=True, help="COCO instances JSON, or a VOC2012 root directory")
    ap.add_argument("--pred", required=True, help="COCO results JSON (RLE segmentation, bbox, score)")
    ap.add_argument("--out", default="", help="write the metrics JSON here")
    ap.add_argument("--image-set", default="val", help="VOC: ImageSets/Segmentation list (default val)")
    ap.add_argument("--classes", default="", help="VOC: class list file (default the 20 VOC classes)")
    args = ap.parse_args(argv)
    gt, category_ids, names = load_gt(args.gt, args.image_set, args.classes or None)
    results = json.loads(Path(args.pred).read_text())
    metrics = evaluate(gt, results, category_ids, names)
    print(format_table(metrics))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
