"""The dense CRF on SS score maps (wsis_ray/crf.py): pure torch, no Ray."""
import numpy as np
import pytest
import torch

from wsis_ray import crf
from wsis_ray.config import ConfigError, CRFConfig, load_config


def _square_scene(h=48, w=56, box=(14, 12, 34, 40), spill=5):
    """An image with one red square on grey, and a 2-class score map that believes in a
    square `spill` px larger on every side, with soft edges (what the SS branch gives)."""
    y0, x0, y1, x1 = box
    img = np.full((h, w, 3), 120, np.uint8)
    img[y0:y1, x0:x1] = (200, 40, 40)
    truth = np.zeros((h, w), bool)
    truth[y0:y1, x0:x1] = True
    fg = np.full((h, w), 0.15, np.float32)
    fg[y0 - spill:y1 + spill, x0 - spill:x1 + spill] = 0.7
    fg[y0 + 3:y1 - 3, x0 + 3:x1 - 3] = 0.9
    return img, np.stack([1 - fg, fg]), truth


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_crf_pulls_a_spilling_map_onto_the_object_edge():
    img, scores, truth = _square_scene()
    before = scores.argmax(0) == 1
    q = crf.refine(img, scores, CRFConfig(iterations=10, radius=8, stride=1, sxy=8.0))
    after = q.argmax(0).numpy() == 1
    assert _iou(before, truth) < 0.65
    assert _iou(after, truth) > 0.95
    assert torch.allclose(q.sum(0), torch.ones(q.shape[1:]), atol=1e-5)
    # without colour (a flat image) the same CRF has no edge to snap to
    flat = crf.refine(np.full_like(img, 120), scores, CRFConfig(iterations=10, radius=8,
                                                                stride=1, sxy=8.0))
    assert _iou(flat.argmax(0).numpy() == 1, truth) < 0.8


def test_message_equals_the_pairwise_sum_it_stands_for():
    """Every pixel j within the (dilated) window of i sends k(i, j) Q_j: checked against
    an explicit double loop over pixel pairs, borders included."""
    rng = np.random.default_rng(0)
    h, w = 9, 11
    img = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
    q = torch.softmax(torch.from_numpy(rng.normal(size=(3, h, w)).astype(np.float32)), 0)
    p = CRFConfig(iterations=1, radius=5, stride=2, sxy=3.0, srgb=40.0, w_appearance=2.0,
                  sxy_smooth=1.5, w_smooth=0.5)
    offsets, kernel = crf._kernel(torch.from_numpy(img).permute(2, 0, 1), p)
    got = crf._message(q, offsets, kernel, p.radius)
    want = torch.zeros_like(q)
    for y in range(h):
        for x in range(w):
            for v in range(h):
                for u in range(w):
                    dy, dx = v - y, u - x
                    if (dy, dx) == (0, 0) or dy % 2 or dx % 2 or max(abs(dy), abs(dx)) > 4:
                        continue
                    d2 = dy * dy + dx * dx
                    c2 = float(((img[y, x] - img[v, u]) ** 2).sum())
                    k = 2.0 * np.exp(-d2 / 18 - c2 / 3200) + 0.5 * np.exp(-d2 / 4.5)
                    want[:, y, x] += k * q[:, v, u]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_zero_iterations_is_the_paper_and_shapes_are_checked():
    img, scores, _ = _square_scene()
    out = crf.refine(img, scores, CRFConfig(iterations=0))
    assert torch.equal(out, torch.from_numpy(scores))
    with pytest.raises(ValueError, match="must share H, W"):
        crf.refine(img[:-1], scores, CRFConfig(iterations=2))
    maps = [scores]
    assert crf.refine_maps([img], maps, CRFConfig(iterations=0)) is maps
    refined = crf.refine_maps([img], maps, CRFConfig(iterations=2, radius=4))
    assert np.array_equal(refined[0], crf.refine(img, scores, CRFConfig(iterations=2,
                                                                         radius=4)).numpy())


@pytest.mark.parametrize("override", ["crf.stride=20", "crf.iterations=-1", "crf.srgb=0"])
def test_bad_crf_settings_are_refused(override):
    with pytest.raises((ConfigError, ValueError)):
        load_config(None, [override])

