"""Built-in synthetic dataset that is hard in the way the paper is about.

Every object has a body (shape, striped texture, colour) drawn from one distribution shared
by all classes, and a small class-specific mark (a coloured shape covering ~10-20 % of the
object). A classifier only needs the mark, so its class response maps (and the boxes and
masks grown from them) cover a small part of the object: the "discriminative part" problem
CCGR repairs (paper, Fig. 1). Backgrounds are cluttered with shapes whose colours are drawn
from the same distribution as the bodies, so objects cannot be cut out by colour alone.

Layout written by `generate(out_dir, ...)`:

    out_dir/train/000001.png ...      out_dir/val/000201.png ...
    out_dir/train.json, val.json      COCO instances JSON (RLE masks, bbox, area, iscrowd=0)
    out_dir/classes.txt               one class name per line (category id = line number)
    out_dir/meta.json                 the generator arguments; written last (completion mark)

The training loader reads only the image-level categories of train.json; its masks serve
the pseudo-label quality figures only. `write_voc` writes the same data in the PASCAL VOC
2012 layout so the VOC loaders run on real files.

CLI: python -m wsis_ray.data.demo --out DIR [--classes K --train N --val M --seed S] [--voc DIR]
"""
from __future__ import annotations

import argparse
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

MARK_SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond")
MARK_COLOURS = (
    ("red", (225, 25, 25)), ("blue", (25, 60, 230)), ("yellow", (240, 220, 20)),
    ("green", (20, 175, 55)), ("magenta", (205, 35, 205)), ("cyan", (20, 205, 215)),
    ("orange", (245, 135, 10)),
)
# (shape k % 6, colour k % 7) is unique for k < lcm(6, 7)
MAX_CLASSES = 42
IMAGE_SIZE_RANGE = (128, 192)
OBJECT_SIZE_RANGE = (20, 90)
GENERATOR_VERSION = 2


def class_names(num_classes: int) -> list[str]:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"demo dataset supports 1..{MAX_CLASSES} classes, got {num_classes}")
    return [f"{MARK_COLOURS[k % 7][0]}_{MARK_SHAPES[k % 6]}" for k in range(num_classes)]


# ---------------------------------------------------------------------------- drawing

