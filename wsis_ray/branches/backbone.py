"""ResNet trunk: the paper's shared convolutional layers (ResNet-50; ResNet-18 for small runs).

Weights: `pretrained: none` trains from scratch; `imagenet` loads torchvision's ImageNet
weights from the local torch cache (or downloads them where the machine is online); any
other value is a path to a torchvision ResNet state dict. Nothing here downloads unless
`imagenet` is asked for and the cache is empty.

Shared convolutional layers. In the paper the MIL, SS and IS branches sit on one set of
shared conv layers (Figure 2). Here the branches are trained one after another as separate
Ray Train runs, so sharing is sequential: with `backbone.share_trunk`, each branch starts
from the latest trunk weights the previous step trained (CAM -> MIL -> SS -> IS -> next
round's MIL ...). Every branch's driver function (`fit_mil`, `fit_ss`, `fit_instance`)
takes an optional `init_trunk` (a `Trunk` state dict) and returns its trained `trunk`; the
round driver threads it through. Weight shapes do not depend on the stride-16 dilation, so
one state dict fits the stride-16 trunk of MIL/SS and the stride-32 ResNet body of Mask
R-CNN's FPN (`trunk_to_resnet_state` renames `stem.0/1` to `conv1/bn1`). With
`share_trunk: false` every branch starts from `pretrained`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from wsis_ray.config import BackboneConfig

_WEIGHTS = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
}
_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


class WeightsUnavailable(RuntimeError):
    pass


def resnet(name: str, pretrained: str = "none") -> nn.Module:
    """A torchvision ResNet with the requested weights (see module docstring)."""
    if name not in _WEIGHTS:
        raise ValueError(f"backbone '{name}' not supported; choose one of {sorted(_WEIGHTS)}")
    net = getattr(models, name)(weights=None)
    if pretrained in ("", "none"):
        return net
    if pretrained == "imagenet":
        weights = _WEIGHTS[name]
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:  # offline and not cached
            raise WeightsUnavailable(
                f"ImageNet weights for {name} are not in the torch cache ({cache}) and could "
                f"not be downloaded ({e}). Copy {Path(weights.url).name} there, or set "
                f"backbone.pretrained to a local state-dict path, or to 'none' to train "
                f"from scratch.") from e
    else:
        p = Path(pretrained)
        if not p.is_file():
            raise WeightsUnavailable(
                f"backbone.pretrained={pretrained!r}: no such file. Give a torchvision {name} "
                f"state dict path, 'imagenet', or 'none'.")
        state = torch.load(p, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net


class Trunk(nn.Module):
    """ResNet conv1..layer4 (stride 32) with `out_channels`; `layer4_stride=1` keeps
    stride 16 for the dense branches (CAM, affinity, SS), as PSPNet/IRN do with dilation."""

    def __init__(self, cfg: BackboneConfig, dilate_last: bool = False):
        super().__init__()
        if dilate_last and cfg.name in ("resnet50",):
            net = getattr(models, cfg.name)(weights=None,
                                            replace_stride_with_dilation=[False, False, True])
            net.load_state_dict(resnet(cfg.name, cfg.pretrained).state_dict())
        else:
            net = resnet(cfg.name, cfg.pretrained)
            if dilate_last:  # BasicBlock has no dilation support: drop the stride instead
                net.layer4[0].conv1.stride = (1, 1)
                net.layer4[0].downsample[0].stride = (1, 1)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_channels = _CHANNELS[cfg.name]
        self.stride = 16 if dilate_last else 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8-range or [0,1] float NCHW RGB -> ImageNet-normalized float."""
    x = images.float()
    if x.max() > 1.5:
        x = x / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def trunk_to_resnet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `Trunk` state dict renamed to torchvision ResNet keys (stem.0 -> conv1,
    stem.1 -> bn1), e.g. to start a Mask R-CNN body from a shared trunk."""
    out = {}
    for k, v in state.items():
        if k.startswith("stem.0."):
            k = "conv1." + k[len("stem.0."):]
        elif k.startswith("stem.1."):
            k = "bn1." + k[len("stem.1."):]
        out[k] = v
    return out


def load_trunk_state(trunk: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a shared trunk state into `trunk`. BatchNorm's `num_batches_tracked` may be
    absent (a Mask R-CNN body with FrozenBatchNorm has none); every weight must fit."""
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"trunk state does not fit this trunk: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (backbone names differ?)")
