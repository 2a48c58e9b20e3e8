"""MIL branch: WSDDN (Bilen & Vedaldi 2016) over peak bags (paper, "Proposed network
architecture", MIL branch).

Each bag B is a peak (or, in later rounds, an IS box) with the R proposals that contain it
and one class label L_B. Proposal features come from RoIAlign on the shared trunk; two
fully connected streams give x^cls, x^det in R^{C x R}; sigma_cls is a softmax over the C
classes (per proposal), sigma_det a softmax over the bag's R proposals (per class);
x^B = sigma_cls(x^cls) * sigma_det(x^det) and phi_B = sum_r x^B[:, r]. The bag loss is the
multi-class binary cross entropy of the paper's L(B) against the one-hot L_B, and
L_MIL = sum over bags. After training, each bag keeps the proposal with the highest x^B
score for its class: one box per bag (`select_boxes`).

Tensors here are laid out (R, C) (proposals x classes), the transpose of the paper's C x R.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsis_ray.branches.backbone import Trunk, load_trunk_state, normalize
from wsis_ray.branches.common import (Meter, Resumable, autocast, grad_scaler, load_rgb,
                                      resize_image, seed_everything, step_batches, sub_state,
                                      unwrap, warmup_cosine)
from wsis_ray.branches.roi_align import roi_align
from wsis_ray.config import BackboneConfig, MILConfig, TrainConfig
from wsis_ray.data.records import read_table

EPS = 1e-6

Bag = tuple[int, int, np.ndarray]  # (bag_id, class_id, proposal indices)


# ---------------------------------------------------------------------------- model

class WSDDN(nn.Module):
    """Trunk (stride 16) -> RoIAlign -> two shared FC layers -> cls and det streams."""

    def __init__(self, backbone: BackboneConfig, num_classes: int, roi_size: int = 7,
                 hidden: int = 256):
        super().__init__()
        self.trunk = Trunk(backbone, output_stride=16)
        self.roi_size = roi_size
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(self.trunk.out_channels * roi_size * roi_size, hidden),
            nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True), nn.Dropout(0.2))
        self.cls = nn.Linear(hidden, num_classes)
        self.det = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images (B,3,H,W) uint8-range; boxes[i] (R_i,4) xyxy in those pixels ->
        per image (x^cls, x^det), each (R_i, C)."""
        feats = self.trunk(normalize(images))
        rois = roi_align(feats, [b.to(feats.dtype) for b in boxes], self.roi_size,
                         spatial_scale=1.0 / self.trunk.stride, sampling_ratio=2, aligned=True)
        h = self.fc(rois)
        x_cls, x_det = self.cls(h), self.det(h)
        sizes = [len(b) for b in boxes]
        return list(zip(x_cls.split(sizes), x_det.split(sizes)))


def bag_scores(x_cls: torch.Tensor, x_det: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x^B (R,C), phi_B (C,)) for one bag's R proposals: softmax over classes times
    softmax over the bag's proposals, summed over proposals."""
    x_b = F.softmax(x_cls, dim=1) * F.softmax(x_det, dim=0)
    return x_b, x_b.sum(dim=0)


def bag_loss(phi: torch.Tensor, class_id: int) -> torch.Tensor:
    """The paper's L(B): binary cross entropy summed over the C classes against the
    one-hot bag label; phi clamped to (eps, 1-eps) (float rounding can exceed 1)."""
    target = torch.zeros_like(phi)
    target[class_id] = 1.0
    phi = phi.clamp(EPS, 1 - EPS)
    return -(target * phi.log() + (1 - target) * (1 - phi).log()).sum()


def image_loss(x_cls: torch.Tensor, x_det: torch.Tensor, bags: list[Bag]) -> torch.Tensor:
    """Sum of bag losses of one image; x_* hold the image's proposals in `bags` indexing
    (`MILImages` remaps bag indices onto the proposals it keeps)."""
    total = x_cls.new_zeros(())
    for _, class_id, idx in bags:
        idx_t = torch.as_tensor(idx, device=x_cls.device, dtype=torch.long)
        _, phi = bag_scores(x_cls[idx_t].float(), x_det[idx_t].float())
        total = total + bag_loss(phi, class_id)
    return total


# ---------------------------------------------------------------------------- data

