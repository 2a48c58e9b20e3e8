"""Serving benchmark: HTTP through Ray Serve vs the direct forward of the same model.

    PYTHONPATH=. python bench/serve.py [--checkpoint URI] [--cpus 2] [--device cpu|cuda]

Prints one JSON line. In one run, on the same images and with the same torch threads:
  direct  - `predict` in this process: one image at a time (c1) and in batches of
            --max-batch-size (the best a server could do with the model alone);
  http    - POST /v1/segment (JPEG bodies) to a one-replica `serve.run` deployment with
            @serve.batch, at concurrency 1 and 8 (threads, one keep-alive client each).
Ratios: http c8 throughput / direct batched (target >= 0.8), http c1 / direct c1, and the
time of a PRM-style proposal-ranking inference over the IS forward (see `prm_style`).
Without --checkpoint a random-weight model of the demo size (ResNet-18, 160 px, light
heads) is built; its box score floor is 0.05 and it keeps 20 detections per image, so each
answer carries masks to encode as a trained model's would.
"""
import argparse
import concurrent.futures as cf
import io
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth coloured blobs on a background (compress like photos, unlike noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        img = np.full((size, size, 3), rng.uniform(20, 80), np.float32)
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 10, size / 4)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(80, 255, 3)
        out.append((img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8))
    return out


def _jpeg(img: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _stats(latencies: list[float], wall: float) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "throughput_ips": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1)}


def _build_checkpoint(path: str, size: int) -> None:
    import torch
    from wsis_ray.branches.instance import build_model, save_checkpoint
    from wsis_ray.config import ISConfig, to_dict
    torch.manual_seed(0)
    cfg = ISConfig(min_size=size, max_size=int(size * 1.4), detections_per_img=20)
    save_checkpoint(path, build_model(cfg, 4).eval(), {
        "classes": [f"class{i}" for i in range(4)], "category_ids": [1, 2, 3, 4],
        "config": to_dict(cfg), "run": "bench", "round": 0, "metrics": {}})


class Direct:
    """The same model in this process, with the replica's torch threads."""

    def __init__(self, checkpoint: str, threads: int, device: str):
        import torch
        from wsis_ray.branches.instance import load_checkpoint, predict
        torch.set_num_threads(threads)
        self.model, self.meta = load_checkpoint(checkpoint, device=device)
        self.predict = predict
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def c1(self, images) -> dict:
        lat = []
        start = time.perf_counter()
        for im in images:
            t = time.perf_counter()
            self.predict(self.model, [im], 0.0)
            self.sync()
            lat.append(time.perf_counter() - t)
        return _stats(lat, time.perf_counter() - start)

    def batched(self, images, batch: int) -> dict:
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            self.predict(self.model, images[i:i + batch], 0.0)
        self.sync()
        return {"batch": batch,
                "throughput_ips": round(len(images) / (time.perf_counter() - start), 2)}


def http_load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    import httpx

    def worker(k: int, total: int = requests):
        out = []
        with httpx.Client(timeout=300) as client:
            for i in range(k, total, concurrency):
                t = time.perf_counter()
                r = client.post(url, content=bodies[i % len(bodies)],
                                params={"score_threshold": 0.0},
                                headers={"content-type": "image/jpeg"})
                out.append((time.perf_counter() - t, r.status_code,
                            r.json()["timing"]["batch_size"] if r.status_code == 200 else 0))
        return out

    with cf.ThreadPoolExecutor(concurrency) as pool:  # warm-up: two requests per client
        list(pool.map(lambda k: worker(k, 2 * concurrency), range(concurrency)))
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = [x for part in pool.map(worker, range(concurrency)) for x in part]
    wall = time.perf_counter() - start
    stats = _stats([r[0] for r in results], wall)
    stats["errors"] = sum(r[1] != 200 for r in results)
    stats["mean_batch_size"] = round(float(np.mean([r[2] for r in results])), 2)
    return stats


def prm_style(images: list[np.ndarray], num_classes: int, size: int) -> dict | str:
    """Time a PRM-style inference (no IS network) on the same images, for the paper's speed
    claim: CAM forward (+ flip, as at seed time) -> class peaks -> selective-search
    proposals -> per-peak Eq. 4 ranking against the class's CAM -> the best proposal per
    peak. It is a lower bound on PRM's own cost: PRM ranks with per-peak backpropagated
    response maps and MCG segments, both slower. Needs the seeds code (wsis_ray.peaks,
    proposals, bags); without it the reason is returned instead of figures."""
    try:
        import cv2
        import torch
        from wsis_ray.bags import peak_bags
        from wsis_ray.config import BackboneConfig
        from wsis_ray.peaks import CAMNet, find_peaks, normalized_cam, predict_response
        from wsis_ray.proposals import selective_search
    except ImportError as e:
        return f"not measured: the seeds code (PRM peaks, proposals, Eq. 4 bags) is not on this branch ({e})"
    torch.manual_seed(0)
    cam = CAMNet(BackboneConfig(name="resnet18"), num_classes).eval()
    parts = {"cam": 0.0, "proposals": 0.0, "ranking": 0.0}
    instances = 0
    predict_response(cam, images[:1], size)  # warm-up
    for im in images:
        h, w = im.shape[:2]
        t0 = time.perf_counter()
        with torch.no_grad():
            logits, _ = cam(torch.from_numpy(cv2.resize(im, (size, size))).permute(2, 0, 1)
                            .float()[None])
        response = predict_response(cam, [im], size)[0]
        present = [int(c) for c in np.flatnonzero(logits[0].numpy() > 0)] or [
            int(logits[0].argmax())]
        peaks = find_peaks(response, present, image_hw=(h, w))
        t1 = time.perf_counter()
        boxes, objectness = selective_search(im, max_proposals=300)
        t2 = time.perf_counter()
        ncam = normalized_cam(response, present)
        scores = np.zeros((num_classes + 1, h, w), np.float32)
        for c in present:
            scores[c + 1] = cv2.resize(ncam[c], (w, h), interpolation=cv2.INTER_LINEAR)
        bags, _ = peak_bags(boxes, objectness, peaks, scores, size=1)
        instances += len(bags)
        t3 = time.perf_counter()
        parts["cam"] += t1 - t0
        parts["proposals"] += t2 - t1
        parts["ranking"] += t3 - t2
    n = len(images)
    total = sum(parts.values())
    return {"ms_per_image": round(1000 * total / n, 1),
            "parts_ms_per_image": {k: round(1000 * v / n, 1) for k, v in parts.items()},
            "instances_per_image": round(instances / n, 2)}


