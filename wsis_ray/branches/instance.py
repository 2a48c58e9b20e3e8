"""Instance segmentation (IS) branch: torchvision's Mask R-CNN (He et al. 2017).

The loss is Eq. (1)'s L_IS = L_cls + L_box + L_mask (torchvision also returns the RPN's
objectness and box losses; all are summed as in torchvision's references/detection). The
mask targets are the CCGR pseudo instance masks (or ground-truth masks for the fully
supervised upper bound).

Why torchvision and not detectron2: detectron2 has no installable release for current
torch (its wheels stopped at torch 1.10, source builds need GitHub).

Architecture: ResNet (paper: ResNet-50) or EfficientNet-Lite0 + FPN backbone
(`cfg.backbone`) built from the project's offline-safe `backbone.body()`, so
`pretrained: imagenet` never downloads silently. `light_heads` (a CPU deviation from the paper) swaps the 1024-wide two-layer box
head for a 256-wide one and the 4x256-conv mask head for 2x128 convs: on CPU those heads,
not the ResNet, dominate the step time.

Inference contract (used by Serve): `load_checkpoint(uri) -> (model, meta)`,
`predict(model, images)` and `to_coco_results(...)`.
"""
from __future__ import annotations

import dataclasses
import io
import threading
import uuid
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (FastRCNNPredictor, TwoMLPHead,
                                                      _default_anchorgen)
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import misc as misc_ops

from wsis_ray.branches.backbone import STAGE_CHANNELS, freeze_batchnorm, trunk_to_resnet_state
from wsis_ray.branches.backbone import body as backbone_body
from wsis_ray.branches.common import unwrap
from wsis_ray.branches.roi_align import MultiScaleRoIAlign
from wsis_ray.config import ISConfig
from wsis_ray.data.records import encode_mask, resolve_fs


# ---------------------------------------------------------------------------- model

class Float32RPNHead(RPNHead):
    """torchvision's RPN head (same parameters) whose objectness and box deltas leave in
    float32. torchvision decodes the anchors in the deltas' dtype; under bfloat16 autocast
    (train.cpu_bf16) that put the proposals on a ~1 px grid at 128-256 px, boxes collapsed
    to zero height, and their box-regression targets, log(0 / 0), were NaN (the results
    config's "no Det." IS training, step 14)."""

    def forward(self, x: list[torch.Tensor]):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


def _fpn_backbone(cfg: ISConfig, frozen_bn: bool, load_weights: bool,
                  init_trunk: dict[str, torch.Tensor] | None) -> BackboneWithFPN:
    """Backbone body + FPN, like torchvision's resnet_fpn_backbone but with our offline-safe
    weight loading, a trunk state from another branch, and a configurable FPN width."""
    if cfg.backbone not in STAGE_CHANNELS:
        raise ValueError(f"instance.backbone '{cfg.backbone}' not supported; "
                         f"choose one of {sorted(STAGE_CHANNELS)}")
    weights = cfg.pretrained if load_weights and init_trunk is None else "none"
    net = backbone_body(cfg.backbone, weights)
    if init_trunk is not None:
        try:
            missing, unexpected = net.load_state_dict(trunk_to_resnet_state(init_trunk),
                                                      strict=False)
        except RuntimeError as e:  # shape mismatch
            missing, unexpected = [str(e).splitlines()[0]], []
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"init_trunk does not fit a {cfg.backbone} body (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}): the shared trunk "
                             f"and instance.backbone must name the same network")
    if frozen_bn:  # after loading, so the frozen layers hold the loaded statistics
        freeze_batchnorm(net)
    # torchvision's rule: from scratch everything trains; from weights only the top stages.
    trainable = cfg.trainable_layers if frozen_bn else 5
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        train_prefixes.append("bn1")
    for name, p in net.named_parameters():
        if not any(name.startswith(t) for t in train_prefixes):
            p.requires_grad_(False)
    # EfficientNet's stages end in a linear projection: with ImageNet weights their outputs
    # are ~10x ResNet's post-ReLU ones (std 6-8 vs 0.4-0.8 on the demo), which gives the
    # fresh FPN and heads huge logits in the first steps. BatchNorm in the FPN (as in
    # torchvision's Mask R-CNN v2) puts every level on one scale.
    fpn_norm = None if cfg.backbone.startswith("resnet") else nn.BatchNorm2d
    return BackboneWithFPN(net, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                           list(STAGE_CHANNELS[cfg.backbone]), cfg.fpn_channels,
                           norm_layer=fpn_norm)


