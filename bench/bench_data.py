"""Demo generation and image-validation speed.

Prints one JSON line: seconds to generate N demo images (PNG), and the time to validate
image files the way the loaders do (`_check_image`: every file decoded, JPEG in draft
mode, a thread pool) against the baseline of sequential full decodes
(`Image.open(p).load()`), on the demo PNGs and on VOC-sized (500x375) JPEGs.
ratio = baseline / ours.

    PYTHONPATH=. python bench/bench_data.py [--images 1000]
"""
import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from wsis_ray.data import demo
from wsis_ray.data.datasets import _check_image


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _baseline(paths):
    for p in paths:
        with Image.open(p) as im:
            im.load()


def _ours(paths):
    with ThreadPoolExecutor(min(8, (os.cpu_count() or 2) * 2)) as pool:
        assert all(err is None for _, err in pool.map(_check_image, paths))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()
    n_val = args.images // 5
    with tempfile.TemporaryDirectory() as tmp:
        gen_s = _time(lambda: demo.generate(Path(tmp) / "demo", 4, args.images - n_val, n_val, 0))
        pngs = sorted(str(p) for p in (Path(tmp) / "demo").rglob("*.png"))
        yy, xx = np.mgrid[0:375, 0:500]
        jpgs = []
        for i in range(300):
            img = np.stack([(xx + 7 * i) % 256, (yy * 2) % 256, (xx ^ yy) % 256], -1).astype(np.uint8)
            jpgs.append(os.path.join(tmp, f"{i}.jpg"))
            Image.fromarray(img).save(jpgs[-1], quality=90)
        res = {"images": len(pngs), "generate_s": round(gen_s, 2), "generate_img_per_s": round(len(pngs) / gen_s, 1)}
        for name, paths in (("png", pngs), ("jpeg500", jpgs)):
            base, ours = _time(lambda: _baseline(paths)), _time(lambda: _ours(paths))
            res.update({f"validate_{name}_n": len(paths), f"validate_{name}_s": round(ours, 3),
                        f"baseline_{name}_s": round(base, 3), f"ratio_{name}": round(base / ours, 2)})
    print(json.dumps(res))


if __name__ == "__main__":
    main()
