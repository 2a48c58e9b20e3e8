"""IS branch inference contract: build, predict, COCO export, checkpoint round trip."""
import numpy as np
import pytest
import torch

from wsis_ray.branches import instance
from wsis_ray.branches.backbone import Trunk, load_trunk_state
from wsis_ray.config import BackboneConfig
from wsis_ray.config import ISConfig
from wsis_ray.data.records import decode_mask

CFG = ISConfig(min_size=64, max_size=96, detections_per_img=20)


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


def test_threshold_above_the_floor_gives_the_filtered_outputs_and_restores_it(model):
    """predict() raises the model's box score floor for the forward (no masks for boxes it
    would drop): the answer equals the floor-level answer filtered afterwards."""
    images = _images()
    floor = model.roi_heads.score_thresh
    low = instance.predict(model, images, score_threshold=0.0)
    scores = np.concatenate([o["scores"] for o in low])
    cut = float(np.sort(scores)[len(scores) // 2])  # a score that occurs: >= keeps it
    rois = []  # RoIs through the mask head: only those of returned boxes
    hook = model.roi_heads.mask_head.register_forward_hook(
        lambda m, args, out: rois.append(len(out)))
    try:
        high = instance.predict(model, images, score_threshold=cut)
    finally:
        hook.remove()
    assert model.roi_heads.score_thresh == floor and not model.training
    assert sum(rois) == sum(len(h["scores"]) for h in high)
    kept = 0
    for lo, hi in zip(low, high):
        keep = lo["scores"] >= cut
        kept += int(keep.sum())
        for key in ("boxes", "scores", "class_ids", "masks"):
            assert np.array_equal(lo[key][keep], hi[key]), key
    assert 0 < kept < len(scores)


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
    with pytest.raises(ValueError, match="same network"):
        instance.build_model(ISConfig(backbone="resnet50", min_size=64, max_size=96), 2,
                             init_trunk=trunk.state_dict())


def test_efficientnet_mask_rcnn_takes_the_shared_trunk_and_frozen_batchnorm():
    from torchvision.ops.misc import FrozenBatchNorm2d

    cfg = ISConfig(backbone="efficientnet_lite0", pretrained="none", min_size=64, max_size=96,
                   fpn_channels=32)
    trunk = Trunk(BackboneConfig(name="efficientnet_lite0"), output_stride=16)
    m = instance.build_model(cfg, 2, frozen_bn=True, init_trunk=trunk.state_dict())
    body = m.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and body.bn1.eps == 1e-3
    assert torch.equal(body.layer3[0]._project_conv.weight, trunk.layer3[0]._project_conv.weight)
    assert not body.layer1[0]._depthwise_conv.weight.requires_grad  # trainable_layers=3
    assert body.layer4[0]._depthwise_conv.stride == [2, 2]  # the FPN body keeps stride 32
    shared = instance.trunk_state(m)
    assert torch.equal(shared["stem.0.1.weight"], trunk.state_dict()["stem.0.1.weight"])
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 70, 90)])
    assert out[0]["masks"].shape[-2:] == (70, 90)
    with pytest.raises(ValueError, match="same network"):
        instance.build_model(cfg, 2, init_trunk=Trunk(BackboneConfig(name="resnet18")).state_dict())