def build_model(cfg: ISConfig, num_classes: int, *, frozen_bn: bool | None = None,
                load_weights: bool = True,
                init_trunk: dict[str, torch.Tensor] | None = None) -> MaskRCNN:
    """Mask R-CNN for `num_classes` object classes (+1 background: label c+1 = class c).

    frozen_bn: FrozenBatchNorm2d in the ResNet, right for ImageNet statistics at small
    batch sizes; default: frozen iff `cfg.pretrained` names weights. From scratch, and from
    a shared trunk whose BatchNorm statistics come from our own short runs, the ResNet uses
    ordinary BatchNorm and all stages train (as torchvision does without weights).
    load_weights=False skips loading ImageNet weights (checkpoint loading overwrites them).
    init_trunk: a `Trunk` state dict from a previously trained branch (trunk sharing).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if frozen_bn is None:
        frozen_bn = cfg.pretrained not in ("", "none")
    backbone = _fpn_backbone(cfg, frozen_bn, load_weights, init_trunk)
    ch, k = cfg.fpn_channels, num_classes + 1
    # torchvision's poolers (FPN levels "0"-"3", 7x7 box and 14x14 mask RoIs, 2x2 samples
    # per bin) over the matmul RoIAlign: its CPU backward is 3-10x torchvision's
    heads: dict[str, nn.Module] = {
        "box_roi_pool": MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        "mask_roi_pool": MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)}
    if cfg.light_heads:
        heads["box_head"] = TwoMLPHead(ch * 7 * 7, 256)
        heads["box_predictor"] = FastRCNNPredictor(256, k)
        heads["mask_head"] = MaskRCNNHeads(ch, [128, 128], 1)
        heads["mask_predictor"] = MaskRCNNPredictor(128, 128, k)
    anchors = _default_anchorgen()
    heads["rpn_anchor_generator"] = anchors
    heads["rpn_head"] = Float32RPNHead(ch, anchors.num_anchors_per_location()[0])
    return MaskRCNN(
        backbone, num_classes=None if cfg.light_heads else k,
        min_size=cfg.min_size, max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.score_threshold,
        box_detections_per_img=cfg.detections_per_img,
        **heads)


def trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ResNet body of a Mask R-CNN as a `Trunk` state dict (for the next branch)."""
    model = unwrap(model)
    out = {}
    for k, v in model.backbone.body.state_dict().items():
        k = k.replace("conv1.", "stem.0.", 1) if k.startswith("conv1.") else k
        k = k.replace("bn1.", "stem.1.", 1) if k.startswith("bn1.") else k
        out[k] = v.detach().cpu().clone()
    return out


# ---------------------------------------------------------------------------- checkpoints

def _is_frozen(model: nn.Module) -> bool:
    return any(isinstance(m, misc_ops.FrozenBatchNorm2d) for m in model.modules())


def save_checkpoint(uri: str, model: nn.Module, meta: dict[str, Any]) -> None:
    """One file with the weights and `meta` (plain types only): at least `classes` and
    `config` (the ISConfig as a dict); usually also `category_ids`, run/round/metrics.
    Written under a temporary name and renamed, so a reader never sees half a file."""
    model = unwrap(model)
    for key in ("classes", "config"):
        if key not in meta:
            raise ValueError(f"save_checkpoint({uri}): meta needs '{key}'")
    meta = dict(meta, frozen_bn=_is_frozen(model))
    if dataclasses.is_dataclass(meta["config"]):
        meta["config"] = dataclasses.asdict(meta["config"])
    buf = io.BytesIO()
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "meta": meta}, buf)
    fs, path = resolve_fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    with fs.open_output_stream(tmp) as out:
        out.write(buf.getvalue())
    fs.move(tmp, path)