def _random_body_colour(rng: np.random.Generator) -> np.ndarray:
    """Muted colours; the same distribution feeds bodies and background clutter."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(40, 140), rng.integers(90, 210)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


_MARK_RGB = np.array([c for _, c in MARK_COLOURS], np.float32)


def _random_clutter_colour(rng: np.random.Generator) -> np.ndarray:
    """Any colour but the class-mark colours: the extent of an object is meant to be hard
    to find, not its class (the paper's setting: the discriminative part is easy)."""
    while True:
        c = rng.uniform(0, 255, 3).astype(np.float32)
        if np.abs(_MARK_RGB - c).max(1).min() > 70:
            return c


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    small = rng.random((cells, cells, channels)).astype(np.float32)
    out = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return out.reshape(h, w, channels)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _random_body_colour(rng)
    img = base + (_smooth_noise(rng, h, w, int(rng.integers(3, 7)), 3) - 0.5) * 120
    img += rng.normal(0, 8, (h, w, 3)).astype(np.float32)
    for _ in range(int(rng.integers(6, 16))):
        colour = _random_body_colour(rng) if rng.random() < 0.6 else _random_clutter_colour(rng)
        colour = tuple(float(c) for c in colour)
        kind = rng.integers(0, 3)
        if kind == 0:  # thick line
            p1 = rng.integers(0, [w, h]); p2 = rng.integers(0, [w, h])
            cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), colour,
                     int(rng.integers(2, 7)))
        elif kind == 1:  # blob
            c = rng.integers(0, [w, h]); ax = rng.integers(4, 22, 2)
            cv2.ellipse(img, tuple(int(v) for v in c), tuple(int(v) for v in ax),
                        float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:  # irregular polygon
            c = rng.uniform(0, [w, h]); pts = c + rng.normal(0, 14, (int(rng.integers(3, 7)), 2))
            cv2.fillPoly(img, [pts.astype(np.int32)], colour)
    return img


def _body_mask(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, size: float) -> np.ndarray:
    """A smooth irregular blob or an ellipse; the shape says nothing about the class."""
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.4:
        axes = (max(2, int(size / 2)), max(2, int(size / 2 * rng.uniform(0.55, 1.0))))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        n = int(rng.integers(10, 18))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        # radial profile: low-frequency harmonics keep the blob smooth and star-free
        phase = rng.uniform(0, 2 * np.pi, 3)
        amp = rng.uniform(0.05, 0.22, 3)
        r = 1 + sum(a * np.sin((k + 2) * angles + p) for k, (a, p) in enumerate(zip(amp, phase)))
        r = r / r.max()  # `size` is the largest extent
        aspect = rng.uniform(0.6, 1.0)
        rot = rng.uniform(0, 2 * np.pi)
        x = r * np.cos(angles); y = r * np.sin(angles) * aspect
        xr = x * np.cos(rot) - y * np.sin(rot); yr = x * np.sin(rot) + y * np.cos(rot)
        pts = np.stack([cx + xr * size / 2, cy + yr * size / 2], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _mark_mask(rng: np.random.Generator, body: np.ndarray, shape: str, frac: float) -> np.ndarray | None:
    """Class mark of ~frac of the body's area, placed fully inside the body."""
    area = float(body.sum())
    half = max(2.0, np.sqrt(frac * area) / 2)  # half side of a square of that area
    dist = cv2.distanceTransform(body.astype(np.uint8), cv2.DIST_L2, 3)
    ok = np.argwhere(dist >= half * 1.15 + 1)
    if len(ok) == 0:
        ok = np.argwhere(dist >= dist.max() * 0.8)
        half = max(2.0, float(dist.max()) / 1.3 - 0.5)
    y, x = ok[rng.integers(len(ok))]
    m = np.zeros(body.shape, np.uint8)
    c = (int(x), int(y))
    if shape == "disc":
        cv2.circle(m, c, int(round(half * 1.13)), 1, -1)
    elif shape == "square":
        s = int(round(half))
        cv2.rectangle(m, (c[0] - s, c[1] - s), (c[0] + s, c[1] + s), 1, -1)
    elif shape == "triangle":
        s = half * 1.5
        pts = np.array([[x, y - s], [x - s, y + s * 0.8], [x + s, y + s * 0.8]])
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    elif shape == "cross":
        s = int(round(half * 1.3)); t = max(1, int(round(half * 0.45)))
        cv2.rectangle(m, (c[0] - s, c[1] - t), (c[0] + s, c[1] + t), 1, -1)
        cv2.rectangle(m, (c[0] - t, c[1] - s), (c[0] + t, c[1] + s), 1, -1)
    elif shape == "ring":
        r = int(round(half * 1.35))
        cv2.circle(m, c, r, 1, max(1, int(round(r * 0.45))))
    else:  # diamond
        s = half * 1.4
        pts = np.array([[x, y - s], [x + s, y], [x, y + s], [x - s, y]])
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    mark = m.astype(bool) & body
    return mark if mark.sum() >= 4 else None


def _paint_body(rng: np.random.Generator, img: np.ndarray, body: np.ndarray) -> None:
    ys, xs = np.nonzero(body)
    colour = _random_body_colour(rng)
    theta = rng.uniform(0, np.pi); period = rng.uniform(4, 10)
    phase = (xs * np.cos(theta) + ys * np.sin(theta)) * (2 * np.pi / period)
    stripes = np.sin(phase)[:, None] * rng.uniform(18, 40)
    noise = rng.normal(0, 6, (len(ys), 3))
    img[ys, xs] = colour + stripes + noise


def _render_image(rng: np.random.Generator, num_classes: int):
    """One image: RGB uint8 array and a list of (class index, visible mask)."""
    h, w = (int(v) for v in rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1, 2))
    img = _background(rng, h, w)
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.25, 0.15]))
    objects: list[dict] = []  # bodies drawn later occlude earlier ones
    for i in range(n):
        cls = int(objects[int(rng.integers(len(objects)))]["cls"]) \
            if objects and rng.random() < 0.4 else int(rng.integers(num_classes))
        for _ in range(25):
            size = rng.uniform(OBJECT_SIZE_RANGE[0], min(OBJECT_SIZE_RANGE[1], 0.7 * min(h, w)))
            if objects and rng.random() < 0.5:  # next to an earlier object: occlusion
                other = objects[int(rng.integers(len(objects)))]
                ang = rng.uniform(0, 2 * np.pi); d = 0.55 * (size + other["size"]) / 2
                cx, cy = other["cx"] + d * np.cos(ang), other["cy"] + d * np.sin(ang)
            else:
                cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
            if not (size / 2 <= cx <= w - size / 2 and size / 2 <= cy <= h - size / 2):
                continue
            body = _body_mask(rng, h, w, cx, cy, size)
            if body.sum() < 150:
                continue
            mark = _mark_mask(rng, body, MARK_SHAPES[cls % 6], rng.uniform(0.10, 0.20))
            if mark is None:
                continue
            # every earlier object must stay mostly visible, with its mark visible
            if all((o["visible"] & ~body).sum() >= 0.5 * o["area"]
                   and (o["mark"] & ~body).sum() >= 0.7 * o["mark_area"] for o in objects):
                break
        else:
            continue
        for o in objects:
            o["visible"] &= ~body
            o["mark"] &= ~body
        _paint_body(rng, img, body)
        mark_rgb = np.array(MARK_COLOURS[cls % 7][1], np.float32)
        img[mark] = mark_rgb + rng.normal(0, 6, (int(mark.sum()), 3))
        objects.append(dict(cls=cls, size=size, cx=cx, cy=cy, visible=body.copy(), area=int(body.sum()),
                            mark=mark, mark_area=int(mark.sum())))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img, [(o["cls"], o["visible"]) for o in objects]


