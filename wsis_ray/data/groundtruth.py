"""Instance ground truth for evaluation (and pseudo-label quality figures only).

Training code never reads this module: the method sees image-level labels only
(`wsis_ray.data.datasets`). Class ids are 0-based indices into the dataset's class list.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from wsis_ray.data.datasets import (DatasetError, _parse_voc_xml, _read_classes, ensure_demo,
                                    voc_image_ids, voc_image_set)


@dataclass
class InstanceGT:
    """Ground-truth instances of one image.

    masks (N, H, W) bool; class_ids (N,) int 0-based; iscrowd (N,) bool (crowd / difficult:
    neither a hit nor a miss when matched); void (H, W) bool or None: pixels excluded from
    mask IoU (VOC's 255 border band). boxes (N, 4) float [x1, y1, x2, y2] or None (then the
    tight box around each mask)."""
    image_id: int
    masks: np.ndarray
    class_ids: np.ndarray
    iscrowd: np.ndarray
    void: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, bool)
        n = len(self.masks)
        self.class_ids = np.asarray(self.class_ids, np.int64).reshape(n)
        self.iscrowd = np.asarray(self.iscrowd, bool).reshape(n)
        if self.masks.ndim != 3:
            raise ValueError(f"image {self.image_id}: masks must be (N, H, W), got {self.masks.shape}")
        if self.boxes is None:
            self.boxes = masks_to_boxes(self.masks)
        self.boxes = np.asarray(self.boxes, np.float64).reshape(n, 4)

    @property
    def height(self) -> int:
        return self.masks.shape[1]

    @property
    def width(self) -> int:
        return self.masks.shape[2]


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight [x1, y1, x2, y2] boxes in continuous coordinates (pixel i spans [i, i+1));
    an empty mask gives a zero box."""
    boxes = np.zeros((len(masks), 4), np.float64)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(1))
        xs = np.flatnonzero(m.any(0))
        if len(xs):
            boxes[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return boxes


def segmentation_to_mask(segm, height: int, width: int) -> np.ndarray:
    """COCO polygon list, uncompressed RLE or compressed RLE -> bool (H, W) mask."""
    if isinstance(segm, list):  # polygons
        rles = mask_utils.frPyObjects(segm, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and "counts" in segm:
        counts = segm["counts"]
        rle = {"size": segm["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unsupported segmentation {type(segm).__name__}")
    if list(rle["size"]) != [height, width]:
        raise ValueError(f"segmentation size {list(rle['size'])} != image size {[height, width]}")
    return mask_utils.decode(rle).astype(bool)


def _category_index(cats: list[dict], classes_or_category_ids: Sequence, where: str) -> dict[int, int]:
    """COCO category id -> 0-based class index, matched by id (ints) or by name (strings)."""
    if all(isinstance(c, (int, np.integer)) for c in classes_or_category_ids):
        index = {int(cid): i for i, cid in enumerate(classes_or_category_ids)}
        missing = [c for c in cats if c["id"] not in index]
    else:
        by_name = {str(n): i for i, n in enumerate(classes_or_category_ids)}
        index = {c["id"]: by_name[c["name"]] for c in cats if c["name"] in by_name}
        missing = [c for c in cats if c["name"] not in by_name]
    if missing:
        raise DatasetError(f"{where}: categories {[(c['id'], c['name']) for c in missing][:20]} are not in the "
                           f"dataset's class list {list(classes_or_category_ids)}; use the same class list "
                           "for training and evaluation")
    return index


def load_coco_gt(json_path: str | os.PathLike, classes_or_category_ids: Sequence) -> dict[int, InstanceGT]:
    """COCO instances JSON -> {image_id: InstanceGT}. Polygons and RLE (compressed or not)
    are decoded with pycocotools; iscrowd is kept (crowd regions are ignored when matched).
    `classes_or_category_ids`: the dataset's category ids (ints) or class names."""
    path = Path(json_path)
    if not path.is_file():
        raise DatasetError(f"ground-truth file {path} not found")
    data = json.loads(path.read_text())
    index = _category_index(data.get("categories", []), classes_or_category_ids, str(path))
    images = {int(im["id"]): im for im in data["images"]}
    anns: dict[int, list[dict]] = {i: [] for i in images}
    for a in data.get("annotations", []):
        if a["image_id"] not in anns:
            raise DatasetError(f"{path}: annotation {a.get('id')} refers to unknown image id {a['image_id']}")
        anns[a["image_id"]].append(a)
    gt = {}
    for iid, im in images.items():
        h, w = int(im["height"]), int(im["width"])
        masks, cls, crowd, boxes = [], [], [], []
        for a in anns[iid]:
            try:
                masks.append(segmentation_to_mask(a["segmentation"], h, w))
            except (KeyError, ValueError, TypeError) as e:
                raise DatasetError(f"{path}: annotation {a.get('id')} of image {iid} has no usable "
                                   f"segmentation ({e}); evaluation needs instance masks") from e
            cls.append(index[a["category_id"]])
            crowd.append(bool(a.get("iscrowd", 0)))
            x, y, bw, bh = a.get("bbox") or [0, 0, 0, 0]
            boxes.append([x, y, x + bw, y + bh] if a.get("bbox") else masks_to_boxes(masks[-1:])[0])
        m = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        gt[iid] = InstanceGT(iid, m, np.array(cls, np.int64), np.array(crowd, bool), None,
                             np.array(boxes, np.float64).reshape(-1, 4))
    return gt


def load_voc_gt(voc_root: str | os.PathLike, image_set: str = "val",
                classes: str | os.PathLike | Sequence[str] | None = None) -> dict[int, InstanceGT]:
    """VOC 2012 instance ground truth from SegmentationObject/ (instance i = value i) and
    SegmentationClass/ (class c+1) PNGs; 255 = void. Image ids as in `load_voc`.
    Boxes come from the XML when the i-th <object> has the class of instance i (VOC keeps
    that order), else from the mask. No instance is marked difficult (IRN/BESTIE protocol)."""
    from wsis_ray.data.datasets import VOC_CLASSES

    voc_root = Path(voc_root)
    names = _read_classes(classes) if classes is not None else list(VOC_CLASSES)
    ids = voc_image_ids(voc_root)
    _, items = voc_image_set(voc_root, image_set, prefer="Segmentation")
    gt = {}
    for name in items:
        obj_png = voc_root / "SegmentationObject" / f"{name}.png"
        cls_png = voc_root / "SegmentationClass" / f"{name}.png"
        if name not in ids or not obj_png.is_file() or not cls_png.is_file():
            raise DatasetError(f"VOC ground truth for {name} incomplete: need JPEGImages/{name}.jpg, "
                               f"{obj_png} and {cls_png}")
        obj = np.array(Image.open(obj_png))
        sem = np.array(Image.open(cls_png))
        if obj.shape != sem.shape or obj.ndim != 2:
            raise DatasetError(f"{obj_png} and {cls_png} must be single-channel (palette) PNGs of equal size")
        void = obj == 255
        inst = [v for v in np.unique(obj) if v not in (0, 255)]
        masks, cls = [], []
        for v in inst:
            m = obj == v
            vals, counts = np.unique(sem[m], return_counts=True)
            c = int(vals[np.argmax(counts)])
            if not 1 <= c <= len(names):
                raise DatasetError(f"{cls_png}: instance {v} has class value {c}, outside 1..{len(names)}")
            masks.append(m)
            cls.append(c - 1)
        boxes = _voc_boxes(voc_root / "Annotations" / f"{name}.xml", inst, cls, names, masks)
        m = np.stack(masks) if masks else np.zeros((0,) + obj.shape, bool)
        iid = ids[name]
        gt[iid] = InstanceGT(iid, m, np.array(cls, np.int64), np.zeros(len(masks), bool), void, boxes)
    return gt


def _voc_boxes(xml: Path, inst: list[int], cls: list[int], names: list[str], masks: list) -> np.ndarray:
    boxes = masks_to_boxes(np.stack(masks)) if masks else np.zeros((0, 4))
    try:
        _, _, objs = _parse_voc_xml(xml)
    except (OSError, ValueError, TypeError, AttributeError, SyntaxError):  # ET.ParseError is a SyntaxError
        return boxes
    for k, (v, c) in enumerate(zip(inst, cls)):
        if v - 1 < len(objs) and objs[v - 1]["name"] == names[c] and objs[v - 1]["box"]:
            x1, y1, x2, y2 = objs[v - 1]["box"]
            boxes[k] = [x1 - 1, y1 - 1, x2, y2]  # 1-based inclusive -> continuous
    return boxes


def load_eval_gt(data_cfg, split: str = "val", classes: Sequence | None = None) -> dict[int, InstanceGT]:
    """Ground truth of a split named by cfg.data ("val", or "train" for pseudo-label
    figures). `classes`: the training dataset's class names or category ids (default: the
    evaluation file's own categories / the VOC class list)."""
    fmt = data_cfg.format
    if fmt == "demo":
        root = ensure_demo(data_cfg)
        path = root / f"{split}.json"
        return load_coco_gt(path, classes if classes is not None else _coco_category_ids(path))
    if fmt == "voc":
        name = (data_cfg.train or "train") if split == "train" else (data_cfg.val or "val")
        return load_voc_gt(data_cfg.root, name, classes if classes is not None else (data_cfg.classes or None))
    path = data_cfg.train if split == "train" else data_cfg.val
    if classes is None and fmt == "jsonl" and data_cfg.classes:
        classes = _read_classes(data_cfg.classes)  # match the COCO categories by name
    if not path or not str(path).endswith(".json"):
        raise DatasetError(f"data.{'train' if split == 'train' else 'val'} must be a COCO instances JSON with "
                           f"masks to evaluate (format {fmt}), got {path!r}")
    return load_coco_gt(path, classes if classes is not None else _coco_category_ids(path))


def _coco_category_ids(path: Path | str) -> list[int]:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"ground-truth file {p} not found")
    return sorted(int(c["id"]) for c in json.loads(p.read_text())["categories"])