def config_from_dict(d: dict[str, Any]) -> ISConfig:
    """ISConfig from a checkpoint's dict, ignoring fields this version does not know."""
    names = {f.name for f in dataclasses.fields(ISConfig)}
    return ISConfig(**{k: v for k, v in d.items() if k in names})


def load_checkpoint(uri: str, device: str | torch.device = "cpu") -> tuple[MaskRCNN, dict]:
    """(model in eval mode, meta) from a file written by `save_checkpoint`."""
    fs, path = resolve_fs(uri)
    try:
        with fs.open_input_stream(path) as f:
            blob = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"IS checkpoint {uri} not found: train the IS branch first "
                                f"or give the path of a file written by save_checkpoint") from e
    ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise ValueError(f"{uri} is not an IS checkpoint (no state_dict/meta)")
    meta = ckpt["meta"]
    model = build_model(config_from_dict(meta["config"]), len(meta["classes"]),
                        frozen_bn=meta.get("frozen_bn", False), load_weights=False)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), meta


# ---------------------------------------------------------------------------- inference

def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float CHW in [0, 1] (Mask R-CNN normalizes internally)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} "
                         f"{image.shape}")
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0


# predict() raises the model's box score floor for one forward: one forward at a time
_FLOOR_LOCK = threading.Lock()


@torch.no_grad()
def predict(model: nn.Module, images: list[np.ndarray],
            score_threshold: float = 0.05) -> list[dict[str, np.ndarray]]:
    """One batched forward over `images`; per image: boxes (N,4) float32 xyxy, class_ids
    (N,) int64 0-based, scores (N,) float32, masks (N,H,W) bool (mask probability > 0.5).

    A `score_threshold` above the model's own box score floor (`roi_heads.score_thresh`)
    becomes the floor for this forward, so masks are predicted and pasted only for the boxes
    returned. Same boxes as filtering afterwards: torchvision drops boxes under the floor
    before NMS and top-k, and NMS suppresses a box only by a higher-scoring one."""
    model = unwrap(model)
    if not images:
        return []
    heads = model.roi_heads
    with _FLOOR_LOCK:
        was_training, floor = model.training, heads.score_thresh
        # torchvision keeps scores > floor; we keep scores >= score_threshold
        heads.score_thresh = max(floor, float(np.nextafter(np.float32(score_threshold),
                                                           np.float32(-1))))
        model.eval()
        device = next(model.parameters()).device
        try:
            raw = model([to_tensor(im).to(device) for im in images])
        finally:
            heads.score_thresh = floor
            model.train(was_training)
    outputs = []
    for im, r in zip(images, raw):
        keep = r["scores"] >= score_threshold
        masks = r["masks"][keep]
        outputs.append({
            "boxes": r["boxes"][keep].float().cpu().numpy().astype(np.float32),
            "class_ids": (r["labels"][keep] - 1).cpu().numpy().astype(np.int64),
            "scores": r["scores"][keep].float().cpu().numpy().astype(np.float32),
            "masks": (masks[:, 0] > 0.5).cpu().numpy() if len(masks)
            else np.zeros((0,) + im.shape[:2], bool),
        })
    return outputs


