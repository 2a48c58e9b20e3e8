"""Ray Serve deployment of the final instance segmentation (IS) model over HTTP.

    serve run serve/config.yaml                      # Serve's CLI, config in YAML
    python -m serve.app --config serve/config.yaml   # the same through serve.run()

Endpoints (FastAPI ingress; OpenAPI schema at /openapi.json, docs at /docs):
  POST /v1/segment  an image (multipart file or raw body: JPEG, PNG, WebP) -> instances with
                    class, score, xyxy box and COCO RLE mask; `?format=png` -> overlay picture
  GET  /v1/model    classes, run and round of the checkpoint, its val metrics, serving limits
  GET  /-/healthz   (Serve's proxy) plus `check_health`, which fails without a loaded model

Requests are batched across clients with `@serve.batch` (max size and wait from the
deployment's `user_config`, changeable without a restart); the batch forward runs in a worker
thread so the replica keeps accepting and decoding requests meanwhile. Client errors are 4xx
JSON `{"error": code, "detail": message}`; they never touch the model.

Only the IS branch's inference code is imported here (no Train, no other branches).
"""

import argparse
import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from serve.imaging import (FORMATS, RAW_CONTENT_TYPES, BadInput, check_resizable,
                           decode_image, encode_rle, overlay_png)
from wsis_ray.branches.instance import load_checkpoint, predict

API_VERSION = "1.0.0"


# ----------------------------------------------------------------------------- settings
@dataclass
class ServingConfig:
    """Per-deployment knobs, set through the deployment's `user_config` (reconfigurable)."""
    score_threshold: float = 0.5      # default when the request gives none
    max_instances: int = 100          # default cap on returned instances per image
    max_batch_size: int = 8           # @serve.batch
    batch_wait_timeout_s: float = 0.01
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # decompression-bomb guard, checked on the header

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ServingConfig":
        values = dict(values or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown user_config key(s) {unknown}; valid: {sorted(names)}")
        cfg = cls(**values)
        if not 0.0 <= cfg.score_threshold <= 1.0:
            raise ValueError(f"user_config.score_threshold={cfg.score_threshold} not in [0, 1]")
        for name in ("max_instances", "max_batch_size", "max_body_bytes", "max_image_pixels"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"user_config.{name} must be >= 1")
        if cfg.batch_wait_timeout_s < 0:
            raise ValueError("user_config.batch_wait_timeout_s must be >= 0")
        return cfg


# ----------------------------------------------------------------------------- schemas
class RLEMask(BaseModel):
    size: list[int] = Field(description="[height, width] of the image")
    counts: str = Field(description="COCO compressed RLE (pycocotools.mask.decode reads it)")


class Instance(BaseModel):
    class_id: int = Field(description="0-based index into the model's class list")
    class_name: str
    category_id: int = Field(description="the dataset's own category id (COCO exports)")
    score: float
    box: list[float] = Field(description="[x1, y1, x2, y2] in image pixels")
    mask: RLEMask


class ImageSize(BaseModel):
    width: int
    height: int


class Timing(BaseModel):
    total_ms: float = Field(description="server time for the whole request")
    decode_ms: float
    inference_ms: float = Field(description="the batched forward this image was part of")
    batch_size: int = Field(description="images in that forward")


class SegmentResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_id: str
    image: ImageSize
    score_threshold: float
    instances: list[Instance]
    timing: Timing


class ClassInfo(BaseModel):
    id: int
    name: str
    category_id: int


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_id: str
    checkpoint: str
    classes: list[ClassInfo]
    run: str | None = None
    round: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="val metrics")
    is_config: dict[str, Any] = Field(default_factory=dict,
                                      description="the ISConfig it was built with")
    serving: dict[str, Any] = Field(description="limits and defaults of this deployment")
    device: str
    torch_threads: int


class ErrorResponse(BaseModel):
    error: str = Field(description="short code, e.g. not_an_image, body_too_large")
    detail: str = Field(description="what was wrong and what to send instead")


