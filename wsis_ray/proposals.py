"""Object proposals with an objectness score B_S: the stand-in for MCG (Pont-Tuset et al. 2017).

MCG is MATLAB-only, so proposals come from selective search (Uijlings et al. 2013, OpenCV
contrib `ximgproc.segmentation`, "fast" mode). Selective search has no objectness score, and
Eq. 4 needs one (B_S in [0, 1]). We score each box with **superpixel straddling** (Alexe,
Deselaers & Ferrari, "Measuring the objectness of image windows", TPAMI 2012):

    B_S(w) = 1 - sum_s min(|s \\ w|, |s ∩ w|) / |w|

over the superpixels s of a Felzenszwalb graph segmentation of the image. A box that cuts
through few superpixels (its border follows region boundaries) scores near 1; a box that
slices regions in half scores low. It is in [0, 1] by construction (each straddled
superpixel contributes at most its part inside w). Boxes are then ranked by B_S (ties in
coordinate order; OpenCV returns its boxes in a run-dependent order) and the first `max_proposals` kept.

Precomputed MCG/COB proposals, as distributed for PASCAL VOC 2012 (one `.mat` per image with
`boxes` (N x 4, [y1 x1 y2 x2], 1-based inclusive pixels) and `scores` (N x 1)), load with
`load_mcg`.

Everything is deterministic: OpenCV runs single-threaded with a fixed RNG seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Felzenszwalb segmentation for the straddling score (sigma, k, min_size at ~160-500 px).
_SEG_SIGMA, _SEG_K, _SEG_MIN = 0.8, 150, 20


class ProposalError(ValueError):
    pass


def _ximgproc():
    """OpenCV's contrib module, with OpenCV set to one thread (deterministic output); plain
    opencv-python(-headless) lacks it and, installed beside the contrib build (both provide
    `cv2`), can shadow it."""
    import cv2

    if not hasattr(cv2, "ximgproc"):
        raise ProposalError(
            f"selective search needs OpenCV's contrib module (cv2.ximgproc), which the cv2 "
            f"at {cv2.__file__} ({cv2.__version__}) lacks. Run `pip uninstall -y opencv-python "
            f"opencv-python-headless opencv-contrib-python-headless && pip install "
            f"opencv-contrib-python-headless`, or use precomputed proposals "
            f"(proposals.method: mcg).")
    cv2.setNumThreads(1)
    return cv2.ximgproc


def selective_search(image: np.ndarray, max_proposals: int = 300, min_size: int = 4,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Selective search ("fast") boxes with superpixel-straddling objectness.

    image: uint8 HxWx3 RGB. Returns boxes (N, 4) float32 [x1, y1, x2, y2] in continuous
    image pixels and objectness (N,) float32 in [0, 1], sorted by objectness, N <= max_proposals.
    """
    import cv2

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ProposalError(f"selective_search wants a uint8 HxWx3 image, got "
                            f"{image.dtype} {image.shape}")
    ximgproc = _ximgproc()
    cv2.setRNGSeed(0)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    ss = ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    ss.switchToSelectiveSearchFast()
    rects = np.asarray(ss.process(), dtype=np.float32).reshape(-1, 4)  # x, y, w, h
    h, w = image.shape[:2]
    # the whole image is always a candidate (an object may fill the frame)
    rects = np.concatenate([rects, np.array([[0, 0, w, h]], np.float32)])
    boxes = np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2],
                      rects[:, 1] + rects[:, 3]], axis=1)
    keep = (rects[:, 2] >= min_size) & (rects[:, 3] >= min_size)
    # OpenCV returns the same set of boxes in a varying order: sort rows to be deterministic
    boxes = np.unique(boxes[keep], axis=0)
    segments = superpixels(image)
    scores = straddling_objectness(boxes, segments)
    order = np.argsort(-scores, kind="stable")[:max_proposals]
    return boxes[order].astype(np.float32), scores[order].astype(np.float32)


def superpixels(image: np.ndarray) -> np.ndarray:
    """Felzenszwalb graph segmentation (OpenCV ximgproc): int32 HxW labels 0..S-1."""
    seg = _ximgproc().segmentation.createGraphSegmentation(_SEG_SIGMA, _SEG_K, _SEG_MIN)
    labels = seg.processImage(np.ascontiguousarray(image[:, :, ::-1]))
    return labels.astype(np.int32)


