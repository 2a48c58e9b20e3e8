"""Request-image decoding with client-error reporting, mask encoding and overlay pictures.

Pure functions (no Ray, no torch): the Serve deployment in `serve/app.py` calls them, and
tests can call them directly. Every rejection is a `BadInput` carrying the HTTP status, a
short machine-readable code and a message that says what was wrong and what to send.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFile, ImageOps
from pycocotools import mask as mask_utils

# Accepted formats: PIL format name -> MIME type.
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Content types a raw-body upload may declare (octet-stream: "sniff the bytes").
RAW_CONTENT_TYPES = set(FORMATS.values()) | {"image/jpg", "application/octet-stream"}


class BadInput(Exception):
    """A client error: `status` is the 4xx HTTP status, `code` a stable short name."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def sniff_format(data: bytes) -> str | None:
    """The accepted format named by the leading magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(data: bytes) -> str | None:
    """Name of a format PIL recognises that we do not accept (GIF, BMP, TIFF, ...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format
    except Exception:  # any failure just means "not an image we can name"
        return None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> uint8 HxWx3 RGB (EXIF orientation applied).

    The pixel limit is checked on the header size before any pixel data is decoded, so a
    decompression bomb (a tiny file declaring a huge image) costs nothing.
    """
    if not data:
        raise BadInput(400, "empty_body", "the request carried no image bytes (zero-byte body "
                       "or empty file part); send a JPEG, PNG or WebP image")
    fmt = sniff_format(data)
    if fmt is None:
        other = _other_format(data)
        if other:
            raise BadInput(415, "unsupported_format", f"{other} images are not supported; "
                           "send JPEG, PNG or WebP")
        raise BadInput(400, "not_an_image", f"the body ({len(data)} bytes, starting "
                       f"{data[:8]!r}) is not a JPEG, PNG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise BadInput(413, "too_many_pixels", f"{e}; the limit here is {max_pixels} pixels")
    except Exception as e:  # PIL raises OSError/SyntaxError/ValueError on bad headers
        raise BadInput(400, "corrupt_image", f"could not read the {fmt} header: {e}")
    width, height = im.size
    if width * height > max_pixels:
        raise BadInput(413, "too_many_pixels", f"the image is {width}x{height} = "
                       f"{width * height} pixels, over the limit of {max_pixels}; downscale it")
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels
        im.load()
        im = ImageOps.exif_transpose(im)
        rgb = np.array(im.convert("RGB"))  # writable copy (torch.from_numpy warns otherwise)
    except Exception as e:
        raise BadInput(400, "corrupt_image", f"the {fmt} image data is truncated or corrupt "
                       f"({type(e).__name__}: {e})")
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise BadInput(400, "corrupt_image", f"decoded to an empty image of shape {rgb.shape}")
    return rgb


def encode_rle(masks: np.ndarray) -> list[dict]:
    """(N,H,W) bool masks -> COCO compressed RLE dicts {"size": [H, W], "counts": str}."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])],
             "counts": r["counts"].decode("ascii")} for r in rles]


def _colour(class_id: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per class (golden-ratio hue steps)."""
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((0.11 + class_id * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def overlay_png(rgb: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray, scores: np.ndarray,
                masks: np.ndarray, classes: list[str], alpha: float = 0.5) -> bytes:
    """PNG of the image with each instance's mask tinted, its box and `class score` label."""
    out = rgb.astype(np.float32)
    for c, m in zip(class_ids, masks):
        out[m] = (1 - alpha) * out[m] + alpha * np.array(_colour(int(c)), np.float32)
    im = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for box, c, s in zip(boxes, class_ids, scores):
        colour = _colour(int(c))
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=2)
        name = classes[int(c)] if 0 <= int(c) < len(classes) else str(int(c))
        draw.text((x1 + 2, y1 + 1), f"{name} {float(s):.2f}", fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def check_resizable(height: int, width: int, min_size: int, max_size: int) -> None:
    """Mask R-CNN scales the short side to `min_size` unless the long side would pass
    `max_size`; a very elongated image would get a short side under a pixel and crash the
    forward (for every image batched with it), so it is refused here."""
    short, long = min(height, width), max(height, width)
    scaled = short * min(min_size / short, max_size / long)
    if scaled < 2:
        raise BadInput(400, "bad_aspect_ratio", f"the image is {width}x{height}: the model "
                       f"resizes it to at most {max_size} px on the long side, leaving "
                       f"{scaled:.2f} px on the short side; send an image with an aspect "
                       f"ratio under {max_size // 2}:1")
