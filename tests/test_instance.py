"""IS branch inference contract: build, predict, COCO export, checkpoint round trip."""
import numpy as np
import pytest
import torch

from wsis_ray.branches import instance
from wsis_ray.branches.backbone import Trunk, load_trunk_state
from wsis_ray.config import BackboneConfig
from wsis_ray.config import ISConfig
from wsis_ray.data.records import decode_mask

CFG = ISConfig(min_size=64, max_size=96)


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (70, 90, 3), dtype=np.uint8),
            rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return instance.build_model(CFG, num_classes=3).eval()


def test_predict_shapes_and_coco_round_trip(model):
    images = _images()
    outs = instance.predict(model, images, score_threshold=0.0)
    assert len(outs) == 2
    for im, o in zip(images, outs):
        n = len(o["scores"])
        assert n > 0  # untrained heads still score every class at threshold 0
        assert o["boxes"].shape == (n, 4) and o["boxes"].dtype == np.float32
        assert o["masks"].shape == (n,) + im.shape[:2] and o["masks"].dtype == bool
        assert o["class_ids"].min() >= 0 and o["class_ids"].max() <= 2
    results = instance.to_coco_results([11, 12], outs, category_ids=[5, 7, 9])
    assert len(results) == sum(len(o["scores"]) for o in outs)
    first = results[0]
    o = outs[0]
    assert first["image_id"] == 11
    assert first["category_id"] == [5, 7, 9][o["class_ids"][0]]
    x1, y1, x2, y2 = o["boxes"][0]
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    h, w = first["segmentation"]["size"]
    assert (h, w) == (70, 90)
    assert np.array_equal(decode_mask(first["segmentation"]["counts"], h, w), o["masks"][0])
    # the threshold filters
    high = instance.predict(model, images, score_threshold=0.99)
    assert all((h["scores"] >= 0.99).all() for h in high)


def test_checkpoint_round_trip_gives_identical_outputs(model, tmp_path):
    uri = str(tmp_path / "is" / "model.pt")
    instance.save_checkpoint(uri, model, {"classes": ["a", "b", "c"], "category_ids": [5, 7, 9],
                                          "config": CFG, "round": 1})
    loaded, meta = instance.load_checkpoint(uri)
    assert meta["classes"] == ["a", "b", "c"] and meta["round"] == 1
    assert instance.config_from_dict(meta["config"]) == CFG
    a = instance.predict(model, _images(), 0.0)
    b = instance.predict(loaded, _images(), 0.0)
    for x, y in zip(a, b):
        for k in ("boxes", "class_ids", "scores", "masks"):
            assert np.array_equal(x[k], y[k]), k


def test_missing_checkpoint_and_bad_meta_are_clear(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="not found"):
        instance.load_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="classes"):
        instance.save_checkpoint(str(tmp_path / "x.pt"), model, {"config": CFG})


def test_trunk_sharing_into_and_out_of_mask_rcnn():
    trunk = Trunk(BackboneConfig(name="resnet18"))
    m = instance.build_model(CFG, 2, init_trunk=trunk.state_dict())
    shared = instance.trunk_state(m)
    assert torch.equal(shared["layer3.1.conv2.weight"], trunk.state_dict()["layer3.1.conv2.weight"])
    other = Trunk(BackboneConfig(name="resnet18"))
    load_trunk_state(other, shared)
    assert torch.equal(other.stem[0].weight, trunk.stem[0].weight)
    with pytest.raises(ValueError, match="same ResNet"):
        instance.build_model(ISConfig(backbone="resnet50", min_size=64, max_size=96), 2,
                             init_trunk=trunk.state_dict())
