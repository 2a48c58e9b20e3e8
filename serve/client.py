"""Minimal client for the IS service (standard library only; pycocotools for the masks).

    python serve/client.py photo.jpg [--url http://127.0.0.1:8000] [--threshold 0.5]
        [--overlay out.png]

Prints one line per instance (class, score, box, mask area); `--overlay` also saves the
server-drawn picture.
"""
import argparse
import json
import mimetypes
import sys
import urllib.error
import urllib.parse
import urllib.request


def segment(url: str, path: str, threshold: float | None = None, fmt: str = "json") -> bytes:
    """POST the file as a raw body; returns the response bytes (JSON or PNG)."""
    params = {"format": fmt}
    if threshold is not None:
        params["score_threshold"] = threshold
    with open(path, "rb") as f:
        body = f.read()
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    req = urllib.request.Request(f"{url}/v1/segment?{urllib.parse.urlencode(params)}",
                                 data=body, headers={"Content-Type": mime}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.read()
    except urllib.error.HTTPError as e:  # 4xx: {"error": code, "detail": message}
        err = json.loads(e.read())
        sys.exit(f"{path}: HTTP {e.code} {err['error']}: {err['detail']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--threshold", type=float)
    p.add_argument("--overlay", help="also save the overlay PNG here")
    a = p.parse_args()
    result = json.loads(segment(a.url, a.image, a.threshold))
    print(f"model {result['model_id']}, {result['image']['width']}x"
          f"{result['image']['height']}, {len(result['instances'])} instances, "
          f"{result['timing']['total_ms']:.0f} ms")
    from pycocotools import mask as mask_utils
    for inst in result["instances"]:
        rle = {"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode()}
        area = int(mask_utils.area(rle))
        box = ", ".join(f"{v:.0f}" for v in inst["box"])
        print(f"  {inst['class_name']:<12} {inst['score']:.2f}  box [{box}]  mask {area} px")
    if a.overlay:
        with open(a.overlay, "wb") as f:
            f.write(segment(a.url, a.image, a.threshold, fmt="png"))


if __name__ == "__main__":
    main()
