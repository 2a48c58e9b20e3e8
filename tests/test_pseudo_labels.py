"""Pseudo-label Parquet -> COCO export and -> COCO results (pseudo-label quality)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wsis_ray import evaluate as ev
from wsis_ray.data import demo
from wsis_ray.data.datasets import load_coco
from wsis_ray.data.groundtruth import load_coco_gt
from wsis_ray.data.records import (PSEUDO_LABEL_SCHEMA, decode_mask, encode_mask, pseudo_labels_to_coco,
                                   results_from_pseudo_labels, write_table_atomic)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    d = demo.generate(tmp_path_factory.mktemp("demo"), num_classes=3, num_train=8, num_val=1, seed=2)
    ds = load_coco(d / "train.json", d / "train")
    return d, ds, load_coco_gt(d / "train.json", ds.category_ids)


def _table(gt, shrink=0):
    rows = []
    for iid, g in gt.items():
        for m, c, b in zip(g.masks, g.class_ids, g.boxes):
            rows.append({"image_id": iid, "class_id": int(c), "box_before": [b[0] + shrink, b[1] + shrink,
                         b[2] - shrink, b[3] - shrink], "box_after": list(b), "score": 0.9,
                         "rle_counts": encode_mask(m), "height": g.height, "width": g.width, "round": 1,
                         "ccgr_loss": -0.5, "ccgr_iterations": 10, "stop_reason": "converged"})
    first = next(iter(gt.values()))
    rows.append({**rows[0], "rle_counts": encode_mask(np.zeros((first.height, first.width), bool)),
                 "image_id": first.image_id, "height": first.height, "width": first.width, "score": 0.01})
    return pa.Table.from_pylist(rows, schema=PSEUDO_LABEL_SCHEMA)


def test_parquet_round_trip_and_coco_export(train, tmp_path):
    d, ds, gt = train
    write_table_atomic(_table(gt), str(tmp_path / "pl" / "pseudo_labels.parquet"))
    t = pq.read_table(tmp_path / "pl" / "pseudo_labels.parquet")  # plain pyarrow, no Ray
    assert t.schema.equals(PSEUDO_LABEL_SCHEMA)
    row = t.slice(0, 1).to_pylist()[0]
    g = gt[row["image_id"]]
    assert np.array_equal(decode_mask(row["rle_counts"], row["height"], row["width"]), g.masks[0])

    coco = pseudo_labels_to_coco(t, ds, images_root=str(d / "train"))
    assert coco["info"]["empty_masks_skipped"] == 1
    assert [c["name"] for c in coco["categories"]] == ds.classes
    f = tmp_path / "pseudo.json"
    f.write_text(json.dumps(coco))
    # other toolkits' view: a normal COCO instances file with the same images and masks
    again = load_coco_gt(f, ds.category_ids)
    for iid, g in gt.items():
        assert np.array_equal(again[iid].masks, g.masks) and again[iid].class_ids.tolist() == g.class_ids.tolist()
        assert np.allclose(again[iid].boxes, g.boxes)
    assert [r.class_ids for r in load_coco(f, d / "train")] == [r.class_ids for r in ds]


def test_pseudo_label_quality_via_results(train):
    d, ds, gt = train
    t = _table(gt, shrink=6)
    m = ev.evaluate(gt, results_from_pseudo_labels(t, ds), ds.category_ids, ds.classes)
    assert m["summary"]["mAP_r@0.75"] == pytest.approx(1.0) and m["summary"]["mAP_b@0.5"] == 1.0
    before = ev.evaluate(gt, results_from_pseudo_labels(t, ds, box="box_before"), ds.category_ids)
    assert before["summary"]["mAP_b@0.5"] < 1.0  # shrunken MIL boxes miss small objects


def test_bad_tables_named(train):
    d, ds, gt = train
    t = _table(gt)
    bad = t.set_column(0, "image_id", pa.array([999] * len(t), pa.int64()))
    with pytest.raises(ValueError, match="image id 999"):
        pseudo_labels_to_coco(bad, ds)
    with pytest.raises(ValueError, match="lacks column"):
        pseudo_labels_to_coco(t.drop(["rle_counts"]), ds)
