"""Pictures of CCGR in the style of the paper's Figures 1, 3 and 4.

- `figure_boxes` (Fig. 1): (a) image and (b) score map with the box before (green) and
  after (blue) refinement; (c)/(d) the score map with the box before/after and its context
  box dotted.
- `figure_context` (Fig. 3): rows before/after; (a) score map with box and dotted context,
  (b) the scores inside the context ring only, (c) the scores inside the box only.
- `figure_trajectory` (Fig. 4): the box at chosen CCGR iterations (default 0/40/.../200).
- `figure_convergence` (Fig. 5): pseudo-box quality (mAP^b) against the CCGR iteration,
  from boxes recorded with `refine(..., record_every=k)`.
- `ccgr_pictures` refines one box and writes all three; the round job's report and the
  README use it. Command line:

    python -m wsis_ray.viz ccgr --out DIR                  # synthetic demo example
    python -m wsis_ray.viz ccgr --out DIR --scores S.npy --class 2 --box 10 20 60 80 \\
        [--image I.png] [--peaks PEAKS.json]

  S.npy holds a (C+1, H, W) softmax score map (channel 0 = background); PEAKS.json a list
  of [x, y] peaks of that class (for the peak rule), the first being the box's own peak.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from wsis_ray.ccgr import RefineResult, context_box, refine  # noqa: E402
from wsis_ray.config import CCGRConfig  # noqa: E402

BEFORE, AFTER = "#00c000", "#1060ff"  # the paper's green and blue
FIG4_ITERATIONS = (0, 40, 80, 120, 160, 200)


def _rect(ax, box, color, dotted=False, width=2.0):
    x1, y1, x2, y2 = [float(v) for v in box]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                           linewidth=width, linestyle=":" if dotted else "-"))


def _show(ax, img, title, cmap=None):
    ax.imshow(img, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None,
              extent=(0, img.shape[1], img.shape[0], 0), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _box_mask(shape, box):
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    x1, y1, x2, y2 = [float(v) for v in box]
    return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)


def figure_boxes(image: np.ndarray | None, score: np.ndarray, before, after, path,
                 context_scale: float = 1.5, title: str = "") -> Path:
    """Figure 1 analog. score: (H, W) map of the box's class."""
    h, w = score.shape
    image = _as_image(image, score)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    _show(axes[0], image, "(a) image")
    _show(axes[1], score, "(b) score map", cmap="jet")
    for ax in axes[:2]:
        _rect(ax, before, BEFORE)
        _rect(ax, after, AFTER)
    for ax, box, color, name in [(axes[2], before, BEFORE, "(c) before + context"),
                                 (axes[3], after, AFTER, "(d) after + context")]:
        _show(ax, score, name, cmap="jet")
        _rect(ax, box, color)
        _rect(ax, context_box(box, h, w, context_scale), color, dotted=True)
    return _save(fig, path, title)


def figure_context(score: np.ndarray, before, after, path, context_scale: float = 1.5,
                   title: str = "") -> Path:
    """Figure 3 analog: per row (before, after) the map, the context ring, the box."""
    h, w = score.shape
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for row, (box, color, name) in enumerate([(before, BEFORE, "before"), (after, AFTER, "after")]):
        ctx = context_box(box, h, w, context_scale)
        inner, outer = _box_mask(score.shape, box), _box_mask(score.shape, ctx)
        _show(axes[row, 0], score, f"(a) score map, {name}", cmap="jet")
        _show(axes[row, 1], np.where(outer & ~inner, score, 0.0), "(b) context scores", cmap="jet")
        _show(axes[row, 2], np.where(inner, score, 0.0), "(c) box scores", cmap="jet")
        for ax in axes[row]:
            _rect(ax, box, color)
            _rect(ax, ctx, color, dotted=True)
    return _save(fig, path, title)


def figure_trajectory(image: np.ndarray | None, score: np.ndarray, trajectory,
                      iterations: Sequence[int], path, title: str = "") -> Path:
    """Figure 4 analog: trajectory (T, 4) boxes at `iterations`; green = start, blue = now."""
    image = _as_image(image, score)
    overlay = 0.5 * image / 255.0 + 0.5 * plt.get_cmap("jet")(score)[..., :3]
    fig, axes = plt.subplots(1, len(iterations), figsize=(2.4 * len(iterations), 2.8))
    axes = np.atleast_1d(axes)
    for ax, it, box in zip(axes, iterations, trajectory):
        _show(ax, overlay, f"iteration {it}")
        _rect(ax, trajectory[0], BEFORE, width=1.2)
        _rect(ax, box, AFTER)
    return _save(fig, path, title)