def render_image(rng: np.random.Generator, num_classes: int):
    """Like _render_image, but never an image without objects (it would have no label)."""
    while True:
        img, objs = _render_image(rng, num_classes)
        if objs:
            return img, objs


# ---------------------------------------------------------------------------- writing

def _mask_annotation(mask: np.ndarray) -> tuple[dict, list[float], int]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
    seg = {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}
    return seg, [x, y, bw, bh], int(mask.sum())


def _write_split(out_dir: Path, split: str, num_images: int, first_id: int, num_classes: int,
                 seed: int, names: list[str]) -> None:
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    for stale in img_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # from an earlier generation
        stale.unlink()
    images, annotations = [], []
    split_key = {"train": 0, "val": 1}[split]
    for k in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_key, k]))
        img, objs = render_image(rng, num_classes)
        image_id = first_id + k
        file_name = f"{image_id:06d}.png"
        cv2.imwrite(str(img_dir / file_name), img[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
        for cls, mask in objs:
            seg, bbox, area = _mask_annotation(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "segmentation": seg, "bbox": bbox, "area": area, "iscrowd": 0})
    coco = {
        "info": {"description": f"wsis-ray synthetic demo dataset ({split})", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": n, "supercategory": "demo"} for c, n in enumerate(names)],
    }
    (out_dir / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))


def generate(out_dir: str | Path, num_classes: int = 4, num_train: int = 200, num_val: int = 50,
             seed: int = 0) -> Path:
    """Write the demo dataset under out_dir (deterministic: same arguments, same bytes)."""
    out = Path(out_dir)
    names = class_names(num_classes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    (out / "classes.txt").write_text("".join(n + "\n" for n in names))
    _write_split(out, "train", num_train, 1, num_classes, seed, names)
    _write_split(out, "val", num_val, num_train + 1, num_classes, seed, names)
    (out / "meta.json").write_text(json.dumps(demo_meta(num_classes, num_train, num_val, seed)))
    return out


def demo_meta(num_classes: int, num_train: int, num_val: int, seed: int) -> dict:
    return {"generator": "wsis_ray.data.demo", "version": GENERATOR_VERSION, "num_classes": num_classes,
            "num_train": num_train, "num_val": num_val, "seed": seed}


def is_generated(out_dir: str | Path, num_classes: int, num_train: int, num_val: int, seed: int) -> bool:
    meta = Path(out_dir) / "meta.json"
    try:
        return json.loads(meta.read_text()) == demo_meta(num_classes, num_train, num_val, seed)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------- VOC copy

def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (index i -> RGB), 256 entries flattened."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _void_band(masks: list[np.ndarray]) -> np.ndarray:
    """VOC marks object borders as void (255): here a band one pixel either side."""
    kernel = np.ones((3, 3), np.uint8)
    band = np.zeros(masks[0].shape, bool) if masks else None
    for m in masks:
        m8 = m.astype(np.uint8)
        band |= cv2.dilate(m8, kernel).astype(bool) & ~cv2.erode(m8, kernel).astype(bool)
    return band


def voc_name(image_id: int) -> str:
    return f"2026_{image_id:06d}"


def write_voc(dataset_dir: str | Path, voc_root: str | Path) -> Path:
    """Copy a generated demo dataset into the PASCAL VOC 2012 layout under voc_root
    (JPEGImages, Annotations, ImageSets/{Main,Segmentation}, SegmentationObject,
    SegmentationClass with 255 = void on object borders) plus voc_root/classes.txt.
    SegmentationObject instance i is the i-th <object> of the XML, as in VOC."""
    src, root = Path(dataset_dir), Path(voc_root)
    names = (src / "classes.txt").read_text().split()
    for d in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation",
              "SegmentationObject", "SegmentationClass"):
        (root / d).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    lists: dict[str, list[str]] = {}
    for split in ("train", "val"):
        coco = json.loads((src / f"{split}.json").read_text())
        anns: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        lists[split] = []
        for im in coco["images"]:
            name = voc_name(im["id"])
            lists[split].append(name)
            h, w = im["height"], im["width"]
            Image.open(src / split / im["file_name"]).convert("RGB").save(
                root / "JPEGImages" / f"{name}.jpg", quality=95)
            objs = anns.get(im["id"], [])
            masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in objs]
            obj_png = np.zeros((h, w), np.uint8)
            cls_png = np.zeros((h, w), np.uint8)
            for i, (a, m) in enumerate(zip(objs, masks)):
                obj_png[m] = i + 1
                cls_png[m] = a["category_id"]
            if masks:
                band = _void_band(masks)
                obj_png[band] = 255
                cls_png[band] = 255
            for arr, sub in ((obj_png, "SegmentationObject"), (cls_png, "SegmentationClass")):
                p = Image.fromarray(arr, mode="P")
                p.putpalette(palette)
                p.save(root / sub / f"{name}.png")
            _write_voc_xml(root / "Annotations" / f"{name}.xml", name, h, w,
                           [(names[a["category_id"] - 1], a["bbox"]) for a in objs])
    for sub in ("Main", "Segmentation"):
        for split, items in list(lists.items()) + [("trainval", lists["train"] + lists["val"])]:
            (root / "ImageSets" / sub / f"{split}.txt").write_text("".join(n + "\n" for n in items))
    (root / "classes.txt").write_text("".join(n + "\n" for n in names))
    return root


def _write_voc_xml(path: Path, name: str, h: int, w: int, objects: list[tuple[str, list[float]]]) -> None:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "VOC2012"
    ET.SubElement(ann, "filename").text = f"{name}.jpg"
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(ann, "segmented").text = "1"
    for cname, (x, y, bw, bh) in objects:
        o = ET.SubElement(ann, "object")
        ET.SubElement(o, "name").text = cname
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = "0"
        box = ET.SubElement(o, "bndbox")
        # VOC boxes are 1-based inclusive pixel indices
        for tag, v in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + bw), ("ymax", y + bh)):
            ET.SubElement(box, tag).text = str(int(round(v)))
    ET.indent(ann)
    ET.ElementTree(ann).write(path, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the wsis-ray synthetic demo dataset.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--val", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voc", default="", help="also write a PASCAL VOC 2012 layout copy here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = generate(args.out, args.classes, args.train, args.val, args.seed)
    dt = time.perf_counter() - t0
    print(json.dumps({"out": str(out), "images": args.train + args.val, "seconds": round(dt, 2),
                      "classes": class_names(args.classes)}))
    if args.voc:
        write_voc(out, args.voc)
        print(json.dumps({"voc_root": args.voc}))


if __name__ == "__main__":
    main()
