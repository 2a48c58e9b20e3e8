"""Classification network with class response maps, and PRM peaks (Zhou et al. 2018).

`CAMNet` is a fully convolutional classifier: the backbone trunk at stride 16 (last stage
without stride, as PRM/IRN do) followed by a 1x1 class convolution that gives one response
map per class. It is trained with image-level labels only (multilabel soft-margin loss).

Pooling (`pooling="peak"`, the default) is PRM's **peak stimulation**: the class score is the
mean of the response map over its peaks (local maxima in a `window` x `window` neighbourhood
above the map's median), so gradients flow only through the peaks during training and the
network learns instance-centred maxima. `pooling="gap"` is plain global average pooling (CAM).

`find_peaks` extracts the peaks of each present class at inference, in image coordinates:
the response map is first upsampled bilinearly (PRM's sub-pixel peak locating, factor
`upsample`) so peaks are not quantised to the 16-pixel grid.

The module is pure PyTorch: `train_loop_per_worker` imports Ray Train only inside the
function (it runs under `wsis_ray.train.fit`), never at module import.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsis_ray.branches.backbone import Trunk, normalize
from wsis_ray.config import BackboneConfig


class CAMNet(nn.Module):
    def __init__(self, backbone: BackboneConfig, num_classes: int, pooling: str = "peak",
                 window: int = 3):
        super().__init__()
        if pooling not in ("peak", "gap"):
            raise ValueError(f"cam.pooling must be 'peak' or 'gap', got {pooling!r}")
        self.trunk = Trunk(backbone, output_stride=16)
        self.classifier = nn.Conv2d(self.trunk.out_channels, num_classes, 1, bias=False)
        self.pooling = pooling
        self.window = window

    def response(self, images: torch.Tensor) -> torch.Tensor:
        """Class response maps (B, C, H/16, W/16) of uint8-range or [0,1] RGB images."""
        return self.classifier(self.trunk(normalize(images)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (B, C), response maps)."""
        r = self.response(images)
        if self.pooling == "gap":
            return r.mean((2, 3)), r
        return peak_stimulation(r, self.window), r


def local_maxima(response: torch.Tensor, window: int, threshold: torch.Tensor) -> torch.Tensor:
    """Bool mask of points that are the maximum of their window x window neighbourhood and
    strictly above `threshold` (broadcast over (..., h, w))."""
    pad = window // 2
    x = response.reshape(-1, 1, *response.shape[-2:])
    pooled = F.max_pool2d(F.pad(x, (pad, pad, pad, pad), value=float("-inf")), window, stride=1)
    return (x == pooled).reshape(response.shape) & (response > threshold)


