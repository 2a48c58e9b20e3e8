"""A tiny, easy synthetic dataset the branch tests write themselves: flat coloured
shapes (class 0 = red square, class 1 = blue square) on a grey noisy background, with
proposals, bags, semantic labels and instance labels in the project's file formats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from wsis_ray.data.records import (BAGS_SCHEMA, PROPOSALS_SCHEMA, PSEUDO_LABEL_SCHEMA,
                                   ImageRecord, encode_mask, write_table_atomic)

COLOURS = [(220, 40, 40), (40, 60, 220)]
CLASSES = ["red", "blue"]
CATEGORY_IDS = [1, 2]


def make_dataset(root: Path, n: int = 8, size: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "semantic").mkdir(exist_ok=True)
    records, props, bags, pseudo, gt = [], [], [], [], {}
    for i in range(n):
        h, w = size, size + 16 * (i % 2)
        img = rng.normal(128, 12, (h, w, 3)).clip(0, 255).astype(np.uint8)
        sem = np.zeros((h, w), np.uint8)
        objects = []
        for c in ([i % 2] if i % 3 else [0, 1]):
            s = int(rng.integers(16, 26))
            for _ in range(20):  # place without overlap
                x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
                if not sem[max(0, y - 2):y + s + 2, max(0, x - 2):x + s + 2].any():
                    break
            img[y:y + s, x:x + s] = COLOURS[c]
            sem[y:y + s, x:x + s] = c + 1
            m = np.zeros((h, w), bool)
            m[y:y + s, x:x + s] = True
            objects.append((c, m, np.array([x, y, x + s, y + s], np.float32)))
        path = root / f"{i:03d}.png"
        Image.fromarray(img).save(path)
        Image.fromarray(sem).save(root / "semantic" / f"{i}.png")
        records.append(ImageRecord(i, str(path), h, w, tuple(sorted({o[0] for o in objects}))))
        gt[i] = objects
        # proposals: per object its box, a loose box and a tight one; plus random boxes
        boxes = []
        for _, _, b in objects:
            boxes += [b, b + np.array([-4, -4, 4, 4], np.float32),
                      b + np.array([4, 4, -4, -4], np.float32),
                      b + np.array([-8, -2, 10, 6], np.float32)]
        for _ in range(6):
            x1, y1 = rng.uniform(0, w - 12), rng.uniform(0, h - 12)
            boxes.append(np.array([x1, y1, x1 + rng.uniform(8, w - x1),
                                   y1 + rng.uniform(8, h - y1)], np.float32))
        boxes = np.clip(np.stack(boxes), 0, [w, h, w, h]).astype(np.float32)
        props.append({"image_id": i, "boxes": boxes.tolist(),
                      "objectness": [1.0] * len(boxes)})
        for k, (c, m, b) in enumerate(objects):
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            inside = np.where((boxes[:, 0] <= cx) & (boxes[:, 2] >= cx) &
                              (boxes[:, 1] <= cy) & (boxes[:, 3] >= cy))[0]
            bags.append({"image_id": i, "bag_id": k, "class_id": c, "peak_x": float(cx),
                         "peak_y": float(cy), "source_box": None,
                         "proposal_indices": inside.astype(np.int32).tolist()})
            pseudo.append({"image_id": i, "class_id": c, "box_before": b.tolist(),
                           "box_after": b.tolist(), "score": 1.0,
                           "rle_counts": encode_mask(m), "height": h, "width": w,
                           "round": 1, "ccgr_loss": 0.0, "ccgr_iterations": 0,
                           "stop_reason": "test"})
    write_table_atomic(pa.Table.from_pylist(props, PROPOSALS_SCHEMA), str(root / "proposals.parquet"))
    write_table_atomic(pa.Table.from_pylist(bags, BAGS_SCHEMA), str(root / "bags.parquet"))
    write_table_atomic(pa.Table.from_pylist(pseudo, PSEUDO_LABEL_SCHEMA), str(root / "pseudo.parquet"))
    return {"records": records, "proposals": str(root / "proposals.parquet"),
            "bags": str(root / "bags.parquet"), "pseudo": str(root / "pseudo.parquet"),
            "semantic": str(root / "semantic"), "gt": gt}
