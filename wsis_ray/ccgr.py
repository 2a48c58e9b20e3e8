"""Center-context-gap refinement (CCGR, paper Eq. 2-3): boxes refined on class score maps.

Objective
---------
For a box B = (x1, y1, x2, y2) of class c on the score map S = scores[c + 1] (channel 0 is
background), Phi(B) is the mean of S over B (Eq. 2). The context box B~ has B's center and
`context_scale` (1.5) times its width and height, clipped to the image; the context is the
ring C = B~ - B with Phi(C) = (sum_B~ S - sum_B S) / (A_B~ - A_B), using the clipped areas.
The loss is L = Phi(C) - Phi(B) (Eq. 3), minimised over the four continuous coordinates.
(The paper writes Phi(C) = Phi(B~) - Phi(B); we use the ring's own mean, which is what its
text and Figure 3 describe.) If B covers the whole image the ring is empty and Phi(C) = 0.

Box sums come from a summed-area table (SAT) I of S, evaluated at fractional corners by
bilinear interpolation. For a map that is constant on each pixel (pixel i spans [i, i+1))
that interpolant is *exactly* the integral of Eq. 2, so Phi is continuous and piecewise
smooth in the coordinates; its derivative w.r.t. an edge is the mean of S along that edge.
The engine uses these derivatives in closed form (checked against finite differences and
autograd in tests/test_ccgr.py); `refine_reference` computes the same gradient with
autograd one box at a time and serves as the naive baseline.

Optimiser and scale invariance
------------------------------
Adam (beta1 0.9, beta2 0.999), as the paper uses Adam for its networks. Adam runs on the
dimensionless gradient g~ = dL/dx * size (size = the box's current width for x1, x2 and its
height for y1, y2), and its normalised step m^/(sqrt(v^) + eps), which is about +-1, is
multiplied by lr * size. An edge therefore moves at most about `lr` times the box's own
size per iteration, whatever the box's size in pixels: scaling the map and the box by k
scales every step by k, so a 20 px and a 400 px object follow the same trajectory in
relative coordinates and converge in the same number of iterations. The step decays from
lr to lr * lr_final by a cosine schedule so boxes settle instead of oscillating around a
kink of L (a sharp object edge).

Flat maps and plateaus
----------------------
Where S is constant over both the box and its context, Phi(B) = Phi(C) for every nearby
box, so Eq. 3 has no gradient at all (and float rounding noise must not be mistaken for
one: Adam would blow it up to full-size steps; hence float64 SATs and flat_tol). The engine
decides by the score level, per side of the box:
- plateau expansion: a side steps outward by lr * size when the mean of S along that side
  of the box AND along the outer side of its context are both >= expand_threshold (0.5),
  i.e. the box cuts through a region of its class that continues across the whole context
  on that side (a small MIL box in the middle of a large object). It keeps stepping until
  the context reaches the object's boundary, where Eq. 3's gradient takes over;
- otherwise, where no coordinate has a gradient (|dL/dx| * size < flat_tol), nothing
  indicates a direction: an all-zero map, a uniform low-score region. The box stops where
  it is with stop_reason "flat" and its Eq. 3 loss (0 on a flat map); if it had already
  moved (a smooth optimum) the reason is "converged".
The same rule covers two cases where Eq. 3 alone gets stuck on real maps: partial plateaus
(a box spanning an elongated object tightly in y while its x-context lies inside the
object has dL/dx1 = dL/dx2 = 0 exactly), and the image border: when the context is clipped,
a box in the corner of an object that fills most of the image has a ring with a fixed-width
strip of background, and Eq. 3 then prefers to *shrink* the box (seen with a 300 px object
in a 340 px image). At a real optimum the context's outer side lies on background, so the
rule is inactive there; same-class objects that touch are kept apart by the peak rule.

Constraints and stop rules (kept at every step)
-----------------------------------------------
- x1 < x2, y1 < y2, width and height >= min_size (or the image size if smaller), inside
  [0, W] x [0, H]: every step is projected onto that set.
- Peak rule (paper, Ablation): a box stops, keeping its last coordinates, as soon as a
  step would make it contain a peak of its class other than its own peak
  (stop_reason "second_peak"). A box that already holds such a peak at the start is not
  refined. Without an own peak (NaN), a box may hold at most one peak of its class.
  With peak_region > 0 (an option; default 0 = the paper's rule) a peak counts only where
  S >= peak_region at the peak and the straight line from the box's own peak to it leaves
  the class's region (S < peak_region somewhere on it): CAMs give one instance several
  peaks (1.2-1.6 per instance on the demo) and put some on background, and each stops a
  box half-way. It helps on good score maps and hurts on weak ones (README, deviations).
- "converged": every coordinate moved < tol * size for `patience` iterations, or the
  gradient vanished after the box moved; "max_iterations": ran all `iterations`.
- "degenerate": the box does not overlap its image; it is returned clipped to the image
  (grown to min_size) without refinement. Boxes smaller than min_size (e.g. 1 px) are grown
  to min_size about their center, then refined. Inverted coordinates are swapped.
- NaN/inf in a score map raises ValueError naming the image; no boxes -> empty result.

All boxes of all images in a call are refined together: one tensor program per iteration
over the boxes still active; stopped boxes are dropped from the active set at once, and
the loop ends when none is left. Per-box state is laid out box-last, (2, 2, N) = (lo/hi
corner, x/y, box), so every op runs over contiguous rows of N values. Cost per call: one
float64 SAT per (image, class) pair used (built in cache-sized blocks; calls whose SATs
exceed 256 MiB run in groups of pairs), then about 100 small tensor ops per iteration, whose
fixed dispatch cost and the SAT gather (32 reads per box) dominate on CPU, so throughput
grows with the number of boxes per call; on CPU it runs single-threaded by default
(cfg.num_threads). Results do not depend on the batching.

Pseudo instance masks
---------------------
`pseudo_masks` crops the score map with each refined box (pixels whose centre lies in the
box) and keeps a pixel where the box's class wins the argmax over all channels (background
included) or its score is >= threshold (default 0.4: a softmax score >= 0.5 always wins,
so 0.4 adds pixels where the class is a close second). Where boxes of the same class
overlap, a pixel goes to the box in which it is most central: smallest
max(|x - cx| / (w / 2), |y - cy| / (h / 2)), ties to the smaller box, then the lower index.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from wsis_ray.config import CCGRConfig

STOP_REASONS = ("converged", "max_iterations", "second_peak", "flat", "degenerate")
_CONVERGED, _MAX_ITER, _SECOND_PEAK, _FLAT, _DEGENERATE = range(5)
_RUNNING = -1


@dataclass
class RefineResult:
    """boxes (N,4) float32; loss (N,) Eq. 3 at the final box; iterations (N,) gradient steps
    applied; stop_reason per box (one of STOP_REASONS); trajectory (T,N,4) boxes at
    trajectory_iterations (0 = the input box after projection), if asked for."""
    boxes: Tensor
    loss: Tensor
    iterations: Tensor
    stop_reason: list[str]
    trajectory: Tensor | None = None
    trajectory_iterations: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


def _stack_scores(scores: Tensor | Sequence[Tensor], image_sizes) -> tuple[Tensor, Tensor]:
    """A padded (B,C+1,H,W) batch (with optional (B,2) sizes (H, W)) or a list of
    (C+1,H_i,W_i) maps -> a batch and the sizes. Nothing outside an image's size is ever
    read, so padding may hold anything. Raises on NaN/inf inside an image, naming it."""
    if isinstance(scores, Tensor):
        if scores.dim() != 4:
            raise ValueError(f"scores must be (B, C+1, H, W) or a list of (C+1, H, W), "
                             f"got shape {tuple(scores.shape)}")
        out = scores if scores.is_floating_point() else scores.float()
        if image_sizes is None:
            sizes = torch.tensor([list(scores.shape[-2:])] * scores.shape[0], dtype=torch.long)
        else:
            sizes = torch.as_tensor(image_sizes).long().reshape(-1, 2).cpu()
            if sizes.shape[0] != out.shape[0]:
                raise ValueError(f"image_sizes has {sizes.shape[0]} rows for {out.shape[0]} images")
    else:
        maps = [torch.as_tensor(m) for m in scores]
        for k, m in enumerate(maps):
            if m.dim() != 3:
                raise ValueError(f"score map of image {k} must be (C+1, H, W), "
                                 f"got shape {tuple(m.shape)}")
        if not maps:
            return torch.zeros(0, 1, 1, 1), torch.zeros(0, 2, dtype=torch.long)
        if len({m.shape[0] for m in maps}) != 1:
            raise ValueError("all score maps need the same number of channels (C+1)")
        sizes = torch.tensor([list(m.shape[-2:]) for m in maps], dtype=torch.long)
        out = maps[0].new_zeros((len(maps), maps[0].shape[0], int(sizes[:, 0].max()),
                                 int(sizes[:, 1].max())), dtype=torch.float32)
        for k, m in enumerate(maps):
            out[k, :, :m.shape[1], :m.shape[2]] = m
    for k, (h, w) in enumerate(sizes.tolist()):
        if h < 1 or w < 1 or h > out.shape[-2] or w > out.shape[-1]:
            raise ValueError(f"image {k}: size {(h, w)} does not fit its score map "
                             f"{tuple(out.shape[-2:])}")
    # a sum is NaN/inf if any term is (or on overflow, which the exact check then clears)
    if sizes.shape[0] and bool((sizes == torch.tensor(out.shape[-2:])).all()):
        sums = out.sum(dim=(1, 2, 3))
    else:
        sums = torch.stack([out[k, :, :h, :w].sum() for k, (h, w) in enumerate(sizes.tolist())])
    for k in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():
        h, w = sizes[k].tolist()
        if torch.isfinite(out[k, :, :h, :w]).all():
            continue
        raise ValueError(f"score map of image {k} contains NaN or inf; check the SS "
                         f"branch output for that image")
    return out, sizes


_WORKSPACE = threading.local()  # one reusable SAT buffer per thread (see _sat_buffer)
_WORKSPACE_MAX_BYTES = 512 * 2 ** 20


def _sat_buffer(numel: int, device: torch.device) -> Tensor:
    """A float64 buffer of numel elements. Fresh allocations of this size cost more in
    page faults than the cumulative sums themselves, so a thread reuses its last buffer
    (up to 512 MiB) across calls, e.g. across the batches a Ray Data actor refines."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.device != device or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float64, device=device)
        if numel * 8 <= _WORKSPACE_MAX_BYTES:
            _WORKSPACE.buf = buf
    return buf[:numel]


