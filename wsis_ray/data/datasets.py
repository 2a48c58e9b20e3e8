"""Training datasets with image-level labels only.

Loaders for JSON Lines, COCO instances JSON and PASCAL VOC 2012 return an
`ImageLabelDataset` of `ImageRecord`s (no masks, no boxes). Every loader validates all
records before any work starts: missing or unreadable image files, unknown class names,
images without labels, duplicate ids or file names and declared sizes that disagree with
the file raise one `DatasetError` naming the offending records and what to do. With
`skip_invalid=True` those records are dropped instead and listed (JSON Lines: record +
reason) in `skipped_out`.

Image ids are ints: COCO's own ids; for JSON Lines the 1-based position in sorted
file-name order; for VOC the 1-based position of the image in the sorted JPEGImages/
listing (stable across image sets, so train, val and their ground truth agree).
"""
from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile

from wsis_ray.data.records import ImageRecord

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
MAX_LISTED = 20
SKIP_HINT = "pass --skip-invalid (config data.skip_invalid=true) to proceed without them"


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says which records and why."""


@dataclass
class ImageLabelDataset:
    """Records plus the class list. `category_ids[c]` is class c's id in the source
    (COCO category id; 1..K for JSON Lines and VOC)."""
    records: list[ImageRecord]
    classes: list[str]
    category_ids: list[int]
    _by_id: dict[int, ImageRecord] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.category_ids):
            raise ValueError("classes and category_ids must have the same length")
        self._by_id = {r.image_id: r for r in self.records}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def by_id(self, image_id: int) -> ImageRecord:
        return self._by_id[image_id]

    def label_matrix(self) -> np.ndarray:
        """(N, C) float32 multi-hot image labels, in record order."""
        y = np.zeros((len(self.records), self.num_classes), np.float32)
        for i, r in enumerate(self.records):
            y[i, list(r.class_ids)] = 1
        return y


def load_image(record: ImageRecord | str | os.PathLike) -> np.ndarray:
    """H x W x 3 uint8 RGB (EXIF orientation is not applied: sizes match the annotations)."""
    path = record.path if isinstance(record, ImageRecord) else record
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------- validation

@dataclass
class _Candidate:
    """A record before validation: what the source declares, plus problems found so far."""
    name: str                      # file name as written in the source (for messages)
    path: str
    image_id: int | None
    height: int | None             # declared (COCO/VOC) or None (read from the file)
    width: int | None
    class_ids: tuple[int, ...]
    problems: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # the raw record, for the skipped list


def _check_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) or (None, reason). Decodes the whole file (a truncated JPEG
    fails only on decode) at reduced scale where the format allows it (JPEG draft mode)."""
    if not os.path.isfile(path):
        return None, "image file not found"
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except Exception as e:  # PIL raises many types for corrupt data
        return None, f"unreadable image ({type(e).__name__}: {e})"
    return (size[1], size[0]), None


def _validate(cands: list[_Candidate], num_classes: int, where: str, skip_invalid: bool,
              skipped_out: str | os.PathLike | None, require_labels: bool = True) -> list[ImageRecord]:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images will pass validation")
    seen_ids: dict[int, str] = {}
    seen_paths: dict[str, str] = {}
    for c in cands:
        if c.image_id is not None:
            if c.image_id in seen_ids:
                c.problems.append(f"duplicate image id {c.image_id} (also used by {seen_ids[c.image_id]})")
            else:
                seen_ids[c.image_id] = c.name
        key = os.path.normpath(c.path)
        if key in seen_paths:
            c.problems.append(f"duplicate file name (also listed as {seen_paths[key]})")
        else:
            seen_paths[key] = c.name
        if c.path.startswith("<"):  # a line that could not be parsed: nothing more to check
            continue
        if require_labels and not c.class_ids and not any("class" in p for p in c.problems):
            c.problems.append("no image-level labels")
        if any(not 0 <= k < num_classes for k in c.class_ids):
            c.problems.append(f"class index out of range 0..{num_classes - 1}")
    workers = min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        checks = list(pool.map(_check_image, [c.path for c in cands if not c.path.startswith("<")]))
    checks_iter = iter(checks)
    checks = [(None, None) if c.path.startswith("<") else next(checks_iter) for c in cands]
    records, bad = [], []
    for c, (hw, err) in zip(cands, checks):
        if err:
            c.problems.append(f"{err}: {c.path}")
        elif c.height is not None and (c.height, c.width) != hw:
            c.problems.append(f"declared size {c.height}x{c.width} (HxW) but the file is {hw[0]}x{hw[1]}")
        if c.problems:
            bad.append(c)
            continue
        # absolute, so Ray workers with another working directory find the file
        records.append(ImageRecord(image_id=int(c.image_id), path=os.path.abspath(c.path), height=hw[0], width=hw[1],
                                   class_ids=tuple(sorted(set(c.class_ids)))))
    if bad:
        _report(bad, len(cands), where, skip_invalid, skipped_out)
    return records