def test_efficientnet_fpn_levels_start_on_one_scale():
    # ImageNet EfficientNet stages end in a linear projection whose outputs are ~10x
    # ResNet's; un-normalised, the FPN's finest levels start with std > 10 and the first
    # steps' mask loss explodes. BatchNorm in the FPN keeps every level near unit scale.
    cfg = ISConfig(backbone="efficientnet_lite0", pretrained="imagenet", min_size=128,
                   max_size=160, fpn_channels=64)
    m = instance.build_model(cfg, 2).train()
    torch.manual_seed(0)
    x, _ = m.transform([torch.rand(3, 128, 160)])
    with torch.no_grad():
        levels = m.backbone(x.tensors)
    assert all(0.5 < float(v.std()) < 2.0 for v in levels.values()), \
        {k: float(v.std()) for k, v in levels.items()}


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_next_round_takes_the_trunk_of_a_frozen_batchnorm_model(name):
    # Round >= 2: the shared trunk is the previous IS model's body, whose FrozenBatchNorm2d
    # has no num_batches_tracked (BatchNorm's loader fills it in); its statistics must carry.
    cfg = ISConfig(backbone=name, pretrained="none", min_size=64, max_size=96, fpn_channels=32)
    previous = instance.build_model(cfg, 2, frozen_bn=True)
    with torch.no_grad():
        previous.backbone.body.bn1.running_mean.add_(0.5)
    shared = instance.trunk_state(previous)
    assert not any(k.endswith("num_batches_tracked") for k in shared)
    for frozen in (True, False):
        body = instance.build_model(cfg, 2, frozen_bn=frozen, init_trunk=shared).backbone.body
        assert torch.equal(body.bn1.running_mean, previous.backbone.body.bn1.running_mean)
    with pytest.raises(ValueError, match="same network"):
        instance.build_model(cfg, 2, init_trunk={k: v for k, v in shared.items()
                                                 if "layer2" not in k})

def test_gt_table_and_targets(tmp_path):
    from types import SimpleNamespace

    from wsis_ray.branches.common import record_dicts
    from wsis_ray.data.records import write_table_atomic
    from _branches_synth import make_dataset

    d = make_dataset(tmp_path / "data", n=3)
    gt = {i: SimpleNamespace(masks=np.stack([m for _, m, _ in objs]),
                             class_ids=np.array([c for c, _, _ in objs]),
                             iscrowd=np.zeros(len(objs), bool))
          for i, objs in d["gt"].items()}
    uri = str(tmp_path / "gt.parquet")
    write_table_atomic(instance.gt_table(gt), uri)
    data = instance.ISImages(record_dicts(d["records"]),
                             instance.read_instance_labels(uri), flip=False)
    x, t = data[0]
    c, m, b = d["gt"][0][0]
    assert x.shape == (3, 64, 64) and float(x.max()) <= 1.0
    assert t["labels"][0] == c + 1  # Mask R-CNN label c+1
    assert t["boxes"][0].tolist() == b.tolist()
    assert np.array_equal(t["masks"][0].numpy().astype(bool), m)


@pytest.mark.ray
def test_instance_trains_on_two_workers_and_writes_a_serve_checkpoint(ray_session, tmp_path):
    from _branches_synth import CATEGORY_IDS, CLASSES, make_dataset
    from wsis_ray.config import Config

    d = make_dataset(tmp_path / "data", n=6)
    cfg = Config()
    cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.checkpoint_every = 2, 0.5, 4
    cfg.instance = ISConfig(min_size=64, max_size=96, batch_size=2, steps=8, lr=0.01)
    ckpt = str(tmp_path / "final" / "is.pt")
    out = instance.fit_instance(cfg, d["records"], d["pseudo"], CLASSES, str(tmp_path / "ray"),
                                checkpoint_uri=ckpt, meta={"category_ids": CATEGORY_IDS})
    hist = out["history"]
    assert [h["step"] for h in hist] == [4, 8]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert {"loss_mask", "loss_classifier", "loss_box_reg", "images_per_s"} <= set(hist[-1])
    model, meta = instance.load_checkpoint(ckpt)
    assert meta["classes"] == CLASSES and meta["category_ids"] == CATEGORY_IDS
    assert meta["metrics"]["step"] == 8
    outs = instance.predict(model, [np.zeros((64, 64, 3), np.uint8)], 0.0)
    assert outs[0]["masks"].shape[1:] == (64, 64)