def figure_convergence(iterations: Sequence[int], values: Sequence[float], path,
                       ylabel: str = "pseudo-box mAP$^b_{0.5}$", title: str = "") -> Path:
    """Figure 5 analog: a quality measure of the pseudo boxes (e.g. mAP^b at 0.5 of the
    boxes in RefineResult.trajectory against ground truth) per CCGR iteration."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(list(iterations), list(values), marker="o", color=AFTER)
    ax.set_xlabel("CCGR iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, path, title)


def ccgr_pictures(image: np.ndarray | None, scores: np.ndarray | torch.Tensor, box,
                  class_id: int, out_dir, stem: str = "ccgr", cfg: CCGRConfig | None = None,
                  peaks_xy: Sequence[Sequence[float]] | None = None) -> dict[str, Path]:
    """Refine one box on a (C+1, H, W) score map and write the Figure 1/3/4 analogs.
    peaks_xy: peaks of the box's class, the first being its own (peak rule)."""
    cfg = cfg or CCGRConfig()
    scores = torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    res = _refine_one(scores, box, class_id, cfg, peaks_xy)
    score = scores[class_id + 1].numpy()
    before, after = res.trajectory[0, 0].tolist(), res.boxes[0].tolist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    note = (f"loss {float(res.loss[0]):.3f}, {int(res.iterations[0])} iterations, "
            f"{res.stop_reason[0]}")
    return {
        "boxes": figure_boxes(image, score, before, after, out / f"{stem}_fig1.png",
                              cfg.context_scale, note),
        "context": figure_context(score, before, after, out / f"{stem}_fig3.png",
                                  cfg.context_scale, note),
        "trajectory": figure_trajectory(image, score, res.trajectory[:, 0].numpy(),
                                        res.trajectory_iterations, out / f"{stem}_fig4.png", note),
    }


def _refine_one(scores, box, class_id, cfg, peaks_xy) -> RefineResult:
    peak_xy, peaks = None, None
    if peaks_xy is not None and len(peaks_xy):
        xy = torch.tensor(peaks_xy, dtype=torch.float32).reshape(-1, 2)
        zeros = torch.zeros(len(xy), dtype=torch.long)
        peak_xy, peaks = xy[:1], (zeros, zeros + class_id, xy)
    record = [k for k in FIG4_ITERATIONS if k <= cfg.iterations]
    return refine(scores[None], torch.tensor([list(map(float, box))]), torch.tensor([0]),
                  torch.tensor([class_id]), peak_xy, peaks, cfg, record_at=record)


def _as_image(image, score):
    if image is None:  # no photo: show the score map in grey
        return np.repeat((score[..., None] * 255).astype(np.uint8), 3, axis=2)
    return np.asarray(image)


def _save(fig, path, title) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def demo_example(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A synthetic image, its 2-class soft score map (an ellipse and a rectangle) and an
    off-centre box on the ellipse covering ~20 % of it, as a MIL box often does."""
    h, w = 128, 160
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    ell = 1 / (1 + np.exp(-(1 - np.sqrt(((xs - 60) / 38) ** 2 + ((ys - 64) / 26) ** 2)) * 30))
    rect = 1 / (1 + np.exp(-np.minimum.reduce([xs - 112, 148 - xs, ys - 20, 52 - ys]) * 2))
    rng = np.random.default_rng(seed)
    fg = np.clip(0.95 * np.maximum(ell, rect) + 0.03 * rng.standard_normal((h, w)), 0, 1)
    scores = np.stack([1 - fg, fg]).astype(np.float32)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (70, 90, 60)
    image[ell > 0.5] = (200, 120, 60)
    image[rect > 0.5] = (210, 110, 70)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    return image, scores, [36.0, 52.0, 62.0, 74.0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsis_ray.viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ccgr", help="CCGR pictures (paper Figures 1, 3, 4)")
    p.add_argument("--out", required=True)
    p.add_argument("--scores", help="(C+1, H, W) .npy score map; omit for the demo example")
    p.add_argument("--image", help="RGB image (png/jpg) of the same size")
    p.add_argument("--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"))
    p.add_argument("--class", dest="class_id", type=int, default=0)
    p.add_argument("--peaks", help="JSON list of [x, y] peaks of that class (own peak first)")
    p.add_argument("--iterations", type=int, default=CCGRConfig().iterations)
    args = parser.parse_args(argv)
    cfg = CCGRConfig(iterations=args.iterations)
    if args.scores:
        if not args.box:
            parser.error("--box is required with --scores")
        scores = np.load(args.scores)
        if scores.ndim != 3:
            parser.error(f"{args.scores}: expected a (C+1, H, W) array, got {scores.shape}")
        image = np.asarray(_read_image(args.image)) if args.image else None
        box, peaks = args.box, json.loads(Path(args.peaks).read_text()) if args.peaks else None
    else:
        image, scores, box = demo_example()
        peaks = None
    paths = ccgr_pictures(image, scores, box, args.class_id, args.out, cfg=cfg, peaks_xy=peaks)
    for p_ in paths.values():
        print(p_)
    return 0


def _read_image(path):
    from PIL import Image
    return Image.open(path).convert("RGB")


if __name__ == "__main__":
    raise SystemExit(main())