def _fix_hint(problems: list[str]) -> str:
    hints = []
    text = " ".join(problems)
    if "not found" in text:
        hints.append("check the images root / file names")
    if "unreadable" in text:
        hints.append("re-export or delete the corrupt image files")
    if "unknown class" in text:
        hints.append("add the class to the class list or fix the label")
    if "no image-level labels" in text:
        hints.append("label the images or remove them from the list")
    if "duplicate" in text:
        hints.append("give each image one unique id and file name")
    if "declared size" in text:
        hints.append("fix width/height in the annotations to match the files")
    return "; ".join(hints)


def _report(bad: list[_Candidate], total: int, where: str, skip_invalid: bool,
            skipped_out: str | os.PathLike | None) -> None:
    if skip_invalid:
        log.warning("skipping %d of %d invalid image record(s) in %s%s", len(bad), total, where,
                    f"; list written to {skipped_out}" if skipped_out else "")
        if skipped_out:
            Path(skipped_out).parent.mkdir(parents=True, exist_ok=True)
            with open(skipped_out, "w") as f:
                for c in bad:
                    f.write(json.dumps({"record": c.source or {"file_name": c.name},
                                        "path": c.path, "reason": "; ".join(c.problems)}) + "\n")
        return
    lines = [f"{len(bad)} of {total} image record(s) in {where} are invalid:"]
    for c in bad[:MAX_LISTED]:
        lines.append(f"  - {c.name}" + (f" (id {c.image_id})" if c.image_id is not None else "")
                     + ": " + "; ".join(c.problems))
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more ({len(bad)} in total)")
    hint = _fix_hint([p for c in bad for p in c.problems])
    lines.append(f"To fix: {hint}; or {SKIP_HINT}.")
    raise DatasetError("\n".join(lines))


