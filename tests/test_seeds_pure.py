"""Round-0 seed pieces on small constructed inputs (no Ray)."""
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch

from wsis_ray import affinity, bags, peaks, proposals
from wsis_ray.config import BackboneConfig


# -- peaks --------------------------------------------------------------------------------

def _two_bumps(h=20, w=20, centres=((5, 4), (14, 15)), amp=(1.0, 0.6)):
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros((h, w), np.float32)
    for (y, x), a in zip(centres, amp):
        m += a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.0)
    return m


def test_find_peaks_known_layout_in_image_coordinates():
    r = np.zeros((3, 20, 20), np.float32)
    r[1] = _two_bumps()
    r[2] = _two_bumps(centres=((10, 10),), amp=(1.0,))
    found = peaks.find_peaks(r, [1], window=3, image_hw=(40, 80))
    # only the present class; both bumps; cell i sits at image pixel i*stride (centre +0.5)
    assert [p[0] for p in found] == [1, 1]
    assert found[0][1:3] == pytest.approx((4 * 4 + 0.5, 5 * 2 + 0.5))
    assert found[1][1:3] == pytest.approx((15 * 4 + 0.5, 14 * 2 + 0.5))
    assert found[0][3] > found[1][3]
    # a relative threshold keeps only the strong bump; a constant map has no peak
    assert len(peaks.find_peaks(r, [1], min_relative=0.8)) == 1
    assert peaks.find_peaks(np.ones((2, 8, 8)), [0, 1]) == []


def test_find_peaks_subpixel_upsampling_keeps_location():
    r = _two_bumps(centres=((5, 4),), amp=(1.0,))[None]
    (c, x, y, s), = peaks.find_peaks(r, [0], upsample=4, image_hw=(20, 20))
    assert abs(x - 4.5) <= 0.5 and abs(y - 5.5) <= 0.5


def test_resize_maps_keeps_cells_on_their_first_pixel():
    m = np.zeros((1, 5, 5), np.float32)
    m[0, 2, 3] = 1.0
    up = peaks.resize_maps(m, (80, 80))[0]       # stride 16: cell (2, 3) -> pixel (32, 48)
    assert tuple(int(v) for v in np.unravel_index(int(up.argmax()), up.shape)) == (32, 48)
    assert float(up[32, 48]) == pytest.approx(1.0) and float(up[40, 48]) == pytest.approx(0.5)
    batched = peaks.resize_maps(torch.from_numpy(m)[None].repeat(2, 1, 1, 1), (80, 80))
    assert batched.shape == (2, 1, 80, 80) and torch.equal(batched[1, 0], up)


def test_peak_stimulation_averages_peaks_and_routes_gradient_there():
    r = torch.tensor(_two_bumps()[None, None], requires_grad=True)
    score = peaks.peak_stimulation(r, 3)
    assert float(score) == pytest.approx((1.0 + 0.6) / 2, abs=0.02)
    score.sum().backward()
    assert int((r.grad != 0).sum()) == 2


def test_peak_recall_counts_instances_with_a_peak_of_their_class():
    m1 = np.zeros((10, 10), bool); m1[0:5, 0:5] = True
    m2 = np.zeros((10, 10), bool); m2[5:, 5:] = True
    pk = [(0, 2.5, 2.5, 1.0), (0, 7.5, 7.5, 1.0), (1, 1.0, 1.0, 1.0)]
    out = peaks.peak_recall([pk], [np.stack([m1, m2])], [np.array([0, 1])])
    assert out["peak_recall"] == 0.5 and out["peaks_per_instance"] == 1.5


def test_camnet_shapes_and_cams_roundtrip(tmp_path):
    from wsis_ray.data.records import write_table_atomic
    net = peaks.CAMNet(BackboneConfig(name="resnet18"), 3)
    logits, r = net(torch.rand(2, 3, 64, 64) * 255)
    assert logits.shape == (2, 3) and r.shape == (2, 3, 4, 4)
    resp = [np.random.rand(3, 4, 4).astype(np.float32)]
    write_table_atomic(peaks.cams_table([7], [[2]], resp), str(tmp_path / "c.parquet"))
    back = peaks.read_cams(str(tmp_path / "c.parquet"), normalize=True)[7]
    assert back[:2].max() == 0 and back[2].max() == pytest.approx(1.0)