_SAT_BLOCK_BYTES = 4 * 2 ** 20  # planes built together: near the L2 size, fastest measured


def _summed_area_tables(scores: Tensor, image_index: Tensor, class_ids: Tensor):
    """SATs (U, H+1, W+1) float64 for the (image, class) pairs the boxes use, and each box's
    row in them. float64 keeps box sums exact enough for the flat-map test (flat_tol).
    Built in blocks of pairs of a few MiB, near a core's L2 cache (one copy and two
    cumulative sums per block): whole-buffer passes over a 100+ MiB SAT are memory-bound and took
    twice as long."""
    n_cls = scores.shape[1] - 1
    pair = image_index * n_cls + class_ids
    uniq, inverse = torch.unique(pair, return_inverse=True)
    u, h, w = uniq.numel(), scores.shape[2], scores.shape[3]
    sat = _sat_buffer(u * (h + 1) * (w + 1), scores.device).view(u, h + 1, w + 1)
    sat[:, 0] = 0
    sat[:, :, 0] = 0
    planes = scores.reshape(-1, h, w)
    src = (uniq // n_cls) * (n_cls + 1) + uniq % n_cls + 1  # plane of (image, class + 1)
    step = max(1, _SAT_BLOCK_BYTES // ((h + 1) * (w + 1) * 8))
    for k in range(0, u, step):
        inner = sat[k:k + step, 1:, 1:]
        inner.copy_(planes.index_select(0, src[k:k + step]))
        inner.cumsum_(2)
        inner.cumsum_(1)
    return sat, inverse


def _other_peaks(image_index, class_ids, peak_xy, peaks, device):
    """Per box, the peaks of its image and class other than its own: (N,K,2), valid (N,K),
    and how many such peaks the box may hold (0 with an own peak, 1 without)."""
    n = image_index.shape[0]
    allowed = torch.isnan(peak_xy).any(1).long() if peak_xy is not None else \
        torch.ones(n, dtype=torch.long, device=device)
    if peaks is not None:
        p_img, p_cls, p_xy = (torch.as_tensor(t, device=device) for t in peaks)
    if peaks is None or p_img.numel() == 0 or n == 0:
        return (torch.zeros(n, 0, 2, dtype=torch.float64, device=device),
                torch.zeros(n, 0, dtype=torch.bool, device=device), allowed)
    p_xy = p_xy.to(torch.float64).reshape(-1, 2)
    match = (image_index[:, None] == p_img[None].long()) & \
        (class_ids[:, None] == p_cls[None].long())
    if peak_xy is not None:
        own = (p_xy[None] - peak_xy[:, None].to(torch.float64)).abs().amax(-1) < 1e-3
        match &= ~own
    k = int(match.sum(1).max())
    order = torch.sort(match.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    return p_xy[order], torch.gather(match, 1, order), allowed


# Inside the engine every per-box quantity is laid out box-last:
# a box is (2, 2, N) = (lo/hi corner, x/y, box), so each coordinate is one contiguous row
# of N values. Slices, stacks and broadcasts then touch whole rows; with boxes-first
# (N, 4) tensors the same algebra needed strided copies (index_select along dim 1, repeat)
# that cost 10x an elementwise op on CPU.


def _box_last(boxes: Tensor) -> Tensor:
    """(N,4) [x1, y1, x2, y2] -> (2,2,N) [lo/hi][x/y]."""
    return boxes.t().contiguous().view(2, 2, -1)


def _box_first(boxes: Tensor) -> Tensor:
    """(..., 2,2,N) -> (..., N,4)."""
    return boxes.reshape(*boxes.shape[:-3], 4, boxes.shape[-1]).transpose(-1, -2).contiguous()


class _Geometry(NamedTuple):
    """Per-box constants of a refine call (the last dim follows the boxes; `take` keeps
    some)."""
    lim: Tensor       # (2,N) W, H of the box's image
    cell_max: Tensor  # (2,N) W - 1, H - 1: the last pixel's index per axis
    base: Tensor      # (N,) float64 offset of the box's SAT in the flat SAT buffer
    bound: Tensor     # (2,2,N) upper limits of (x1, y1), (x2, y2): W - m, H - m, W, H
    min_wh: Tensor    # (2,N) m: min_size capped by the image size, per axis

    def take(self, k: Tensor) -> "_Geometry":
        return _Geometry(*(t[..., k] for t in self))


def _geometry(lim: Tensor, row: Tensor, sat_shape, min_size: float) -> _Geometry:
    m = torch.clamp(lim, max=min_size)
    base = (row * sat_shape[1] * sat_shape[2]).to(torch.float64)
    return _Geometry(lim, lim - 1, base, torch.stack([lim - m, lim]), m)


def _project(boxes: Tensor, geo: _Geometry) -> Tensor:
    """Onto {x1 < x2, y1 < y2, size >= min_size, inside the image} (min_size capped by the
    image size). boxes (2,2,N) float64."""
    b = torch.minimum(boxes.clamp(min=0), geo.bound)
    lo, hi = b[0], b[1]
    short = hi - lo < geo.min_wh
    if bool(short.any()):
        m = geo.min_wh
        center = torch.minimum(torch.maximum((lo + hi) / 2, m / 2), geo.lim - m / 2)
        b = torch.stack([torch.where(short, center - m / 2, lo),
                         torch.where(short, center + m / 2, hi)])
    return b


_MATS: dict = {}


def _mats(scale: float, device, dtype=torch.float64):
    """Constants of Eq. 2-3's per-corner algebra. C: (lo, hi) of B -> of B~ along each
    axis (x~1 = a x1 + b x2, x~2 = b x1 + a x2; symmetric, so it also maps gradients back).
    SIGN: +1 for the lo corner, -1 for the hi corner (a side moves outward along -SIGN);
    AREA_SIGN = -SIGN: the sign of d area / d side."""
    key = (scale, device, dtype)
    if key not in _MATS:
        a, b = (1 + scale) / 2, (1 - scale) / 2
        _MATS[key] = dict(
            C=torch.tensor([[a, b], [b, a]], dtype=dtype, device=device),
            SIGN=torch.tensor([1.0, -1.0], dtype=dtype, device=device).view(2, 1, 1),
            AREA_SIGN=torch.tensor([-1.0, 1.0], dtype=dtype, device=device).view(2, 1, 1))
    return _MATS[key]


@functools.lru_cache(maxsize=16)
def _corner_offsets(width1: int, device) -> Tensor:
    """Flat offsets of a SAT cell's 4 corners (I00, I10, I01, I11) for rows of width1,
    shaped to broadcast over (box, y lo/hi, x lo/hi, N) corner indices."""
    return torch.tensor([0, 1, width1, width1 + 1], device=device).view(4, 1, 1, 1, 1)


def _context(boxes: Tensor, lim: Tensor, mats):
    """Context box B~ (same center, `scale` x size) clipped to the image, and which of its
    sides are not clipped (only those carry gradient). boxes (2,2,N)."""
    raw = (mats["C"] @ boxes.reshape(2, -1)).view(boxes.shape)
    ctx = torch.minimum(raw.clamp(min=0), lim)  # x~1 <= x1 < W and x~2 >= x2 > 0
    free = (raw > 0) & (raw < lim)
    return ctx, free


def context_box(box: Sequence[float], height: int, width: int, scale: float = 1.5) -> list[float]:
    """The context box B~ of a box: same center, `scale` x width and height, clipped."""
    b = _box_last(torch.tensor([list(map(float, box))], dtype=torch.float64))
    lim = torch.tensor([[width], [height]], dtype=torch.float64)
    return _box_first(_context(b, lim, _mats(scale, b.device))[0])[0].tolist()


def _corner_values(sat_flat, width1, geo, pts):
    """Bilinearly interpolated SAT at the corners of P = [B, B~] (exactly the integral of
    the pixel-constant map up to that point) and its x/y derivatives there. pts (2,2,2,N)
    = (box, lo/hi, x/y, N); each output (2,2,2,N) = (box, top/bottom, left/right, N)."""
    cell = torch.minimum(pts.floor(), geo.cell_max).clamp_(min=0)
    frac = pts - cell
    fx, fy = frac[:, None, :, 0], frac[:, :, None, 1]        # (2,1,2,N), (2,2,1,N)
    rows = torch.add(geo.base, cell[:, :, 1], alpha=width1)  # (2,2,N): box, top/bottom
    idx = (rows[:, :, None] + cell[:, None, :, 0]).long() + _corner_offsets(width1, pts.device)
    c00, c10, c01, c11 = sat_flat.index_select(0, idx.view(-1)).view(idx.shape)
    ix, iy = c10 - c00, c01 - c00
    ixy = c11 - c10 - iy
    dx = torch.addcmul(ix, fy, ixy)
    dy = torch.addcmul(iy, fx, ixy)
    return torch.addcmul(torch.addcmul(c00, fx, ix), fy, dy), dx, dy


def _box_sums(val, dx, dy, mats):
    """From the corners' values and derivatives: the sums over B and B~ (2,N), and
    d sum / d(lo x, lo y, hi x, hi y) for both, as (2,2,2,N)."""
    sums = (val[:, 0, 0] + val[:, 1, 1]) - (val[:, 0, 1] + val[:, 1, 0])  # TL+BR-TR-BL
    # d/dx1 = dx_TL - dx_BL, d/dx2 = dx_BR - dx_TR, d/dy1 = dy_TL - dy_TR, d/dy2 = dy_BR - dy_BL
    ddx = dx[:, 0] - dx[:, 1]        # (2,2,N): d/dx1, -d/dx2
    ddy = dy[:, :, 0] - dy[:, :, 1]  # (2,2,N): d/dy1, -d/dy2
    return sums, torch.stack([ddx, ddy], 2).mul_(mats["SIGN"])


def _eq3_analytic(sat_flat, width1, geo, boxes, mats):
    """L (Eq. 3) (N,), dL/d(box) (2,2,N) in closed form, and per side (2,2,N) the smaller of
    the mean scores along the box's edge and along the context's outer edge (plateau
    rule). boxes (2,2,N)."""
    ctx, free = _context(boxes, geo.lim, mats)
    pts = torch.stack([boxes, ctx])
    sums, dsum = _box_sums(*_corner_values(sat_flat, width1, geo, pts), mats)
    wh = pts[:, 1] - pts[:, 0]                        # (2,2,N): w, h of B and B~
    area = wh[:, 0] * wh[:, 1]                        # A_B, A_B~
    darea = wh.flip(1)[:, None] * mats["AREA_SIGN"]   # d area / d(x1, y1, x2, y2) = -h, -w, h, w
    # mean S along each side (d sum / d side = +-line integral, d area / d side = +-length)
    edge_means = dsum / darea
    edge = torch.minimum(edge_means[0], edge_means[1])
    # chain rule through B~(B), zero where B~ is clipped
    through = (mats["C"] @ (torch.stack([dsum[1], darea[1]]) * free).view(2, 2, -1)) \
        .view(2, *boxes.shape)
    den = area[1] - area[0]
    has_ring = den > 1e-9
    inv = has_ring / torch.where(has_ring, den, 1.0)  # 1 / A_ring, 0 without a ring
    phi_c = (sums[1] - sums[0]) * inv
    dphi_c = torch.addcmul(through[0] - dsum[0], phi_c, through[1] - darea[0], value=-1) * inv
    phi_b = sums[0] / area[0]
    dphi_b = torch.addcmul(dsum[0], phi_b, darea[0], value=-1) / area[0]
    return phi_c - phi_b, dphi_c - dphi_b, edge


def _eq3_forward(sat_flat, width1, geo, boxes, mats):
    """L (Eq. 3) by plain differentiable tensor ops (for autograd), same maths as above."""
    ctx, _ = _context(boxes, geo.lim, mats)
    pts = torch.stack([boxes, ctx])
    val, _, _ = _corner_values(sat_flat, width1, geo, pts)
    sums = (val[:, 0, 0] + val[:, 1, 1]) - (val[:, 0, 1] + val[:, 1, 0])
    wh = pts[:, 1] - pts[:, 0]
    area = wh[:, 0] * wh[:, 1]
    den = area[1] - area[0]
    has_ring = den > 1e-9
    phi_c = torch.where(has_ring, (sums[1] - sums[0]) / torch.where(has_ring, den, 1.0), 0.0)
    return phi_c - sums[0] / area[0]


def _eq3_autograd(sat_flat, width1, geo, boxes, mats):
    """L and its gradient by autograd; edge means in closed form (not differentiated)."""
    with torch.enable_grad():
        x = boxes.detach().clone().requires_grad_(True)
        loss = _eq3_forward(sat_flat, width1, geo, x, mats)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    edge = _eq3_analytic(sat_flat, width1, geo, boxes, mats)[2]
    return loss.detach(), grad, edge


# --------------------------------------------------------------------------- engine


def refine(scores: Tensor | Sequence[Tensor], boxes: Tensor, image_index: Tensor,
           class_ids: Tensor, peak_xy: Tensor | None = None,
           peaks: tuple[Tensor, Tensor, Tensor] | None = None,
           cfg: CCGRConfig | None = None, record_every: int | None = None,
           image_sizes: Tensor | None = None, record_at: Sequence[int] | None = None,
           gradient: str = "analytic") -> RefineResult:
    """Refine boxes by minimising Eq. 3 with Adam (see the module docstring for the rules).

    scores: padded (B, C+1, H, W) softmax maps (with image_sizes (B,2) = (H, W) per image,
        the padding counting as outside) or a list of (C+1, H_i, W_i) maps.
    boxes (N,4) [x1, y1, x2, y2] pixels; image_index (N,); class_ids (N,) 0-based classes.
    peak_xy (N,2): each box's own peak (NaN rows: none); peaks = (image_index (P,),
        class_id (P,), xy (P,2)): all peaks, for the peak rule. None: no peak rule.
    record_every / record_at: keep the boxes at iterations 0, k, 2k, ... / at the given
        iterations (0 = start) in result.trajectory, e.g. for mAP^b vs iteration (Fig. 5).
    gradient: "analytic" (closed form) or "autograd" (same maths, for tests/baselines).
    On CPU it runs with cfg.num_threads torch threads (restored afterwards).
    """
    cfg = cfg or CCGRConfig()
    maps, sizes = _stack_scores(scores, image_sizes)
    dev = maps.device
    boxes = torch.as_tensor(boxes, device=dev).reshape(-1, 4).to(torch.float64)
    image_index = torch.as_tensor(image_index, device=dev).long().reshape(-1)
    class_ids = torch.as_tensor(class_ids, device=dev).long().reshape(-1)
    if peak_xy is not None:
        peak_xy = torch.as_tensor(peak_xy, device=dev).to(torch.float64).reshape(-1, 2)
    _check_boxes(boxes, image_index, class_ids, peak_xy, maps)
    rec = _record_iterations(cfg.iterations, record_every, record_at)
    before = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        chunks = _sat_chunks(image_index, class_ids, maps.shape)
        if len(chunks) == 1:
            return _refine(maps, sizes, boxes, image_index, class_ids, peak_xy, peaks, cfg,
                           rec, gradient)
        parts = [_refine(maps, sizes, boxes[k], image_index[k], class_ids[k],
                         None if peak_xy is None else peak_xy[k], peaks, cfg, rec, gradient)
                 for k in chunks]
        return _merge(parts, chunks, boxes.shape[0], rec)
    finally:
        torch.set_num_threads(before)


_SAT_CHUNK_BYTES = 256 * 2 ** 20


def _sat_chunks(image_index, class_ids, shape) -> list[Tensor]:
    """Box indices in groups whose summed-area tables fit in _SAT_CHUNK_BYTES (all boxes of
    one (image, class) pair in the same group), so memory stays bounded for big calls."""
    n_cls, h, w = shape[1] - 1, shape[2], shape[3]
    per_chunk = max(1, _SAT_CHUNK_BYTES // ((h + 1) * (w + 1) * 8))
    _, rank = torch.unique(image_index * n_cls + class_ids, return_inverse=True)
    chunk = rank // per_chunk
    if image_index.numel() == 0 or int(chunk.max()) == 0:
        return [torch.arange(image_index.numel(), device=image_index.device)]
    return [torch.nonzero(chunk == k).flatten() for k in range(int(chunk.max()) + 1)]


def _merge(parts: list[RefineResult], chunks: list[Tensor], n: int, rec) -> RefineResult:
    boxes, loss = torch.zeros(n, 4), torch.zeros(n)
    iterations = torch.zeros(n, dtype=torch.long)
    reasons = [""] * n
    traj = torch.zeros(len(rec), n, 4) if rec else None
    for part, k in zip(parts, chunks):
        k = k.cpu()
        boxes[k], loss[k], iterations[k] = part.boxes.cpu(), part.loss.cpu(), part.iterations.cpu()
        for i, r in zip(k.tolist(), part.stop_reason):
            reasons[i] = r
        if rec:
            traj[:, k] = part.trajectory.cpu()
    dev = parts[0].boxes.device
    return RefineResult(boxes.to(dev), loss.to(dev), iterations.to(dev), reasons,
                        None if traj is None else traj.to(dev), rec)


def _refine(maps, sizes, boxes, image_index, class_ids, peak_xy, peaks, cfg, rec,
            gradient) -> RefineResult:
    """The engine for boxes whose SATs fit in memory at once (see refine)."""
    dev = maps.device
    n = boxes.shape[0]
    if n == 0:
        empty = torch.zeros(0, 4, device=dev)
        return RefineResult(empty, torch.zeros(0, device=dev),
                            torch.zeros(0, dtype=torch.long, device=dev), [],
                            torch.zeros(len(rec), 0, 4, device=dev) if rec else None, rec)
    eq3 = {"analytic": _eq3_analytic, "autograd": _eq3_autograd}[gradient]

    lim = sizes.to(dev)[image_index].t().flip(0).to(torch.float64)  # (2,N): W, H
    mats = _mats(cfg.context_scale, dev)
    sat, row = _summed_area_tables(maps, image_index, class_ids)
    width1 = sat.shape[2]
    sat_flat = sat.reshape(-1)
    geo = _geometry(lim, row, sat.shape, cfg.min_size)
    others, valid, allowed = _other_peaks(image_index, class_ids, peak_xy, peaks, dev)
    if cfg.peak_region > 0 and peak_xy is not None and others.shape[1]:
        valid = valid & ~_same_region(maps, sizes, image_index, class_ids, peak_xy, others,
                                      cfg.peak_region)
    others, valid = others.permute(2, 1, 0).contiguous(), valid.t().contiguous()  # (2,K,N), (K,N)

    boxes, status = _initial_boxes(_box_last(boxes), geo, others, valid, allowed)
    steps = torch.zeros(n, dtype=torch.long, device=dev)

    traj = [boxes.clone()] if 0 in rec else []
    rec_set = set(rec)
    # per-box state of the still active boxes only, compacted whenever some stop
    act = torch.nonzero(status == _RUNNING).flatten()
    a_geo = geo.take(act)
    state = [boxes[..., act], others[..., act], valid[..., act], allowed[act],
             torch.zeros(2, 2, act.numel(), dtype=torch.float64, device=dev),  # Adam m
             torch.zeros(2, 2, act.numel(), dtype=torch.float64, device=dev),  # Adam v
             torch.zeros(act.numel(), dtype=torch.long, device=dev),  # still count
             torch.zeros(act.numel(), dtype=torch.long, device=dev)]  # steps taken
    for t in range(1, cfg.iterations + 1):
        if act.numel() == 0:
            break
        cur, a_others, a_valid, a_allowed, m, v, still, a_steps = state
        _, grad, edge = eq3(sat_flat, width1, a_geo, cur, mats)
        cand, no_grad, expand, size = _adam_step(cur, grad, edge, m, v, a_geo, t, cfg, mats)
        blocked = _too_many_peaks(cand, a_others, a_valid, a_allowed)
        flat = no_grad.view(4, -1).all(0) & ~expand.view(4, -1).any(0)
        moved = ((cand - cur).abs_().div_(size)).view(4, -1).amax(0)
        still = torch.where(moved < cfg.tol, still + 1, 0)
        take = ~(blocked | flat)
        cur = torch.where(take, cand, cur)
        a_steps += take
        state[0], state[6] = cur, still
        done = blocked | flat | (still >= cfg.patience)
        any_done = t == cfg.iterations or bool(done.any())
        if any_done or t in rec_set:
            boxes[..., act] = cur
        if t in rec_set:
            traj.append(boxes.clone())
        if any_done:  # rare: name the reasons only then
            last = _MAX_ITER if t == cfg.iterations else _RUNNING
            new_status = torch.where(still >= cfg.patience, _CONVERGED, last)
            new_status = torch.where(flat, torch.where(a_steps > 0, _CONVERGED, _FLAT), new_status)
            new_status = torch.where(blocked, _SECOND_PEAK, new_status)
            done = new_status != _RUNNING
            status[act[done]] = new_status[done]
            steps[act[done]] = a_steps[done]
            act = act[~done]
            state = [x[..., ~done] for x in state]
            a_geo = a_geo.take(~done)
    while len(traj) < len(rec):  # the loop ended early: all boxes keep their final box
        traj.append(boxes.clone())
    status[status == _RUNNING] = _MAX_ITER  # only with iterations == 0

    loss = _eq3_analytic(sat_flat, width1, geo, boxes, mats)[0]
    reasons = [STOP_REASONS[int(s)] for s in status.tolist()]
    return RefineResult(_box_first(boxes).float(), loss.float(), steps, reasons,
                        _box_first(torch.stack(traj)).float() if rec else None, rec)


def _initial_boxes(boxes, geo, others, valid, allowed):
    """Swap inverted coordinates, mark boxes outside their image "degenerate" and boxes that
    already hold a second peak "second_peak", project all onto the constraints.
    boxes (2,2,N)."""
    lo, hi = torch.minimum(boxes[0], boxes[1]), torch.maximum(boxes[0], boxes[1])
    outside = ((lo >= geo.lim) | (hi <= 0)).any(0)
    boxes = _project(torch.stack([lo, hi]), geo)
    status = torch.full((boxes.shape[-1],), _RUNNING, dtype=torch.long, device=boxes.device)
    status[outside] = _DEGENERATE
    status[(status == _RUNNING) & _too_many_peaks(boxes, others, valid, allowed)] = _SECOND_PEAK
    return boxes, status


def _adam_step(cur, grad, edge, m, v, geo, t, cfg, mats):
    """One Adam step in units of the box size (m, v updated in place), with the plateau
    rule, projected onto the constraints. Returns the candidate box, which coordinates
    have no gradient, which sides expand, and the (w, h) sizes (2,N). All boxes (2,2,N)."""
    size = cur[1] - cur[0]
    g = grad * size  # dimensionless: Adam's steps come out in units of the box size
    m.lerp_(g, 1 - cfg.beta1)
    v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
    # m^ / (sqrt(v^) + eps) with the bias corrections c1, c2 taken out of the tensors
    c1, c2 = 1 - cfg.beta1 ** t, math.sqrt(1 - cfg.beta2 ** t)
    direction = m.div(v.sqrt().add_(1e-12 * c2)).mul_(c2 / c1)
    no_grad = g.abs_() < cfg.flat_tol
    expand = edge >= cfg.expand_threshold
    direction = torch.where(expand, mats["SIGN"], direction.masked_fill_(no_grad, 0.0))
    cand = _project(torch.addcmul(cur, direction, size, value=-_step_size(cfg, t)), geo)
    return cand, no_grad, expand, size


def _step_size(cfg: CCGRConfig, t: int) -> float:
    """Cosine decay from lr to lr * lr_final over the iterations (relative step size)."""
    frac = (t - 1) / max(cfg.iterations - 1, 1)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * frac)))


def _record_iterations(iterations, record_every, record_at) -> list[int]:
    rec = set(int(k) for k in (record_at or []) if 0 <= int(k) <= iterations)
    if record_every:
        rec |= set(range(0, iterations + 1, int(record_every)))
    return sorted(rec)


def _same_region(maps, sizes, image_index, class_ids, peak_xy, others, level, samples=32):
    """(N,K): whether S stays >= level along the straight segment from each box's own peak
    to each other peak (sampled at `samples` points, nearest pixel), i.e. both peaks lie in
    one region of the class: the second is a duplicate peak of the same instance, not a
    second instance. Boxes without an own peak (NaN) get False."""
    t = torch.linspace(0, 1, samples, dtype=torch.float64, device=maps.device)
    own = peak_xy.to(torch.float64)[:, None, None, :]
    pts = own + t[None, None, :, None] * (others[:, :, None, :] - own)  # (N,K,T,2)
    hw = sizes.to(maps.device)[image_index].to(torch.float64)  # (N,2) = (H, W)
    x = torch.minimum(pts[..., 0].nan_to_num(0).floor().clamp(min=0), hw[:, None, None, 1] - 1)
    y = torch.minimum(pts[..., 1].nan_to_num(0).floor().clamp(min=0), hw[:, None, None, 0] - 1)
    _, c1, h, w = maps.shape
    plane = (image_index * c1 + class_ids + 1)[:, None, None]
    s = maps.reshape(-1).index_select(0, ((plane * h + y.long()) * w + x.long())
                                      .flatten()).view(x.shape)
    duplicate = (s.amin(-1) >= level) | (s[..., -1] < level)
    return duplicate & ~torch.isnan(peak_xy).any(1)[:, None]


def _too_many_peaks(boxes, others, valid, allowed) -> Tensor:
    """Whether each box (2,2,N) holds more than `allowed` of the other peaks (2,K,N)."""
    if others.shape[1] == 0:
        return torch.zeros(boxes.shape[-1], dtype=torch.bool, device=boxes.device)
    px, py = others[0], others[1]
    inside = valid & (px >= boxes[0, 0]) & (px <= boxes[1, 0]) & \
        (py >= boxes[0, 1]) & (py <= boxes[1, 1])
    return inside.sum(0) > allowed


def _check_boxes(boxes, image_index, class_ids, peak_xy, maps) -> None:
    n = boxes.shape[0]
    if image_index.shape[0] != n or class_ids.shape[0] != n or \
            (peak_xy is not None and peak_xy.shape[0] != n):
        raise ValueError(f"boxes ({n}), image_index ({image_index.shape[0]}), class_ids "
                         f"({class_ids.shape[0]}) and peak_xy must have one row per box")
    if n == 0:
        return
    bad = ~torch.isfinite(boxes).all(1)
    if bad.any():
        k = int(torch.nonzero(bad)[0])
        raise ValueError(f"box {k} (image {int(image_index[k])}) has non-finite coordinates "
                         f"{boxes[k].tolist()}")
    if int(image_index.min()) < 0 or int(image_index.max()) >= maps.shape[0]:
        raise ValueError(f"image_index must lie in [0, {maps.shape[0]}), got "
                         f"[{int(image_index.min())}, {int(image_index.max())}]")
    if int(class_ids.min()) < 0 or int(class_ids.max()) >= maps.shape[1] - 1:
        raise ValueError(f"class_ids must lie in [0, {maps.shape[1] - 1}) for maps with "
                         f"{maps.shape[1]} channels (channel 0 = background)")


def eq3_loss(scores: Tensor | Sequence[Tensor], boxes: Tensor, image_index: Tensor,
             class_ids: Tensor, context_scale: float = 1.5, image_sizes: Tensor | None = None,
             with_grad: bool = False):
    """Eq. 3 for many boxes at once without refining them (float64); with_grad also
    returns dL/d(x1,y1,x2,y2). Boxes must lie inside their images."""
    maps, sizes = _stack_scores(scores, image_sizes)
    boxes = torch.as_tensor(boxes).reshape(-1, 4).to(torch.float64)
    image_index = torch.as_tensor(image_index).long().reshape(-1)
    class_ids = torch.as_tensor(class_ids).long().reshape(-1)
    sat, row = _summed_area_tables(maps, image_index, class_ids)
    lim = sizes[image_index].t().flip(0).to(torch.float64)
    loss, grad, _ = _eq3_analytic(sat.reshape(-1), sat.shape[2], _geometry(lim, row, sat.shape, 0),
                                  _box_last(boxes), _mats(context_scale, boxes.device))
    return (loss, _box_first(grad)) if with_grad else loss


def refine_reference(scores, boxes, image_index, class_ids, peak_xy=None, peaks=None,
                     cfg: CCGRConfig | None = None, image_sizes=None) -> RefineResult:
    """Naive baseline: one box at a time, autograd gradients, a Python loop over the
    iterations. Same rules as `refine`; used by the benchmark and as a cross-check."""
    boxes = torch.as_tensor(boxes).reshape(-1, 4)
    image_index = torch.as_tensor(image_index).reshape(-1)
    class_ids = torch.as_tensor(class_ids).reshape(-1)
    parts = []
    for k in range(boxes.shape[0]):
        own = None if peak_xy is None else torch.as_tensor(peak_xy)[k:k + 1]
        parts.append(refine(scores, boxes[k:k + 1], image_index[k:k + 1], class_ids[k:k + 1],
                            own, peaks, cfg, image_sizes=image_sizes, gradient="autograd"))
    if not parts:
        return refine(scores, boxes, image_index, class_ids, cfg=cfg, image_sizes=image_sizes)
    return RefineResult(torch.cat([p.boxes for p in parts]), torch.cat([p.loss for p in parts]),
                        torch.cat([p.iterations for p in parts]),
                        [r for p in parts for r in p.stop_reason])


# --------------------------------------------------------------------------- masks


def pseudo_masks(scores: Tensor | Sequence[Tensor], boxes: Tensor, image_index: Tensor,
                 class_ids: Tensor, threshold: float = 0.4,
                 image_sizes: Tensor | None = None) -> list[np.ndarray]:
    """Pseudo instance masks (H_i, W_i) bool, one per box (see the module docstring): the
    box crops its class's map; a pixel is kept where the class wins the argmax or scores
    >= threshold; same-class overlaps go to the box the pixel is most central in."""
    maps, sizes = _stack_scores(scores, image_sizes)
    boxes = torch.as_tensor(boxes).reshape(-1, 4).to(torch.float64).cpu()
    image_index = torch.as_tensor(image_index).long().reshape(-1).cpu()
    class_ids = torch.as_tensor(class_ids).long().reshape(-1).cpu()
    out: list[np.ndarray | None] = [None] * boxes.shape[0]
    for img in image_index.unique().tolist():
        h, w = sizes[img].tolist()
        s = maps[img, :, :h, :w].cpu()
        winner = s.argmax(0)
        ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
        xs = torch.arange(w, dtype=torch.float64)[None] + 0.5
        for c in class_ids[image_index == img].unique().tolist():
            sel = torch.nonzero((image_index == img) & (class_ids == c)).flatten()
            b = boxes[sel]
            fg = (winner == c + 1) | (s[c + 1] >= threshold)
            half_w = ((b[:, 2] - b[:, 0]) / 2).clamp(min=1e-6)[:, None, None]
            half_h = ((b[:, 3] - b[:, 1]) / 2).clamp(min=1e-6)[:, None, None]
            dist = torch.maximum((xs - (b[:, 0] + b[:, 2])[:, None, None] / 2).abs() / half_w,
                                 (ys - (b[:, 1] + b[:, 3])[:, None, None] / 2).abs() / half_h)
            inside = (xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None]) & \
                (ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None]) & fg
            # ties to the smaller box, then the lower index: a tiny area-ordered tie-break
            area = (half_w * half_h).flatten()
            rank = torch.empty_like(area)
            rank[torch.argsort(area, stable=True)] = torch.arange(len(area), dtype=area.dtype)
            key = torch.where(inside, dist + rank[:, None, None] * 1e-9,
                              torch.full_like(dist, math.inf))
            owner = key.argmin(0)
            for k, i in enumerate(sel.tolist()):
                out[i] = (inside[k] & (owner == k)).numpy()
    return out  # type: ignore[return-value]


def masks_to_rle(masks: Sequence[np.ndarray]) -> list[str]:
    """COCO compressed RLE strings (wsis_ray.data.records.encode_mask) of bool masks."""
    from wsis_ray.data.records import encode_mask
    return [encode_mask(mk) for mk in masks]
