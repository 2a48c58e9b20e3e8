"""The synthetic demo dataset: layout, determinism, difficulty properties, VOC copy."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsis_ray.data import demo
from wsis_ray.data.datasets import load_coco, load_image
from wsis_ray.data.groundtruth import load_coco_gt

# pycocotools 2.0.x on numpy 2 warns about __array__(copy=...) on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.generate(tmp_path_factory.mktemp("demo"), num_classes=4, num_train=24, num_val=8, seed=3)


def test_layout_and_coco_contents(demo_dir):
    names = (demo_dir / "classes.txt").read_text().split()
    assert names == demo.class_names(4) and len(set(names)) == 4
    for split, n, first in (("train", 24, 1), ("val", 8, 25)):
        coco = json.loads((demo_dir / f"{split}.json").read_text())
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
        assert [c["name"] for c in coco["categories"]] == names
        assert [im["id"] for im in coco["images"]] == list(range(first, first + n))
        per_image = {}
        for a in coco["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a)
            assert a["iscrowd"] == 0 and a["area"] > 0 and set(a["segmentation"]) == {"size", "counts"}
        for im in coco["images"]:
            f = demo_dir / split / im["file_name"]
            w, h = Image.open(f).size
            assert (h, w) == (im["height"], im["width"])
            assert 128 <= h <= 192 and 128 <= w <= 192
            assert 1 <= len(per_image[im["id"]]) <= 4


def test_masks_are_disjoint_visible_parts_and_boxes_tight(demo_dir):
    gt = load_coco_gt(demo_dir / "train.json", [1, 2, 3, 4])
    sizes, occluded = [], 0
    for g in gt.values():
        assert (g.masks.sum(0) <= 1).all()  # visible parts never overlap
        for m, b in zip(g.masks, g.boxes):
            ys, xs = np.nonzero(m)
            assert list(b) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            sizes.append(max(b[2] - b[0], b[3] - b[1]))
        # occlusion: a box holding pixels of another instance
        for i, b in enumerate(g.boxes.astype(int)):
            others = np.delete(g.masks, i, 0)[:, b[1]:b[3], b[0]:b[2]]
            occluded += bool(others.any())
    assert min(sizes) >= 10 and max(sizes) <= 95 and max(sizes) - min(sizes) > 30
    assert occluded > 0


def test_class_mark_is_a_small_part_of_each_object(demo_dir):
    """The class-specific mark colour covers ~10-20 % of the object and (nearly) none of
    the other objects or classes: the discriminative part is small."""
    coco = json.loads((demo_dir / "train.json").read_text())
    gt = load_coco_gt(demo_dir / "train.json", [1, 2, 3, 4])
    files = {im["id"]: demo_dir / "train" / im["file_name"] for im in coco["images"]}
    fracs = []
    for iid, g in gt.items():
        img = load_image(files[iid]).astype(int)
        for m, c in zip(g.masks, g.class_ids):
            colour = np.array(demo.MARK_COLOURS[c % 7][1])
            near = np.abs(img - colour).max(-1) < 30
            fracs.append((near & m).sum() / m.sum())
    fracs = np.array(fracs)
    assert 0.04 < np.median(fracs) < 0.25, np.median(fracs)
    assert (fracs < 0.4).all()


def test_deterministic_bytes(tmp_path):
    a = demo.generate(tmp_path / "a", num_classes=3, num_train=5, num_val=2, seed=7)
    b = demo.generate(tmp_path / "b", num_classes=3, num_train=5, num_val=2, seed=7)
    c = demo.generate(tmp_path / "c", num_classes=3, num_train=5, num_val=2, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert demo.is_generated(a, 3, 5, 2, 7) and not demo.is_generated(a, 3, 5, 2, 8)


def test_train_loader_reads_labels_only(demo_dir):
    ds = load_coco(demo_dir / "train.json", demo_dir / "train")
    assert len(ds) == 24 and ds.classes == demo.class_names(4) and ds.category_ids == [1, 2, 3, 4]
    gt = load_coco_gt(demo_dir / "train.json", ds.category_ids)
    for r in ds:
        assert set(r.class_ids) == set(gt[r.image_id].class_ids.tolist())
        assert not hasattr(r, "masks") and not hasattr(r, "boxes")
        img = load_image(r)
        assert img.shape == (r.height, r.width, 3) and img.dtype == np.uint8


def test_cli(tmp_path, capsys):
    demo.main(["--out", str(tmp_path / "d"), "--classes", "2", "--train", "3", "--val", "1", "--seed", "1"])
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["images"] == 4 and (tmp_path / "d" / "meta.json").is_file()
    assert len(list((tmp_path / "d" / "train").glob("*.png"))) == 3


def test_regenerating_smaller_removes_stale_images(tmp_path):
    demo.generate(tmp_path, num_classes=2, num_train=6, num_val=2, seed=0)
    demo.generate(tmp_path, num_classes=2, num_train=3, num_val=1, seed=0)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000001.png", "000002.png", "000003.png"]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["000004.png"]


def test_every_image_has_an_object():
    for k in range(50):
        rng = np.random.default_rng(np.random.SeedSequence([0, 0, k]))
        _, objs = demo.render_image(rng, 4)
        assert 1 <= len(objs) <= 4