class _RedAtStride16(torch.nn.Module):
    """A stand-in CAM network: the response of its one class is the mean red value of each
    16 x 16 cell."""

    def response(self, x):
        return torch.nn.functional.avg_pool2d(x[:, :1] / 255, 16)


def test_predict_response_averages_scales_on_the_largest_grid():
    image = np.zeros((64, 64, 3), np.uint8)
    image[32:48, 16:32, 0] = 255  # a red square, off-centre so flips matter
    model = _RedAtStride16()
    single = peaks.predict_response(model, [image], 64)
    assert single.shape == (1, 1, 4, 4)
    both = peaks.predict_response(model, [image], 64, scales=[1.0, 2.0])
    assert both.shape == (1, 1, 8, 8)  # the grid of the 128 px input
    big = peaks.predict_response(model, [image], 128)
    want = (peaks.resize_maps(torch.from_numpy(single), (8, 8)).numpy() + big) / 2
    np.testing.assert_allclose(both, want, atol=1e-6)
    # the averaged map still peaks on the square (cell i of the 8 x 8 grid: pixel 8 i)
    y, x = np.unravel_index(both[0, 0].argmax(), (8, 8))
    assert 32 <= 8 * y < 48 and 16 <= 8 * x < 32
    half = peaks.predict_response(model, [image], 64, scales=[0.5])
    assert half.shape == (1, 1, 2, 2)  # 32 px input
    assert peaks.predict_response(model, [image], 88).shape == (1, 1, 5, 5)  # scale 1: 88 px
    with pytest.raises(ValueError, match="cam.scales"):
        peaks.predict_response(model, [image], 64, scales=[])


