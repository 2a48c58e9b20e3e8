"""Evaluation: hand-computed AP cases, void and crowd handling, polygon vs RLE ground
truth, the demo val set against itself, and agreement with pycocotools' COCOeval."""
import json

import cv2
import numpy as np
import pytest

from wsis_ray import evaluate as ev
from wsis_ray.data import demo
from wsis_ray.data.groundtruth import InstanceGT, load_coco_gt
from wsis_ray.data.records import encode_mask

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
H = W = 32


def square(x, y, s, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y:y + s, x:x + s] = True
    return m


def res(image_id, mask, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "score": score,
            "segmentation": {"size": list(mask.shape), "counts": encode_mask(mask)}}


def gt_of(masks, classes, crowd=None, void=None, image_id=1):
    return {image_id: InstanceGT(image_id, np.stack(masks), np.array(classes),
                                 np.zeros(len(masks), bool) if crowd is None else np.array(crowd), void)}


A, B, FP = square(1, 1, 8), square(20, 20, 8), square(12, 1, 6)


def mask_aps(m, t):
    return m["voc"]["mask"][t]["ap"]


def test_perfect_predictions_score_one_everywhere():
    gt = gt_of([A, B, FP], [0, 0, 1])
    results = [res(1, A, 0.9), res(1, B, 0.8), res(1, FP, 0.7, 2)]
    m = ev.evaluate(gt, results, [1, 2], ["a", "b"])
    for t in ("0.25", "0.5", "0.7", "0.75"):
        assert m["voc"]["mask"][t]["ap"] == [1.0, 1.0] and m["voc"]["mask"][t]["mean"] == 1.0
        assert m["coco"]["segm"][t]["mean"] == pytest.approx(1.0)
        assert m["coco"]["bbox"][t]["mean"] == pytest.approx(1.0)
    assert m["voc"]["box"]["0.5"]["mean"] == 1.0
    assert m["summary"]["mAP_r@0.5"] == 1.0 and m["excluded_classes"] == []


def test_false_positive_ranked_first_and_between():
    gt = gt_of([A, B], [0, 0])
    # FP first: precision 0, 1/2, 2/3 at recall 0, .5, 1 -> envelope 2/3 everywhere
    m = ev.evaluate(gt, [res(1, FP, 0.9), res(1, A, 0.8), res(1, B, 0.7)], [1])
    assert mask_aps(m, "0.5")[0] == pytest.approx(2 / 3)
    assert m["coco"]["segm"]["0.5"]["ap"][0] == pytest.approx(2 / 3)
    # FP between: precision 1, 1/2, 2/3 at recall .5, .5, 1 -> VOC area .5*1 + .5*2/3;
    # COCO's 101 points: 51 points at recall <= .5 give 1, 50 points give 2/3
    m = ev.evaluate(gt, [res(1, A, 0.9), res(1, FP, 0.8), res(1, B, 0.7)], [1])
    assert mask_aps(m, "0.5")[0] == pytest.approx(5 / 6)
    assert m["coco"]["segm"]["0.5"]["ap"][0] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_class_agnostic_ap_separates_wrong_classes_from_wrong_masks():
    gt = gt_of([A, B], [0, 1])
    # right extents, swapped classes: 0 per class, 1 class-agnostic
    m = ev.evaluate(gt, [res(1, A, 0.9, 2), res(1, B, 0.8, 1)], [1, 2], coco=False)
    assert m["summary"]["mAP_r@0.5"] == 0.0
    assert m["summary"]["class_agnostic_AP_r@0.5"] == 1.0
    assert m["summary"]["class_agnostic_AP_b@0.5"] == 1.0
    # right classes, one mask off the object: low either way
    m = ev.evaluate(gt, [res(1, A, 0.9, 1), res(1, FP, 0.8, 2)], [1, 2], coco=False)
    assert m["summary"]["mAP_r@0.5"] == 0.5
    assert m["summary"]["class_agnostic_AP_r@0.5"] == 0.5
    assert "Class-agnostic (all classes as one): AP^r@0.5 50.0, AP^b@0.5 50.0." \
        in ev.format_table(m)
    # crowd ground truth stays neither hit nor miss; off when asked
    gt = gt_of([A, B], [0, 1], crowd=[False, True])
    m = ev.evaluate(gt, [res(1, B, 0.9, 1), res(1, A, 0.8, 2)], [1, 2], coco=False)
    assert m["summary"]["class_agnostic_AP_r@0.5"] == 1.0
    m = ev.evaluate(gt, [res(1, A, 0.9, 1)], [1, 2], coco=False, class_agnostic=False)
    assert "class_agnostic_AP_r@0.5" not in m["summary"] and "class_agnostic" not in m["voc"]


