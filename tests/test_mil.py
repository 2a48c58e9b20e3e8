"""MIL branch (WSDDN over bags): Eq. for x^B / phi_B / L(B) by hand, input validation,
selection, and training on Ray Train (2 DDP workers, then local mode)."""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from _branches_synth import make_dataset
from wsis_ray.branches import mil
from wsis_ray.branches.backbone import Trunk
from wsis_ray.config import Config
from wsis_ray.data.records import BAGS_SCHEMA, PROPOSALS_SCHEMA, write_table_atomic


def test_bag_score_and_loss_match_hand_computation():
    # R = 2 proposals, C = 2 classes; rows = proposals
    x_cls = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_det = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    x_b, phi = mil.bag_scores(x_cls, x_det)
    e = math.exp
    cls = [[e(1) / (e(1) + 1), 1 / (e(1) + 1)], [1 / (1 + e(2)), e(2) / (1 + e(2))]]
    det = [[e(.5) / (e(.5) + 1), 1 / (1 + e(1))], [1 / (e(.5) + 1), e(1) / (1 + e(1))]]
    hand = [[cls[r][c] * det[r][c] for c in range(2)] for r in range(2)]
    assert x_b.flatten().tolist() == pytest.approx(sum(hand, []), rel=1e-6)
    phi_hand = [hand[0][c] + hand[1][c] for c in range(2)]
    assert phi.tolist() == pytest.approx(phi_hand, rel=1e-6)
    loss = mil.bag_loss(phi, class_id=1)
    assert loss.item() == pytest.approx(-math.log(phi_hand[1]) - math.log(1 - phi_hand[0]),
                                        rel=1e-6)
    # clamping keeps the loss finite when phi saturates
    assert torch.isfinite(mil.bag_loss(torch.tensor([1.0, 0.0]), 0))


class _FixedScores(nn.Module):
    """Stands in for WSDDN: returns given (x_cls, x_det) per image."""

    def __init__(self, outs):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.outs = outs

    def forward(self, images, boxes):
        return self.outs


def test_select_boxes_takes_the_best_proposal_of_the_bag_class():
    proposals = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 30, 30]], np.float32)
    x_cls = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    x_det = torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    model = _FixedScores([(x_cls, x_det)])
    image = np.zeros((32, 32, 3), np.uint8)
    bags = [[(7, 1, np.array([0, 1, 2])), (8, 0, np.array([1, 2]))]]
    [chosen] = mil.select_boxes(model, [image], [proposals], bags, image_size=32)
    assert [c["bag_id"] for c in chosen] == [7, 8]
    assert chosen[0]["box"].tolist() == proposals[1].tolist()  # class 1: det favours row 1
    x_b, _ = mil.bag_scores(x_cls[[0, 1, 2]], x_det[[0, 1, 2]])
    assert chosen[0]["score"] == pytest.approx(float(x_b[1, 1]))
    res = mil.to_coco_box_results([dict(chosen[0], image_id=3)], category_ids=[10, 20])
    assert res[0]["category_id"] == 20 and res[0]["bbox"] == [5.0, 5.0, 15.0, 15.0]


def test_select_boxes_runs_only_bag_proposals_and_matches_scoring_all():
    """select_boxes sends only the proposals some bag holds through the RoI head; the
    choice and score must equal those from scoring every proposal of the image."""
    from wsis_ray.config import BackboneConfig

    torch.manual_seed(0)
    model = mil.WSDDN(BackboneConfig("resnet18", "none"), num_classes=3, hidden=32).eval()
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (12, 2))
    proposals = np.concatenate([xy, xy + rng.uniform(8, 24, (12, 2))], 1).astype(np.float32)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    bags = [[(0, 2, np.array([9, 3, 7])), (1, 0, np.array([1, 4, 9, 11])),
             (2, 1, np.array([], np.int64))]]
    with torch.no_grad():
        [chosen] = mil.select_boxes(model, [image], [proposals], bags, image_size=64)
        batch = mil.resize_image(image, 64)[None]
        [(x_cls, x_det)] = model(batch, [torch.from_numpy(mil.scale_boxes(proposals, 64, 64, 64))])
    assert [c["bag_id"] for c in chosen] == [0, 1]  # the empty bag gives no box
    for c, (_, class_id, idx) in zip(chosen, bags[0]):
        x_b, _ = mil.bag_scores(x_cls[idx], x_det[idx])
        best = int(x_b[:, class_id].argmax())
        assert c["box"].tolist() == proposals[idx[best]].tolist()
        assert c["score"] == pytest.approx(float(x_b[best, class_id]), rel=1e-5)