def test_pure_modules_do_not_import_ray():
    code = ("import sys, wsis_ray.peaks, wsis_ray.proposals, wsis_ray.bags, "
            "wsis_ray.affinity; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- proposals ----------------------------------------------------------------------------

def _scene(seed=0):
    rng = np.random.default_rng(seed)
    img = (90 + rng.integers(0, 30, (96, 96, 3))).astype(np.uint8)
    img[10:50, 20:60] = (210, 40, 40)
    img[60:90, 5:35] = (40, 200, 40)
    return img


def test_selective_search_is_deterministic_scored_and_finds_objects():
    img = _scene()
    b1, s1 = proposals.selective_search(img, max_proposals=50)
    b2, s2 = proposals.selective_search(img, max_proposals=50)
    assert np.array_equal(b1, b2) and np.array_equal(s1, s2)
    assert len(b1) <= 50 and b1.dtype == np.float32
    assert (s1 >= 0).all() and (s1 <= 1).all() and (np.diff(s1) <= 0).all()
    rec = proposals.proposal_recall([b1], [np.array([[20, 10, 60, 50], [5, 60, 35, 90]])])
    assert rec["recall@0.7"] == 1.0


def test_opencv_without_contrib_gets_a_clear_error(monkeypatch):
    """A plain opencv-python (no ximgproc) names the fix instead of an AttributeError."""
    import cv2

    monkeypatch.delattr(cv2, "ximgproc")
    with pytest.raises(proposals.ProposalError, match="opencv-contrib-python-headless"):
        proposals.selective_search(_scene(), max_proposals=5)


def test_straddling_objectness_prefers_boxes_along_region_borders():
    seg = np.zeros((20, 20), np.int32)
    seg[5:15, 5:15] = 1
    s = proposals.straddling_objectness(np.array([[5, 5, 15, 15], [0, 0, 10, 10]]), seg)
    assert s[0] == pytest.approx(1.0)
    # second box: 75 px of region 0 inside (25 outside -> min 25... of 300), 25 of region 1
    assert s[1] == pytest.approx(1 - (75 + 25) / 100)


def test_load_mcg_converts_boxes_and_scales_scores(tmp_path):
    p = tmp_path / "2007_000032.mat"
    scipy.io.savemat(p, {"boxes": np.array([[11, 21, 30, 60], [1, 1, 100, 200]], np.float64),
                         "scores": np.array([[-1.0], [3.0]])})
    boxes, scores = proposals.load_mcg(p)
    assert boxes.tolist() == [[0, 0, 200, 100], [20, 10, 60, 30]]
    assert scores.tolist() == [1.0, 0.0]
    scipy.io.savemat(tmp_path / "bad.mat", {"boxes": np.zeros((1, 4))})
    with pytest.raises(proposals.ProposalError, match="scores"):
        proposals.load_mcg(tmp_path / "bad.mat")
    with pytest.raises(proposals.ProposalError, match="mcg_dir"):
        proposals.load_mcg(tmp_path / "none.mat")


# -- bags (Eq. 4) -------------------------------------------------------------------------

def test_eq4_ranking_and_only_this_peak():
    # 20x20 image; class-0 foreground at [2,12)x[2,12); peaks of class 0 at (5,5) and (16,16),
    # a class-1 peak at (9,9)
    label = np.zeros((20, 20), np.uint8)
    label[2:12, 2:12] = 1
    boxes = np.array([
        [2, 2, 12, 12],    # 0: exact fg, B_S .5            -> R = .5
        [0, 0, 20, 20],    # 1: contains both class-0 peaks -> excluded
        [0, 0, 14, 14],    # 2: B_S .55, bg (196-100)/196   -> R = .55 - .1*.49 = .501
        [3, 3, 8, 8],      # 3: inside fg, B_S .45          -> R = .45
        [14, 14, 19, 19],  # 4: the other peak only
    ], np.float32)
    obj = np.array([0.5, 0.9, 0.55, 0.45, 0.7], np.float32)
    pk = [(0, 5.0, 5.0, 1.0), (0, 16.0, 16.0, 0.5), (1, 9.0, 9.0, 0.8)]
    r = bags.eq4_rank_scores(boxes, obj, bags.foreground_map(label, 0), 0.1)
    assert r[2] == pytest.approx(0.55 - 0.1 * 96 / 196)
    out, stats = bags.peak_bags(boxes, obj, pk, label, size=2, weight=0.1)
    assert out[0].class_id == 0 and out[0].proposal_indices.tolist() == [2, 0]
    assert out[1].proposal_indices.tolist() == [4]
    assert stats == {"fallback": 0, "dropped": 0}
    # literal reading: the class-1 peak at (9,9) now excludes boxes 0 and 2
    out, _ = bags.peak_bags(boxes, obj, pk, label, size=2, exclusive="any_class")
    assert out[0].proposal_indices.tolist() == [3]
    # a score map (C+1, H, W) is used directly
    scores = np.zeros((3, 20, 20), np.float32)
    scores[1] = 1.0
    out, _ = bags.peak_bags(boxes, obj, pk[:1], scores, size=1)
    assert out[0].proposal_indices.tolist() == [1]  # no bg penalty: highest B_S wins


def test_bag_fallback_and_drop():
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    pk = [(0, 2.0, 2.0, 1.0), (0, 7.0, 7.0, 1.0), (0, 50.0, 50.0, 1.0)]
    out, stats = bags.peak_bags(boxes, np.ones(1), pk, np.zeros((60, 60), np.uint8))
    assert [b.fallback for b in out] == [True, True]
    assert [b.peak for b in out] == [(2.0, 2.0), (7.0, 7.0)]
    assert stats == {"fallback": 2, "dropped": 1}


def test_box_bags_and_bag_recall():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 9, 10], [20, 20, 30, 30], [0, 0, 30, 30]],
                     np.float32)
    out = bags.box_bags(boxes, np.array([[0, 0, 10, 10]]), np.array([3]), size=2)
    assert out[0].class_id == 3 and out[0].proposal_indices.tolist() == [0, 1]
    gts = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    assert bags.bag_recall([out], [boxes], [gts], [np.array([3, 3])]) == 0.5
    assert bags.bag_recall([out], [boxes], [gts], [np.array([2, 3])]) == 0.0