def test_duplicate_is_a_false_positive_and_a_miss_halves_recall():
    gt = gt_of([A, B], [0, 0])
    m = ev.evaluate(gt, [res(1, A, 0.9), res(1, A, 0.8), res(1, B, 0.7)], [1])
    assert mask_aps(m, "0.5")[0] == pytest.approx(5 / 6)
    m = ev.evaluate(gt, [res(1, A, 0.9)], [1])
    assert mask_aps(m, "0.5")[0] == pytest.approx(0.5)
    m = ev.evaluate(gt, [], [1])
    assert mask_aps(m, "0.5")[0] == 0.0 and m["coco"]["segm"]["0.5"]["ap"][0] == 0.0


def test_iou_thresholds():
    gt = gt_of([square(0, 0, 10)], [0])
    pred = np.zeros((H, W), bool); pred[0:10, 0:15] = True  # IoU 100/150 = 0.667
    m = ev.evaluate(gt, [res(1, pred, 0.5)], [1])
    assert [mask_aps(m, t)[0] for t in ("0.25", "0.5", "0.7", "0.75")] == [1.0, 1.0, 0.0, 0.0]
    assert m["voc"]["box"]["0.5"]["ap"][0] == 1.0
    assert m["coco"]["segm"]["0.5"]["ap"][0] == pytest.approx(1.0) and m["coco"]["segm"]["0.7"]["ap"][0] == 0.0


def test_class_without_ground_truth_is_left_out_of_the_mean():
    gt = gt_of([A, B], [0, 0])
    m = ev.evaluate(gt, [res(1, A, 0.9), res(1, FP, 0.8, 2)], [1, 2, 3], ["a", "b", "c"])
    assert mask_aps(m, "0.5") == [0.5, None, None]
    assert m["voc"]["mask"]["0.5"]["mean"] == 0.5 and m["coco"]["segm"]["0.5"]["mean"] == pytest.approx(51 / 101)
    assert m["excluded_classes"] == ["b", "c"]
    table = ev.format_table(m)
    assert "left out of the means: b, c" in table and "mean (1)" in table


def test_void_pixels_are_removed_from_predictions():
    g = square(10, 10, 6)
    void = square(9, 9, 8) & ~g  # one-pixel border band around the object, as in VOC
    pred = square(9, 9, 8)       # covers the band too: IoU 36/64 = .56 without void removal
    m = ev.evaluate(gt_of([g], [0], void=void), [res(1, pred, 0.9)], [1])
    assert [mask_aps(m, t)[0] for t in ("0.5", "0.7", "0.75")] == [1.0, 1.0, 1.0]
    assert m["coco"]["segm"]["0.75"]["ap"][0] == pytest.approx(1.0)
    m = ev.evaluate(gt_of([g], [0]), [res(1, pred, 0.9)], [1])
    assert [mask_aps(m, t)[0] for t in ("0.5", "0.7", "0.75")] == [1.0, 0.0, 0.0]
    assert ev.mask_iou(pred[None], g[None], void)[0, 0] == 1.0