def test_bags_indexing_missing_proposals_is_a_clear_error(tmp_path):
    props = pa.Table.from_pylist([{"image_id": 1, "boxes": [[0, 0, 4, 4]],
                                   "objectness": [1.0]}], PROPOSALS_SCHEMA)
    bags = pa.Table.from_pylist([{"image_id": 1, "bag_id": 0, "class_id": 0, "peak_x": 1.0,
                                  "peak_y": 1.0, "source_box": None,
                                  "proposal_indices": [0, 3]}], BAGS_SCHEMA)
    write_table_atomic(props, str(tmp_path / "p.parquet"))
    write_table_atomic(bags, str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match="bag 0 of image 1 indexes proposal 3"):
        mil.read_mil_inputs(str(tmp_path / "p.parquet"), str(tmp_path / "b.parquet"))


def _cfg(workers, steps):
    cfg = Config()
    cfg.train.num_workers, cfg.train.cpus_per_worker = workers, 0.5
    cfg.train.checkpoint_every = steps // 2
    cfg.mil.steps, cfg.mil.lr, cfg.mil.image_size, cfg.mil.batch_size = steps, 1e-3, 64, 2
    return cfg


@pytest.mark.ray
def test_mil_trains_on_two_workers_and_selects_one_box_per_bag(ray_session, tmp_path):
    d = make_dataset(tmp_path / "data", n=6)
    cfg = _cfg(2, 8)
    out = mil.fit_mil(cfg, d["records"], d["proposals"], d["bags"], 2, str(tmp_path / "ray"))
    losses = [h["loss"] for h in out["history"]]
    assert [h["step"] for h in out["history"]] == [4, 8]
    assert losses[-1] < losses[0]
    assert set(out["trunk"]) and all(not k.startswith("trunk.") for k in out["trunk"])
    model = mil.load_model(out["model"], cfg.backbone, cfg.mil, 2)
    rows = mil.select_all(model, d["records"], d["proposals"], d["bags"], 64)
    assert len(rows) == sum(len(v) for v in d["gt"].values())  # one box per bag
    for r in rows:  # the chosen box is one of the bag's proposals and contains its peak
        c, _, b = d["gt"][r["image_id"]][r["bag_id"]]
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        assert r["box"][0] <= cx <= r["box"][2] and r["box"][1] <= cy <= r["box"][3]


@pytest.mark.ray
def test_mil_local_mode_and_trunk_sharing(ray_session, tmp_path):
    d = make_dataset(tmp_path / "data", n=4)
    cfg = _cfg(0, 3)
    cfg.train.checkpoint_every = 1
    cfg.mil.lr = 0.0  # a zero-lr run must hand back exactly the trunk it was given
    given = Trunk(cfg.backbone).state_dict()
    out = mil.fit_mil(cfg, d["records"], d["proposals"], d["bags"], 2, str(tmp_path / "ray"),
                      init_trunk=given)
    # local mode's checkpoint must survive the run (it is read back after fit)
    assert [h["step"] for h in out["history"]] == [1, 2, 3]
    kept = list((tmp_path / "ray" / "mil").glob("checkpoint_*"))
    assert len(kept) == 2  # older local-mode checkpoints are pruned like num_to_keep=2
    k = "layer2.0.conv1.weight"
    assert torch.equal(out["trunk"][k], given[k])