# -- affinity -----------------------------------------------------------------------------

def test_random_walk_known_result_two_cliques():
    # nodes 0-2 and 3-5 (a 2x3 grid) form two cliques; T^t converges to each clique's mean
    a = torch.zeros(6, 6)
    a[:3, :3] = 1
    a[3:, 3:] = 1
    scores = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.3]])[None]
    for mat in (a, a.to_sparse()):
        out = affinity.random_walk(scores, mat, beta=8.0, iterations=1)
        assert out.flatten()[:3] == pytest.approx([0.5] * 3)
        assert out.flatten()[3:] == pytest.approx([0.1] * 3)
    # one step on a chain: hand-computed weighted means
    chain = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])
    out = affinity.random_walk(torch.tensor([[[3.0, 0.0, 0.0]]]), chain, beta=1.0, iterations=1)
    assert out.flatten().tolist() == pytest.approx([2.0, 0.75, 0.0])


def test_affinity_matrix_symmetric_within_radius():
    feats = torch.rand(1, 4, 5, 6)
    affs = affinity.pair_affinities(feats, radius=3)
    m = affinity.affinity_matrix([a[0] for a in affs], 5, 6, 3).to_dense()
    assert torch.allclose(m, m.T) and torch.all(torch.diag(m) == 1)
    # pixel (0,0) and (1,1): distance sqrt 2 < 3 -> linked; (0,0) and (0,3): not
    f = feats[0].reshape(4, -1)
    assert m[0, 7] == pytest.approx(float(torch.exp(-(f[:, 0] - f[:, 7]).abs().mean())))
    assert m[0, 3] == 0


def test_affinity_labels_and_loss_pairs():
    cam = np.zeros((2, 4, 4), np.float32)
    cam[1, :2, :2] = 1.0        # confident class-1 fg
    cam[1, 2:, 2:] = 0.1        # uncertain -> ignore
    lab = affinity.affinity_labels(cam, [1], 0.3, 0.05)
    assert lab[0, 0] == 2 and lab[3, 3] == 255 and lab[0, 3] == 0
    labels = torch.from_numpy(lab).long()[None]
    perfect = [torch.where((ls == lt), 1.0, 0.0) for ls, lt in _pairs(labels, 2)]
    loss, parts = affinity.affinity_loss(perfect, labels, 2)
    assert float(loss) < 1e-3
    wrong = [1 - a for a in perfect]
    assert float(affinity.affinity_loss(wrong, labels, 2)[0]) > 5


def _pairs(labels, radius):
    h, w = labels.shape[-2:]
    for dy, dx in affinity.pair_offsets(radius):
        (ys, xs), (yt, xt) = affinity._crops(h, w, dy, dx)
        yield labels[..., ys, xs].float(), labels[..., yt, xt].float()


def test_labels_from_scores_and_miou():
    scores = np.zeros((4, 2, 3), np.float32)
    scores[0] = 0.5
    scores[2, :, 0] = 0.9    # class 1 present
    scores[3, :, 1] = 0.9    # class 2 absent: must not win
    lab = affinity.label_from_scores(scores, [1])
    assert lab.tolist() == [[2, 0, 0], [2, 0, 0]]
    assert affinity.label_from_scores(scores, [1], ignore_margin=0.5)[0, 0] == 255
    gt = np.array([[2, 0, 0], [2, 2, 255]], np.uint8)
    conf = affinity.confusion(lab, gt, 4)
    # bg: tp 2, union 3; class 1 (label 2): tp 2, union 3
    assert affinity.mean_iou(conf) == pytest.approx(2 / 3)
    base = affinity.cam_threshold_labels(scores[1:], [1], 0.5)
    assert base.tolist() == [[2, 0, 0], [2, 0, 0]]


def test_affinitynet_forward_stride8():
    net = affinity.AffinityNet(BackboneConfig(name="resnet18"))
    assert net(torch.rand(1, 3, 64, 48) * 255).shape == (1, 448, 8, 6)
