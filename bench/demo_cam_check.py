"""Does the demo dataset have the property the paper is about? Train a small fully
convolutional classifier (image labels only) on the demo train split, then measure on val
how much of each ground-truth object its class activation map (CAM > 0.5 of the image's
max for that class) covers, against how much of the object's class mark it covers.

Prints one JSON line: multi-label accuracy, mean object coverage, mean mark coverage,
and mark/object coverage ratio. A classifier that localises the mark but not the object
gives high mark coverage and low object coverage.

    PYTHONPATH=. python bench/demo_cam_check.py --data /tmp/demo --steps 300
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsis_ray.data import demo
from wsis_ray.data.datasets import load_coco, load_image
from wsis_ray.data.groundtruth import load_coco_gt

SIZE = 160


def net(k):
    def block(i, o, s):
        return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
    return nn.Sequential(block(3, 32, 2), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2),
                         block(128, 128, 1), block(128, 128, 1), nn.Conv2d(128, k, 1))  # stride 8 CAMs


def batch(ds, idx):
    xs, ys = [], []
    for i in idx:
        r = ds[i]
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        a = load_image(r)[:SIZE, :SIZE]
        img[:a.shape[0], :a.shape[1]] = a
        xs.append(img)
        y = np.zeros(ds.num_classes, np.float32); y[list(r.class_ids)] = 1; ys.append(y)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255 - 0.5
    return x, torch.from_numpy(np.stack(ys))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/demo_cam")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    if not demo.is_generated(args.data, 4, 800, 200, 0):
        demo.generate(args.data, 4, 800, 200, 0)
    train = load_coco(f"{args.data}/train.json", f"{args.data}/train")
    val = load_coco(f"{args.data}/val.json", f"{args.data}/val")
    gt = load_coco_gt(f"{args.data}/val.json", val.category_ids)
    model = net(train.num_classes)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for step in range(args.steps):
        if step % 50 == 0:
            print(f"step {step} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        x, y = batch(train, rng.integers(0, len(train), 16))
        if rng.random() < 0.5:
            x = x.flip(3)
        loss = F.binary_cross_entropy_with_logits(model(x).mean((2, 3)), y)
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    correct, obj_cov, mark_cov = [], [], []
    with torch.no_grad():
        for i0 in range(0, len(val), 32):
            idx = list(range(i0, min(len(val), i0 + 32)))
            x, y = batch(val, idx)
            cams = model(x)
            correct.append(((cams.mean((2, 3)) > 0) == (y > 0)).float().mean(1))
            cams = F.interpolate(cams, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
            for b, i in enumerate(idx):
                r = val[i]; g = gt[r.image_id]; img = load_image(r).astype(int)
                for m, c in zip(g.masks, g.class_ids):
                    cam = cams[b, c, :r.height, :r.width][:SIZE, :SIZE]
                    m = m[:SIZE, :SIZE]
                    on = cam > 0.5 * cam.max()
                    mark = m & (np.abs(img[:SIZE, :SIZE] - np.array(demo.MARK_COLOURS[c % 7][1])).max(-1) < 30)
                    if mark.sum() == 0:
                        continue
                    obj_cov.append((on & m).sum() / m.sum())
                    mark_cov.append((on & mark).sum() / mark.sum())
    print(json.dumps({"steps": args.steps, "train_s": round(time.time() - t0, 1),
                      "val_label_accuracy": round(float(torch.cat(correct).mean()), 3),
                      "object_coverage": round(float(np.mean(obj_cov)), 3),
                      "mark_coverage": round(float(np.mean(mark_cov)), 3),
                      "ratio_mark_over_object": round(float(np.mean(mark_cov) / np.mean(obj_cov)), 2)}))


if __name__ == "__main__":
    main()