def straddling_objectness(boxes: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Superpixel straddling B_S (see module docstring) for integer-pixel boxes.

    Uses one summed-area table per superpixel, so the cost is O(S·H·W + N·S).
    """
    h, w = segments.shape
    num = int(segments.max()) + 1
    onehot = np.zeros((num, h + 1, w + 1), np.int32)
    onehot[segments.ravel(), np.repeat(np.arange(h), w) + 1, np.tile(np.arange(w), h) + 1] = 1
    sat = onehot.cumsum(1).cumsum(2)                                   # (S, H+1, W+1)
    sizes = sat[:, h, w]
    x1, y1, x2, y2 = _pixel_bounds(boxes, h, w)
    inside = sat[:, y2, x2] - sat[:, y1, x2] - sat[:, y2, x1] + sat[:, y1, x1]  # (S, N)
    straddle = np.minimum(inside, sizes[:, None] - inside).sum(0)
    area = ((x2 - x1) * (y2 - y1)).astype(np.float64)
    return np.clip(1.0 - straddle / area, 0.0, 1.0)


def _pixel_bounds(boxes: np.ndarray, h: int, w: int):
    """Continuous boxes -> integer pixel bounds [x1, x2) x [y1, y2), at least one pixel."""
    b = np.rint(np.asarray(boxes, np.float64)).astype(np.int64)
    x1 = np.clip(b[:, 0], 0, w - 1)
    y1 = np.clip(b[:, 1], 0, h - 1)
    x2 = np.clip(np.maximum(b[:, 2], x1 + 1), 1, w)
    y2 = np.clip(np.maximum(b[:, 3], y1 + 1), 1, h)
    return x1, y1, x2, y2


def load_mcg(mat_path: str | Path, max_proposals: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed MCG/COB proposals from a `.mat` file -> (boxes (N,4) [x1,y1,x2,y2]
    continuous pixels, objectness (N,) in [0, 1]), best-scored first.

    The distributed files store `boxes` as [y1 x1 y2 x2] in 1-based inclusive pixels and
    `scores` as the ranker's output; scores already inside [0, 1] are kept as they are,
    otherwise they are min-max scaled within the image (B_S must lie in [0, 1] for Eq. 4).
    """
    import scipy.io

    p = Path(mat_path)
    if not p.is_file():
        raise ProposalError(f"MCG proposal file {p} not found; set proposals.mcg_dir to the "
                            f"folder holding one <image name>.mat per image")
    mat = scipy.io.loadmat(str(p))
    for key in ("boxes", "scores"):
        if key not in mat:
            raise ProposalError(f"{p}: no '{key}' variable (found {sorted(k for k in mat if not k.startswith('__'))}); "
                                f"expected MCG/COB boxes [y1 x1 y2 x2] and scores")
    raw = np.asarray(mat["boxes"], np.float64).reshape(-1, 4)
    scores = np.asarray(mat["scores"], np.float64).reshape(-1)
    if len(scores) != len(raw):
        raise ProposalError(f"{p}: {len(raw)} boxes but {len(scores)} scores")
    boxes = np.stack([raw[:, 1] - 1, raw[:, 0] - 1, raw[:, 3], raw[:, 2]], axis=1)
    if len(scores) and (scores.min() < 0 or scores.max() > 1):
        span = scores.max() - scores.min()
        scores = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    order = np.argsort(-scores, kind="stable")[:max_proposals]
    return boxes[order].astype(np.float32), scores[order].astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of continuous [x1, y1, x2, y2] boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight continuous box [x1, y1, x2, y2] around a boolean mask's pixels."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4, np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def proposal_recall(proposals: list[np.ndarray], gt_boxes: list[np.ndarray],
                    thresholds=(0.5, 0.7)) -> dict[str, float]:
    """Fraction of ground-truth boxes whose best proposal reaches each IoU threshold."""
    best = []
    for boxes, gts in zip(proposals, gt_boxes):
        if len(gts) == 0:
            continue
        iou = box_iou(gts, boxes) if len(boxes) else np.zeros((len(gts), 1))
        best.extend(iou.max(1).tolist())
    best = np.asarray(best)
    out = {f"recall@{t}": float((best >= t).mean()) if len(best) else 0.0 for t in thresholds}
    out["gt_instances"] = int(len(best))
    return out
