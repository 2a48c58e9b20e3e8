"""Serving the IS model: real HTTP requests to a `serve.run` deployment on CPU.

A tiny random-weight Mask R-CNN (ResNet-18, 96 px, light heads, box score floor 0) is saved
with the IS branch's `save_checkpoint`, so it emits instances deterministically; answers are
compared with a direct `predict` on the same decoded image. Every bad-input case must give a
4xx JSON error and leave the replica healthy (checked with /-/healthz and a good request).
"""
import concurrent.futures as cf
import io
import json
import socket
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from serve.app import ServingConfig, Segmenter, api, app_from_config
from serve.imaging import BadInput, decode_image
from wsis_ray.branches.instance import build_model, load_checkpoint, predict, save_checkpoint
from wsis_ray.config import ISConfig, to_dict

ROOT = Path(__file__).resolve().parents[1]
APP = "wsis_serve_test"
PREFIX = "/wsis-test"
LIMITS = {"score_threshold": 0.0, "max_instances": 100, "max_batch_size": 8,
          "batch_wait_timeout_s": 0.01, "max_body_bytes": 64 * 1024,
          "max_image_pixels": 200 * 200}


# ----------------------------------------------------------------------------- helpers
def _image(seed: int, h: int = 96, w: int = 96) -> np.ndarray:
    """Smooth blobs rather than noise, so JPEG/WebP round trips stay close."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 40, np.float32)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 20)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(80, 255, 3)
    return img.astype(np.uint8)


def _encode(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with a few bytes of pixel data."""
    png = bytearray(_encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    ihdr = png[8 + 8: 8 + 8 + 13]  # after the signature and IHDR length/type
    ihdr[0:8] = struct.pack(">II", width, height)
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(png)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _assert_matches_direct(body: dict, direct: dict, threshold: float = 0.0) -> None:
    keep = direct["scores"] >= threshold
    got = body["instances"]
    assert len(got) == int(keep.sum()) > 0
    order = np.argsort(-direct["scores"][keep], kind="stable")
    boxes, classes = direct["boxes"][keep][order], direct["class_ids"][keep][order]
    scores, masks = direct["scores"][keep][order], direct["masks"][keep][order]
    np.testing.assert_allclose([i["score"] for i in got], scores, atol=1e-4)
    np.testing.assert_allclose([i["box"] for i in got], boxes, atol=1e-2)
    assert [i["class_id"] for i in got] == classes.tolist()
    for inst, m in zip(got, masks):
        rle = {"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode()}
        assert _mask_iou(mask_utils.decode(rle).astype(bool), m) >= 0.98


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch
    torch.manual_seed(0)
    cfg = ISConfig(backbone="resnet18", min_size=96, max_size=128, fpn_channels=32,
                   light_heads=True, score_threshold=0.0, detections_per_img=8,
                   rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    model = build_model(cfg, 3).eval()
    path = tmp_path_factory.mktemp("serve") / "is_model.pt"
    save_checkpoint(str(path), model, {
        "classes": ["cat", "dog", "boat"], "category_ids": [17, 18, 9], "config": to_dict(cfg),
        "run": "test-run", "round": 2, "metrics": {"mAP_r@0.5": 12.5}})
    return path


@pytest.fixture(scope="module")
def direct(checkpoint):
    model, _ = load_checkpoint(str(checkpoint))
    return lambda rgb: predict(model, [rgb], 0.0)[0]


@pytest.fixture(scope="module")
def test_config(checkpoint, tmp_path_factory):
    """serve/config.yaml with this test's checkpoint, one 1-CPU replica and small limits."""
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    spec = config["applications"][0]
    spec["args"]["checkpoint"] = str(checkpoint)
    dep = spec["deployments"][0]
    dep["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    dep["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 0}
    dep["user_config"] = dict(LIMITS)
    path = tmp_path_factory.mktemp("serve_cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def base(ray_session, test_config):
    """The deployment behind real HTTP on a free port (8000 may be taken on shared hosts)."""
    from ray import serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app, _ = app_from_config(str(test_config))  # the Python form of `serve run`
    serve.run(app, name=APP, route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def client(base):
    with httpx.Client(base_url=base + PREFIX, timeout=60) as c:
        yield c


def _segment(client, data: bytes, mime="image/png", **params):
    return client.post("/v1/segment", content=data, params=params,
                       headers={"content-type": mime})


# ----------------------------------------------------------------------------- no Ray
def test_decode_formats_and_rejections():
    img = _image(1)
    assert np.array_equal(decode_image(_encode(img, "PNG"), 10**6), img)
    assert decode_image(_encode(img, "JPEG", quality=95), 10**6).shape == img.shape
    assert np.array_equal(decode_image(_encode(img, "WEBP", lossless=True), 10**6), img)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    assert decode_image(_encode(rgba, "PNG"), 10**6).shape == img.shape  # RGBA -> RGB
    cases = [(b"", 400, "empty_body"), (b"GIF89a not really", 400, "not_an_image"),
             (_encode(img, "GIF"), 415, "unsupported_format"),
             (_encode(img, "BMP"), 415, "unsupported_format"),
             (_encode(img, "JPEG")[:300], 400, "corrupt_image"),
             (_png_bomb(100_000, 100_000), 413, "too_many_pixels"),
             (_encode(img, "PNG"), 413, "too_many_pixels")]  # limit below 96*96 next
    for i, (data, status, code) in enumerate(cases):
        with pytest.raises(BadInput) as e:
            decode_image(data, 96 * 96 - 1 if i == len(cases) - 1 else 10**6)
        assert (e.value.status, e.value.code) == (status, code), e.value.message


def test_serving_config_validation():
    assert ServingConfig.from_dict({"max_batch_size": 4}).max_batch_size == 4
    for bad in ({"max_batch": 4}, {"score_threshold": 1.5}, {"max_body_bytes": 0}):
        with pytest.raises(ValueError):
            ServingConfig.from_dict(bad)


def test_check_health_fails_without_model():
    not_loaded = SimpleNamespace(model=None, class_names=[])
    with pytest.raises(RuntimeError, match="not loaded"):
        Segmenter.func_or_class.check_health(not_loaded)


def test_failing_image_fails_only_its_own_request(monkeypatch):
    """If a batched forward raises, each image is retried alone: co-batched requests still
    get answers and only the culprit's slot holds the error."""
    def fake_predict(model, images, threshold):
        if any(im.shape[0] == 1 for im in images):
            raise RuntimeError("boom")
        return [{"h": im.shape[0]} for im in images]

    forward = Segmenter.func_or_class._forward
    monkeypatch.setitem(forward.__globals__, "predict", fake_predict)  # Serve copied globals
    out = forward(SimpleNamespace(model=None), [np.zeros((4, 4, 3), np.uint8),
                                                np.zeros((1, 4, 3), np.uint8),
                                                np.zeros((5, 4, 3), np.uint8)], 0.0)
    assert out[0] == {"h": 4} and out[2] == {"h": 5} and isinstance(out[1], RuntimeError)


def test_config_yaml_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    app, where = app_from_config(str(ROOT / "serve" / "config.yaml"), checkpoint="x.pt")
    assert where["route_prefix"] == "/" and where["http_options"]["port"] == 8000
    ServingConfig.from_dict(config["applications"][0]["deployments"][0]["user_config"])


def test_checked_in_openapi_is_current():
    """serve/openapi.json (linked from the README) is what the app serves at /openapi.json;
    regenerate with `python -m serve.app --write-openapi serve/openapi.json`."""
    checked_in = json.loads((ROOT / "serve" / "openapi.json").read_text())
    assert checked_in == json.loads(json.dumps(api.openapi()))
    seg = checked_in["paths"]["/v1/segment"]["post"]
    assert {p["name"] for p in seg["parameters"]} == {"score_threshold", "max_instances",
                                                      "format"}
    assert {"multipart/form-data", "image/jpeg", "image/png", "image/webp"} <= set(
        seg["requestBody"]["content"])
    assert {"400", "413", "415", "422"} <= set(seg["responses"])


# ----------------------------------------------------------------------------- over HTTP
@pytest.mark.ray
@pytest.mark.parametrize("fmt,kw,mime", [("PNG", {}, "image/png"),
                                         ("JPEG", {"quality": 90}, "image/jpeg"),
                                         ("WEBP", {"quality": 90}, "image/webp")])
def test_good_images_match_direct_forward(client, direct, fmt, kw, mime):
    data = _encode(_image(2, 96, 112), fmt, **kw)
    rgb = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # what the server decodes
    expected = direct(rgb)
    raw = _segment(client, data, mime)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["image"] == {"width": 112, "height": 96}
    assert body["model_id"].startswith("test-run-r2-")
    assert body["timing"]["inference_ms"] > 0 and body["timing"]["batch_size"] >= 1
    _assert_matches_direct(body, expected)
    names = {0: "cat", 1: "dog", 2: "boat"}
    ids = {0: 17, 1: 18, 2: 9}
    for inst in body["instances"]:
        assert inst["class_name"] == names[inst["class_id"]]
        assert inst["category_id"] == ids[inst["class_id"]]
        assert inst["mask"]["size"] == [96, 112]
    form = client.post("/v1/segment", files={"image": (f"x.{fmt.lower()}", data, mime)})
    assert form.status_code == 200, form.text
    _assert_matches_direct(form.json(), expected)


@pytest.mark.ray
def test_query_options_and_overlay(client, direct):
    img = _image(3)
    data = _encode(img, "PNG")
    expected = direct(img)
    top = _segment(client, data, max_instances=3).json()["instances"]
    assert [i["score"] for i in top] == pytest.approx(sorted(expected["scores"])[::-1][:3],
                                                      abs=1e-4)
    cut = float(np.median(expected["scores"]))
    body = _segment(client, data, score_threshold=cut).json()
    assert body["score_threshold"] == pytest.approx(cut)
    _assert_matches_direct(body, expected, threshold=cut)
    png = _segment(client, data, format="png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert int(png.headers["x-instances"]) == len(expected["scores"])
    overlay = np.array(Image.open(io.BytesIO(png.content)).convert("RGB"))
    assert overlay.shape == img.shape and not np.array_equal(overlay, img)


@pytest.mark.ray
def test_model_info(client):
    info = client.get("/v1/model").json()
    assert [c["name"] for c in info["classes"]] == ["cat", "dog", "boat"]
    assert [c["category_id"] for c in info["classes"]] == [17, 18, 9]
    assert (info["run"], info["round"], info["metrics"]) == ("test-run", 2, {"mAP_r@0.5": 12.5})
    assert info["is_config"]["backbone"] == "resnet18"
    assert info["serving"]["max_body_bytes"] == LIMITS["max_body_bytes"]
    assert info["serving"]["model_max_detections"] == 8
    assert info["torch_threads"] == 1 and info["device"] == "cpu"
    openapi = client.get("/openapi.json")
    assert openapi.status_code == 200 and "/v1/segment" in openapi.json()["paths"]


_IMG = _image(4)
_BAD = {
    "non_image_bytes": (dict(content=b"hello, this is text", headers={
        "content-type": "application/octet-stream"}), {}, 400, "not_an_image"),
    "truncated_jpeg": (dict(content=_encode(_IMG, "JPEG", quality=95)[:600], headers={
        "content-type": "image/jpeg"}), {}, 400, "corrupt_image"),
    "truncated_png": (dict(content=_encode(_IMG, "PNG")[:200], headers={
        "content-type": "image/png"}), {}, 400, "corrupt_image"),
    "zero_byte_body": (dict(content=b"", headers={"content-type": "image/png"}), {}, 400,
                       "empty_body"),
    "empty_file_part": (dict(files={"image": ("x.png", b"", "image/png")}), {}, 400,
                        "empty_body"),
    "gif_format": (dict(content=_encode(_IMG, "GIF"), headers={
        "content-type": "application/octet-stream"}), {}, 415, "unsupported_format"),
    "text_content_type": (dict(content=_encode(_IMG, "PNG"), headers={
        "content-type": "text/plain"}), {}, 415, "unsupported_content_type"),
    "json_content_type": (dict(json={"image": "x"}), {}, 415, "unsupported_content_type"),
    "no_content_type": (dict(content=_encode(_IMG, "PNG")), {}, 415,
                        "unsupported_content_type"),
    "form_without_file": (dict(data={"note": "no file"}, files={"other": (None, "x")}), {},
                          400, "no_file"),
    "broken_multipart": (dict(content=b"--nope\r\ngarbage", headers={
        "content-type": "multipart/form-data; boundary=xyz"}), {}, 400, "bad_multipart"),
    "too_elongated": (dict(content=_encode(_image(6, 1, 300), "PNG"), headers={
        "content-type": "image/png"}), {}, 400, "bad_aspect_ratio"),
    "pixel_bomb": (dict(content=_png_bomb(60_000, 60_000), headers={
        "content-type": "image/png"}), {}, 413, "too_many_pixels"),
    "over_pixel_limit": (dict(content=_encode(_image(5, 201, 200), "PNG"), headers={
        "content-type": "image/png"}), {}, 413, "too_many_pixels"),
    "body_over_limit": (dict(content=np.random.default_rng(0).bytes(65 * 1024), headers={
        "content-type": "image/png"}), {}, 413, "body_too_large"),
    "chunked_body_over_limit": (dict(content=iter([b"\x89PNG\r\n\x1a\n" + b"0" * 40_000] * 2),
                                     headers={"content-type": "image/png"}), {}, 413,
                                "body_too_large"),
    "threshold_not_a_number": (dict(content=_encode(_IMG, "PNG"), headers={
        "content-type": "image/png"}), {"score_threshold": "abc"}, 422, "bad_query"),
    "threshold_above_one": (dict(content=_encode(_IMG, "PNG"), headers={
        "content-type": "image/png"}), {"score_threshold": "1.5"}, 422, "bad_query"),
    "max_instances_zero": (dict(content=_encode(_IMG, "PNG"), headers={
        "content-type": "image/png"}), {"max_instances": "0"}, 422, "bad_query"),
    "unknown_format": (dict(content=_encode(_IMG, "PNG"), headers={
        "content-type": "image/png"}), {"format": "gif"}, 422, "bad_query"),
}


@pytest.mark.ray
@pytest.mark.parametrize("case", list(_BAD))
def test_bad_input_is_4xx_and_replica_stays_healthy(base, client, case):
    request, params, status, code = _BAD[case]
    r = client.post("/v1/segment", params=params, **request)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["detail"], body
    assert httpx.get(base + "/-/healthz", timeout=30).status_code == 200
    good = _segment(client, _encode(_IMG, "PNG"))
    assert good.status_code == 200 and good.json()["instances"], good.text


@pytest.mark.ray
def test_concurrent_burst_has_no_errors(base, direct):
    images = [_image(10 + i) for i in range(4)]
    payloads = [_encode(im, "PNG") for im in images]
    counts = [len(direct(im)["scores"]) for im in images]

    def one(i):
        with httpx.Client(base_url=base + PREFIX, timeout=120) as c:
            return [(k, _segment(c, payloads[k % 4])) for k in range(i, 200, 8)]

    with cf.ThreadPoolExecutor(8) as pool:
        results = [kr for rs in pool.map(one, range(8)) for kr in rs]
    assert len(results) == 200
    errors = [(k, r.status_code, r.text[:200]) for k, r in results if r.status_code != 200]
    assert not errors
    assert all(len(r.json()["instances"]) == counts[k % 4] for k, r in results)
    assert max(r.json()["timing"]["batch_size"] for _, r in results) > 1  # batching happened


@pytest.mark.ray
def test_client_example(client, tmp_path):
    from serve import client as example
    path = tmp_path / "photo.png"
    path.write_bytes(_encode(_IMG, "PNG"))
    url = str(client.base_url).rstrip("/")
    body = json.loads(example.segment(url, str(path), threshold=0.0))
    assert body["image"] == {"width": 96, "height": 96} and body["instances"]
    assert example.segment(url, str(path), threshold=0.0, fmt="png")[:8] == b"\x89PNG\r\n\x1a\n"
