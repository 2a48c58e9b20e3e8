"""AffinityNet (Ahn & Kwak, CVPR 2018): round-0 pseudo semantic labels from CAMs.

The paper (Sec. "Iterative optimization and its initialization") takes its first-round
class-level pseudo labels from this method. Steps:

1. Affinity labels from CAMs: pixels whose normalized CAM reaches `fg_threshold` are
   confident foreground of the argmax class, pixels whose CAMs all stay below
   `bg_threshold` are confident background, the rest is ignored (255).
2. `AffinityNet` maps an image to embeddings f at stride 8 (features of three trunk stages,
   as the paper does). The affinity of two pixels within `radius` is
   a_ij = exp(-||f_i - f_j||_1 / D). Pairs of confident pixels with the same label are
   positives (foreground or background), with different labels negatives; the loss is
   the paper's balanced cross-entropy  L = L_bg+/4 + L_fg+/4 + L-/2  (each term a mean).
3. Random walk: the transition matrix T = D^-1 A^beta (A the sparse affinity matrix with
   self-loops, A^beta elementwise) is applied `iterations` times (T^t) to the CAMs plus a
   background channel (1 - max_c CAM_c)^bg_power (the paper's background score).
4. Upsampled to image size, argmax over background and the image's classes gives the label
   map (uint8: 0 background, c+1 class c, 255 ignore where the top two scores are closer
   than `ignore_margin`, 0 = never).

Pure PyTorch; `train_loop_per_worker` imports Ray Train only inside the function.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsis_ray.branches.backbone import Trunk, normalize
from wsis_ray.config import BackboneConfig
from wsis_ray.peaks import resize_maps

IGNORE = 255


class AffinityNet(nn.Module):
    """Trunk stages 2-4 -> 1x1 convs -> concatenated at stride 8 -> 1x1 conv embedding."""

    def __init__(self, backbone: BackboneConfig, dim: int = 448):
        super().__init__()
        self.trunk = Trunk(backbone, output_stride=16)
        _, c2, c3, c4 = self.trunk.stage_channels
        self.reduce = nn.ModuleList([nn.Conv2d(c, d, 1, bias=False)
                                     for c, d in ((c2, 64), (c3, 128), (c4, 256))])
        self.norms = nn.ModuleList([nn.GroupNorm(4, d) for d in (64, 128, 256)])
        self.embed = nn.Conv2d(448, dim, 1, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, dim, ceil(H/8), ceil(W/8))."""
        t = self.trunk
        x2 = t.layer2(t.layer1(t.stem(normalize(images))))
        x3 = t.layer3(x2)
        x4 = t.layer4(x3)
        size = x2.shape[-2:]
        feats = []
        for x, conv, norm in zip((x2, x3, x4), self.reduce, self.norms):
            f = F.elu(norm(conv(x)))
            feats.append(resize_maps(f, tuple(size)) if f.shape[-2:] != size else f)
        return F.elu(self.embed(torch.cat(feats, 1)))


@functools.lru_cache(maxsize=8)
def pair_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """(dy, dx) of every pixel pair within `radius` (Euclidean, < radius), one direction
    per pair (a half plane), self excluded."""
    out = [(0, dx) for dx in range(1, radius)]
    out += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
            if dy * dy + dx * dx < radius * radius]
    return tuple(out)


def _crops(h: int, w: int, dy: int, dx: int):
    """Slices (source, target) selecting pixels (y, x) and (y+dy, x+dx), both inside."""
    ys, yt = slice(0, h - dy), slice(dy, h)
    xs = slice(max(0, -dx), w - max(0, dx))
    xt = slice(max(0, dx), w + min(0, dx))
    return (ys, xs), (yt, xt)


def pair_affinities(feats: torch.Tensor, radius: int) -> list[torch.Tensor]:
    """a_ij = exp(-mean_d |f_i - f_j|) for every offset: list of (B, h', w') tensors."""
    h, w = feats.shape[-2:]
    out = []
    for dy, dx in pair_offsets(radius):
        (ys, xs), (yt, xt) = _crops(h, w, dy, dx)
        diff = (feats[..., ys, xs] - feats[..., yt, xt]).abs().mean(1)
        out.append(torch.exp(-diff))
    return out


def affinity_labels(cam: np.ndarray, class_ids, fg_threshold: float, bg_threshold: float
                    ) -> np.ndarray:
    """Confident regions of normalized CAMs (C, h, w): uint8 (h, w), 0 background,
    c+1 class c, 255 ignored (step 1 of the module docstring)."""
    present = sorted({int(c) for c in class_ids})
    h, w = cam.shape[-2:]
    label = np.full((h, w), IGNORE, np.uint8)
    if not present:
        label[:] = 0
        return label
    sub = cam[present]
    top = sub.max(0)
    arg = np.asarray(present)[sub.argmax(0)]
    label[top < bg_threshold] = 0
    fg = top >= fg_threshold
    label[fg] = arg[fg] + 1
    return label


