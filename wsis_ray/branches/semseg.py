"""SS branch: an FCN with a PSP pyramid pooling module (Zhao et al. 2017) on the shared
trunk at `ss.output_stride` 16 (default) or 8 (PSPNet's) (paper, "Proposed network
architecture", semantic segmentation branch).

Pyramid pooling: for each bin size (1, 2, 3, 6) adaptive average pooling -> 1x1 conv ->
bilinear upsampling back to the feature size; the levels are concatenated with the input
features, fused by a 3x3 conv, and a 1x1 conv gives C+1 score channels (0 = background,
c+1 = class c). L_SS is the cross entropy against pseudo semantic labels (uint8 maps,
255 = ignore): AffinityNet labels in round 0, the union of IS masks afterwards.

Images are resized to `image_size` x `image_size` for training and inference; score maps
are resized back to each image's own resolution.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from wsis_ray.branches.backbone import Trunk, load_trunk_state, normalize
from wsis_ray.branches.common import (Meter, Resumable, autocast, grad_scaler, load_rgb,
                                      resize_image, resize_labels, seed_everything, step_batches,
                                      sub_state, unwrap, warmup_cosine)
from wsis_ray.config import BackboneConfig, SSConfig, TrainConfig
from wsis_ray.data.records import resolve_fs

LABEL_NAME = "{image_id}.png"  # pseudo semantic label file of an image inside labels_dir


# ---------------------------------------------------------------------------- model

class PyramidPooling(nn.Module):
    """PSP module: pooled levels (1x1 conv + ReLU; no BatchNorm, whose 1x1 bin cannot be
    normalized at batch size 1, the paper's setting) upsampled and concatenated with the
    input, then a 3x3 conv with BatchNorm."""

    def __init__(self, in_channels: int, bins: list[int], out_channels: int = 256):
        super().__init__()
        level = in_channels // len(bins)
        self.bins = list(bins)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, level, 1),
                          nn.ReLU(inplace=True)) for b in self.bins)
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels + level * len(self.bins), out_channels, 3, padding=1,
                      bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.Dropout2d(0.1))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(level(x), size=size, mode="bilinear", align_corners=False)
                  for level in self.levels]
        return self.fuse(torch.cat([x] + pooled, dim=1))


class PSPNet(nn.Module):
    def __init__(self, backbone: BackboneConfig, num_classes: int, bins: list[int],
                 output_stride: int = 16):
        super().__init__()
        self.trunk = Trunk(backbone, output_stride=output_stride)
        self.ppm = PyramidPooling(self.trunk.out_channels, bins)
        self.classifier = nn.Conv2d(self.ppm.out_channels, num_classes + 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) uint8-range -> logits (B, C+1, H, W)."""
        logits = self.classifier(self.ppm(self.trunk(normalize(images))))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                             align_corners=False)


def load_model(state: dict[str, torch.Tensor], backbone: BackboneConfig, ss: SSConfig,
               num_classes: int) -> PSPNet:
    """A trained PSPNet from `fit_ss(...)["model"]` (no pretrained weights are loaded)."""
    model = PSPNet(BackboneConfig(backbone.name, "none"), num_classes, ss.bins,
                   ss.output_stride)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def predict_scores(model: PSPNet, images: list[np.ndarray], image_size: int = 160,
                   batch_size: int = 8) -> list[np.ndarray]:
    """Softmax score maps (C+1, H, W) float32 at each image's own resolution (channel 0 =
    background), in batches of `batch_size` at `image_size` x `image_size`."""
    model = unwrap(model).eval()
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        x = torch.stack([resize_image(im, image_size) for im in chunk]).to(dev)
        logits = model(x).float()
        for im, lg in zip(chunk, logits):
            lg = F.interpolate(lg[None], size=im.shape[:2], mode="bilinear",
                               align_corners=False)[0]
            out.append(F.softmax(lg, dim=0).cpu().numpy())
    return out


# ---------------------------------------------------------------------------- metrics

def confusion(pred: np.ndarray, gt: np.ndarray, n: int, ignore: int = 255) -> np.ndarray:
    valid = gt != ignore
    return np.bincount(n * gt[valid].astype(np.int64) + pred[valid].astype(np.int64),
                       minlength=n * n).reshape(n, n)


def miou(pred_labels: list[np.ndarray], gt: list[np.ndarray], num_labels: int,
         ignore: int = 255) -> dict[str, Any]:
    """Mean IoU over the `num_labels` labels (background included) that occur in the
    ground truth or the predictions, accumulated over all images; 255 in gt is ignored."""
    conf = np.zeros((num_labels, num_labels), np.int64)
    for p, g in zip(pred_labels, gt):
        if p.shape != g.shape:
            raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in size")
        conf += confusion(p, g, num_labels, ignore)
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)) if present.any() else 0.0,
            "iou": [None if np.isnan(v) else float(v) for v in iou]}