def _read_classes(classes: str | os.PathLike | Sequence[str]) -> list[str]:
    if isinstance(classes, (str, os.PathLike)):
        p = Path(classes)
        if not p.is_file():
            raise DatasetError(f"class list {p} not found: give a text file with one class name per line")
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    else:
        names = [str(c) for c in classes]
    if not names:
        raise DatasetError(f"class list {classes} is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"class list {classes} names {', '.join(dup)} more than once")
    return names


def _class_ids(labels: list, index: dict[str, int], problems: list[str]) -> tuple[int, ...]:
    ids = []
    for lab in labels:
        if lab in index:
            ids.append(index[lab])
        else:
            problems.append(f"unknown class {lab!r}")
    return tuple(ids)


# ---------------------------------------------------------------------------- JSON Lines

def load_jsonl(labels_file: str | os.PathLike, images_root: str | os.PathLike,
               classes_file: str | os.PathLike | Sequence[str], skip_invalid: bool = False,
               skipped_out: str | os.PathLike | None = None) -> ImageLabelDataset:
    """JSON Lines, one image per line: {"file_name": "a/b.jpg", "labels": ["cat", "dog"]}.
    file_name is relative to images_root. Ids: 1-based position in sorted file-name order."""
    labels_file, root = Path(labels_file), Path(images_root)
    if not labels_file.is_file():
        raise DatasetError(f"labels file {labels_file} not found")
    classes = _read_classes(classes_file)
    index = {n: i for i, n in enumerate(classes)}
    cands = []
    for lineno, line in enumerate(labels_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name = f"line {lineno}"
        try:
            obj = json.loads(line)
            name = obj["file_name"]
            labels = obj["labels"]
            if not isinstance(name, str) or not isinstance(labels, list):
                raise TypeError("file_name must be a string and labels a list")
        except (ValueError, KeyError, TypeError) as e:
            c = _Candidate(name, f"<{labels_file}:{lineno}>", None, None, None, (),
                           [f"malformed line ({type(e).__name__}: {e}); expected "
                            '{"file_name": "...", "labels": ["..."]}'], {"line": lineno, "text": line[:200]})
            cands.append(c)
            continue
        problems: list[str] = []
        ids = _class_ids(labels, index, problems)
        cands.append(_Candidate(name, str(root / name), None, None, None, ids, problems, obj))
    cands.sort(key=lambda c: (c.name, c.path))
    for i, c in enumerate(cands, 1):
        c.image_id = i
    records = _validate(cands, len(classes), str(labels_file), skip_invalid, skipped_out)
    return ImageLabelDataset(records, classes, list(range(1, len(classes) + 1)))


# ---------------------------------------------------------------------------- COCO

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"annotation file {path} not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise DatasetError(f"{path} is not a COCO instances file (needs 'images', 'categories', 'annotations')")
    return data


def load_coco(instances_json: str | os.PathLike, images_root: str | os.PathLike,
              skip_invalid: bool = False, skipped_out: str | os.PathLike | None = None,
              require_labels: bool = True) -> ImageLabelDataset:
    """COCO instances JSON; only the set of categories present per image is read (masks,
    boxes and crowd flags are ignored: a crowd region still says the class is there).
    Classes are the categories sorted by id; category_ids keeps the COCO ids."""
    path = Path(instances_json)
    data = _read_json(path)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    classes = [str(c["name"]) for c in cats]
    category_ids = [int(c["id"]) for c in cats]
    cat_index = {cid: i for i, cid in enumerate(category_ids)}
    per_image: dict[int, set[int]] = {}
    unknown: dict[int, set] = {}
    for a in data.get("annotations", []):
        iid = a.get("image_id")
        if a.get("category_id") in cat_index:
            per_image.setdefault(iid, set()).add(cat_index[a["category_id"]])
        else:
            unknown.setdefault(iid, set()).add(a.get("category_id"))
    root = Path(images_root)
    cands = []
    for im in data["images"]:
        name = str(im.get("file_name", f"<image {im.get('id')}>"))
        problems = [f"unknown class (category id {u!r} not in categories)" for u in sorted(unknown.get(im.get("id"), []), key=str)]
        try:
            iid, h, w = int(im["id"]), int(im["height"]), int(im["width"])
        except (KeyError, TypeError, ValueError):
            iid, h, w = None, None, None
            problems.append("image entry needs integer id, height and width")
        cands.append(_Candidate(name, str(root / name), iid, h, w,
                                tuple(sorted(per_image.get(iid, ()))), problems, im))
    records = _validate(cands, len(classes), str(path), skip_invalid, skipped_out, require_labels)
    return ImageLabelDataset(records, classes, category_ids)


# ---------------------------------------------------------------------------- VOC

def voc_image_ids(voc_root: str | os.PathLike) -> dict[str, int]:
    """Image name (no extension) -> 1-based position in the sorted JPEGImages/ listing."""
    jpeg = Path(voc_root) / "JPEGImages"
    if not jpeg.is_dir():
        raise DatasetError(f"{jpeg} not found: voc_root must be the VOC2012 directory "
                           "(holding JPEGImages/, Annotations/, ImageSets/)")
    names = sorted(p.stem for p in jpeg.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    return {n: i for i, n in enumerate(names, 1)}


def voc_image_set(voc_root: str | os.PathLike, image_set: str, prefer: str = "Main") -> tuple[Path, list[str]]:
    """`image_set` is "Main/train", "Segmentation/val" or a bare name ("train": ImageSets/
    <prefer>/train.txt, else the other directory)."""
    sets = Path(voc_root) / "ImageSets"
    if "/" in image_set:
        options = [sets / f"{image_set}.txt"]
    else:
        other = "Segmentation" if prefer == "Main" else "Main"
        options = [sets / prefer / f"{image_set}.txt", sets / other / f"{image_set}.txt"]
    for p in options:
        if p.is_file():
            return p, [ln.split()[0] for ln in p.read_text().splitlines() if ln.strip()]
    raise DatasetError(f"VOC image set {image_set!r} not found (looked for {', '.join(map(str, options))})")


def _parse_voc_xml(path: Path) -> tuple[int, int, list[dict]]:
    root = ET.parse(path).getroot()
    size = root.find("size")
    h, w = int(size.findtext("height")), int(size.findtext("width"))
    objs = []
    for o in root.findall("object"):
        bb = o.find("bndbox")
        box = None
        if bb is not None:
            box = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        objs.append({"name": (o.findtext("name") or "").strip(), "difficult": o.findtext("difficult") == "1",
                     "box": box})
    return h, w, objs


def load_voc(voc_root: str | os.PathLike, image_set: str = "train",
             classes: str | os.PathLike | Sequence[str] | None = None, skip_invalid: bool = False,
             skipped_out: str | os.PathLike | None = None) -> ImageLabelDataset:
    """PASCAL VOC 2012 (voc_root = VOCdevkit/VOC2012): image labels from Annotations/*.xml
    (every <object>, difficult ones included), images from an ImageSets list. `classes`
    defaults to the 20 VOC classes; category ids are 1..K."""
    voc_root = Path(voc_root)
    names = _read_classes(classes) if classes is not None else list(VOC_CLASSES)
    index = {n: i for i, n in enumerate(names)}
    ids = voc_image_ids(voc_root)
    list_path, items = voc_image_set(voc_root, image_set)
    cands = []
    for name in items:
        problems: list[str] = []
        xml = voc_root / "Annotations" / f"{name}.xml"
        h = w = None
        labels: tuple[int, ...] = ()
        try:
            h, w, objs = _parse_voc_xml(xml)
            labels = _class_ids([o["name"] for o in objs], index, problems)
        except FileNotFoundError:
            problems.append(f"annotation file not found: {xml}")
        except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
            problems.append(f"malformed annotation {xml} ({type(e).__name__}: {e})")
        cands.append(_Candidate(name, str(voc_root / "JPEGImages" / f"{name}.jpg"), ids.get(name, None),
                                h, w, labels, problems, {"name": name}))
    records = _validate(cands, len(names), str(list_path), skip_invalid, skipped_out)
    return ImageLabelDataset(records, names, list(range(1, len(names) + 1)))


# ---------------------------------------------------------------------------- config entry

def ensure_demo(data_cfg) -> Path:
    """Generate the demo dataset under data_cfg.root unless it is there with the same
    arguments. A file lock keeps concurrent callers (several Ray workers) from racing."""
    import fcntl

    from wsis_ray.data import demo

    root = Path(data_cfg.root)
    args = (data_cfg.demo_classes, data_cfg.demo_train_images, data_cfg.demo_val_images, data_cfg.demo_seed)
    if demo.is_generated(root, *args):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not demo.is_generated(root, *args):
            log.info("generating the demo dataset under %s", root)
            demo.generate(root, *args)
    return root


def load_train_dataset(data_cfg, skipped_out: str | os.PathLike | None = None) -> ImageLabelDataset:
    """The training set named by cfg.data (image-level labels only)."""
    fmt = data_cfg.format
    skip = data_cfg.skip_invalid
    if fmt == "demo":
        root = ensure_demo(data_cfg)
        return load_coco(root / "train.json", root / "train", skip, skipped_out)
    if fmt == "jsonl":
        _need(data_cfg, "train", "a JSON Lines labels file")
        _need(data_cfg, "classes", "a class list file")
        return load_jsonl(data_cfg.train, data_cfg.root, data_cfg.classes, skip, skipped_out)
    if fmt == "coco":
        _need(data_cfg, "train", "a COCO instances JSON")
        return load_coco(data_cfg.train, data_cfg.root, skip, skipped_out)
    if fmt == "voc":
        return load_voc(data_cfg.root, data_cfg.train or "train", data_cfg.classes or None, skip, skipped_out)
    raise DatasetError(f"unknown data.format {fmt!r}: use demo, jsonl, coco or voc")


def load_eval_dataset(data_cfg, split: str = "val") -> ImageLabelDataset:
    """Images of the evaluation split (their labels are not used by inference). Images
    without objects are allowed here."""
    fmt = data_cfg.format
    if fmt == "demo":
        root = ensure_demo(data_cfg)
        return load_coco(root / f"{split}.json", root / split, data_cfg.skip_invalid, require_labels=False)
    if fmt == "voc":
        name = data_cfg.val or "val"
        if split == "train":
            name = data_cfg.train or "train"
        image_set = name if "/" in name else f"Segmentation/{name}"
        return load_voc(data_cfg.root, image_set, data_cfg.classes or None, data_cfg.skip_invalid)
    path = data_cfg.val if split != "train" else data_cfg.train
    if not path or not str(path).endswith(".json"):
        raise DatasetError(f"data.{'val' if split != 'train' else 'train'} must be a COCO instances JSON "
                           f"with masks to evaluate (format {fmt}), got {path!r}")
    root = data_cfg.val_root or data_cfg.root
    return load_coco(path, root, data_cfg.skip_invalid, require_labels=False)


def _need(data_cfg, name: str, what: str) -> None:
    if not getattr(data_cfg, name):
        raise DatasetError(f"data.format={data_cfg.format} needs data.{name} ({what})")