def test_crowd_match_is_neither_hit_nor_miss():
    gt = gt_of([A, B], [0, 0], crowd=[False, True])
    m = ev.evaluate(gt, [res(1, B, 0.9), res(1, A, 0.8)], [1])
    assert mask_aps(m, "0.5")[0] == 1.0 and m["num_gt"] == 1


def test_bad_results_named():
    gt = gt_of([A], [0])
    with pytest.raises(ValueError, match="have no ground truth"):
        ev.evaluate(gt, [res(7, A, 0.9)], [1])
    with pytest.raises(ValueError, match="not dataset categories"):
        ev.evaluate(gt, [res(1, A, 0.9, 5)], [1])


def test_polygon_and_rle_ground_truth_agree(tmp_path):
    polys = [[[2, 2, 20, 3, 18, 15, 4, 12]], [[22, 20, 30, 20, 30, 30]]]
    from pycocotools import mask as mask_utils
    masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p, H, W))).astype(bool) for p in polys]
    cats = [{"id": 5, "name": "x"}]
    img = [{"id": 3, "file_name": "a.png", "height": H, "width": W}]
    for name, segs in (("poly", polys),
                       ("rle", [{"size": [H, W], "counts": encode_mask(m)} for m in masks]),
                       ("raw", [mask_utils.frPyObjects(  # uncompressed RLE
                           {"size": [H, W], "counts": _raw_counts(m)}, H, W) and
                           {"size": [H, W], "counts": _raw_counts(m)} for m in masks])):
        anns = [{"id": i + 1, "image_id": 3, "category_id": 5, "segmentation": s, "iscrowd": 0}
                for i, s in enumerate(segs)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"images": img, "annotations": anns, "categories": cats}))
    gts = {n: load_coco_gt(tmp_path / f"{n}.json", [5])[3] for n in ("poly", "rle", "raw")}
    for g in gts.values():
        assert np.array_equal(g.masks, np.stack(masks))
    results = [res(3, masks[0] | square(0, 0, 3), 0.8, 5), res(3, masks[1], 0.6, 5)]
    aps = [ev.evaluate({3: g}, results, [5])["voc"]["mask"] for g in gts.values()]
    assert aps[0] == aps[1] == aps[2]


def _raw_counts(m):
    flat = m.T.reshape(-1).astype(np.uint8)  # column-major, starting with zeros
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n); cur, n = v, 1
    runs.append(n)
    return [int(r) for r in runs]


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory):
    d = demo.generate(tmp_path_factory.mktemp("demo"), num_classes=4, num_train=2, num_val=30, seed=11)
    return load_coco_gt(d / "val.json", [1, 2, 3, 4]), d


