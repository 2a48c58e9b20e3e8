"""Instance segmentation (IS) branch: torchvision's Mask R-CNN (He et al. 2017).

The loss is Eq. (1)'s L_IS = L_cls + L_box + L_mask (torchvision also returns the RPN's
objectness and box losses; all are summed as in torchvision's references/detection). The
mask targets are the CCGR pseudo instance masks (or ground-truth masks for the fully
supervised upper bound).

Why torchvision and not detectron2: detectron2 has no installable release for current
torch (its wheels stopped at torch 1.10, source builds need GitHub).

Architecture: ResNet + FPN backbone (`cfg.backbone`, paper: ResNet-50) built from the
project's offline-safe `backbone.resnet()`, so `pretrained: imagenet` never downloads
silently. `light_heads` (a CPU deviation from the paper) swaps the 1024-wide two-layer box
head for a 256-wide one and the 4x256-conv mask head for 2x128 convs: on CPU those heads,
not the ResNet, dominate the step time.

Inference contract (used by Serve): `load_checkpoint(uri) -> (model, meta)`,
`predict(model, images)` and `to_coco_results(...)`.
"""
from __future__ import annotations

import dataclasses
import io
import uuid
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision import models
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import misc as misc_ops

from wsis_ray.branches.backbone import resnet, trunk_to_resnet_state
from wsis_ray.config import ISConfig
from wsis_ray.data.records import encode_mask, resolve_fs

_FPN_IN = {"resnet18": 64, "resnet34": 64, "resnet50": 256}  # layer1 output channels


# ---------------------------------------------------------------------------- model

def _fpn_backbone(cfg: ISConfig, frozen_bn: bool, load_weights: bool,
                  init_trunk: dict[str, torch.Tensor] | None) -> BackboneWithFPN:
    """ResNet body + FPN, like torchvision's resnet_fpn_backbone but with our offline-safe
    weight loading, a trunk state from another branch, and a configurable FPN width."""
    if cfg.backbone not in _FPN_IN:
        raise ValueError(f"instance.backbone '{cfg.backbone}' not supported; "
                         f"choose one of {sorted(_FPN_IN)}")
    norm = misc_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    body = getattr(models, cfg.backbone)(weights=None, norm_layer=norm)
    if init_trunk is not None:
        try:
            missing, unexpected = body.load_state_dict(trunk_to_resnet_state(init_trunk),
                                                       strict=False)
        except RuntimeError as e:  # shape mismatch
            missing, unexpected = [str(e).splitlines()[0]], []
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"init_trunk does not fit a {cfg.backbone} body (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}): the shared trunk "
                             f"and instance.backbone must name the same ResNet")
    elif load_weights and cfg.pretrained not in ("", "none"):
        body.load_state_dict(resnet(cfg.backbone, cfg.pretrained).state_dict())
    # torchvision's rule: from scratch everything trains; from weights only the top stages.
    trainable = cfg.trainable_layers if frozen_bn else 5
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        train_prefixes.append("bn1")
    for name, p in body.named_parameters():
        if not any(name.startswith(t) for t in train_prefixes):
            p.requires_grad_(False)
    c1 = _FPN_IN[cfg.backbone]
    return BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                           [c1, c1 * 2, c1 * 4, c1 * 8], cfg.fpn_channels)


def build_model(cfg: ISConfig, num_classes: int, *, frozen_bn: bool | None = None,
                load_weights: bool = True,
                init_trunk: dict[str, torch.Tensor] | None = None) -> MaskRCNN:
    """Mask R-CNN for `num_classes` object classes (+1 background: label c+1 = class c).

    frozen_bn: FrozenBatchNorm2d in the ResNet (right when starting from trained weights:
    ImageNet or a shared trunk); default: frozen iff weights are loaded. From scratch the
    ResNet uses ordinary BatchNorm and all stages train (as torchvision does).
    load_weights=False skips loading ImageNet weights (checkpoint loading overwrites them).
    init_trunk: a `Trunk` state dict from a previously trained branch (trunk sharing).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    has_weights = init_trunk is not None or cfg.pretrained not in ("", "none")
    if frozen_bn is None:
        frozen_bn = has_weights
    backbone = _fpn_backbone(cfg, frozen_bn, load_weights, init_trunk)
    ch, k = cfg.fpn_channels, num_classes + 1
    heads: dict[str, nn.Module] = {}
    if cfg.light_heads:
        heads["box_head"] = TwoMLPHead(ch * 7 * 7, 256)
        heads["box_predictor"] = FastRCNNPredictor(256, k)
        heads["mask_head"] = MaskRCNNHeads(ch, [128, 128], 1)
        heads["mask_predictor"] = MaskRCNNPredictor(128, 128, k)
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
    model = getattr(model, "module", model)
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
    model = getattr(model, "module", model)
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
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def predict(model: nn.Module, images: list[np.ndarray],
            score_threshold: float = 0.05) -> list[dict[str, np.ndarray]]:
    """One batched forward over `images`; per image: boxes (N,4) float32 xyxy, class_ids
    (N,) int64 0-based, scores (N,) float32, masks (N,H,W) bool (mask probability > 0.5)."""
    model = getattr(model, "module", model)
    if not images:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    raw = model([to_tensor(im).to(device) for im in images])
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