_ERRORS = {
    400: {"model": ErrorResponse, "description": "empty_body, not_an_image, corrupt_image "
          "(truncated or undecodable), bad_aspect_ratio (too elongated for the model), "
          "bad_multipart, no_file, bad_content_length"},
    413: {"model": ErrorResponse, "description": "body_too_large (over max_body_bytes), "
          "too_many_pixels (header size over max_image_pixels: decompression bombs)"},
    415: {"model": ErrorResponse, "description": "unsupported_content_type (not multipart, "
          "image/* or octet-stream), unsupported_format (e.g. GIF, BMP, TIFF)"},
    422: {"model": ErrorResponse, "description": "bad_query: a query value of the wrong type "
          "or out of range"},
}

api = FastAPI(
    title="wsis-ray instance segmentation",
    version=API_VERSION,
    description="Instance masks from a Mask R-CNN trained with image-level labels only "
                "(CCGR pseudo labels). Errors are JSON `{error, detail}` with a 4xx status.",
)


@api.exception_handler(BadInput)
async def _bad_input(_: Request, e: BadInput) -> JSONResponse:
    return JSONResponse({"error": e.code, "detail": e.message}, status_code=e.status)


@api.exception_handler(RequestValidationError)
async def _bad_query(_: Request, e: RequestValidationError) -> JSONResponse:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "query")
        parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
    return JSONResponse({"error": "bad_query", "detail": "; ".join(parts)}, status_code=422)


_IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
_SEGMENT_REQUEST = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary",
                                 "description": "JPEG, PNG or WebP file (any field name "
                                                "works; the first file part is used)"}}}},
    **{mime: _IMAGE_BODY for mime in FORMATS.values()},
    "application/octet-stream": _IMAGE_BODY,
}}}


# ----------------------------------------------------------------------------- deployment
def _replica_cpus() -> int:
    """CPUs Ray assigned to this replica (Serve sets OMP_NUM_THREADS=1 otherwise)."""
    try:
        import ray
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # not inside Ray (direct use of the class)
        cpus = 1.0
    return max(1, int(round(cpus)))


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of the weights: the same checkpoint gives the same id on every replica."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