def _results_from_gt(gt):
    out = []
    for iid, g in gt.items():
        for k, (m, c, b) in enumerate(zip(g.masks, g.class_ids, g.boxes)):
            out.append(res(iid, m, 1.0 - 0.01 * k, int(c) + 1))
            out[-1]["bbox"] = [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
    return out


def test_demo_val_against_itself(demo_val):
    gt, d = demo_val
    m = ev.evaluate(gt, _results_from_gt(gt), [1, 2, 3, 4])
    for key, v in m["summary"].items():
        assert v == pytest.approx(1.0), key


def _perturb(gt, seed=0):
    """Shift / erode / drop ground-truth masks, add false positives, random scores."""
    rng = np.random.default_rng(seed)
    results = []
    kernel = np.ones((3, 3), np.uint8)
    ids = list(gt)
    for iid, g in gt.items():
        for m, c in zip(g.masks, g.class_ids):
            if rng.random() < 0.2:
                continue  # a miss
            dx, dy = rng.integers(-4, 5, 2)
            p = np.roll(np.roll(m, dx, 1), dy, 0)
            if rng.random() < 0.5:
                p = cv2.erode(p.astype(np.uint8), kernel, iterations=int(rng.integers(1, 4))).astype(bool)
            if p.any():
                results.append(res(iid, p, float(rng.random()), int(c) + 1))
            if rng.random() < 0.15:  # a duplicate
                results.append(res(iid, m, float(rng.random()), int(c) + 1))
        for _ in range(int(rng.integers(0, 3))):  # false positives: masks from other images
            other = gt[ids[int(rng.integers(len(ids)))]]
            if len(other.masks) and other.masks.shape[1:] == g.masks.shape[1:]:
                k = int(rng.integers(len(other.masks)))
                results.append(res(iid, other.masks[k], float(rng.random()), int(rng.integers(1, 5))))
            else:
                results.append(res(iid, square(5, 5, 30, g.height, g.width), float(rng.random()),
                                   int(rng.integers(1, 5))))
    return results


def test_perturbed_demo_matches_cocoeval(demo_val):
    """Where the two protocols coincide they must agree exactly: the demo's ground-truth
    masks are disjoint, so at IoU >= 0.5 a prediction can match at most one of them and the
    VOC rule (best IoU, duplicates are false positives) and COCO's rule (best unmatched)
    pick the same ground truth. The 101-point interpolation of our precision/recall curve
    then equals COCOeval's AP for every class; our area-under-envelope AP differs from it
    only by the interpolation."""
    gt, _ = demo_val
    results = _perturb(gt)
    cats = [1, 2, 3, 4]
    coco = ev.coco_eval(gt, results, cats)
    scores, mask_m, box_m, n_pos = ev.collect_matches(gt, results, cats, (0.5, 0.7, 0.75), (0.75,))
    assert (n_pos > 0).all()
    checked = 0
    for t in (0.5, 0.7, 0.75):
        for c in range(4):
            prec, rec = ev.precision_recall(scores[c], mask_m[t][c], int(n_pos[c]))
            assert ev.interpolated_ap(prec, rec) == pytest.approx(coco["segm"][f"{t:g}"]["ap"][c], abs=1e-12)
            assert abs(ev.voc_ap(prec, rec) - coco["segm"][f"{t:g}"]["ap"][c]) < 0.03
            checked += 0.0 < ev.voc_ap(prec, rec) < 1.0
    assert checked >= 8  # the perturbation gives non-trivial APs
    # boxes: GT boxes may overlap; at 0.75 no prediction reaches that IoU with two of them here
    for iid, g in gt.items():
        rs = [r for r in results if r["image_id"] == iid]
        p = ev._image_predictions(g, rs, {1: 0, 2: 1, 3: 2, 4: 3})
        iou = ev.box_iou(p.boxes, g.boxes)
        assert ((iou >= 0.75).sum(1) <= 1).all()
    for c in range(4):
        prec, rec = ev.precision_recall(scores[c], box_m[0.75][c], int(n_pos[c]))
        assert ev.interpolated_ap(prec, rec) == pytest.approx(coco["bbox"]["0.75"]["ap"][c], abs=1e-12)


def test_cli_coco_and_voc(demo_val, tmp_path, capsys):
    gt, d = demo_val
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(_perturb(gt, seed=1)))
    m = ev.main(["--gt", str(d / "val.json"), "--pred", str(pred), "--out", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert "red_disc" in out and "AP^r@0.25" in out and "C-segm@0.75" in out and "mean (4)" in out
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["summary"] == pytest.approx(m["summary"])
    assert 0.2 < m["summary"]["mAP_r@0.5"] < 0.95

    voc = demo.write_voc(d, tmp_path / "VOC2012")
    from wsis_ray.data.groundtruth import load_voc_gt
    vgt = load_voc_gt(voc, "val", voc / "classes.txt")
    pred.write_text(json.dumps(_results_from_gt(vgt)))
    m = ev.main(["--gt", str(voc), "--image-set", "val", "--classes", str(voc / "classes.txt"),
                 "--pred", str(pred)])
    for key, v in m["summary"].items():
        assert v == pytest.approx(1.0), key