def read_mil_inputs(proposals_uri: str, bags_uri: str) -> dict[int, dict[str, Any]]:
    """Per image_id: {"boxes": (N,4) float32, "bags": [(bag_id, class_id, indices)]} from
    the PROPOSALS_SCHEMA and BAGS_SCHEMA Parquet files; bad indices are errors."""
    props = read_table(proposals_uri).to_pylist()
    out: dict[int, dict[str, Any]] = {}
    for row in props:
        boxes = np.asarray(row["boxes"] or [], np.float32).reshape(-1, 4)
        out[int(row["image_id"])] = {"boxes": boxes, "bags": []}
    for row in read_table(bags_uri).to_pylist():
        image_id, bag_id = int(row["image_id"]), int(row["bag_id"])
        if image_id not in out:
            raise ValueError(f"{bags_uri}: bag {bag_id} of image {image_id} has no proposals "
                             f"in {proposals_uri}; recompute the bags from these proposals")
        idx = np.asarray(row["proposal_indices"] or [], np.int64)
        n = len(out[image_id]["boxes"])
        if len(idx) == 0:
            continue  # a peak no proposal contains: nothing to choose from
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{bags_uri}: bag {bag_id} of image {image_id} indexes proposal "
                             f"{int(idx.max())} but the image has {n}; the bags and proposals "
                             f"files come from different runs")
        out[image_id]["bags"].append((bag_id, int(row["class_id"]), idx))
    return out


class MILImages(torch.utils.data.Dataset):
    """Images resized to size x size with the proposals their bags use (remapped)."""

    def __init__(self, records: list[dict], inputs: dict[int, dict[str, Any]], size: int,
                 flip: bool):
        self.records = [r for r in records if inputs.get(r["image_id"], {}).get("bags")]
        self.inputs, self.size, self.flip = inputs, size, flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        inp = self.inputs[rec["image_id"]]
        image = load_rgb(rec["path"])
        h, w = image.shape[:2]
        used = np.unique(np.concatenate([idx for _, _, idx in inp["bags"]]))
        remap = {int(j): k for k, j in enumerate(used)}
        bags = [(b, c, np.array([remap[int(j)] for j in idx])) for b, c, idx in inp["bags"]]
        boxes = torch.from_numpy(scale_boxes(inp["boxes"][used], w, h, self.size))
        x = resize_image(image, self.size)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
            boxes = torch.stack([self.size - boxes[:, 2], boxes[:, 1],
                                 self.size - boxes[:, 0], boxes[:, 3]], dim=1)
        return x, boxes, bags


def scale_boxes(boxes: np.ndarray, w: int, h: int, size: int) -> np.ndarray:
    s = np.array([size / w, size / h, size / w, size / h], np.float32)
    return (boxes * s).astype(np.float32)


def collate(items):
    images, boxes, bags = zip(*items)
    return torch.stack(images), list(boxes), list(bags)


# ---------------------------------------------------------------------------- training

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train WSDDN: plain PyTorch plus wsis_ray.train.report/restore (runs on each worker).

    config: records (dicts), proposals_uri, bags_uri, num_classes, mil, backbone, train
    (dataclass dicts), init_trunk (optional Trunk state dict)."""
    import ray.train.torch
    from wsis_ray import train as rt

    mil, tc = MILConfig(**config["mil"]), TrainConfig(**config["train"])
    rank, world = rt.world()
    seed_everything(tc.seed + rank)
    dev = rt.device()
    inputs = read_mil_inputs(config["proposals_uri"], config["bags_uri"])
    data = MILImages(config["records"], inputs, mil.image_size, flip=True)
    if len(data) == 0:
        raise ValueError("MIL branch: no training image has a non-empty bag")

    model = WSDDN(BackboneConfig(**config["backbone"]), config["num_classes"], mil.roi_size,
                  mil.hidden)
    if config.get("init_trunk") is not None:
        load_trunk_state(model.trunk, config["init_trunk"])
    model = ray.train.torch.prepare_model(model)
    # The paper's optimiser is Adam (lr 1e-4, weight decay 1e-4); fused: one pass over the
    # parameters instead of ~10 kernels per tensor (MIL's CPU step 0.17 -> 0.11 s)
    opt = torch.optim.Adam(model.parameters(), lr=mil.lr, weight_decay=mil.weight_decay,
                           fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, mil.steps, min(50, mil.steps // 10 + 1)))
    scaler = grad_scaler(dev, tc.amp)
    ckpt = Resumable(model, opt, sched, scaler)
    step = ckpt.step

    model.train()
    meter = Meter()
    batches = step_batches(data, mil.batch_size, tc.seed, rank, world, step, collate)
    while step < mil.steps:
        images, boxes, bags = next(batches)
        images, boxes = images.to(dev), [b.to(dev) for b in boxes]
        with autocast(dev, tc.amp, tc.cpu_bf16):
            outs = model(images, boxes)
        loss = sum(image_loss(xc, xd, b) for (xc, xd), b in zip(outs, bags))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        meter.add({"loss": loss.item(), "bags": sum(len(b) for b in bags)}, len(images))
        rt.crash_once(config, step)
        if rt.should_checkpoint(step, mil.steps, tc.checkpoint_every):
            ckpt.report(meter, world, step, mil.steps)


def fit_mil(cfg, records, proposals_uri: str, bags_uri: str, num_classes: int,
            storage_path: str, name: str = "mil",
            init_trunk: dict[str, torch.Tensor] | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Driver side: train WSDDN under Ray Train (cfg: the full Config). `init_trunk`: the
    latest shared trunk (backbone.share_trunk); `extra`: more loop config (test hooks).
    Returns {"model": state dict, "trunk": its Trunk state (for the next branch),
    "metrics": the last report, "history": every report}."""
    from wsis_ray import train as rt
    from wsis_ray.branches.common import record_dicts
    from wsis_ray.config import to_dict

    loop_config = {
        "records": record_dicts(records), "proposals_uri": proposals_uri,
        "bags_uri": bags_uri, "num_classes": num_classes, "mil": to_dict(cfg.mil),
        "backbone": to_dict(cfg.backbone), "train": to_dict(cfg.train),
        "init_trunk": init_trunk}
    loop_config.update(extra or {})
    result = rt.fit(train_loop_per_worker, loop_config, cfg.train, name, storage_path)
    state = rt.load_result_state(result)
    return {"model": state["model"], "trunk": sub_state(state["model"], "trunk."),
            "metrics": state["history"][-1], "history": state["history"]}