def _median(runs: list[dict]) -> dict:
    """The run with the median throughput (the host is shared: one outlier round from a
    neighbour's job must not decide the figure)."""
    return sorted(runs, key=lambda r: r["throughput_ips"])[len(runs) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="IS checkpoint (default: build a demo-size one)")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="HTTP requests per level/round")
    p.add_argument("--rounds", type=int, default=3,
                   help="direct and HTTP measured alternately this many times; medians kept")
    p.add_argument("--cpus", type=int, default=2, help="replica num_cpus = torch threads")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()

    import ray
    import torch
    from ray import serve
    from serve.app import Segmenter
    from serve.imaging import decode_image

    tmp = tempfile.mkdtemp(prefix="wsis-bench-")
    checkpoint = a.checkpoint or f"{tmp}/is_model.pt"
    if not a.checkpoint:
        _build_checkpoint(checkpoint, a.size)
    images = _images(a.images, a.size)
    bodies = [_jpeg(im) for im in images]
    decoded = [decode_image(b, 10**8) for b in bodies]  # what the server forwards

    gpus = 1 if a.device == "cuda" else 0
    # address="local": a fresh instance, never a cluster someone else started on this host
    ray.init(address="local", num_cpus=a.cpus + 2, num_gpus=gpus, include_dashboard=False,
             log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = Segmenter.options(
        num_replicas=1, max_ongoing_requests=4 * a.max_batch_size,
        ray_actor_options={"num_cpus": a.cpus, "num_gpus": gpus},
        user_config={"max_batch_size": a.max_batch_size,
                     "batch_wait_timeout_s": a.batch_wait_s, "max_instances": 1000},
    ).bind(checkpoint=checkpoint, device=a.device)
    serve.run(app, name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/segment"
    import httpx
    replica_threads = httpx.get(f"http://127.0.0.1:{port}/v1/model").json()["torch_threads"]

    direct = Direct(checkpoint, a.cpus, a.device)
    prm = prm_style(decoded, len(direct.meta["classes"]), a.size) if a.device == "cpu" else \
        "not measured on GPU (selective search runs on CPU)"
    direct.batched(decoded[:a.max_batch_size], a.max_batch_size)  # warm-up
    runs = {"direct_c1": [], "direct_batched": [], "http_c1": [], "http_c8": []}
    for _ in range(a.rounds):  # alternate, so both sides see the same host load
        runs["direct_c1"].append(direct.c1(decoded))
        runs["http_c1"].append(http_load(url, bodies, a.requests, 1))
        runs["direct_batched"].append(direct.batched(decoded, a.max_batch_size))
        runs["http_c8"].append(http_load(url, bodies, a.requests, 8))
    serve.shutdown()
    ray.shutdown()
    m = {k: _median(v) for k, v in runs.items()}

    print(json.dumps({
        "bench": "serve", "device": a.device,
        "cuda_device": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
        "checkpoint": a.checkpoint or "random demo-size model", "image_size": a.size,
        "images": a.images, "rounds": a.rounds, "replica_cpus": a.cpus,
        "torch_threads": {"replica": replica_threads, "direct": torch.get_num_threads()},
        "max_batch_size": a.max_batch_size, "batch_wait_s": a.batch_wait_s,
        "direct": {"c1": m["direct_c1"], "batched": m["direct_batched"]},
        "http": {"c1": m["http_c1"], "c8": m["http_c8"]},
        "http_errors": sum(r["errors"] for k in ("http_c1", "http_c8") for r in runs[k]),
        "ratio_http_c8_vs_direct_batched": round(
            m["http_c8"]["throughput_ips"] / m["direct_batched"]["throughput_ips"], 3),
        "ratio_http_c1_vs_direct_c1": round(
            m["http_c1"]["throughput_ips"] / m["direct_c1"]["throughput_ips"], 3),
        "target_ratio_c8": 0.8,
        "throughput_per_round": {k: [r["throughput_ips"] for r in v] for k, v in runs.items()},
        "prm_style_inference": prm,
        "ratio_prm_style_vs_is_forward_time": round(
            prm["ms_per_image"] * m["direct_c1"]["throughput_ips"] / 1000, 2)
        if isinstance(prm, dict) else None,
    }))


if __name__ == "__main__":
    main()
