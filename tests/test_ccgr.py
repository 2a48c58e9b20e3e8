"""CCGR (Eq. 2-3): gradient, convergence on soft maps, peak rule, degenerate inputs, masks."""
import math

import numpy as np
import pytest
import torch

from wsis_ray.ccgr import eq3_loss, masks_to_rle, pseudo_masks, refine, refine_reference
from wsis_ray.config import CCGRConfig
from wsis_ray.data.records import decode_mask


def soft_map(h, w, objects, edge=2.0):
    """(1, 2, H, W) softmax-like map: class 0 ~1 inside the objects, falling to ~0 over about
    `edge` px at their border. objects: ("rect", x1, y1, x2, y2) or ("disk", cx, cy, r)."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    k = edge / 4
    p = torch.zeros(h, w)
    for kind, *a in objects:
        if kind == "rect":
            x1, y1, x2, y2 = a
            q = (torch.sigmoid((xs - x1) / k) * torch.sigmoid((x2 - xs) / k)
                 * torch.sigmoid((ys - y1) / k) * torch.sigmoid((y2 - ys) / k))
        else:
            cx, cy, r = a
            q = torch.sigmoid((r - ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()) / k)
        p = torch.maximum(p, q)
    return torch.stack([1 - p, p])[None]


def iou(a, b):
    a, b = [float(v) for v in a], [float(v) for v in b]
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def one(scores, box, **kw):
    return refine(scores, torch.tensor([box], dtype=torch.float32), torch.tensor([0]),
                  torch.tensor([0]), **kw)


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    s = torch.softmax(torch.randn(1, 3, 40, 50) * 3, 1)
    boxes = torch.tensor([[5.3, 7.7, 20.2, 30.6],     # context inside the image
                          [30.1, 2.4, 45.5, 15.2],    # context clipped at the top
                          [0.5, 0.5, 49.2, 39.1],     # context clipped on every side
                          [12.0, 10.0, 19.0, 16.0]],  # integer corners (one-sided derivative)
                         dtype=torch.float64)
    ii, cc = torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1])
    loss, grad = eq3_loss(s, boxes, ii, cc, with_grad=True)
    eps = 1e-6
    for k in range(4):
        d = torch.zeros_like(boxes)
        d[:, k] = eps
        fwd = (eq3_loss(s, boxes + d, ii, cc) - loss) / eps  # forward: integer corners
        torch.testing.assert_close(grad[:, k], fwd, rtol=1e-4, atol=1e-7)
        assert grad[:, k].abs().max() > 1e-4  # the check is not vacuous


def test_loss_is_eq3_by_brute_force_pixel_sums():
    torch.manual_seed(1)
    s = torch.rand(1, 2, 30, 30)
    box = [6.0, 8.0, 16.0, 20.0]  # integer box: context (3.5, 5, 18.5, 23) half pixels
    loss = float(eq3_loss(s, torch.tensor([box]), torch.tensor([0]), torch.tensor([0])))
    up = torch.repeat_interleave(torch.repeat_interleave(s[0, 1], 2, 0), 2, 1)  # half-px grid
    inner = up[16:40, 12:32]
    outer = up[10:46, 7:37]
    phi_b = inner.mean()
    phi_c = (outer.sum() - inner.sum()) / (outer.numel() - inner.numel())
    assert loss == pytest.approx(float(phi_c - phi_b), abs=1e-6)


def test_analytic_engine_equals_autograd_reference():
    s = soft_map(64, 64, [("rect", 12, 14, 50, 44)])
    boxes = torch.tensor([[15.0, 18.0, 25.0, 28.0], [38.0, 30.0, 48.0, 42.0]])
    ii, cc = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    cfg = CCGRConfig(iterations=60)
    fast = refine(s, boxes, ii, cc, cfg=cfg)
    slow = refine_reference(s, boxes, ii, cc, cfg=cfg)
    torch.testing.assert_close(fast.boxes, slow.boxes, atol=1e-4, rtol=0)
    assert fast.stop_reason == slow.stop_reason


@pytest.mark.parametrize("init", [(25, 35, 40, 48),   # ~10 % of the object, top left
                                  (50, 55, 68, 68),   # ~12 %, bottom right corner
                                  (22, 32, 45, 60)])  # ~32 %, left half
def test_rectangle_recovered_from_partial_box(init):
    obj = (20, 30, 70, 70)
    r = one(soft_map(96, 96, [("rect", *obj)]), init)
    assert iou(r.boxes[0], obj) >= 0.9
    assert r.stop_reason[0] in ("converged", "max_iterations")
    assert r.loss[0] < -0.9


def test_round_object_reaches_brute_force_optimum():
    cx, cy, rad = 24.0, 26.0, 12.0
    s = soft_map(48, 48, [("disk", cx, cy, rad)])
    r = one(s, (20, 22, 28, 31))
    # brute force over a 0.5 px grid of boxes around the disk
    g = torch.arange(-4.0, 4.01, 0.5)
    lo_x, lo_y = cx - rad + g, cy - rad + g
    hi_x, hi_y = cx + rad + g, cy + rad + g
    grid = torch.stack(torch.meshgrid(lo_x, lo_y, hi_x, hi_y, indexing="ij"), -1).reshape(-1, 4)
    zeros = torch.zeros(len(grid), dtype=torch.long)
    best = float(eq3_loss(s, grid, zeros, zeros).min())
    assert float(r.loss[0]) <= best * 0.98  # losses are negative: within 2 % of the best
    bbox = (cx - rad, cy - rad, cx + rad, cy + rad)
    assert float(eq3_loss(s, torch.tensor([bbox]), zeros[:1], zeros[:1])) > best + 1e-3


def test_tight_box_stays():
    obj = (20, 30, 70, 70)
    r = one(soft_map(96, 96, [("rect", *obj)]), obj)
    assert iou(r.boxes[0], obj) >= 0.95


def test_two_objects_one_peak_each_neither_swallows_the_other():
    a, b = (10, 20, 40, 50), (46, 22, 76, 52)  # 6 px apart, same class
    s = soft_map(64, 88, [("rect", *a), ("rect", *b)])
    peaks_xy = torch.tensor([[25.5, 35.5], [61.5, 37.5]])
    boxes = torch.tensor([[20.0, 28.0, 32.0, 42.0], [55.0, 30.0, 68.0, 44.0]])
    zeros = torch.zeros(2, dtype=torch.long)
    peaks = (zeros, zeros, peaks_xy)
    r = refine(s, boxes, zeros, zeros, peak_xy=peaks_xy, peaks=peaks)
    for k, (obj, other) in enumerate([(a, 1), (b, 0)]):
        x1, y1, x2, y2 = r.boxes[k].tolist()
        px, py = peaks_xy[other].tolist()
        assert not (x1 <= px <= x2 and y1 <= py <= y2)
        assert iou(r.boxes[k], obj) >= 0.8


def test_peak_rule_stops_at_last_valid_box():
    # the paper's literal rule (peak_region 0): one object with two peaks of its class,
    # growth stops before the box takes the 2nd peak
    s = soft_map(64, 96, [("rect", 8, 16, 88, 48)])
    peaks_xy = torch.tensor([[20.5, 32.5], [60.5, 32.5]])
    zeros = torch.zeros(2, dtype=torch.long)
    literal = CCGRConfig()
    r = refine(s, torch.tensor([[14.0, 24.0, 28.0, 40.0]]), zeros[:1], zeros[:1],
               peak_xy=peaks_xy[:1], peaks=(zeros, zeros, peaks_xy), record_every=1,
               cfg=literal)
    assert r.stop_reason == ["second_peak"]
    assert float(r.boxes[0, 2]) < 60.5
    assert float(r.boxes[0, 2]) > 50.0  # it did grow towards the peak first
    # without peaks it would have swallowed the second one
    free = refine(s, torch.tensor([[14.0, 24.0, 28.0, 40.0]]), zeros[:1], zeros[:1])
    assert float(free.boxes[0, 2]) > 80.0
    # a box that already holds another peak is not refined
    r2 = refine(s, torch.tensor([[14.0, 24.0, 70.0, 40.0]]), zeros[:1], zeros[:1],
                peak_xy=peaks_xy[:1], peaks=(zeros, zeros, peaks_xy), cfg=literal)
    assert r2.stop_reason == ["second_peak"] and int(r2.iterations[0]) == 0
    torch.testing.assert_close(r2.boxes[0], torch.tensor([14.0, 24.0, 70.0, 40.0]))


def test_peak_rule_ignores_duplicate_and_background_peaks():
    """peak_region > 0: a peak joined to the box's own peak by the class region is a
    duplicate of the same instance, a peak where S is low is no instance; only a peak on
    another region of the class stops the box."""
    s = soft_map(64, 160, [("rect", 8, 16, 88, 48), ("rect", 110, 16, 150, 48)])
    zeros = torch.zeros(1, dtype=torch.long)
    start, own = torch.tensor([[14.0, 24.0, 28.0, 40.0]]), torch.tensor([[20.5, 32.5]])

    def run(*others):
        xy = torch.cat([own, torch.tensor(others)])
        z = torch.zeros(len(xy), dtype=torch.long)
        return refine(s, start, zeros, zeros, peak_xy=own, peaks=(z, z, xy),
                      cfg=CCGRConfig(peak_region=0.5))

    duplicate = run([60.5, 32.5])                 # same object
    assert duplicate.stop_reason == ["converged"]
    assert iou(duplicate.boxes[0], (8, 16, 88, 48)) >= 0.9
    background = run([60.5, 58.5])                # below the object, S ~ 0 there
    assert iou(background.boxes[0], (8, 16, 88, 48)) >= 0.9
    other = run([60.5, 32.5], [98.5, 32.5], [130.5, 32.5])  # + one in the gap, one on obj 2
    assert iou(other.boxes[0], (8, 16, 88, 48)) >= 0.9      # the gap peak is background
    # the same peaks under the literal rule stop the box at the duplicate
    z = torch.zeros(4, dtype=torch.long)
    xy = torch.tensor([[20.5, 32.5], [60.5, 32.5], [98.5, 32.5], [130.5, 32.5]])
    literal = refine(s, start, zeros, zeros, peak_xy=own, peaks=(z, z, xy))
    assert literal.stop_reason == ["second_peak"] and float(literal.boxes[0, 2]) < 60.5


def test_scale_invariance_small_and_large_objects():
    small = one(soft_map(40, 40, [("rect", 10, 12, 30, 32)]), (12, 14, 19, 21), record_every=1)
    large = one(soft_map(340, 340, [("rect", 20, 20, 320, 320)]), (50, 50, 155, 155),
                record_every=1)
    first = []
    for r, obj in [(small, (10, 12, 30, 32)), (large, (20, 20, 320, 320))]:
        ious = [iou(b, obj) for b in r.trajectory[:, 0]]
        assert ious[-1] >= 0.9
        assert r.stop_reason[0] == "converged"
        first.append(next(k for k, v in enumerate(ious) if v >= 0.9))
        assert int(r.iterations[0]) < CCGRConfig().iterations
    # same relative trajectory: IoU 0.9 reached at about the same iteration (20 vs 300 px)
    assert abs(first[0] - first[1]) <= 10, first


def test_flat_maps():
    zero = torch.zeros(1, 2, 32, 32)
    zero[:, 0] = 1.0  # all background: the class map is all zero
    r = one(zero, (8, 8, 16, 16))
    assert r.stop_reason == ["flat"] and int(r.iterations[0]) == 0
    torch.testing.assert_close(r.boxes[0], torch.tensor([8.0, 8.0, 16.0, 16.0]))
    assert float(r.loss[0]) == 0.0
    low = torch.full((1, 2, 32, 32), 0.3)  # uniform low score: no evidence, box stays
    assert one(low, (8, 8, 16, 16)).stop_reason == ["flat"]
    # flat but inside one object (box and context on its plateau): plateau expansion
    obj = (8, 8, 88, 88)
    r = one(soft_map(96, 96, [("rect", *obj)]), (40, 44, 52, 56))
    assert iou(r.boxes[0], obj) >= 0.9
    assert not torch.isnan(r.loss).any()


def test_batched_equals_each_box_alone():
    maps = [soft_map(64, 80, [("rect", 10, 12, 40, 44), ("rect", 50, 10, 72, 30)])[0],
            soft_map(48, 48, [("disk", 24, 24, 14)])[0]]
    maps[1] = torch.cat([maps[1], maps[1][1:]])[[0, 2, 1]]  # class 1 on image 1
    maps[0] = torch.cat([maps[0], torch.zeros_like(maps[0][1:])])
    boxes = torch.tensor([[14.0, 16.0, 24.0, 26.0], [55.0, 14.0, 64.0, 22.0],
                          [20.0, 20.0, 28.0, 28.0], [3.0, 3.0, 9.0, 9.0]])
    ii, cc = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])
    batched = refine(maps, boxes, ii, cc, record_every=40)
    for k in range(4):
        alone = refine([maps[ii[k]]], boxes[k:k + 1], torch.tensor([0]), cc[k:k + 1],
                       record_every=40)
        torch.testing.assert_close(batched.boxes[k], alone.boxes[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.trajectory[:, k], alone.trajectory[:, 0],
                                   atol=1e-5, rtol=0)
        assert batched.stop_reason[k] == alone.stop_reason[0]
        assert int(batched.iterations[k]) == int(alone.iterations[0])
    assert batched.trajectory_iterations == [0, 40, 80, 120, 160, 200]


def test_summed_area_tables_built_in_blocks_match_a_direct_cumulative_sum(monkeypatch):
    import wsis_ray.ccgr as ccgr
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 9, 7, generator=g)  # 3 images, 3 classes + background
    ii, cc = torch.tensor([2, 0, 2, 1, 0]), torch.tensor([1, 2, 1, 0, 0])
    for block_bytes in (1, 10 * 8 * 8 * 2, 2 ** 30):  # one plane, two planes, all at once
        monkeypatch.setattr(ccgr, "_SAT_BLOCK_BYTES", block_bytes)
        sat, row = ccgr._summed_area_tables(maps, ii, cc)
        assert sat.shape == (4, 10, 8)  # the distinct (image, class) pairs
        for k in range(5):
            want = maps[ii[k], cc[k] + 1].double().cumsum(0).cumsum(1)
            assert torch.equal(sat[row[k], 1:, 1:], want)
            assert not sat[row[k], 0].any() and not sat[row[k], :, 0].any()


def test_chunked_summed_area_tables_give_the_same_result(monkeypatch):
    import wsis_ray.ccgr as ccgr
    maps = torch.cat([soft_map(48, 48, [("rect", 8, 8, 30, 34)]),
                      soft_map(48, 48, [("disk", 24, 24, 12)])])
    boxes = torch.tensor([[10.0, 10.0, 18.0, 20.0], [20.0, 20.0, 28.0, 28.0],
                          [12.0, 14.0, 20.0, 22.0]])
    ii, cc = torch.tensor([0, 1, 0]), torch.zeros(3, dtype=torch.long)
    whole = refine(maps, boxes, ii, cc, record_every=50)
    monkeypatch.setattr(ccgr, "_SAT_CHUNK_BYTES", 49 * 49 * 8)  # one (image, class) each
    assert len(ccgr._sat_chunks(ii, cc, maps.shape)) == 2
    parts = refine(maps, boxes, ii, cc, record_every=50)
    torch.testing.assert_close(parts.boxes, whole.boxes)
    torch.testing.assert_close(parts.trajectory, whole.trajectory)
    assert parts.stop_reason == whole.stop_reason


def test_padded_batch_treats_padding_as_outside():
    s = soft_map(40, 40, [("rect", 10, 10, 40, 40)])  # object touches the image border
    padded = torch.zeros(1, 2, 64, 64)
    padded[:, :, :40, :40] = s
    padded[:, 1, :, 40:] = 1.0  # garbage in the padding must not matter
    a = refine(padded, torch.tensor([[20.0, 20.0, 30.0, 30.0]]), torch.tensor([0]),
               torch.tensor([0]), image_sizes=torch.tensor([[40, 40]]))
    b = one(s, (20, 20, 30, 30))
    torch.testing.assert_close(a.boxes, b.boxes)
    assert float(a.boxes[0, 2]) <= 40.0 and float(a.boxes[0, 3]) <= 40.0


def test_degenerate_inputs():
    s = soft_map(32, 32, [("rect", 8, 8, 24, 24)])
    boxes = torch.tensor([[40.0, 40.0, 50.0, 50.0],   # fully outside
                          [15.0, 15.0, 16.0, 16.0],   # 1 px
                          [20.0, 20.0, 12.0, 12.0],   # inverted
                          [-5.0, 10.0, 12.0, 40.0]])  # partly outside
    z = torch.zeros(4, dtype=torch.long)
    r = refine(s, boxes, z, z)
    assert r.stop_reason[0] == "degenerate" and int(r.iterations[0]) == 0
    assert not torch.isnan(r.boxes).any() and not torch.isnan(r.loss).any()
    b = r.boxes
    assert ((b[:, 2] - b[:, 0]) >= 2.0 - 1e-6).all() and ((b[:, 3] - b[:, 1]) >= 2.0 - 1e-6).all()
    assert (b >= 0).all() and (b <= 32).all()
    assert iou(b[1], (8, 8, 24, 24)) >= 0.9 and iou(b[3], (8, 8, 24, 24)) >= 0.9
    none = refine(s, boxes[1:2], z[:1], z[:1], cfg=CCGRConfig(iterations=0))
    assert none.stop_reason == ["max_iterations"] and int(none.iterations[0]) == 0
    empty = refine(s, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.long), record_every=50)
    assert empty.boxes.shape == (0, 4) and empty.stop_reason == []
    bad = s.repeat(3, 1, 1, 1)
    bad[2, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="image 2"):
        refine(bad, torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([0]), torch.tensor([0]))
    bad[2, 1, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="image 2"):
        refine(list(bad), torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([0]),
               torch.tensor([0]))
    with pytest.raises(ValueError, match="box 0"):
        refine(s, torch.tensor([[1.0, float("nan"), 5.0, 5.0]]), torch.tensor([0]),
               torch.tensor([0]))


def test_constraints_hold_at_every_recorded_step():
    torch.manual_seed(3)
    s = torch.softmax(torch.randn(2, 4, 8, 8) * 4, 1)
    s = torch.nn.functional.interpolate(s, size=(48, 48), mode="bilinear")
    boxes = torch.rand(12, 4) * 48
    ii, cc = torch.arange(12) % 2, torch.arange(12) % 3
    r = refine(s, boxes, ii, cc, cfg=CCGRConfig(min_size=3.0), record_every=1)
    t = r.trajectory
    assert torch.isfinite(t).all()
    assert ((t[..., 2] - t[..., 0]) >= 3.0 - 1e-4).all()
    assert ((t[..., 3] - t[..., 1]) >= 3.0 - 1e-4).all()
    assert (t >= -1e-6).all() and (t <= 48 + 1e-4).all()


def test_pseudo_masks_argmax_threshold_and_overlap():
    s = torch.zeros(1, 3, 20, 20)
    s[0, 0] = 1.0
    s[0, :, 2:10, 2:18] = torch.tensor([0.1, 0.8, 0.1])[:, None, None]   # class 0 wins
    s[0, :, 10:14, 2:18] = torch.tensor([0.35, 0.2, 0.45])[:, None, None]  # class 1 wins
    s[0, :, 14:18, 2:18] = torch.tensor([0.15, 0.42, 0.43])[:, None, None]  # class 0 close 2nd
    boxes = torch.tensor([[0.0, 0.0, 12.0, 20.0], [8.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0]])
    masks = pseudo_masks(s, boxes, torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 1]),
                         threshold=0.4)
    a, b, c = masks
    assert a.shape == (20, 20) and a.dtype == bool
    assert not (a & b).any()  # same class: each pixel in at most one instance
    assert a[5, 3] and not a[5, 15] and b[5, 15]  # given to the box it is most central in
    assert a[5, 9] and not b[5, 9] and b[5, 11] and not a[5, 11]
    assert a[15, 3] and not a[12, 3]  # 0.42 >= threshold joins; 0.2 (not argmax) does not
    assert not a[0, 0] and not b[19, 19]  # background
    assert c[12, 5] and c[15, 5] and not c[5, 5]  # other class: argmax or >= 0.4
    rle = masks_to_rle(masks)
    assert (decode_mask(rle[0], 20, 20) == a).all()


def test_elongated_object_partial_plateau():
    # the box spans the bar tightly in y; its x-context lies inside the bar (dL/dx = 0)
    obj = (10, 40, 90, 55)
    r = one(soft_map(96, 100, [("rect", *obj)]), (40, 42, 55, 53))
    assert iou(r.boxes[0], obj) >= 0.9