def to_coco_results(image_ids: list[int], outputs: list[dict[str, np.ndarray]],
                    category_ids: list[int]) -> list[dict[str, Any]]:
    """COCO results JSON entries (segmentation as compressed RLE, bbox as xywh)."""
    if len(image_ids) != len(outputs):
        raise ValueError(f"{len(image_ids)} image ids for {len(outputs)} outputs")
    results = []
    for image_id, out in zip(image_ids, outputs):
        h, w = out["masks"].shape[1:] if out["masks"].ndim == 3 else (0, 0)
        for box, c, s, m in zip(out["boxes"], out["class_ids"], out["scores"], out["masks"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({
                "image_id": int(image_id),
                "category_id": int(category_ids[int(c)]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(s),
                "segmentation": {"size": [int(h), int(w)], "counts": encode_mask(m)},
            })
    return results


# ---------------------------------------------------------------------------- data

def read_instance_labels(uri: str) -> dict[int, list[dict[str, Any]]]:
    """PSEUDO_LABEL_SCHEMA rows grouped by image_id (pseudo labels, or ground truth written
    by `gt_table`)."""
    from wsis_ray.data.records import read_table

    out: dict[int, list[dict[str, Any]]] = {}
    for row in read_table(uri).to_pylist():
        out.setdefault(int(row["image_id"]), []).append(row)
    return out


def gt_table(gt: dict[int, Any]):
    """Ground-truth instances (`InstanceGT`: masks, class_ids, iscrowd) as a
    PSEUDO_LABEL_SCHEMA table, so the fully supervised upper bound trains through the same
    reader as the pseudo labels. Crowd regions are left out."""
    import pyarrow as pa

    from wsis_ray.data.records import PSEUDO_LABEL_SCHEMA

    rows = []
    for image_id, g in gt.items():
        for m, c, crowd in zip(g.masks, g.class_ids, g.iscrowd):
            if crowd or not m.any():
                continue
            box = mask_box(m).tolist()
            rows.append({"image_id": int(image_id), "class_id": int(c), "box_before": box,
                         "box_after": box, "score": 1.0, "rle_counts": encode_mask(m),
                         "height": m.shape[0], "width": m.shape[1], "round": 0,
                         "ccgr_loss": 0.0, "ccgr_iterations": 0, "stop_reason": "ground_truth"})
    return pa.Table.from_pylist(rows, PSEUDO_LABEL_SCHEMA)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight [x1, y1, x2, y2] of a non-empty mask (continuous coordinates)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


class ISImages(torch.utils.data.Dataset):
    """Images with Mask R-CNN targets (boxes from the masks, labels c+1, masks)."""

    def __init__(self, records: list[dict], labels: dict[int, list[dict]], flip: bool):
        self.records = [r for r in records if labels.get(r["image_id"])]
        self.labels, self.flip = labels, flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from wsis_ray.branches.common import load_rgb
        from wsis_ray.data.records import decode_mask

        rec = self.records[i]
        image = load_rgb(rec["path"])
        h, w = image.shape[:2]
        masks, boxes, classes = [], [], []
        for row in self.labels[rec["image_id"]]:
            if (row["height"], row["width"]) != (h, w):
                raise ValueError(f"instance label of image {rec['image_id']} is "
                                 f"{row['height']}x{row['width']} but {rec['path']} is {h}x{w}")
            m = decode_mask(row["rle_counts"], h, w)
            box = mask_box(m) if m.any() else np.asarray(row["box_after"], np.float32)
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue  # degenerate: nothing to learn from
            masks.append(m)
            boxes.append(box)
            classes.append(int(row["class_id"]) + 1)
        x = to_tensor(image)
        masks_t = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), bool))
        boxes_t = torch.from_numpy(np.stack(boxes) if boxes else np.zeros((0, 4), np.float32))
        if self.flip and torch.rand(()) < 0.5:
            x, masks_t = x.flip(-1), masks_t.flip(-1)
            boxes_t = torch.stack([w - boxes_t[:, 2], boxes_t[:, 1], w - boxes_t[:, 0],
                                   boxes_t[:, 3]], dim=1)
        return x, {"boxes": boxes_t, "labels": torch.tensor(classes, dtype=torch.int64),
                   "masks": masks_t.to(torch.uint8)}


def collate(items):
    return tuple(zip(*items))