def semantic_gt(gt) -> np.ndarray:
    """uint8 label map from an InstanceGT (masks, class_ids, iscrowd, void): 0 = bg,
    c+1 = class c, 255 = void or crowd."""
    h, w = gt.masks.shape[1:] if gt.masks.ndim == 3 else gt.void.shape
    out = np.zeros((h, w), np.uint8)
    for m, c, crowd in zip(gt.masks, gt.class_ids, gt.iscrowd):
        out[m] = 255 if crowd else int(c) + 1
    if gt.void is not None:
        out[gt.void] = 255
    return out


# ---------------------------------------------------------------------------- data

def read_label(labels_dir: str, image_id: int, height: int, width: int) -> np.ndarray:
    """The pseudo semantic label PNG of an image (local dir or any pyarrow fs URI)."""
    uri = labels_dir.rstrip("/") + "/" + LABEL_NAME.format(image_id=image_id)
    fs, path = resolve_fs(uri)
    try:
        with fs.open_input_stream(path) as f:
            labels = np.asarray(Image.open(io.BytesIO(f.read())))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"pseudo semantic label {uri} of image {image_id} is missing; "
                                f"rerun the step that writes {labels_dir}") from e
    if labels.shape != (height, width):
        raise ValueError(f"pseudo semantic label {uri} is {labels.shape}, but image "
                         f"{image_id} is {(height, width)}")
    return labels


class SSImages(torch.utils.data.Dataset):
    def __init__(self, records: list[dict], labels_dir: str, size: int, flip: bool):
        self.records, self.labels_dir, self.size, self.flip = records, labels_dir, size, flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        image = load_rgb(rec["path"])
        labels = read_label(self.labels_dir, rec["image_id"], *image.shape[:2])
        x, y = resize_image(image, self.size), resize_labels(labels, self.size)
        if self.flip and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


# ---------------------------------------------------------------------------- training

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train the PSPNet: plain PyTorch plus wsis_ray.train.report/restore.

    config: records (dicts), labels_dir, num_classes, ss, backbone, train (dataclass
    dicts), init_trunk (optional Trunk state dict)."""
    import ray.train.torch
    from wsis_ray import train as rt

    ss, tc = SSConfig(**config["ss"]), TrainConfig(**config["train"])
    rank, world = rt.world()
    seed_everything(tc.seed + rank)
    dev = rt.device()
    data = SSImages(config["records"], config["labels_dir"], ss.image_size, flip=True)

    model = PSPNet(BackboneConfig(**config["backbone"]), config["num_classes"], ss.bins,
                   ss.output_stride)
    if config.get("init_trunk") is not None:
        load_trunk_state(model.trunk, config["init_trunk"])
    model = ray.train.torch.prepare_model(model)
    # The paper's optimiser is Adam (lr 1e-4, weight decay 1e-4); fused: one pass over the
    # parameters instead of ~10 kernels per tensor (MIL's CPU step 0.17 -> 0.11 s)
    opt = torch.optim.Adam(model.parameters(), lr=ss.lr, weight_decay=ss.weight_decay,
                           fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, ss.steps, min(50, ss.steps // 10 + 1)))
    scaler = grad_scaler(dev, tc.amp)
    ckpt = Resumable(model, opt, sched, scaler)
    step = ckpt.step

    model.train()
    meter = Meter()
    batches = step_batches(data, ss.batch_size, tc.seed, rank, world, step)
    while step < ss.steps:
        images, labels = next(batches)
        images, labels = images.to(dev), labels.to(dev)
        with autocast(dev, tc.amp, tc.cpu_bf16):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=ss.ignore_index)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        meter.add({"loss": loss.item()}, len(images))
        rt.crash_once(config, step)
        if rt.should_checkpoint(step, ss.steps, tc.checkpoint_every):
            ckpt.report(meter, world, step, ss.steps)


def fit_ss(cfg, records, labels_dir: str, num_classes: int, storage_path: str,
           name: str = "ss", init_trunk: dict[str, torch.Tensor] | None = None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Driver side: train the SS branch under Ray Train on the pseudo semantic labels in
    `labels_dir` (LABEL_NAME per image). Returns {"model", "trunk", "metrics", "history"}."""
    from wsis_ray import train as rt
    from wsis_ray.branches.common import record_dicts
    from wsis_ray.config import to_dict

    loop_config = {
        "records": record_dicts(records), "labels_dir": labels_dir,
        "num_classes": num_classes, "ss": to_dict(cfg.ss), "backbone": to_dict(cfg.backbone),
        "train": to_dict(cfg.train), "init_trunk": init_trunk}
    loop_config.update(extra or {})
    result = rt.fit(train_loop_per_worker, loop_config, cfg.train, name, storage_path)
    state = rt.load_result_state(result)
    return {"model": state["model"], "trunk": sub_state(state["model"], "trunk."),
            "metrics": state["history"][-1], "history": state["history"]}