# ---------------------------------------------------------------------------- selection

@torch.no_grad()
def select_boxes(model: WSDDN, images: list[np.ndarray], proposals: list[np.ndarray],
                 bags: list[list[Bag]], image_size: int) -> list[list[dict[str, Any]]]:
    """One box per bag: the bag's proposal with the highest x^B score for the bag's class.
    Returns per image a list of {bag_id, class_id, box (4,) float32 in image pixels, score}."""
    model = unwrap(model).eval()
    dev = next(model.parameters()).device
    batch = [resize_image(im, image_size) for im in images]
    # Scores of a proposal do not depend on the others (x^det's softmax runs over a bag),
    # so only the proposals some bag holds go through the RoI head: ~10x fewer than all.
    used = [np.unique(np.concatenate([np.asarray(idx, np.int64) for _, _, idx in b] + [
        np.zeros(0, np.int64)])) for b in bags]
    scaled = [torch.from_numpy(scale_boxes(p[u], im.shape[1], im.shape[0], image_size))
              for p, u, im in zip(proposals, used, images)]
    keep = [i for i, u in enumerate(used) if len(u)]
    outs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if keep:
        res = model(torch.stack([batch[i] for i in keep]).to(dev),
                    [scaled[i].to(dev) for i in keep])
        outs = dict(zip(keep, res))
    selections = []
    for i, image_bags in enumerate(bags):
        chosen = []
        for bag_id, class_id, idx in image_bags:
            if len(idx) == 0:
                continue
            x_cls, x_det = outs[i]
            idx_t = torch.as_tensor(np.searchsorted(used[i], idx), dtype=torch.long,
                                    device=x_cls.device)
            x_b, _ = bag_scores(x_cls[idx_t].float(), x_det[idx_t].float())
            best = int(x_b[:, class_id].argmax())
            chosen.append({"bag_id": int(bag_id), "class_id": int(class_id),
                           "box": proposals[i][int(idx[best])].astype(np.float32),
                           "score": float(x_b[best, class_id])})
        selections.append(chosen)
    return selections


def load_model(state: dict[str, torch.Tensor], backbone: BackboneConfig, mil: MILConfig,
               num_classes: int) -> WSDDN:
    """A trained WSDDN from `fit_mil(...)["model"]` (no pretrained weights are loaded)."""
    model = WSDDN(BackboneConfig(backbone.name, "none"), num_classes, mil.roi_size, mil.hidden)
    model.load_state_dict(state)
    return model.eval()


def select_all(model: WSDDN, records, proposals_uri: str, bags_uri: str, image_size: int,
               batch_size: int = 8) -> list[dict[str, Any]]:
    """`select_boxes` over a record list; rows {image_id, bag_id, class_id, box, score}."""
    from wsis_ray.branches.common import record_dicts

    inputs = read_mil_inputs(proposals_uri, bags_uri)
    recs = [r for r in record_dicts(records) if inputs.get(r["image_id"], {}).get("bags")]
    rows = []
    for s in range(0, len(recs), batch_size):
        chunk = recs[s:s + batch_size]
        images = [load_rgb(r["path"]) for r in chunk]
        sel = select_boxes(model, images, [inputs[r["image_id"]]["boxes"] for r in chunk],
                           [inputs[r["image_id"]]["bags"] for r in chunk], image_size)
        for r, chosen in zip(chunk, sel):
            rows.extend(dict(c, image_id=r["image_id"]) for c in chosen)
    return rows


def to_coco_box_results(rows: list[dict[str, Any]], category_ids: list[int]
                        ) -> list[dict[str, Any]]:
    """Selected boxes as COCO detection results (bbox xywh) for the pseudo-box mAP^b_0.5."""
    out = []
    for r in rows:
        x1, y1, x2, y2 = (float(v) for v in r["box"])
        out.append({"image_id": int(r["image_id"]),
                    "category_id": int(category_ids[r["class_id"]]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(r["score"])})
    return out
