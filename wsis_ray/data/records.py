"""Record types and Parquet schemas shared by every step.

`ImageRecord` is what training code sees of an image: it has no field for masks or boxes,
so the method can only use image-level labels by construction. Ground truth for evaluation
lives elsewhere (`wsis_ray.data.groundtruth`).

Class ids are 0-based indices into the dataset's class list everywhere inside wsis_ray.
Networks that need a background class put it at index 0 and shift (SS score maps: channel
0 = background, channel c+1 = class c; Mask R-CNN labels: c+1). COCO exports map back to the
dataset's own category ids.

All Parquet files use plain Arrow types (no Ray extension types), masks as COCO RLE strings,
so they read with `pyarrow.parquet.read_table` and nothing else.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils


@dataclass(frozen=True)
class ImageRecord:
    """One training image with its image-level labels (the paper's I_n and L_n)."""
    image_id: int
    path: str
    height: int
    width: int
    class_ids: tuple[int, ...]


BOX = pa.list_(pa.float32(), 4)

PROPOSALS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("boxes", pa.list_(BOX)),            # [x1, y1, x2, y2] in image pixels
    ("objectness", pa.list_(pa.float32())),  # B_S in [0, 1]
])

PEAKS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("class_id", pa.int32()),
    ("x", pa.float32()),
    ("y", pa.float32()),
    ("score", pa.float32()),
])

BAGS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("bag_id", pa.int32()),
    ("class_id", pa.int32()),
    ("peak_x", pa.float32()),           # the bag's peak (round 0) ...
    ("peak_y", pa.float32()),
    # ... or the IS box it came from (later rounds; else null). A plain list, not BOX: pyarrow
    # 21 (measured; releases before apache/arrow#35692's fix) cannot read a null fixed-size
    # list back from Parquet.
    ("source_box", pa.list_(pa.float32())),
    ("proposal_indices", pa.list_(pa.int32())),  # into that image's proposals, best-ranked first
])

PSEUDO_LABEL_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("class_id", pa.int32()),
    ("box_before", BOX),                 # MIL-selected box
    ("box_after", BOX),                  # CCGR-refined box (== box_before with CCGR off)
    ("score", pa.float32()),
    ("rle_counts", pa.string()),         # COCO compressed RLE of the pseudo instance mask
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("round", pa.int32()),
    ("ccgr_loss", pa.float32()),         # Eq. 3 at the final box
    ("ccgr_iterations", pa.int32()),
    ("stop_reason", pa.string()),
    # box at CCGR iterations 0, k, 2k, ... (k = ccgr.record_every; paper Fig. 5), or null
    ("box_trajectory", pa.list_(BOX)),
])


def encode_mask(mask: np.ndarray) -> str:
    """Binary HxW mask -> COCO compressed RLE counts string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle["counts"].decode("ascii")


def decode_mask(counts: str, height: int, width: int) -> np.ndarray:
    """COCO compressed RLE counts string -> bool HxW mask."""
    rle = {"counts": counts.encode("ascii"), "size": [int(height), int(width)]}
    return mask_utils.decode(rle).astype(bool)


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """Any pyarrow filesystem URI (local path, s3://, gs://) -> (filesystem, path)."""
    if "://" not in uri:
        import os
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def load_torch_state(uri: str) -> Any:
    """A torch object saved under a URI (local path or object store), loaded onto the CPU.
    The run directory holds only what our own jobs wrote, hence weights_only=False."""
    import io

    import torch

    fs, path = resolve_fs(uri)
    with fs.open_input_stream(path) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def write_table_atomic(table: pa.Table, uri: str) -> None:
    """Write Parquet under a temporary name, then rename, so a reader (or a resumed run)
    never sees a half-written file under the final name."""
    fs, path = resolve_fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    with fs.open_output_stream(tmp) as out:
        pq.write_table(table, out)
    fs.move(tmp, path)


def read_table(uri: str) -> pa.Table:
    fs, path = resolve_fs(uri)
    return pq.read_table(path, filesystem=fs)


# ---------------------------------------------------------------------------- COCO export

def _xywh(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _pseudo_rows(table: pa.Table, dataset):
    """Rows of a PSEUDO_LABEL_SCHEMA table, checked against the dataset's records."""
    missing = set(PSEUDO_LABEL_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"pseudo-label table lacks column(s) {sorted(missing)}")
    by_id = {r.image_id: r for r in dataset.records}
    for row in table.to_pylist():
        rec = by_id.get(row["image_id"])
        if rec is None:
            raise ValueError(f"pseudo label for image id {row['image_id']}, which is not in the dataset")
        if (row["height"], row["width"]) != (rec.height, rec.width):
            raise ValueError(f"pseudo label of image {row['image_id']} is {row['height']}x{row['width']}, "
                             f"the image is {rec.height}x{rec.width}")
        if not 0 <= row["class_id"] < len(dataset.category_ids):
            raise ValueError(f"pseudo label class id {row['class_id']} outside the dataset's "
                             f"{len(dataset.category_ids)} classes")
        yield row, {"size": [row["height"], row["width"]], "counts": row["rle_counts"].encode("ascii")}


def pseudo_labels_to_coco(table: pa.Table, dataset, images_root: str | None = None) -> dict:
    """Pseudo labels (PSEUDO_LABEL_SCHEMA) -> COCO instances JSON that other toolkits
    (detectron2, mmdetection, pycocotools) can train on. Every dataset image is listed;
    `file_name` is the record path, relative to `images_root` when given. bbox/area are the
    mask's; the MIL and CCGR boxes, score and round ride along as extra fields. Empty masks
    are left out (counted in info)."""
    import os

    images = []
    for r in dataset.records:
        name = os.path.relpath(r.path, images_root) if images_root else r.path
        images.append({"id": r.image_id, "file_name": name, "height": r.height, "width": r.width})
    anns, empty = [], 0
    for row, rle in _pseudo_rows(table, dataset):
        area = int(mask_utils.area(rle))
        if area == 0:
            empty += 1
            continue
        anns.append({
            "id": len(anns) + 1, "image_id": int(row["image_id"]),
            "category_id": int(dataset.category_ids[row["class_id"]]),
            "segmentation": {"size": rle["size"], "counts": row["rle_counts"]},
            "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            "score": float(row["score"]), "round": int(row["round"]),
            "box_before": _xywh(row["box_before"]), "box_after": _xywh(row["box_after"]),
        })
    return {
        "info": {"description": "wsis-ray pseudo instance labels (image-level supervision only)",
                 "empty_masks_skipped": empty},
        "images": images,
        "annotations": anns,
        "categories": [{"id": int(c), "name": n} for c, n in zip(dataset.category_ids, dataset.classes)],
    }


def results_from_pseudo_labels(table: pa.Table, dataset, box: str = "box_after") -> list[dict]:
    """Pseudo labels as COCO results (for `wsis_ray.evaluate` against the training ground
    truth: pseudo-label quality). bbox is the `box` column (box_after = CCGR-refined,
    box_before = MIL-selected), so mAP^b measures the boxes themselves (paper, Fig. 5)."""
    if box not in ("box_after", "box_before"):
        raise ValueError(f"box must be box_after or box_before, got {box!r}")
    return [{"image_id": int(row["image_id"]), "category_id": int(dataset.category_ids[row["class_id"]]),
             "score": float(row["score"]), "bbox": _xywh(row[box]),
             "segmentation": {"size": [row["height"], row["width"]], "counts": row["rle_counts"]}}
            for row, _ in _pseudo_rows(table, dataset)]