def test_weight_average_follows_the_warmed_up_decay_and_loads_as_a_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = instance.weight_average(net, decay=0.5)
    start = net[0].weight.detach().clone()
    ema.update_parameters(net)  # the first update copies
    assert torch.equal(ema.module[0].weight, start)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and its counter
    ema.update_parameters(net)  # n = 1: decay min(0.5, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * net[0].weight)
    run_mean = net[1].running_mean
    assert torch.allclose(ema.module[1].running_mean, (1 - d) * run_mean)  # from zeros
    assert ema.module[1].num_batches_tracked.dtype == torch.long
    weights = instance.final_weights({"model": net.state_dict(), "ema": ema.state_dict()})
    assert weights.keys() == net.state_dict().keys()
    assert torch.equal(weights["0.weight"], ema.module[0].weight)
    plain = net.state_dict()
    assert instance.final_weights({"model": plain}) is plain  # no average kept: last step's


def test_ema_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        ISConfig(ema_decay=1.0)


@pytest.mark.ray
def test_weight_average_resumes_after_a_crash_and_is_what_the_branch_returns(ray_session,
                                                                             tmp_path):
    """A worker killed mid-training resumes its weight average too: the run ends with the
    uninterrupted run's weights; and the returned weights are the average, not the last
    step's (which a run without the average returns)."""
    from _branches_synth import CLASSES, make_dataset
    from wsis_ray.config import Config

    d = make_dataset(tmp_path / "data", n=6)

    def fit(name, extra=None, num_workers=1):
        cfg = Config()
        cfg.train.num_workers, cfg.train.cpus_per_worker = num_workers, 1
        cfg.train.checkpoint_every, cfg.train.max_failures = 2, 1
        cfg.instance = ISConfig(min_size=64, max_size=96, batch_size=2, steps=6, lr=0.01,
                                ema_decay=0.9)
        return instance.fit_instance(cfg, d["records"], d["pseudo"], CLASSES,
                                     str(tmp_path / name), extra=extra)["model"]

    # the uninterrupted run in Ray Train's local mode, which trains what one worker does
    # (tests/test_reproducible.py) without a worker's start-up time
    a = fit("a", num_workers=0)
    b = fit("b", {"crash_at_step": 5, "crash_marker": str(tmp_path / "b.crashed")})
    assert (tmp_path / "b.crashed").exists()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # run a's last checkpoint holds both: the last step's weights and their average
    last_ckpt = sorted(p for p in (tmp_path / "a" / "is").glob("checkpoint_*") if p.is_dir())[-1]
    state = torch.load(last_ckpt / "state.pt", weights_only=False)
    assert state["step"] == 6
    last = state["model"]
    assert a.keys() == last.keys()
    w = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(a[w], instance.final_weights(state)[w])
    assert not torch.equal(a[w], last[w])
    # a run without the average (ema_decay 0) saves no "ema": it ends with the last weights
    assert instance.final_weights({"model": last}) is last


def test_proposals_stay_float32_under_bfloat16_autocast():
    """Under train.cpu_bf16 the RPN's outputs, hence the proposals and the box-regression
    targets, are float32: decoded in bfloat16 they sat on a ~1 px grid and boxes that
    collapsed to zero size gave NaN targets. The head keeps torchvision's parameter names."""
    cfg = ISConfig(backbone="resnet18", min_size=128, max_size=160)
    model = instance.build_model(cfg, 2).eval()
    assert isinstance(model.rpn.head, instance.Float32RPNHead)
    assert {k for k in model.state_dict() if k.startswith("rpn.")} == {
        "rpn.head.conv.0.0.weight", "rpn.head.conv.0.0.bias", "rpn.head.cls_logits.weight",
        "rpn.head.cls_logits.bias", "rpn.head.bbox_pred.weight", "rpn.head.bbox_pred.bias"}
    images = [torch.rand(3, 150, 130)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image_list, _ = model.transform(images)
        feats = model.backbone(image_list.tensors)
        logits, deltas = model.rpn.head(list(feats.values()))
        proposals, _ = model.rpn(image_list, feats)
    assert all(t.dtype == torch.float32 for t in logits + deltas)
    assert proposals[0].dtype == torch.float32
    # off the bfloat16 grid: bfloat16 holds no fraction of 0.25 above 128
    assert (proposals[0] % 1 != 0).any()