def affinity_loss(affs: list[torch.Tensor], labels: torch.Tensor, radius: int
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's balanced loss over pairs: L_bg+/4 + L_fg+/4 + L-/2.

    labels: (B, h, w) long with 0 background, >0 classes, 255 ignore.
    """
    h, w = labels.shape[-2:]
    sums = {"bg": 0.0, "fg": 0.0, "neg": 0.0}
    counts = {"bg": 0, "fg": 0, "neg": 0}
    for a, (dy, dx) in zip(affs, pair_offsets(radius)):
        (ys, xs), (yt, xt) = _crops(h, w, dy, dx)
        ls, lt = labels[..., ys, xs], labels[..., yt, xt]
        valid = (ls != IGNORE) & (lt != IGNORE)
        same = valid & (ls == lt)
        for key, sel, term in (("bg", same & (ls == 0), -torch.log(a + 1e-5)),
                               ("fg", same & (ls > 0), -torch.log(a + 1e-5)),
                               ("neg", valid & (ls != lt), -torch.log(1 + 1e-5 - a))):
            sums[key] = sums[key] + term[sel].sum()
            counts[key] += int(sel.sum())
    means = {k: sums[k] / max(counts[k], 1) for k in sums}
    loss = means["bg"] / 4 + means["fg"] / 4 + means["neg"] / 2
    if not torch.is_tensor(loss):  # no valid pair at all
        loss = affs[0].sum() * 0
    return loss, {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in means.items()}


def affinity_matrix(affs: list[torch.Tensor], h: int, w: int, radius: int) -> torch.Tensor:
    """Symmetric sparse (N, N) affinity matrix, N = h*w, with self-affinity 1, from the
    per-offset affinities of one image (each (h', w'))."""
    dev = affs[0].device if affs else torch.device("cpu")
    idx = torch.arange(h * w, device=dev).reshape(h, w)
    rows, cols, vals = [idx.flatten()], [idx.flatten()], [torch.ones(h * w, device=dev)]
    for a, (dy, dx) in zip(affs, pair_offsets(radius)):
        (ys, xs), (yt, xt) = _crops(h, w, dy, dx)
        s, t, v = idx[ys, xs].flatten(), idx[yt, xt].flatten(), a.flatten().float()
        rows += [s, t]
        cols += [t, s]
        vals += [v, v]
    # check_invariants: a bad index raises here instead of crashing a later sparse op; no
    # measurable cost (~30 ms CPU per construction either way, 1,600 cells), and unset,
    # torch warns in every worker that the checks are off.
    return torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]),
                                   torch.cat(vals), (h * w, h * w),
                                   check_invariants=True).coalesce()


def random_walk(scores: torch.Tensor, affinity: torch.Tensor, beta: float,
                iterations: int) -> torch.Tensor:
    """Propagate (K, h, w) scores by T^t with T = D^-1 A^beta (A dense or sparse (N, N),
    N = h*w, A^beta elementwise, D its row sums): each step replaces a pixel's scores by
    the affinity-weighted mean of its neighbours'."""
    k, h, w = scores.shape
    if affinity.is_sparse:
        a = affinity.coalesce()
        a = torch.sparse_coo_tensor(a.indices(), a.values().pow(beta), a.shape,
                                    check_invariants=True).coalesce()
        deg = torch.sparse.sum(a, 1).to_dense()
        i = a.indices()
        t = torch.sparse_coo_tensor(i, a.values() / deg[i[0]], a.shape,
                                    check_invariants=True)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            t = t.to_sparse_csr()
    else:
        a = affinity.pow(beta)
        t = a / a.sum(1, keepdim=True)
    v = scores.reshape(k, -1).T.contiguous().float()  # (N, K)
    for _ in range(iterations):
        v = t @ v
    return v.T.reshape(k, h, w)


def background_score(cam: np.ndarray | torch.Tensor, power: float):
    """The background channel (1 - max_c CAM_c)^power of normalized CAMs (C, h, w)."""
    top = cam.max(0) if isinstance(cam, np.ndarray) else cam.max(0).values
    return (1 - top) ** power


def label_from_scores(scores: np.ndarray, class_ids, ignore_margin: float = 0.0) -> np.ndarray:
    """(C+1, H, W) scores (channel 0 background) -> uint8 label map over background and the
    image's classes; 255 where the best two differ by less than ignore_margin."""
    keep = [0] + [int(c) + 1 for c in sorted({int(c) for c in class_ids})]
    sub = scores[keep]
    label = np.asarray(keep, np.uint8)[sub.argmax(0)]
    if ignore_margin > 0 and len(keep) > 1:
        top2 = np.sort(sub, 0)[-2:]
        label[(top2[1] - top2[0]) < ignore_margin] = IGNORE
    return label


def cam_threshold_labels(cam: np.ndarray, class_ids, threshold: float) -> np.ndarray:
    """Baseline: argmax of normalized CAMs (C, H, W) where they reach threshold, else bg."""
    bg = np.full((1,) + cam.shape[1:], threshold, np.float32)
    return label_from_scores(np.concatenate([bg, cam]), class_ids)


@torch.no_grad()
def semantic_labels(model: AffinityNet, image: np.ndarray, cam: np.ndarray, class_ids,
                    size: int, radius: int, beta: float, iterations: int, bg_power: float,
                    ignore_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Label map (H, W) uint8 and random-walk scores (C+1, H, W) for one image.

    cam: normalized CAMs (C, h, w) at any resolution (resized to the affinity grid).
    """
    from wsis_ray.peaks import resize_image

    model.eval()
    feats = model(resize_image(image, size)[None].to(next(model.parameters()).device))
    gh, gw = feats.shape[-2:]
    cam_t = resize_maps(cam, (gh, gw)).to(feats.device).clamp(0, 1)
    scores = torch.cat([background_score(cam_t, bg_power)[None], cam_t])
    affs = [a[0] for a in pair_affinities(feats, radius)]
    walked = random_walk(scores, affinity_matrix(affs, gh, gw, radius), beta, iterations)
    h, w = image.shape[:2]
    up = resize_maps(walked, (h, w)).cpu().numpy()
    return label_from_scores(up, class_ids, ignore_margin), up


def confusion(pred: np.ndarray, gt: np.ndarray, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels + 1) counts gt x pred; the last column holds predictions of
    IGNORE (a miss for every class); gt pixels of IGNORE are skipped."""
    valid = gt != IGNORE
    p = pred[valid].astype(np.int64)
    p[p == IGNORE] = num_labels
    return np.bincount(gt[valid].astype(np.int64) * (num_labels + 1) + p,
                       minlength=num_labels * (num_labels + 1)).reshape(num_labels, -1)


def mean_iou(conf: np.ndarray) -> float:
    """mIoU over labels present in gt or prediction, from a `confusion` matrix."""
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    union = conf.sum(1) + conf[:, :n].sum(0) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else 0.0


# -- training (runs under wsis_ray.train.fit) -----------------------------------------------

class AffinityImages(torch.utils.data.Dataset):
    """(image (3,S,S), affinity label map (S/8, S/8) long) from records and their CAMs."""

    def __init__(self, records: list[dict], cams: dict[int, np.ndarray], size: int,
                 fg_threshold: float, bg_threshold: float):
        self.records, self.cams, self.size = records, cams, size
        self.fg, self.bg = fg_threshold, bg_threshold
        self.grid = -(-size // 8)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from wsis_ray.peaks import load_record_image, resize_image

        rec = self.records[i]
        x = resize_image(load_record_image(rec), self.size)
        cam = resize_maps(self.cams[rec["image_id"]], (self.grid, self.grid))
        y = torch.from_numpy(affinity_labels(cam.numpy(), rec["class_ids"], self.fg, self.bg))
        if torch.rand(()) < 0.5:
            x, y = x.flip(2), y.flip(1)
        return x, y.long()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train AffinityNet on CAM-derived affinity labels (step 2 of the module docstring).

    config: records (ImageRecord dicts), cams_uri (Parquet of CAM responses, see
    wsis_ray.peaks.read_cams), backbone (BackboneConfig dict), affinity (AffinityConfig dict),
    init_trunk (optional trunk state dict, e.g. the trained CAM's), seed, checkpoint_every,
    threads.
    """
    import ray.train.torch as rtt

    from wsis_ray import train as rt
    from wsis_ray.branches.common import step_batches, unwrap
    from wsis_ray.peaks import read_cams

    cfg = config["affinity"]
    torch.manual_seed(config.get("seed", 0))
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    model = AffinityNet(BackboneConfig(**config["backbone"]))
    if config.get("init_trunk") is not None:
        model.trunk.load_state_dict(config["init_trunk"])
    model = rtt.prepare_model(model)
    cams = read_cams(config["cams_uri"], normalize=True)
    data = AffinityImages(config["records"], cams, cfg["image_size"], cfg["fg_threshold"],
                          cfg["bg_threshold"])
    # the trunk starts trained (from the CAM): a 10x smaller step, as the paper's lr schedule
    inner = unwrap(model)
    opt = torch.optim.Adam([
        {"params": inner.trunk.parameters(), "lr": cfg["lr"] * 0.1},
        {"params": [p for n, p in inner.named_parameters() if not n.startswith("trunk.")]},
    ], lr=cfg["lr"], weight_decay=1e-4, fused=True)
    step = 0
    state = rt.restore()
    if state is not None:
        inner.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    every = config.get("checkpoint_every", 50)
    rank, world = rt.world()
    dev = rt.device()
    batches = step_batches(data, cfg["batch_size"], config.get("seed", 0), rank, world, step)
    model.train()
    while step < cfg["steps"]:
        x, y = next(batches)
        x = x.to(dev)
        loss, parts = affinity_loss(pair_affinities(model(x), cfg["radius"]), y.to(dev),
                                    cfg["radius"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        rt.crash_once(config, step)
        if step % every == 0 or step == cfg["steps"]:
            rt.report({"step": step, "steps": cfg["steps"], "loss": loss.item(), **parts},
                      {"model": inner.state_dict(), "optimizer": opt.state_dict(),
                       "step": step})
