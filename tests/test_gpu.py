"""The seeds' networks on a CUDA device: every tensor they build must sit with their inputs.
Skipped without a GPU (CI); `bench/gpu.sh` runs them on a GPU machine. A CPU-built sampling
grid in `resize_maps` once stopped AffinityNet training with train.use_gpu."""
import numpy as np
import pytest
import torch

from wsis_ray import affinity, peaks
from wsis_ray.config import BackboneConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_resize_maps_on_the_gpu_matches_the_cpu():
    maps = torch.rand(2, 3, 5, 7)
    gpu = peaks.resize_maps(maps.cuda(), (40, 56))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), peaks.resize_maps(maps, (40, 56)), atol=1e-5)


def test_camnet_and_affinitynet_train_and_infer_on_the_gpu():
    cam = peaks.CAMNet(BackboneConfig(name="resnet18"), 3).cuda()
    logits, response = cam(torch.rand(2, 3, 64, 64, device="cuda") * 255)
    logits.sum().backward()
    assert response.device.type == "cuda"

    net = affinity.AffinityNet(BackboneConfig(name="resnet18")).cuda()
    x = torch.rand(2, 3, 64, 64, device="cuda") * 255
    labels = torch.randint(0, 3, (2, 8, 8), device="cuda")
    loss, _ = affinity.affinity_loss(affinity.pair_affinities(net(x), 2), labels, 2)
    loss.backward()

    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    cams = np.random.default_rng(1).random((3, 4, 4)).astype(np.float32)
    label, scores = affinity.semantic_labels(net, image, cams, [1], 64, 2, 8.0, 4, 1.0)
    _, scores_cpu = affinity.semantic_labels(net.cpu(), image, cams, [1], 64, 2, 8.0, 4, 1.0)
    assert label.shape == (48, 64) and np.allclose(scores, scores_cpu, atol=1e-3)


def test_mil_and_ss_branches_train_and_predict_on_the_gpu():
    from wsis_ray.branches import mil, semseg
    from wsis_ray.branches.common import autocast

    dev = torch.device("cuda")
    wsddn = mil.WSDDN(BackboneConfig(name="resnet18"), 3).to(dev)
    boxes = [torch.tensor([[0, 0, 32, 32], [16, 16, 64, 64], [8, 0, 40, 48]], device=dev)]
    with autocast(dev, True):
        (x_cls, x_det), = wsddn(torch.rand(1, 3, 64, 64, device=dev) * 255, boxes)
    mil.image_loss(x_cls, x_det, [(0, 1, np.array([0, 1, 2]))]).backward()
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    chosen, = mil.select_boxes(wsddn, [image], [np.array([[0, 0, 30, 30], [10, 10, 60, 40]],
                                                         np.float32)],
                               [[(0, 1, np.array([0, 1]))]], 64)
    assert len(chosen) == 1 and chosen[0]["class_id"] == 1

    psp = semseg.PSPNet(BackboneConfig(name="resnet18"), 3, [1, 2]).to(dev)
    with autocast(dev, True):
        logits = psp(torch.rand(2, 3, 64, 64, device=dev) * 255)
    logits.float().mean().backward()
    scores, = semseg.predict_scores(psp, [image], image_size=64)
    assert scores.shape == (4, 48, 64) and np.allclose(scores.sum(0), 1, atol=1e-4)
