"""Image-label loaders (JSON Lines, COCO, VOC), their validation, ground truth loaders and
the config entry points. Every bad-input case must give one DatasetError naming it."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsis_ray.config import load_config
from wsis_ray.data import demo
from wsis_ray.data.datasets import (DatasetError, load_coco, load_eval_dataset, load_image, load_jsonl,
                                    load_train_dataset, load_voc)
from wsis_ray.data.groundtruth import load_coco_gt, load_eval_gt, load_voc_gt

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _img(path: Path, h=40, w=50, fmt=None, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]  # smooth, so JPEG round trips closely
    arr = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 40 * seed % 255)], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def _truncated_jpeg(path: Path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.generate(tmp_path_factory.mktemp("demo"), num_classes=3, num_train=10, num_val=4, seed=5)


@pytest.fixture(scope="module")
def voc_root(demo_dir, tmp_path_factory):
    return demo.write_voc(demo_dir, tmp_path_factory.mktemp("voc") / "VOC2012")


# ---------------------------------------------------------------------------- JSON Lines

def _jsonl(tmp_path, lines):
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    f = tmp_path / "labels.jsonl"
    f.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return f


def test_jsonl_ok(tmp_path):
    a = _img(tmp_path / "im" / "b.jpg", 30, 40)
    _img(tmp_path / "im" / "a.png", 20, 25)
    f = _jsonl(tmp_path, [{"file_name": "b.jpg", "labels": ["dog", "cat", "dog"]},
                          {"file_name": "a.png", "labels": ["bird"]}, ""])
    ds = load_jsonl(f, tmp_path / "im", tmp_path / "classes.txt")
    assert ds.classes == ["cat", "dog", "bird"] and ds.category_ids == [1, 2, 3]
    assert [(r.image_id, Path(r.path).name, r.height, r.width, r.class_ids) for r in ds] == [
        (1, "a.png", 20, 25, (2,)), (2, "b.jpg", 30, 40, (0, 1))]
    assert np.abs(load_image(ds.by_id(2)).astype(int) - a).mean() < 4  # JPEG is lossy
    assert ds.label_matrix().tolist() == [[0, 0, 1], [1, 1, 0]]


def test_jsonl_every_bad_record_named_in_one_error(tmp_path):
    _img(tmp_path / "im" / "ok.png")
    _img(tmp_path / "im" / "ok2.png")
    (tmp_path / "im" / "text.png").write_text("this is not an image")
    _truncated_jpeg(tmp_path / "im" / "trunc.jpg")
    f = _jsonl(tmp_path, [
        {"file_name": "ok.png", "labels": ["cat"]},
        {"file_name": "missing.png", "labels": ["cat"]},
        {"file_name": "text.png", "labels": ["dog"]},
        {"file_name": "trunc.jpg", "labels": ["dog"]},
        {"file_name": "ok2.png", "labels": ["zebra"]},
        {"file_name": "ok2.png", "labels": []},
        "{not json",
    ])
    with pytest.raises(DatasetError) as e:
        load_jsonl(f, tmp_path / "im", tmp_path / "classes.txt")
    msg = str(e.value)
    assert "6 of 7 image record(s)" in msg and "--skip-invalid" in msg
    for name, reason in [("missing.png", "image file not found"), ("text.png", "unreadable image"),
                         ("trunc.jpg", "truncated"), ("ok2.png", "unknown class 'zebra'"),
                         ("ok2.png", "no image-level labels"), ("ok2.png", "duplicate file name"),
                         ("line 7", "malformed line")]:
        assert any(name in ln and reason in ln for ln in msg.splitlines()), (name, reason, msg)
    assert "ok.png" not in msg.replace("ok.png (also", "")
    line7 = [ln for ln in msg.splitlines() if "line 7" in ln][0]
    assert "not found" not in line7 and "no image-level labels" not in line7


def test_jsonl_skip_invalid_writes_skipped_list(tmp_path):
    _img(tmp_path / "im" / "ok.png")
    _truncated_jpeg(tmp_path / "im" / "trunc.jpg")
    f = _jsonl(tmp_path, [{"file_name": "ok.png", "labels": ["cat"]},
                          {"file_name": "trunc.jpg", "labels": ["dog"]}])
    out = tmp_path / "skipped.jsonl"
    ds = load_jsonl(f, tmp_path / "im", tmp_path / "classes.txt", skip_invalid=True, skipped_out=out)
    assert [Path(r.path).name for r in ds] == ["ok.png"]
    skipped = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["record"]["file_name"] == "trunc.jpg"
    assert "truncated" in skipped[0]["reason"]


def test_error_lists_first_20_and_the_total(tmp_path):
    f = _jsonl(tmp_path, [{"file_name": f"m{i:02d}.png", "labels": ["cat"]} for i in range(25)])
    with pytest.raises(DatasetError) as e:
        load_jsonl(f, tmp_path, tmp_path / "classes.txt")
    msg = str(e.value)
    assert "m19.png" in msg and "m20.png" not in msg and "and 5 more (25 in total)" in msg


def test_missing_inputs(tmp_path):
    with pytest.raises(DatasetError, match="labels file .* not found"):
        load_jsonl(tmp_path / "nope.jsonl", tmp_path, ["a"])
    (tmp_path / "l.jsonl").write_text("")
    with pytest.raises(DatasetError, match="class list .* not found"):
        load_jsonl(tmp_path / "l.jsonl", tmp_path, tmp_path / "classes.txt")
    with pytest.raises(DatasetError, match="annotation file .* not found"):
        load_coco(tmp_path / "nope.json", tmp_path)
    with pytest.raises(DatasetError, match="JPEGImages"):
        load_voc(tmp_path, "train")


# ---------------------------------------------------------------------------- COCO

def _coco(tmp_path, images, annotations, categories=({"id": 3, "name": "cat"}, {"id": 7, "name": "dog"})):
    f = tmp_path / "instances.json"
    f.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return f


def test_coco_labels_and_category_ids(tmp_path):
    _img(tmp_path / "a.png", 20, 30)
    _img(tmp_path / "b.png", 25, 35)
    f = _coco(tmp_path, [{"id": 11, "file_name": "a.png", "height": 20, "width": 30},
                         {"id": 12, "file_name": "b.png", "height": 25, "width": 35}],
              [{"id": 1, "image_id": 11, "category_id": 7, "iscrowd": 1},
               {"id": 2, "image_id": 11, "category_id": 7},
               {"id": 3, "image_id": 12, "category_id": 3}],
              [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}])
    ds = load_coco(f, tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.category_ids == [3, 7]
    assert [(r.image_id, r.class_ids) for r in ds] == [(11, (1,)), (12, (0,))]


def test_coco_bad_records(tmp_path):
    _img(tmp_path / "a.png", 20, 30)
    _img(tmp_path / "b.png", 20, 30)
    _img(tmp_path / "c.png", 20, 30)
    f = _coco(tmp_path, [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
                         {"id": 2, "file_name": "b.png", "height": 21, "width": 30},   # size
                         {"id": 1, "file_name": "c.png", "height": 20, "width": 30},   # dup id
                         {"id": 4, "file_name": "c.png", "height": 20, "width": 30},   # dup file, no labels
                         {"id": 5, "file_name": "a.png", "height": 20, "width": 30}],  # unknown category
              [{"id": 1, "image_id": 1, "category_id": 3}, {"id": 2, "image_id": 2, "category_id": 3},
               {"id": 3, "image_id": 1, "category_id": 3}, {"id": 4, "image_id": 5, "category_id": 99}])
    with pytest.raises(DatasetError) as e:
        load_coco(f, tmp_path)
    msg = str(e.value)
    assert "4 of 5" in msg
    assert "declared size 21x30 (HxW) but the file is 20x30" in msg
    assert "duplicate image id 1" in msg and "duplicate file name" in msg
    assert "no image-level labels" in msg and "category id 99" in msg
    ds = load_coco(f, tmp_path, skip_invalid=True)
    assert [r.image_id for r in ds] == [1]


# ---------------------------------------------------------------------------- VOC

def test_voc_copy_matches_demo(demo_dir, voc_root):
    names = (demo_dir / "classes.txt").read_text().split()
    for split in ("train", "val"):
        coco_ds = load_coco(demo_dir / f"{split}.json", demo_dir / split)
        voc_ds = load_voc(voc_root, split, classes=voc_root / "classes.txt")
        assert voc_ds.classes == names
        assert [r.class_ids for r in voc_ds] == [r.class_ids for r in coco_ds]
        assert [(r.height, r.width) for r in voc_ds] == [(r.height, r.width) for r in coco_ds]
    # ids are stable across image sets (train / trainval / Segmentation lists)
    by_name = lambda ds: {Path(r.path).stem: r.image_id for r in ds}
    tv = by_name(load_voc(voc_root, "trainval", classes=voc_root / "classes.txt"))
    tr = by_name(load_voc(voc_root, "Segmentation/train", classes=voc_root / "classes.txt"))
    assert all(tv[k] == v for k, v in tr.items()) and len(set(tv.values())) == len(tv) == 14
    # the demo class names are not VOC classes: the default list rejects them by name
    with pytest.raises(DatasetError, match="unknown class 'red_disc'"):
        load_voc(voc_root, "train")


def test_voc_gt_matches_coco_gt_up_to_void(demo_dir, voc_root):
    coco_gt = load_coco_gt(demo_dir / "val.json", [1, 2, 3])
    voc_gt = load_voc_gt(voc_root, "val", voc_root / "classes.txt")
    voc_ids = {Path(r.path).stem: r.image_id for r in load_voc(voc_root, "val", voc_root / "classes.txt")}
    assert sorted(voc_gt) == sorted(voc_ids.values())
    for coco_id, g in coco_gt.items():
        v = voc_gt[voc_ids[demo.voc_name(coco_id)]]
        assert v.class_ids.tolist() == g.class_ids.tolist()
        assert v.void is not None and v.void.any()
        assert not (v.masks & v.void).any()
        assert (v.masks <= g.masks).all()                # VOC masks lose the inner border band ...
        assert ((g.masks & ~v.masks) <= v.void).all()    # ... which is void
        assert np.allclose(v.boxes, g.boxes)             # boxes from the XML, 1-based -> continuous


def test_voc_bad_records(voc_root, tmp_path):
    import shutil
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    names = (root / "ImageSets/Main/train.txt").read_text().split()
    xml = root / "Annotations" / f"{names[0]}.xml"
    xml.write_text(xml.read_text().replace("<height>", "<height>9"))
    (root / "Annotations" / f"{names[1]}.xml").unlink()
    (root / "JPEGImages" / f"{names[2]}.jpg").write_text("not a jpeg")
    (root / "ImageSets/Main/train.txt").write_text("\n".join(names + ["2026_999999"]) + "\n")
    with pytest.raises(DatasetError) as e:
        load_voc(root, "train", root / "classes.txt")
    msg = str(e.value)
    assert "4 of 11" in msg and "declared size 9" in msg and "annotation file not found" in msg
    assert "unreadable image" in msg and "2026_999999" in msg
    with pytest.raises(DatasetError, match="image set 'nope' not found"):
        load_voc(root, "nope")


# ---------------------------------------------------------------------------- config entry

def test_load_train_dataset_dispatch(tmp_path, demo_dir, voc_root):
    cfg = load_config(None, [f"data.root={tmp_path / 'gen'}", "data.demo_classes=2",
                             "data.demo_train_images=4", "data.demo_val_images=2", "data.demo_seed=1"])
    ds = load_train_dataset(cfg.data)  # generates the demo data on first use
    assert len(ds) == 4 and ds.num_classes == 2 and (tmp_path / "gen" / "meta.json").is_file()
    assert [r.image_id for r in load_eval_dataset(cfg.data)] == [5, 6]
    assert sorted(load_eval_gt(cfg.data, "val")) == [5, 6]
    assert sorted(load_eval_gt(cfg.data, "train")) == [1, 2, 3, 4]

    cfg = load_config(None, ["data.format=coco", f"data.root={demo_dir / 'train'}",
                             f"data.train={demo_dir / 'train.json'}", f"data.val={demo_dir / 'val.json'}",
                             f"data.val_root={demo_dir / 'val'}"])
    assert len(load_train_dataset(cfg.data)) == 10 and len(load_eval_dataset(cfg.data)) == 4
    assert len(load_eval_gt(cfg.data)) == 4

    cfg = load_config(None, ["data.format=voc", f"data.root={voc_root}", "data.train=train",
                             "data.val=val", f"data.classes={voc_root / 'classes.txt'}"])
    assert len(load_train_dataset(cfg.data)) == 10 and len(load_eval_gt(cfg.data)) == 4

    (tmp_path / "l.jsonl").write_text(json.dumps({"file_name": "000001.png", "labels": ["yellow_triangle"]}))
    cfg = load_config(None, ["data.format=jsonl", f"data.root={demo_dir / 'train'}",
                             f"data.train={tmp_path / 'l.jsonl'}", f"data.classes={demo_dir / 'classes.txt'}",
                             f"data.val={demo_dir / 'val.json'}"])
    assert [r.class_ids for r in load_train_dataset(cfg.data)] == [(2,)]
    assert all(Path(r.path).is_absolute() for r in load_train_dataset(cfg.data))
    assert len(load_eval_gt(cfg.data)) == 4

    cfg = load_config(None, ["data.format=jsonl"])
    with pytest.raises(DatasetError, match="needs data.train"):
        load_train_dataset(cfg.data)
    cfg = load_config(None, ["data.format=tfrecord"])
    with pytest.raises(DatasetError, match="unknown data.format"):
        load_train_dataset(cfg.data)
