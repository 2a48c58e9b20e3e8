"""The Ray Data CCGR stage: same rows as the plain loop, Parquet readable by plain pyarrow,
masks that round-trip."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from wsis_ray import stages
from wsis_ray.config import CCGRConfig
from wsis_ray.data.records import PSEUDO_LABEL_SCHEMA, ImageRecord, decode_mask
from wsis_ray.steps import SELECTED_SCHEMA

OBJECT = (30, 20, 80, 60)  # x1, y1, x2, y2 of class 0's object in every image


class RectScores:
    """Score-map factory standing in for the SS branch: class 0 scores ~1 on OBJECT,
    falling to ~0 over a few pixels, everywhere else background."""

    def __call__(self):
        def score(images, image_ids):
            out = []
            for im in images:
                h, w = im.shape[:2]
                ys, xs = np.mgrid[0:h, 0:w] + 0.5
                x1, y1, x2, y2 = OBJECT
                d = np.minimum.reduce([xs - x1, x2 - xs, ys - y1, y2 - ys])
                fg = 1 / (1 + np.exp(-d / 1.5))
                out.append(np.stack([1 - fg, fg, np.zeros_like(fg)]).astype(np.float32))
            return out
        return score


@pytest.fixture
def inputs(tmp_path):
    records = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((96, 112, 3), 40 * i, np.uint8)).save(p)
        records.append(ImageRecord(i + 1, str(p), 96, 112, (0,)))
    # A MIL-like box on part of the object, its peak inside.
    boxes = pa.Table.from_pylist([
        {"image_id": r.image_id, "bag_id": 0, "class_id": 0, "box": [40.0, 30.0, 60.0, 45.0],
         "score": 0.9, "peak_x": 50.0, "peak_y": 38.0} for r in records], schema=SELECTED_SCHEMA)
    anchors = pa.Table.from_pylist([
        {"image_id": r.image_id, "class_id": 0, "x": 50.0, "y": 38.0} for r in records])
    return stages.image_rows(records, boxes, anchors)


def _iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_plain_loop_refines_and_masks(inputs):
    table = stages.refine_local(inputs, RectScores(), CCGRConfig(), round_index=1)
    assert table.schema.equals(PSEUDO_LABEL_SCHEMA)
    assert table.num_rows == 3
    for row in table.to_pylist():
        assert _iou(row["box_after"], OBJECT) >= 0.9 > _iou(row["box_before"], OBJECT)
        mask = decode_mask(row["rle_counts"], row["height"], row["width"])
        assert mask[25:55, 35:75].all() and not mask[:15].any()


def test_ccgr_off_keeps_boxes(inputs):
    table = stages.refine_local(inputs, RectScores(), CCGRConfig(enabled=False), round_index=1)
    for row in table.to_pylist():
        assert row["box_after"] == row["box_before"]
        assert row["stop_reason"] == "disabled"


def test_dedupe_keeps_one_refined_box_per_object_and_its_whole_mask(tmp_path):
    """Two MIL boxes on parts of one object (as IS-box bags give): CCGR takes both to the
    object. The paper's rule keeps both, and the masks split the object's pixels between
    them; ccgr.dedupe_iou keeps the higher-scored one, with the whole object as its mask."""
    p = tmp_path / "0.png"
    Image.fromarray(np.full((96, 112, 3), 40, np.uint8)).save(p)
    records = [ImageRecord(1, str(p), 96, 112, (0,))]
    parts = [([35.0, 25.0, 60.0, 45.0], 0.6, (47.0, 35.0)),
             ([50.0, 35.0, 75.0, 55.0], 0.9, (62.0, 45.0))]
    boxes = pa.Table.from_pylist([
        {"image_id": 1, "bag_id": i, "class_id": 0, "box": b, "score": sc, "peak_x": x,
         "peak_y": y} for i, (b, sc, (x, y)) in enumerate(parts)], schema=SELECTED_SCHEMA)
    anchors = pa.Table.from_pylist([{"image_id": 1, "class_id": 0, "x": x, "y": y}
                                    for _, _, (x, y) in parts])
    rows = stages.image_rows(records, boxes, anchors)
    both = stages.refine_local(rows, RectScores(), CCGRConfig(peak_region=0.5), 1).to_pylist()
    one = stages.refine_local(rows, RectScores(), CCGRConfig(peak_region=0.5, dedupe_iou=0.5),
                              1).to_pylist()
    assert len(both) == 2 and all(_iou(r["box_after"], OBJECT) >= 0.9 for r in both)
    masks = [decode_mask(r["rle_counts"], 96, 112) for r in both]
    assert max(m[20:60, 30:80].mean() for m in masks) < 0.8  # split between the two
    assert len(one) == 1 and one[0]["score"] == pytest.approx(0.9)
    assert decode_mask(one[0]["rle_counts"], 96, 112)[25:55, 35:75].all()


def test_dedupe_is_per_image_and_class():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [0, 0, 10, 10.]])
    scores = torch.tensor([0.5, 0.9, 0.4, 0.3])
    keep = stages.dedupe(boxes, scores, torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 0, 1]),
                         0.5)
    assert keep.tolist() == [1, 2, 3]
    assert stages.dedupe(boxes, scores, torch.zeros(4), torch.zeros(4), 0.0).tolist() == \
        [0, 1, 2, 3]


def test_ray_data_stage_matches_plain_loop(inputs, tmp_path, ray_session):
    out = tmp_path / "pseudo.parquet"
    info = stages.run_refine_stage(inputs, RectScores(), CCGRConfig(), 1, str(out),
                                   min_actors=1, max_actors=2, batch_size=2)
    assert info["images"] == 3
    # Plain pyarrow, no Ray: the directory of Parquet files reads back with our schema.
    table = pq.read_table(str(out)).sort_by("image_id")
    assert table.schema.equals(PSEUDO_LABEL_SCHEMA)
    local = stages.refine_local(inputs, RectScores(), CCGRConfig(), 1).sort_by("image_id")
    for a, b in zip(table.to_pylist(), local.to_pylist()):
        assert a["box_after"] == pytest.approx(b["box_after"], abs=1e-4)
        assert np.array_equal(decode_mask(a["rle_counts"], a["height"], a["width"]),
                              decode_mask(b["rle_counts"], b["height"], b["width"]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_stage_actors_share_the_cores_not_the_logical_cpus(ray_session):
    """The test Ray counts 6 CPUs on a machine of fewer cores (as the local Ray counts two
    per core): an actor granted k CPUs gets k x (cores / 6) torch threads, at least one,
    so two stages side by side do not put more threads than cores on the machine."""
    import os

    import ray

    @ray.remote(num_cpus=1)
    def threads(cpus):
        return stages.core_share_threads(cpus), len(os.sched_getaffinity(0))

    total = ray.cluster_resources()["CPU"]
    for cpus in (1, 2, 4):
        got, cores = ray.get(threads.remote(cpus))
        assert got == max(1, int(cpus * min(1.0, cores / total)))
        if cores < total:
            assert got < cpus or cpus == 1


def test_cached_score_fn_computes_each_map_once_and_reads_it_back(tmp_path):
    calls = []

    def score(images, image_ids):
        calls.append(list(image_ids))
        return [np.full((3,) + im.shape[:2], 0.1 * (i + 1), np.float32)
                for im, i in zip(images, image_ids)]

    cache = tmp_path / "maps"
    images = [np.zeros((8, 6, 3), np.uint8), np.zeros((5, 7, 3), np.uint8)]
    first = stages.CachedScoreFn(str(cache), score)(images, [1, 2])
    assert calls == [[1, 2]] and sorted(p.name for p in cache.iterdir()) == ["1.npy", "2.npy"]
    (cache / ".tmp-partial").write_bytes(b"half a file")  # a killed writer's leftover
    again = stages.CachedScoreFn(str(cache), score)(images[::-1], [2, 1])
    assert calls == [[1, 2]]  # nothing recomputed
    # float16-rounded, hit or miss, as the ScoreMaps stage sends maps on
    assert np.array_equal(again[0], first[1]) and again[0].dtype == np.float32
    assert np.array_equal(first[0], np.float32(np.float16(0.2)) * np.ones((3, 8, 6)))
    # a map of another size than its image (not this image's map) is recomputed
    np.save(cache / "1.npy", np.zeros((3, 4, 4), np.float16))
    stages.CachedScoreFn(str(cache), score)(images[:1], [1])
    assert calls[-1] == [1] and np.load(cache / "1.npy").shape == (3, 8, 6)