# ---------------------------------------------------------------------------- training

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train Mask R-CNN like torchvision's references (train_one_epoch): the loss dict
    summed (Eq. 1), SGD with momentum and linear warm-up. SGD rather than the paper's Adam:
    torchvision's Mask R-CNN recipe and its lr 0.02 x batch/16 scale are tuned for SGD, and
    Adam at the paper's lr 1e-2 diverges from scratch.

    config: records (dicts), labels_uri, num_classes, instance, train (dataclass dicts),
    init_trunk (optional Trunk state dict)."""
    import ray.train.torch
    from wsis_ray import train as rt
    from wsis_ray.branches.common import (Meter, Resumable, autocast, grad_scaler,
                                          seed_everything, step_batches, warmup_cosine)
    from wsis_ray.config import TrainConfig

    cfg, tc = config_from_dict(config["instance"]), TrainConfig(**config["train"])
    rank, world = rt.world()
    seed_everything(tc.seed + rank)
    dev = rt.device()
    data = ISImages(config["records"], read_instance_labels(config["labels_uri"]), flip=True)
    if len(data) == 0:
        raise ValueError(f"IS branch: no training image has an instance label in "
                         f"{config['labels_uri']}")

    model = build_model(cfg, config["num_classes"], init_trunk=config.get("init_trunk"))
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.steps, min(100, cfg.steps // 10 + 1)))
    scaler = grad_scaler(dev, tc.amp)
    ckpt = Resumable(model, opt, sched, scaler)
    step = ckpt.step
    ema = weight_average(unwrap(model), cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and "ema" in ckpt.restored:
        ema.load_state_dict(ckpt.restored["ema"])

    model.train()
    meter = Meter()
    batches = step_batches(data, cfg.batch_size, tc.seed, rank, world, step, collate)
    while step < cfg.steps:
        images, targets = next(batches)
        images = [im.to(dev) for im in images]
        targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
        with autocast(dev, tc.amp, tc.cpu_bf16):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"IS loss is {loss.item()} at step {step} "
                                     f"({ {k: v.item() for k, v in loss_dict.items()} }); "
                                     f"lower instance.lr")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        # From scratch (no ImageNet weights offline) early steps can blow up; clipping
        # keeps the short CPU schedules stable.
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        step += 1
        meter.add(dict({k: v.item() for k, v in loss_dict.items()}, loss=loss.item()),
                  len(images))
        rt.crash_once(config, step)
        if rt.should_checkpoint(step, cfg.steps, tc.checkpoint_every):
            extra = {"ema": ema.state_dict()} if ema is not None else {}
            ckpt.report(meter, world, step, cfg.steps, frozen_bn=_is_frozen(unwrap(model)),
                        **extra)


def weight_average(model: nn.Module, decay: float):
    """An exponential moving average of `model`'s parameters and buffers (torch's
    AveragedModel). The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates,
    so the freshly initialised heads of the first steps fade out fast."""
    from torch.optim.swa_utils import AveragedModel

    def ema(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1.0 + n) / (10.0 + n), max=decay).to(torch.float32)
        return avg + (new - avg) * (1.0 - d)  # integer buffers (BN counters) truncate

    return AveragedModel(model, avg_fn=ema, use_buffers=True)


def final_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict a finished run ends with: its weight average when it kept one."""
    if "ema" not in state:
        return state["model"]
    return {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}


def fit_instance(cfg, records, labels_uri: str, classes: list[str], storage_path: str,
                 name: str = "is", init_trunk: dict[str, torch.Tensor] | None = None,
                 checkpoint_uri: str | None = None, meta: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Driver side: train the IS branch under Ray Train on the PSEUDO_LABEL_SCHEMA file
    `labels_uri` (pseudo labels, or `gt_table(...)` for the fully supervised upper bound).
    With `checkpoint_uri`, also writes the Serve checkpoint (meta: category_ids, round...).
    Returns {"model", "frozen_bn", "trunk", "metrics", "history"}."""
    from wsis_ray import train as rt
    from wsis_ray.branches.common import record_dicts
    from wsis_ray.config import to_dict

    loop_config = {
        "records": record_dicts(records), "labels_uri": labels_uri,
        "num_classes": len(classes), "instance": to_dict(cfg.instance),
        "train": to_dict(cfg.train), "init_trunk": init_trunk}
    loop_config.update(extra or {})
    result = rt.fit(train_loop_per_worker, loop_config, cfg.train, name, storage_path)
    state = rt.load_result_state(result)
    out = {"model": final_weights(state), "frozen_bn": state["frozen_bn"],
           "metrics": state["history"][-1], "history": state["history"]}
    model = build_model(cfg.instance, len(classes), frozen_bn=state["frozen_bn"],
                        load_weights=False)
    model.load_state_dict(out["model"])
    out["trunk"] = trunk_state(model)
    if checkpoint_uri:
        save_checkpoint(checkpoint_uri, model, dict(meta or {}, classes=list(classes),
                                                    config=to_dict(cfg.instance),
                                                    metrics=out["metrics"]))
    return out