@serve.deployment(name="Segmenter", max_ongoing_requests=32, health_check_period_s=10)
@serve.ingress(api)
class Segmenter:
    def __init__(self, checkpoint: str, torch_threads: int = 0, device: str = "auto"):
        self.torch_threads = int(torch_threads) or _replica_cpus()
        torch.set_num_threads(self.torch_threads)
        self.model, self.meta = None, {}
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model, self.meta = load_checkpoint(checkpoint, device=device)
        meta = self.meta
        self.checkpoint = checkpoint
        # not "self.classes": cloudpickle would then try to pickle the torch.classes module
        self.class_names = list(meta["classes"])
        self.category_ids = list(meta.get("category_ids") or range(1, len(self.class_names) + 1))
        self.model_id = (f"{meta.get('run') or 'model'}-r{meta.get('round', 0)}-"
                         f"{model_fingerprint(self.model)}")
        self.min_size = int(self.model.transform.min_size[-1])  # what eval-mode resizing uses
        self.max_size = int(self.model.transform.max_size)
        self.cfg = ServingConfig()

    def reconfigure(self, user_config: dict) -> None:
        self.cfg = ServingConfig.from_dict(user_config)
        self._infer.set_max_batch_size(int(self.cfg.max_batch_size))
        self._infer.set_batch_wait_timeout_s(float(self.cfg.batch_wait_timeout_s))

    def check_health(self) -> None:
        if self.model is None or not self.class_names:
            raise RuntimeError("the IS model is not loaded")

    # -- batching: one forward for every image that arrived within the wait window
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _infer(self, items: list[tuple[np.ndarray, float]]) -> list[tuple[dict, float, int]]:
        threshold = min(t for _, t in items)
        images = [im for im, _ in items]
        start = time.perf_counter()
        outputs = await asyncio.to_thread(self._forward, images, threshold)
        seconds = time.perf_counter() - start
        return [(o, seconds, len(items)) for o in outputs]

    def _forward(self, images: list[np.ndarray], threshold: float) -> list:
        """One batched forward; if it fails, each image alone, so an image that breaks the
        model fails only its own request (its slot holds the exception)."""
        with torch.inference_mode():
            try:
                return predict(self.model, images, threshold)
            except Exception:
                if len(images) == 1:
                    raise
            outputs = []
            for im in images:
                try:
                    outputs.extend(predict(self.model, [im], threshold))
                except Exception as e:
                    outputs.append(e)
            return outputs

    async def _read_body(self, request: Request) -> bytes:
        """The image bytes from a raw body or the first file of a multipart form, reading
        at most `max_body_bytes` (a longer body is refused without buffering it)."""
        limit = int(self.cfg.max_body_bytes)
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadInput(400, "bad_content_length", f"Content-Length {declared!r} is not "
                               "a number")
            if int(declared) > limit:
                raise BadInput(413, "body_too_large", f"the body is {declared} bytes, over "
                               f"the limit of {limit} bytes")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = ctype == "multipart/form-data"
        if not multipart and ctype not in RAW_CONTENT_TYPES:
            raise BadInput(415, "unsupported_content_type", f"Content-Type {ctype or '(none)'!r}"
                           " is not accepted; send multipart/form-data with an image file, or "
                           "the raw image with Content-Type image/jpeg, image/png, image/webp "
                           "or application/octet-stream")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadInput(413, "body_too_large", f"the body is over the limit of {limit} "
                               "bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        return await self._file_from_form(request, body) if multipart else body

    @staticmethod
    async def _file_from_form(request: Request, body: bytes) -> bytes:
        async def stream():
            yield body
            yield b""
        try:
            form = await MultiPartParser(request.headers, stream(), max_files=4,
                                         max_fields=16).parse()
        except Exception as e:  # MultiPartException, bad boundary, ...
            raise BadInput(400, "bad_multipart", f"could not parse the multipart form: {e}")
        try:
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    return await value.read()
        finally:
            await form.close()
        raise BadInput(400, "no_file", "the multipart form has no file part; send the image "
                       "as a file field, e.g. curl -F image=@photo.jpg")

    @api.post("/v1/segment", summary="Segment instances in one image",
              response_model=SegmentResponse, openapi_extra=_SEGMENT_REQUEST,
              responses={**_ERRORS, 200: {"content": {"image/png": {}}, "description":
                         "JSON instances, or with format=png the overlay picture"}})
    async def segment(
        self, request: Request,
        score_threshold: float | None = Query(None, ge=0.0, le=1.0, description=
                                              "keep instances scoring at least this "
                                              "(default: the deployment's; the model's own "
                                              "floor is in /v1/model)"),
        max_instances: int | None = Query(None, ge=1, le=1000, description=
                                          "return at most this many, best first"),
        format: Literal["json", "png"] = Query("json", description=
                                               "png: an overlay picture instead of JSON"),
    ):
        """Segment the object instances in one image."""
        start = time.perf_counter()
        cfg = self.cfg
        threshold = cfg.score_threshold if score_threshold is None else score_threshold
        limit = cfg.max_instances if max_instances is None else max_instances
        data = await self._read_body(request)
        rgb = await asyncio.to_thread(decode_image, data, int(cfg.max_image_pixels))
        check_resizable(*rgb.shape[:2], self.min_size, self.max_size)
        decoded = time.perf_counter()
        out, infer_s, batch_size = await self._infer((rgb, threshold))
        if isinstance(out, Exception):
            raise out
        keep = np.flatnonzero(out["scores"] >= threshold)
        keep = keep[np.argsort(-out["scores"][keep], kind="stable")][:limit]
        boxes, class_ids = out["boxes"][keep], out["class_ids"][keep]
        scores, masks = out["scores"][keep], out["masks"][keep]
        if format == "png":
            png = await asyncio.to_thread(overlay_png, rgb, boxes, class_ids, scores, masks,
                                          self.class_names)
            return Response(png, media_type="image/png", headers={
                "X-Model-Id": self.model_id, "X-Instances": str(len(keep))})
        instances = [
            {"class_id": int(c), "class_name": self.class_names[int(c)],
             "category_id": int(self.category_ids[int(c)]), "score": float(s),
             "box": [float(v) for v in b], "mask": rle}
            for b, c, s, rle in zip(boxes, class_ids, scores, encode_rle(masks))]
        return {
            "model_id": self.model_id,
            "image": {"width": int(rgb.shape[1]), "height": int(rgb.shape[0])},
            "score_threshold": float(threshold),
            "instances": instances,
            "timing": {"total_ms": 1000 * (time.perf_counter() - start),
                       "decode_ms": 1000 * (decoded - start),
                       "inference_ms": 1000 * infer_s, "batch_size": batch_size},
        }

    @api.get("/v1/model", summary="Describe the served model", response_model=ModelInfo)
    async def model_info(self):
        """The served checkpoint: classes, provenance (run, round), val metrics, limits."""
        meta = self.meta
        return {
            "model_id": self.model_id, "checkpoint": self.checkpoint,
            "classes": [{"id": i, "name": n, "category_id": int(self.category_ids[i])}
                        for i, n in enumerate(self.class_names)],
            "run": None if meta.get("run") is None else str(meta["run"]),
            "round": meta.get("round"),
            "metrics": meta.get("metrics") or {},
            "is_config": meta.get("config") or {},
            # the model itself drops detections under its box score floor and keeps at most
            # its detections-per-image, whatever a request asks
            "serving": {**asdict(self.cfg),
                        "model_score_floor": float(self.model.roi_heads.score_thresh),
                        "model_max_detections": int(self.model.roi_heads.detections_per_img)},
            "device": self.device,
            # as seen by the forward's worker thread (OpenMP settings are per thread)
            "torch_threads": await asyncio.to_thread(torch.get_num_threads),
        }


# ----------------------------------------------------------------------------- building
def _app_args(args: dict | None) -> dict:
    args = dict(args or {})
    if not args.get("checkpoint"):
        raise ValueError("the app needs args.checkpoint: the IS checkpoint path or URI")
    unknown = sorted(set(args) - {"checkpoint", "torch_threads", "device"})
    if unknown:
        raise ValueError(f"unknown app args {unknown}; valid: checkpoint, torch_threads, device")
    return args


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run` / `import_path: serve.app:build_app`.

    args: checkpoint (local path or object-store URI, required), torch_threads (0 = the
    replica's CPUs), device (auto | cpu | cuda). Deployment options (replicas, autoscaling,
    ray_actor_options, user_config) come from the config's `deployments:` section.
    """
    return Segmenter.bind(**_app_args(args))


def app_from_config(path: str, checkpoint: str | None = None) -> tuple[serve.Application, dict]:
    """The Python equivalent of `serve run path`: the first application of a Serve config
    file, with its deployment options applied. Returns (app, {"name", "route_prefix"})."""
    import yaml
    with open(path) as f:
        config = yaml.safe_load(f)
    spec = config["applications"][0]
    args = dict(spec.get("args") or {})
    if checkpoint:
        args["checkpoint"] = checkpoint
    options = {}
    for d in spec.get("deployments") or []:
        if d.get("name") == "Segmenter":
            options = {k: v for k, v in d.items() if k != "name"}
    app = Segmenter.options(**options).bind(**_app_args(args))
    return app, {"name": spec.get("name", "wsis"), "route_prefix": spec.get("route_prefix", "/"),
                 "http_options": config.get("http_options") or {}}


def main() -> None:
    p = argparse.ArgumentParser(description="Serve the IS model (Python form of `serve run`).")
    p.add_argument("--config", default="serve/config.yaml")
    p.add_argument("--checkpoint", help="overrides args.checkpoint in the config")
    p.add_argument("--write-openapi", metavar="PATH",
                   help="write the OpenAPI schema (what /openapi.json serves) and exit")
    a = p.parse_args()
    if a.write_openapi:
        with open(a.write_openapi, "w") as f:
            json.dump(api.openapi(), f, indent=2)
            f.write("\n")
        return
    app, where = app_from_config(a.config, a.checkpoint)
    serve.start(http_options=where.pop("http_options"))
    serve.run(app, blocking=True, **where)


if __name__ == "__main__":
    main()
