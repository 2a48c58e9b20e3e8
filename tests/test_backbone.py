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