def resize_maps(maps, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of feature-aligned maps ((C, h, w) or (N, C, h, w)) to `size`.

    ResNet features with "same" padding are centred on the *first* pixel of their cell:
    cell i of a stride-s map sits at image pixel s*i (not s*i + s/2). So output pixel y
    samples the map at y * h / H (border values beyond the last cell), not at the cell
    centre convention of `F.interpolate(align_corners=False)`, which would shift every
    CAM by s/2 - 1/2 pixels (7.5 px at stride 16).
    """
    x = torch.as_tensor(np.asarray(maps) if not torch.is_tensor(maps) else maps,
                        dtype=torch.float32)
    squeeze = x.dim() == 3
    if squeeze:
        x = x[None]
    h, w = x.shape[-2:]
    out_h, out_w = size
    dev = x.device  # the grid must sit with the maps (GPU training)
    ys = torch.arange(out_h, dtype=torch.float32, device=dev) * h / out_h
    xs = torch.arange(out_w, dtype=torch.float32, device=dev) * w / out_w
    gy = (2 * ys / max(h - 1, 1) - 1).clamp(-1, 1) if h > 1 else torch.zeros(out_h, device=dev)
    gx = (2 * xs / max(w - 1, 1) - 1).clamp(-1, 1) if w > 1 else torch.zeros(out_w, device=dev)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)
    out = F.grid_sample(x, grid[None].expand(len(x), -1, -1, -1), mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out[0] if squeeze else out


def peak_stimulation(response: torch.Tensor, window: int = 3) -> torch.Tensor:
    """PRM's peak stimulation: mean response over the peaks (local maxima above the median)
    of each map; (B, C, h, w) -> (B, C). The peak locations are chosen without gradient.
    A map without a peak (constant) falls back to its mean."""
    with torch.no_grad():
        median = response.flatten(2).median(dim=2).values[..., None, None]
        mask = local_maxima(response, window, median).float()
    count = mask.sum((2, 3))
    peaked = (response * mask).sum((2, 3)) / count.clamp(min=1)
    return torch.where(count > 0, peaked, response.mean((2, 3)))


def find_peaks(response, class_ids, window: int = 3, threshold: str | float = "median",
               image_hw: tuple[int, int] | None = None, upsample: int = 1,
               min_relative: float = 0.0) -> list[tuple[int, float, float, float]]:
    """Peaks of each present class's response map, in image coordinates.

    response: (C, h, w) array/tensor; class_ids: the classes present (image-level labels);
    threshold: "median" (strictly above the map's median, PRM) or a float in response units;
    min_relative: peaks must also exceed this fraction of the map's maximum;
    image_hw: the image size the map covers (default: the map's own size);
    upsample: bilinear upsampling before locating peaks (sub-pixel peaks).
    Returns [(class_id, x, y, score)] with (x, y) in image pixels (pixel centres at i + 0.5;
    map cell i sits at image pixel i * stride, see `resize_maps`), per class in decreasing
    score order. Ties inside one window keep only the first.
    """
    r = torch.as_tensor(np.asarray(response), dtype=torch.float32)
    h, w = r.shape[-2:]
    if image_hw is None:
        image_hw = (h, w)
    # map index u -> source cell coordinate u * step; cell i sits at image pixel i * stride
    # (see resize_maps). align_corners=True: samples run node to node, no border plateaus.
    step_y = step_x = 1.0
    if upsample > 1:
        uh, uw = (h - 1) * upsample + 1, (w - 1) * upsample + 1
        r = F.interpolate(r[None], size=(uh, uw), mode="bilinear", align_corners=True)[0]
        step_y, step_x = (h - 1) / max(uh - 1, 1), (w - 1) / max(uw - 1, 1)
    sy, sx = image_hw[0] / h, image_hw[1] / w
    peaks = []
    for c in sorted({int(c) for c in class_ids}):
        m = r[c]
        t = m.median() if threshold == "median" else torch.tensor(float(threshold))
        if min_relative > 0:
            t = torch.maximum(t, min_relative * m.max())
        ys, xs = torch.nonzero(local_maxima(m, window, t), as_tuple=True)
        scores = m[ys, xs]
        kept: list[tuple[int, int]] = []
        for i in torch.argsort(scores, descending=True, stable=True).tolist():
            y, x = int(ys[i]), int(xs[i])
            if any(abs(y - ky) <= window // 2 and abs(x - kx) <= window // 2 for ky, kx in kept):
                continue  # a plateau: the same maximum seen twice
            kept.append((y, x))
            peaks.append((c, x * step_x * sx + 0.5, y * step_y * sy + 0.5, float(scores[i])))
    return peaks


def normalized_cam(response: np.ndarray, class_ids) -> np.ndarray:
    """CAM in [0, 1]: ReLU of each present class's response over its maximum; absent
    classes are zero. (C, h, w) -> (C, h, w) float32."""
    r = np.maximum(np.asarray(response, np.float32), 0)
    out = np.zeros_like(r)
    for c in set(int(c) for c in class_ids):
        m = r[c].max()
        if m > 0:
            out[c] = r[c] / m
    return out


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HxWx3 -> float (3, size, size) in [0, 255] (square resize, as in training)."""
    import cv2

    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA
                         if min(image.shape[:2]) > size else cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()


@torch.no_grad()
def predict_response(model: CAMNet, images: list[np.ndarray], size: int,
                     flip: bool = True, scales=(1.0,)) -> np.ndarray:
    """Response maps for a list of images resized to `size`, averaged with the horizontally
    flipped image and over the input `scales` (multi-scale inference, as IRN/PSA compute
    CAMs: 0.5, 1.0, 1.5, 2.0). Scale 1 uses `size` itself, the others the nearest multiple
    of 16; the maps are averaged on the grid of the largest input (one scale: the network's
    own (B, C, size/16, size/16)): larger inputs localise finer, smaller ones see whole
    objects."""
    if not len(scales) or min(scales) <= 0:
        raise ValueError(f"cam.scales must be a non-empty list of positive input scales, "
                         f"got {list(scales)}")
    model.eval()
    maps = []
    for s in sorted(scales, reverse=True):  # the largest first: its grid is the target
        side = size if s == 1 else max(16, int(round(size * s / 16)) * 16)
        x = torch.stack([resize_image(im, side) for im in images])
        r = model.response(x)
        if flip:
            r = (r + model.response(x.flip(3)).flip(3)) / 2
        grid = maps[0].shape[-2:] if maps else r.shape[-2:]
        maps.append(r if r.shape[-2:] == grid else resize_maps(r, tuple(grid)))
    return (sum(maps) / len(maps)).numpy()


def peak_recall(peaks_per_image: list[list[tuple]], gt_masks: list[np.ndarray],
                gt_classes: list[np.ndarray]) -> dict[str, float]:
    """Fraction of ground-truth instances containing at least one peak of their class, and
    peaks per instance (all peaks of present classes / all instances)."""
    hit = total = num_peaks = 0
    for peaks, masks, classes in zip(peaks_per_image, gt_masks, gt_classes):
        total += len(classes)
        num_peaks += len(peaks)
        for mask, c in zip(masks, np.asarray(classes).tolist()):
            h, w = mask.shape
            if any(p[0] == c and mask[min(int(p[2]), h - 1), min(int(p[1]), w - 1)]
                   for p in peaks):
                hit += 1
    return {"peak_recall": hit / total if total else 0.0,
            "peaks_per_instance": num_peaks / total if total else 0.0}


# -- training (runs under wsis_ray.train.fit) -----------------------------------------------

class LabelledImages(torch.utils.data.Dataset):
    """Image records (plain dicts) -> (image (3, S, S) float in [0,255], multi-hot labels)."""

    def __init__(self, records: list[dict], num_classes: int, size: int, flip: bool = True):
        self.records, self.num_classes, self.size, self.flip = records, num_classes, size, flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        x = resize_image(load_record_image(rec), self.size)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(2)
        y = torch.zeros(self.num_classes)
        y[list(rec["class_ids"])] = 1
        return x, y


def load_record_image(rec: dict) -> np.ndarray:
    from wsis_ray.data.datasets import load_image
    from wsis_ray.data.records import ImageRecord

    return load_image(ImageRecord(**{**rec, "class_ids": tuple(rec["class_ids"])}))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train CAMNet with the multilabel soft-margin loss on image-level labels.

    config: records (list of ImageRecord dicts), num_classes, backbone (BackboneConfig
    dict), cam (CAMConfig dict), seed, checkpoint_every, threads.
    """
    import ray.train.torch as rtt

    from wsis_ray import train as rt
    from wsis_ray.branches.common import step_batches, unwrap

    cam = config["cam"]
    torch.manual_seed(config.get("seed", 0))
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    model = CAMNet(BackboneConfig(**config["backbone"]), config["num_classes"],
                   cam["pooling"], cam["peak_window"])
    model = rtt.prepare_model(model)
    data = LabelledImages(config["records"], config["num_classes"], cam["image_size"])
    opt = torch.optim.Adam(model.parameters(), lr=cam["lr"], weight_decay=cam["weight_decay"],
                           fused=True)
    step = 0
    state = rt.restore()
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    every = config.get("checkpoint_every", 50)
    rank, world = rt.world()
    dev = rt.device()
    batches = step_batches(data, cam["batch_size"], config.get("seed", 0), rank, world, step)
    model.train()
    while step < cam["steps"]:
        x, y = next(batches)
        logits, _ = model(x.to(dev))
        loss = F.multilabel_soft_margin_loss(logits, y.to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        rt.crash_once(config, step)
        if step % every == 0 or step == cam["steps"]:
            rt.report({"step": step, "steps": cam["steps"], "loss": loss.item()},
                      {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                       "step": step})


# -- CAM responses on disk (Parquet, plain pyarrow) ------------------------------------------

def cams_table(image_ids: list[int], class_ids: list, responses: list[np.ndarray]):
    """Response maps (C, h, w) per image -> a pyarrow table (float16 bytes + shape)."""
    import pyarrow as pa

    return pa.table({
        "image_id": pa.array(image_ids, pa.int64()),
        "class_ids": pa.array([list(map(int, c)) for c in class_ids], pa.list_(pa.int32())),
        "shape": pa.array([list(r.shape) for r in responses], pa.list_(pa.int32(), 3)),
        "response": pa.array([np.asarray(r, np.float16).tobytes() for r in responses],
                             pa.binary()),
    })


def read_cams(uri: str, normalize: bool = False) -> dict[int, np.ndarray]:
    """image_id -> response (C, h, w) float32 (normalized CAMs of the image's classes
    when normalize=True) from a `cams_table` Parquet file."""
    from wsis_ray.data.records import read_table

    t = read_table(uri).to_pylist()
    out = {}
    for row in t:
        r = np.frombuffer(row["response"], np.float16).reshape(row["shape"]).astype(np.float32)
        out[row["image_id"]] = normalized_cam(r, row["class_ids"]) if normalize else r
    return out
