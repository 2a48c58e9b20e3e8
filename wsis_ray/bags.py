"""Bags for the MIL branch: peak bags ranked by Eq. 4 (round 0) and IS-box bags (later rounds).

Round 0 ("Iterative optimization and its initialization"): each peak is a bag labelled with
the peak's class; its instances are the `size` (10) top-ranked proposals that contain this
peak and no other peak, ranked by Eq. 4

    R(B) = B_S - w * <B, 1 - O> / |B|

with B_S the proposal's objectness, O the semantic score map of the peak's class and
<.,.> the Frobenius product of the box indicator with 1 - O (so the second term is the
mean background score inside the box).

Choices the paper leaves open (see README):
- O. Round 0 has AffinityNet label maps, not score maps: O is the binary foreground of the
  peak's class (label == c + 1), ignore pixels (255) count 0.5 (unknown). A `(C+1, H, W)`
  score map is used directly (channel c + 1) when given instead.
- "Containing only this peak": by default a proposal may not contain another peak **of the
  same class** (`exclusive="same_class"`); peaks of other classes are allowed, since
  instances of different classes overlap (a person on a horse) and the bag separates
  instances of one class. `exclusive="any_class"` is the literal reading.
- No qualifying proposal (e.g. two peaks of one class too close for any proposal to
  separate them): the bag falls back to the proposals containing the peak, ranked the same
  way; a peak no proposal contains is dropped. Both are counted in the returned stats.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsis_ray.proposals import _pixel_bounds, box_iou

IGNORE = 255


@dataclass
class Bag:
    class_id: int
    proposal_indices: np.ndarray            # int32, best-ranked first
    peak: tuple[float, float] | None = None  # (x, y) for round-0 bags
    source_box: np.ndarray | None = None     # the IS box for later-round bags
    fallback: bool = False


def foreground_map(semantic: np.ndarray, class_id: int) -> np.ndarray:
    """O for Eq. 4: a (C+1,H,W) score map's channel c+1, or a uint8 label map's binary
    foreground of class c with ignore pixels at 0.5."""
    if semantic.ndim == 3:
        return semantic[class_id + 1].astype(np.float64)
    o = (semantic == class_id + 1).astype(np.float64)
    o[semantic == IGNORE] = 0.5
    return o


def eq4_rank_scores(boxes: np.ndarray, objectness: np.ndarray, fg: np.ndarray,
                    weight: float = 0.1) -> np.ndarray:
    """R(B) = B_S - weight * <B, 1 - O> / |B| (Eq. 4) for every box, O = fg (H, W)."""
    h, w = fg.shape
    sat = np.zeros((h + 1, w + 1))
    sat[1:, 1:] = (1.0 - fg).cumsum(0).cumsum(1)
    x1, y1, x2, y2 = _pixel_bounds(boxes, h, w)
    bg_sum = sat[y2, x2] - sat[y1, x2] - sat[y2, x1] + sat[y1, x1]
    area = (x2 - x1) * (y2 - y1)
    return np.asarray(objectness, np.float64) - weight * bg_sum / area


def contains(boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, P) bool: box n contains point p (x1 <= x < x2 and y1 <= y < y2)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return ((b[:, None, 0] <= p[None, :, 0]) & (p[None, :, 0] < b[:, None, 2])
            & (b[:, None, 1] <= p[None, :, 1]) & (p[None, :, 1] < b[:, None, 3]))


def peak_bags(boxes: np.ndarray, objectness: np.ndarray, peaks: list[tuple],
              semantic: np.ndarray, size: int = 10, weight: float = 0.1,
              exclusive: str = "same_class") -> tuple[list[Bag], dict[str, int]]:
    """Round-0 bags (Eq. 4), one per peak.

    peaks: [(class_id, x, y, score), ...] in image pixels; semantic: uint8 (H, W) label map
    or (C+1, H, W) score map (see module docstring). Returns (bags in peak order, stats with
    counts of 'fallback' and 'dropped' peaks).
    """
    if exclusive not in ("same_class", "any_class"):
        raise ValueError(f"bags.exclusive must be 'same_class' or 'any_class', got {exclusive!r}")
    stats = {"fallback": 0, "dropped": 0}
    if not peaks:
        return [], stats
    classes = np.array([p[0] for p in peaks])
    points = np.array([[p[1], p[2]] for p in peaks], np.float64)
    inside = contains(boxes, points) if len(boxes) else np.zeros((0, len(peaks)), bool)
    rank_cache: dict[int, np.ndarray] = {}
    bags = []
    for k, cls in enumerate(classes.tolist()):
        others = np.ones(len(peaks), bool)
        others[k] = False
        if exclusive == "same_class":
            others &= classes == cls
        with_peak = inside[:, k]
        candidates = np.nonzero(with_peak & ~inside[:, others].any(1))[0]
        fallback = len(candidates) == 0
        if fallback:
            candidates = np.nonzero(with_peak)[0]
        if len(candidates) == 0:
            stats["dropped"] += 1
            continue
        stats["fallback"] += int(fallback)
        if cls not in rank_cache:
            rank_cache[cls] = eq4_rank_scores(boxes, objectness,
                                              foreground_map(semantic, cls), weight)
        r = rank_cache[cls][candidates]
        best = candidates[np.argsort(-r, kind="stable")[:size]]
        bags.append(Bag(int(cls), best.astype(np.int32), peak=(float(points[k, 0]),
                                                                float(points[k, 1])),
                        fallback=fallback))
    return bags, stats


def box_bags(boxes: np.ndarray, is_boxes: np.ndarray, is_classes: np.ndarray,
             size: int = 10) -> list[Bag]:
    """Later-round bags: for each box predicted by the IS branch, the `size` proposals with
    the highest IoU with it, labelled with the box's class."""
    is_boxes = np.asarray(is_boxes, np.float32).reshape(-1, 4)
    if len(is_boxes) == 0 or len(boxes) == 0:
        return []
    iou = box_iou(is_boxes, boxes)
    bags = []
    for i, cls in enumerate(np.asarray(is_classes).tolist()):
        best = np.argsort(-iou[i], kind="stable")[:size]
        bags.append(Bag(int(cls), best.astype(np.int32), source_box=is_boxes[i]))
    return bags


def bag_recall(bags_per_image: list[list[Bag]], boxes_per_image: list[np.ndarray],
               gt_boxes: list[np.ndarray], gt_classes: list[np.ndarray],
               iou_threshold: float = 0.5) -> float:
    """Fraction of ground-truth instances for which some bag of their class holds a
    proposal with IoU >= iou_threshold."""
    hit = total = 0
    for bags, boxes, gts, gcls in zip(bags_per_image, boxes_per_image, gt_boxes, gt_classes):
        total += len(gts)
        if len(gts) == 0 or not bags:
            continue
        iou = box_iou(gts, boxes)
        for g, c in enumerate(np.asarray(gcls).tolist()):
            idx = [b.proposal_indices for b in bags if b.class_id == c]
            if idx and iou[g, np.concatenate(idx)].max() >= iou_threshold:
                hit += 1
    return hit / total if total else 0.0
