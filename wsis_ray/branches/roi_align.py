"""RoIAlign (He et al. 2017) on CPU as two matrix products, for the MIL and IS branches.

torchvision's CPU `roi_align` backward is one scalar loop over rois x channels x bins x
samples that recomputes the bilinear weights for every channel: in a CPU training step of
the results config's Mask R-CNN it was 35-41% of the step (37 ms a call, eight calls a
step). Bilinear sampling on a regular grid is separable: each RoI's output is
A_y F A_x^T per channel, with A_y (bins x H) and A_x (bins x W) holding the bilinear
weights of the bin's samples averaged over the bin. Both products are BLAS calls, forward
and backward (autograd), so the backward runs ~3-10x faster on the same numbers (equal to
torchvision's within float rounding, tests/test_roi_align.py).

Same semantics as `torchvision.ops.roi_align` with a fixed `sampling_ratio` > 0: samples
outside [-1, size] count as zero, samples in [-1, 0] read the border, no gradient flows to
the boxes. On CUDA, and for the adaptive `sampling_ratio <= 0`, torchvision's kernel runs.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign as _TVMultiScaleRoIAlign
from torchvision.ops import poolers
from torchvision.ops._utils import convert_boxes_to_roi_format
from torchvision.ops import roi_align as _tv_roi_align


def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """As `torchvision.ops.roi_align`: input (B,C,H,W); boxes (K,5) [batch index, x1, y1,
    x2, y2] or a list of per-image (K_i,4) boxes -> (K,C,ph,pw)."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    if input.device.type != "cpu" or sampling_ratio <= 0:
        return _tv_roi_align(input, boxes, (ph, pw), spatial_scale, sampling_ratio, aligned)
    rois = convert_boxes_to_roi_format(boxes) if isinstance(boxes, (list, tuple)) else boxes
    n, c, h, w = input.shape
    if len(rois) == 0:  # still part of the graph, like torchvision's empty output
        return input.flatten()[:0].view(0, c, ph, pw)
    # box coordinates and weights in at least float32 (under bf16 autocast too), the
    # products in the features' dtype
    r = rois.detach().to(torch.promote_types(input.dtype, torch.float32))
    offset = 0.5 if aligned else 0.0
    x1, y1 = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    roi_w, roi_h = r[:, 3] * spatial_scale - offset - x1, r[:, 4] * spatial_scale - offset - y1
    if not aligned:  # torchvision's legacy rule: a RoI is at least one feature cell
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    a_y = axis_weights(y1, roi_h, ph, sampling_ratio, h).to(input.dtype)  # (K, ph, H)
    a_x = axis_weights(x1, roi_w, pw, sampling_ratio, w).to(input.dtype)  # (K, pw, W)
    image = r[:, 0].long()
    parts, order = [], []
    for b in range(n):
        idx = (image == b).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        k = len(idx)
        f = input[b].transpose(0, 1).reshape(h, c * w)                # (H, C*W)
        rows = (a_y[idx].reshape(k * ph, h) @ f).view(k, ph * c, w)   # (k, ph*C, W)
        out = torch.bmm(rows, a_x[idx].transpose(1, 2))               # (k, ph*C, pw)
        parts.append(out.view(k, ph, c, pw).transpose(1, 2))
        order.append(idx)
    out = torch.cat(parts)
    return out.index_select(0, torch.argsort(torch.cat(order)))


def axis_weights(start: Tensor, length: Tensor, bins: int, samples: int, size: int) -> Tensor:
    """(K, bins, size): the bilinear weights of each bin's `samples` regularly spaced
    sample points along one axis of length `size`, averaged over the bin, with
    torchvision's border rules (outside [-1, size]: zero; below 0: 0; from size-1: size-1)."""
    t = (torch.arange(bins * samples, dtype=start.dtype, device=start.device) + 0.5) / samples
    p = start[:, None] + t[None] * (length / bins)[:, None]              # (K, bins*samples)
    inside = ((p >= -1.0) & (p <= size)).to(start.dtype)
    p = p.clamp(min=0.0)
    low = p.floor().long()
    last = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(p), p - low.to(p.dtype))
    weights = torch.zeros(p.shape + (size,), dtype=p.dtype, device=p.device)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights.view(len(p), bins, samples, size).mean(2)


class MultiScaleRoIAlign(_TVMultiScaleRoIAlign):
    """torchvision's FPN RoI pooler (boxes to levels by Eq. 1 of the FPN paper) over this
    module's `roi_align`; no parameters, so Mask R-CNN checkpoints are unchanged."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [x[k] for k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = poolers._setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level)
        # in the boxes' own dtype: cast to bfloat16 features, they would sit on a ~1 px grid
        rois = convert_boxes_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1]) + tuple(self.output_size))
        for level, (f, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = roi_align(f, rois[idx], self.output_size, scale,
                                 self.sampling_ratio).to(out.dtype)
        return out
