"""The matmul RoIAlign equals torchvision's, values and input gradients, border cases
included (boxes past the image edges, degenerate boxes, empty inputs)."""
import pytest
import torch
from torchvision import ops

from wsis_ray.branches.roi_align import MultiScaleRoIAlign, roi_align


def _rois(n_images: int, k: int, size: float, gen: torch.Generator) -> torch.Tensor:
    image = torch.randint(n_images, (k, 1), generator=gen).float()
    xy = torch.rand(k, 2, generator=gen) * size * 1.2 - size * 0.1  # some start outside
    wh = torch.rand(k, 2, generator=gen) * size * 0.6
    wh[: k // 8] = 0.0  # degenerate boxes
    return torch.cat([image, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("shape,out,scale", [((3, 5, 12, 9), 7, 0.25), ((1, 4, 1, 6), 3, 1.0),
                                             ((2, 3, 20, 20), (4, 2), 1 / 16)])
def test_matches_torchvision_values_and_gradients(aligned, shape, out, scale):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _rois(shape[0], 40, max(shape[2:]) / scale, gen).double()
    grad_out = None
    results = []
    for fn in (ops.roi_align, roi_align):
        x.grad = None
        y = fn(x, rois, out, scale, 2, aligned)
        if grad_out is None:
            grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (y * grad_out).sum().backward()
        results.append((y.detach(), x.grad.clone()))
    (y_tv, g_tv), (y, g) = results
    assert y.shape == y_tv.shape
    torch.testing.assert_close(y, y_tv, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g, g_tv, rtol=1e-9, atol=1e-9)
    assert g.abs().sum() > 0  # the test exercises the gradient


def test_box_list_input_and_no_boxes():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 6.0]]), torch.zeros((0, 4))]
    torch.testing.assert_close(roi_align(x, boxes, 2, 1.0, 2), ops.roi_align(x, boxes, 2, 1.0, 2))
    empty = roi_align(x, [torch.zeros((0, 4)), torch.zeros((0, 4))], 2, 1.0, 2)
    assert empty.shape == (0, 3, 2, 2) and empty.requires_grad


def test_multiscale_pooler_matches_torchvision():
    gen = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(2, 4, 64 >> i, 48 >> i, generator=gen) for i in range(4)}
    boxes = [_rois(1, 30, 200, gen)[:, 1:].clamp(0, 190).sort(dim=1).values[:, [0, 1, 2, 3]]
             for _ in range(2)]
    boxes = [torch.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], 1)
             for b in boxes]
    shapes = [(256, 192), (240, 180)]
    ours = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, boxes, shapes)
    theirs = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, boxes, shapes)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
