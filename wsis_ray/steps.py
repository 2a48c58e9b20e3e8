"""The steps of the round job (jobs/round.py), one function each, in the paper's order.

Each step reads artefacts of earlier steps from the run directory, writes its own (atomic
names), and returns `(artefacts, metrics)`; `run_step` commits them to the manifest, so a
killed job re-run with the same command continues after the last committed step.
"""
from __future__ import annotations

import functools
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from wsis_ray.config import Config, load_config
from wsis_ray.data.datasets import (ImageLabelDataset, load_eval_dataset, load_image,
                                    load_train_dataset)
from wsis_ray.data.groundtruth import InstanceGT, load_eval_gt
from wsis_ray.data.records import (BAGS_SCHEMA, PEAKS_SCHEMA, decode_mask, encode_mask,
                                   load_torch_state, read_table, write_table_atomic)
from wsis_ray.run import CONFIG, RunDir

Step = Callable[["Context"], tuple[list[str], dict[str, Any]]]

SELECTED_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("bag_id", pa.int32()), ("class_id", pa.int32()),
    ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32()),
    ("peak_x", pa.float32()), ("peak_y", pa.float32()),
])


@dataclass
class Context:
    cfg: Config
    run: RunDir
    train: ImageLabelDataset
    val: ImageLabelDataset
    val_gt: dict[int, InstanceGT]
    train_gt: dict[int, InstanceGT] | None
    started: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: Config, run: RunDir) -> "Context":
        """Load and validate the datasets before any work starts (errors name the records)."""
        skipped = run.path("skipped_records.jsonl") if "://" not in run.uri else None
        train = load_train_dataset(cfg.data, skipped_out=skipped)
        val = load_eval_dataset(cfg.data, "val")
        val_gt = load_eval_gt(cfg.data, "val", train.category_ids)
        try:  # ground truth of the training images, for pseudo-label quality figures only
            train_gt = load_eval_gt(cfg.data, "train", train.category_ids)
        except Exception:
            train_gt = None
        return cls(cfg, run, train, val, val_gt, train_gt)

    @classmethod
    def of_run_dir(cls, run_dir: str) -> "Context":
        """The context of an existing run directory, from its stored config (for tools that
        inspect a run, e.g. bench/ccgr_quality.py)."""
        run = RunDir(run_dir)
        return cls.open(load_config(run.path(CONFIG), [f"run_dir={run_dir}"]), run)

    @property
    def storage(self) -> str:
        """Where Ray Train keeps checkpoints (shared storage on a cluster)."""
        return self.cfg.train.storage_path or self.run.uri_of("ray_train")

    def train_name(self, base: str) -> str:
        """The Ray Train run name of a training step; its checkpoints go at the step's commit."""
        return self.run.train_name(base, self.storage)


def init_ray(address: str | None, cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    # Local workers inherit this: they import wsis_ray from this checkout even when it is
    # not pip-installed (a cluster gets the code through `ray job submit --working-dir`).
    root = str(Path(__file__).resolve().parents[1])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p])
    if address:
        ray.init(address=address)
    else:
        # The Train controller polls its workers every 2 s by default, which adds ~2-3 s to
        # each of a round's short trainings after its loop ends (measured: a trivial fit 12.2
        # -> 9.8 s); a local Ray inherits this (a user's own value wins).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        # More logical CPUs than cores: Train workers and Ray Data actors coexist (FACTS.md).
        from wsis_ray.train import start_local_ray

        start_local_ray(num_cpus=max(4, (os.cpu_count() or 2) * 2))


# -- plan ----------------------------------------------------------------------------------

def plan(cfg: Config) -> list[tuple[str, Step]]:
    """The ordered steps for this config."""
    if cfg.round.supervision == "full":
        return [("full/is", train_is_full), ("full/eval", functools.partial(evaluate_round, "full")),
                ("final", functools.partial(finalize, "full")), ("report", write_report)]
    steps: list[tuple[str, Step]] = [("seeds", make_seeds)]
    for r in range(1, cfg.round.rounds + 1):
        rd = f"round_{r}"
        if cfg.round.no_mil:  # boxes come from the SS masks, so SS goes first
            steps += [(f"{rd}/ss", functools.partial(train_ss, r)),
                      (f"{rd}/boxes", functools.partial(boxes_from_masks, r))]
        else:  # paper order: MIL, then SS
            steps += [(f"{rd}/mil", functools.partial(train_mil, r)),
                      (f"{rd}/ss", functools.partial(train_ss, r))]
        steps += [(f"{rd}/ccgr", functools.partial(refine, r)),
                  (f"{rd}/is", functools.partial(train_is, r)),
                  (f"{rd}/eval", functools.partial(evaluate_round, rd))]
        if r == 1 and cfg.round.ablations:
            # the comparison rows need only the seeds and round 1: a run stopped before its
            # last round already holds Table 1's baseline and upper bound and Table 3
            steps += ablation_steps()
        if r < cfg.round.rounds:
            steps += [(f"{rd}/update", functools.partial(update, r))]
    steps += [("final", functools.partial(finalize, f"round_{cfg.round.rounds}")),
              ("report", write_report)]
    return steps


# Table 1/3 rows beside the method, in the same run directory (they reuse its seeds and its
# round-1 MIL boxes and SS branch): name -> what it is.
ABLATIONS = {
    "baseline_cam": "CAM baseline: each peak's best Eq. 4 proposal, no other branch (Table 1)",
    "table3_no_det": "round 1, no Det., no CCGR: boxes from SS mask components (Table 3)",
    "table3_no_ccgr": "round 1, Det. without CCGR: MIL boxes cropped directly (Table 3)",
    "full": "fully supervised upper bound: Mask R-CNN on ground-truth masks (Table 1)",
}


def ablation_steps() -> list[tuple[str, Step]]:
    """round.ablations: the comparison rows, each trained at the method's IS budget."""
    p = functools.partial
    return [
        ("baseline_cam/eval", cam_baseline),
        ("table3_no_det/boxes", p(boxes_from_masks, 1, rd="table3_no_det")),
        ("table3_no_det/ccgr", p(refine, 1, rd="table3_no_det", ccgr=False, mask_boxes=True)),
        ("table3_no_det/is", p(train_is, 1, rd="table3_no_det")),
        ("table3_no_det/eval", p(evaluate_round, "table3_no_det")),
        ("table3_no_ccgr/ccgr", p(refine, 1, rd="table3_no_ccgr", boxes_from="round_1",
                                  ccgr=False, mask_boxes=False)),
        ("table3_no_ccgr/is", p(train_is, 1, rd="table3_no_ccgr")),
        ("table3_no_ccgr/eval", p(evaluate_round, "table3_no_ccgr")),
        ("full/is", train_is_full),
        ("full/eval", p(evaluate_round, "full")),
    ]


def make_seeds(ctx: Context):
    """Round-0 seeds: CAM + peaks, proposals, AffinityNet semantic labels, Eq. 4 bags (each
    sub-step commits itself in wsis_ray.seeds), then their figures on val."""
    from wsis_ray import seeds

    for fn in seeds.TRAIN_STEPS:
        t0 = time.time()
        fn(ctx.cfg, ctx.train, ctx.run)
        print(f"  [seeds] {fn.__name__} {_fmt(time.time() - t0)}", flush=True)
    metrics = seeds.run_seeds(ctx.cfg, ctx.run, evaluate=ctx.cfg.round.seed_figures)
    # the sub-steps' artefacts, so that the rounds see a recomputed seed (`inputs_of`)
    done = ctx.run.manifest()["steps"]
    artefacts = sorted({a for k, v in done.items() if k.startswith("seeds/")
                        for a in v["artefacts"]})
    return artefacts, {k: v for k, v in metrics.items() if k != "seconds"}


# Steps that summarise every step before them: redone whenever one of those was added or
# recomputed (e.g. `--force --set round.rounds=3` on a finished 2-round run must serve and
# report round 3, not keep round 2's final model).
SUMMARIES = ("final", "report")


def _is_leaf(name: str) -> bool:
    """A step no later step of the method reads: an evaluation, or a comparison row."""
    return name.endswith("/eval") or name.split("/")[0] in ABLATIONS


def inputs_of(plan: list[tuple[str, Step]], i: int) -> list[str]:
    """The earlier steps whose committed artefacts step i is computed from: a step is redone
    once one of them was recomputed with other content (an artefact deleted or changed, then
    rebuilt on resume). Conservatively every earlier step of the method's chain (a round
    reads its predecessor's bags, labels and trunk, which read theirs) and the row's own
    earlier steps, but no evaluation or comparison row, which nothing downstream reads; a
    summary step reads them all."""
    name = plan[i][0]
    if name in SUMMARIES:
        return [n for n, _ in plan[:i]]
    row = name.split("/")[0]
    return [n for n, _ in plan[:i]
            if not _is_leaf(n) or (row in ABLATIONS and n.split("/")[0] == row)]


def run_step(ctx: Context, name: str, fn: Step, remaining: list[str] | None = None,
             inputs: list[str] | None = None) -> None:
    """Run one step unless committed (from `inputs` as committed now, where given); print a
    line with elapsed time and an ETA."""
    run = ctx.run
    if run.is_done(name, inputs):
        print(f"[skip] {name} (committed in {run.uri}/manifest.json)", flush=True)
        return
    print(f"[start] {name}  elapsed {_fmt(time.time() - ctx.started)}"
          f"{eta(run, [name] + (remaining or []))}", flush=True)
    t0 = time.time()
    artefacts, metrics = fn(ctx)
    seconds = time.time() - t0
    run.commit(name, artefacts, metrics, seconds, inputs)
    ctx.seconds[name] = seconds
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(f"[done] {name} in {_fmt(seconds)}  {json.dumps(shown)[:300]}", flush=True)


def eta(run: RunDir, todo: list[str]) -> str:
    """Time left, from the last committed step of the same kind (e.g. round_1/is for
    round_2/is); empty until every step left has such an estimate."""
    done = run.manifest()["steps"]
    total = 0.0
    for name in todo:
        kind = name.split("/")[-1]
        same = [v.get("seconds") for k, v in done.items() if k.split("/")[-1] == kind]
        if not same or same[-1] is None:
            return ""
        total += same[-1]
    return f"  ETA {_fmt(total)}"


def _fmt(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


# -- helpers -------------------------------------------------------------------------------

def save_torch(ctx: Context, rel: str, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    ctx.run.write_bytes(rel, buf.getvalue())


def load_torch(ctx: Context, rel: str) -> Any:
    return load_torch_state(ctx.run.uri_of(rel))


def write_json(ctx: Context, rel: str, obj: Any) -> None:
    ctx.run.write_text(rel, json.dumps(obj, indent=1))


def init_trunk(ctx: Context, r: int):
    """The trunk weights a branch starts from when backbone.share_trunk (the paper's shared
    convolutional layers, trained sequentially: each branch starts from the latest trunk).
    Only committed steps count, so a resumed run starts from what an uninterrupted one did."""
    if not ctx.cfg.backbone.share_trunk:
        return None
    candidates = [f"round_{r}/mil", f"round_{r}/ss"]
    for q in range(r - 1, 0, -1):
        candidates += [f"round_{q}/ss", f"round_{q}/mil"]
    done = [c for c in candidates if ctx.run.is_done(c)]
    if done:
        order = list(ctx.run.manifest()["steps"])  # commit order: the latest trunk last
        return load_torch(ctx, max(done, key=order.index) + "/trunk.pt")
    from wsis_ray.branches.common import sub_state

    return sub_state(load_torch(ctx, "seeds/cam/state.pt")["model"], "trunk.")


def bags_uri(ctx: Context, r: int) -> str:
    return ctx.run.uri_of("seeds/bags.parquet" if r == 1 else f"round_{r - 1}/bags.parquet")


def semantic_dir(ctx: Context, r: int) -> str:
    return ctx.run.uri_of("seeds/semantic" if r == 1 else f"round_{r - 1}/semantic")


def box_ap(ctx: Context, rows: list[dict], box_key: str = "box") -> float | None:
    """mAP^b_0.5 of pseudo boxes on the training images with ground truth (paper: 'Det.')."""
    from wsis_ray.evaluate import evaluate

    if not ctx.train_gt:
        return None
    ids = ctx.train.category_ids
    results = [{"image_id": int(r["image_id"]), "category_id": int(ids[r["class_id"]]),
                "score": float(r["score"]),
                "bbox": [float(r[box_key][0]), float(r[box_key][1]),
                         float(r[box_key][2] - r[box_key][0]),
                         float(r[box_key][3] - r[box_key][1])]}
               for r in rows if int(r["image_id"]) in ctx.train_gt]
    gt = {i: g for i, g in ctx.train_gt.items() if any(x.image_id == i for x in ctx.train)}
    m = evaluate(gt, results, ids, ctx.train.classes, mask_ious=(), coco=False,
                 class_agnostic=False)
    return m["voc"]["box"]["0.5"]["mean"]


# -- round steps ---------------------------------------------------------------------------

def train_mil(r: int, ctx: Context):
    """MIL branch (WSDDN) on the round's bags -> one box per bag (round_r/boxes.parquet);
    the selection runs on a Ray Data actor pool."""
    from wsis_ray import stages
    from wsis_ray.branches import mil

    cfg, rd = ctx.cfg, f"round_{r}"
    props, bags = ctx.run.uri_of("seeds/proposals.parquet"), bags_uri(ctx, r)
    out = mil.fit_mil(cfg, ctx.train.records, props, bags, ctx.train.num_classes, ctx.storage,
                      name=ctx.train_name(f"{rd}-mil"), init_trunk=init_trunk(ctx, r))
    save_torch(ctx, f"{rd}/mil/state.pt", {"model": out["model"]})
    save_torch(ctx, f"{rd}/mil/trunk.pt", out["trunk"])
    rows = stages.run_select_stage(
        ctx.train.records, mil.read_mil_inputs(props, bags), ctx.run.uri_of(f"{rd}/mil/state.pt"),
        asdict(cfg.backbone), asdict(cfg.mil), ctx.train.num_classes,
        max_actors=max(1, cfg.train.num_workers), num_gpus=1.0 if cfg.train.use_gpu else 0.0,
        cpus_per_actor=cfg.train.cpus_per_worker)
    anchors = {(b["image_id"], b["bag_id"]): _anchor(b) for b in read_table(bags).to_pylist()}
    for row in rows:
        row["peak_x"], row["peak_y"] = anchors[(row["image_id"], row["bag_id"])]
        row["box"] = [float(v) for v in row["box"]]
    write_table_atomic(pa.Table.from_pylist(rows, schema=SELECTED_SCHEMA),
                       ctx.run.uri_of(f"{rd}/boxes.parquet"))
    metrics = {"loss": out["metrics"].get("loss"), "boxes": len(rows),
               "pseudo_box_mAP_b@0.5": box_ap(ctx, rows)}
    return [f"{rd}/mil/state.pt", f"{rd}/mil/trunk.pt", f"{rd}/boxes.parquet"], metrics


def _anchor(bag: dict) -> tuple[float, float]:
    """A bag's anchor point: its peak (round 0), or the center of its IS source box."""
    if bag["peak_x"] is not None:
        return float(bag["peak_x"]), float(bag["peak_y"])
    x1, y1, x2, y2 = bag["source_box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def train_ss(r: int, ctx: Context):
    """SS branch (FCN + pyramid pooling) on the round's pseudo semantic labels."""
    from wsis_ray.branches import semseg

    cfg, rd = ctx.cfg, f"round_{r}"
    out = semseg.fit_ss(cfg, ctx.train.records, semantic_dir(ctx, r), ctx.train.num_classes,
                        ctx.storage, name=ctx.train_name(f"{rd}-ss"), init_trunk=init_trunk(ctx, r))
    save_torch(ctx, f"{rd}/ss/state.pt", {"model": out["model"]})
    save_torch(ctx, f"{rd}/ss/trunk.pt", out["trunk"])
    metrics = {"loss": out["metrics"].get("loss"), **ss_miou(ctx, out["model"])}
    return [f"{rd}/ss/state.pt", f"{rd}/ss/trunk.pt"], metrics


def ss_miou(ctx: Context, state: dict) -> dict[str, float]:
    """The SS branch's mIoU on the val ground truth ("val_mIoU") and, with cfg.crf on, on
    the maps CCGR will see, after the CRF ("val_mIoU_crf"); one inference serves both."""
    from wsis_ray import crf
    from wsis_ray.branches import semseg

    model = semseg.load_model(state, ctx.cfg.backbone, ctx.cfg.ss, ctx.train.num_classes)
    recs = [r for r in ctx.val.records if r.image_id in ctx.val_gt]
    images = [load_image(r) for r in recs]
    preds = semseg.predict_scores(model, images, ctx.cfg.ss.image_size)
    gts = [semseg.semantic_gt(ctx.val_gt[r.image_id]) for r in recs]

    def miou(maps):
        return semseg.miou([m.argmax(0).astype(np.uint8) for m in maps], gts,
                           ctx.train.num_classes + 1)["miou"]
    out = {"val_mIoU": miou(preds)}
    if ctx.cfg.crf.iterations > 0:
        out["val_mIoU_crf"] = miou(crf.refine_maps(images, preds, ctx.cfg.crf))
    return out


class SSScoreFn:
    """Picklable factory for the Ray Data SS-inference actors: builds the SS branch from
    its saved state inside the actor."""

    def __init__(self, state_uri: str, cfg: Config, num_classes: int,
                 cache_uri: str | None = None):
        self.state_uri, self.cfg, self.num_classes = state_uri, cfg, num_classes
        self.cache_uri = cache_uri  # stages.CachedScoreFn keeps the maps there

    def __call__(self):
        import torch

        from wsis_ray import crf
        from wsis_ray.branches import semseg

        state = load_torch_state(self.state_uri)
        model = semseg.load_model(state["model"], self.cfg.backbone, self.cfg.ss, self.num_classes)
        if torch.cuda.is_available():
            model = model.cuda()
        size, crf_cfg = self.cfg.ss.image_size, self.cfg.crf

        # README "Deviations": with crf.iterations > 0, a dense CRF on the SS maps
        def score_fn(images, image_ids=None):
            return crf.refine_maps(images, semseg.predict_scores(model, images, size), crf_cfg)

        if self.cache_uri:
            from wsis_ray.stages import CachedScoreFn

            return CachedScoreFn(self.cache_uri, score_fn)
        return score_fn


def maps_cache(ctx: Context, r: int) -> str | None:
    """Where round r's SS (+ CRF) score maps are kept, or None. Under round.ablations round
    1's maps serve round_1/ccgr and the three Table 3 steps after it (each took ~3.5 min to
    recompute them on the results config); the directory is named by a digest of the SS
    state and of the settings that shape the maps, so a retrained SS never reads stale ones."""
    if not (ctx.cfg.round.ablations and r == 1):
        return None
    import hashlib

    state = ctx.run.manifest()["steps"][f"round_{r}/ss"]["artefacts"][f"round_{r}/ss/state.pt"]
    c = ctx.cfg
    key = json.dumps([state, asdict(c.ss), asdict(c.crf), asdict(c.backbone)], sort_keys=True)
    return ctx.run.uri_of(f"round_{r}/ss/maps-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def boxes_from_masks(r: int, ctx: Context, rd: str | None = None):
    """--no-mil (paper Table 3, first row): without the detection branch, each connected
    component of a labelled class's SS mask gives a box (its four extreme corners).
    Written to rd/boxes.parquet (default round_r)."""
    import cv2

    cfg = ctx.cfg
    rd = rd or f"round_{r}"
    score_fn = SSScoreFn(ctx.run.uri_of(f"round_{r}/ss/state.pt"), cfg, ctx.train.num_classes,
                         maps_cache(ctx, r))()
    rows = []
    for i in range(0, len(ctx.train.records), 8):
        recs = ctx.train.records[i:i + 8]
        maps = score_fn([load_image(x) for x in recs], [x.image_id for x in recs])
        for rec, s in zip(recs, maps):
            winner = s.argmax(0)
            for c in rec.class_ids:
                n, lab, stats, cent = cv2.connectedComponentsWithStats(
                    (winner == c + 1).astype(np.uint8), connectivity=8)
                for k in range(1, n):
                    x, y, w, h, area = stats[k]
                    if area < 4:
                        continue
                    comp = lab == k
                    rows.append({"image_id": rec.image_id, "bag_id": len(rows), "class_id": c,
                                 "box": [float(x), float(y), float(x + w), float(y + h)],
                                 "score": float(s[c + 1][comp].mean()),
                                 "peak_x": float(cent[k][0]), "peak_y": float(cent[k][1])})
    write_table_atomic(pa.Table.from_pylist(rows, schema=SELECTED_SCHEMA),
                       ctx.run.uri_of(f"{rd}/boxes.parquet"))
    return [f"{rd}/boxes.parquet"], {"boxes": len(rows), "pseudo_box_mAP_b@0.5": box_ap(ctx, rows)}


def anchors_table(ctx: Context, r: int) -> pa.Table:
    """Every bag anchor of the round (the peaks the CCGR peak rule must respect)."""
    rows = [{"image_id": b["image_id"], "class_id": b["class_id"],
             "x": _anchor(b)[0], "y": _anchor(b)[1], "score": 1.0}
            for b in read_table(bags_uri(ctx, r)).to_pylist()]
    return pa.Table.from_pylist(rows, schema=PEAKS_SCHEMA)


def round_ccgr_config(ctx: Context, r: int, mask_boxes: bool = False):
    """cfg.ccgr for round r: where some bag of the round comes from an IS box (anchor = its
    centre, several per object), other anchors are judged by the region rule at
    ccgr.anchor_region; rounds of PRM peaks (round 1, or no confident IS box) and --no-mil
    keep ccgr.peak_region."""
    cfg = ctx.cfg.ccgr
    if mask_boxes or r < 2:
        return cfg
    peak_x = read_table(bags_uri(ctx, r)).column("peak_x")
    return replace(cfg, peak_region=cfg.anchor_region) if peak_x.null_count else cfg


def refine(r: int, ctx: Context, rd: str | None = None, boxes_from: str | None = None,
           ccgr: bool | None = None, mask_boxes: bool | None = None):
    """CCGR on Ray Data: SS score maps -> refined boxes -> pseudo masks (Parquet).

    rd: where the pseudo labels go (default round_r); boxes_from: whose boxes.parquet to
    refine (default rd); ccgr / mask_boxes: override round.no_ccgr / round.no_mil (the
    Table 3 ablations run this step with their own settings)."""
    from wsis_ray import stages
    from wsis_ray.data.records import pseudo_labels_to_coco

    cfg = ctx.cfg
    rd = rd or f"round_{r}"
    ccgr = (not cfg.round.no_ccgr) if ccgr is None else ccgr
    mask_boxes = cfg.round.no_mil if mask_boxes is None else mask_boxes
    boxes = read_table(ctx.run.uri_of(f"{boxes_from or rd}/boxes.parquet"))
    anchors = (anchors_table(ctx, r) if not mask_boxes else
               boxes.select(["image_id", "class_id", "peak_x", "peak_y"])
               .rename_columns(["image_id", "class_id", "x", "y"]))
    rows = stages.image_rows(ctx.train.records, boxes, anchors)
    ccgr_cfg = replace(round_ccgr_config(ctx, r, mask_boxes), enabled=cfg.ccgr.enabled and ccgr)
    score_fn = SSScoreFn(ctx.run.uri_of(f"round_{r}/ss/state.pt"), cfg, ctx.train.num_classes,
                         maps_cache(ctx, r))
    gpus = 1.0 if cfg.train.use_gpu else 0.0
    info = stages.run_refine_stage(rows, score_fn, ccgr_cfg, r, ctx.run.uri_of(f"{rd}/pseudo.parquet"),
                                   min_actors=1, max_actors=max(1, cfg.train.num_workers),
                                   batch_size=cfg.ccgr.batch_images, num_gpus=gpus,
                                   cpus_per_actor=cfg.train.cpus_per_worker)
    table = read_table(ctx.run.uri_of(f"{rd}/pseudo.parquet")).sort_by(
        [("image_id", "ascending"), ("class_id", "ascending")])
    write_json(ctx, f"{rd}/pseudo_coco.json", pseudo_labels_to_coco(table, ctx.train))
    pseudo = table.to_pylist()
    reasons: dict[str, int] = {}
    for p in pseudo:
        reasons[p["stop_reason"]] = reasons.get(p["stop_reason"], 0) + 1
    selected = boxes.to_pylist()  # every MIL box, also those ccgr.dedupe_iou drops after CCGR
    metrics = {"pseudo_labels": len(pseudo), "images": info["images"],
               "pseudo_box_mAP_b@0.5_before": box_ap(ctx, selected),
               "pseudo_box_mAP_b@0.5_after": box_ap(ctx, pseudo, "box_after"),
               "pseudo_mask_mAP_r@0.5": pseudo_mask_ap(ctx, table),
               "stop_reasons": reasons}
    if ccgr_cfg.dedupe_iou > 0:  # the same NMS on the MIL boxes: what CCGR adds beyond it
        import torch

        kept = stages.dedupe(torch.tensor([r["box"] for r in selected]).reshape(-1, 4),
                             torch.tensor([r["score"] for r in selected]),
                             torch.tensor([r["image_id"] for r in selected]),
                             torch.tensor([r["class_id"] for r in selected]),
                             ccgr_cfg.dedupe_iou)
        metrics["pseudo_box_mAP_b@0.5_before_deduped"] = box_ap(
            ctx, [selected[k] for k in kept.tolist()])
    artefacts = [f"{rd}/pseudo.parquet", f"{rd}/pseudo_coco.json"]
    curve = convergence(ctx, pseudo)
    if curve:
        from wsis_ray import viz

        metrics["pseudo_box_mAP_b@0.5_by_iteration"] = curve
        png = viz.figure_convergence(list(curve), list(curve.values()),
                                     _local_tmp(f"fig5_{rd}.png"), title=f"{rd}: CCGR")
        ctx.run.write_bytes(f"{rd}/pictures/fig5_convergence.png", png.read_bytes())
        artefacts.append(f"{rd}/pictures/fig5_convergence.png")
    return artefacts, metrics


def _local_tmp(name: str):
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="wsis-")) / name


def convergence(ctx: Context, pseudo: list[dict]) -> dict[int, float] | None:
    """Paper Fig. 5: pseudo-box mAP^b_0.5 on the training images vs CCGR iteration."""
    every = ctx.cfg.ccgr.record_every
    if not ctx.train_gt or not every or not pseudo or pseudo[0]["box_trajectory"] is None:
        return None
    iterations = list(range(0, ctx.cfg.ccgr.iterations + 1, every))
    curve = {}
    for t, it in enumerate(iterations):
        rows = [dict(p, box=p["box_trajectory"][t]) for p in pseudo
                if p["box_trajectory"] is not None and t < len(p["box_trajectory"])]
        curve[it] = box_ap(ctx, rows)
    return curve


def pseudo_mask_ap(ctx: Context, table: pa.Table) -> float | None:
    """Pseudo-mask quality: mAP^r_0.5 of the pseudo masks against training ground truth."""
    from wsis_ray.data.records import results_from_pseudo_labels
    from wsis_ray.evaluate import evaluate

    if not ctx.train_gt:
        return None
    res = [x for x in results_from_pseudo_labels(table, ctx.train) if x["image_id"] in ctx.train_gt]
    gt = {r.image_id: ctx.train_gt[r.image_id] for r in ctx.train if r.image_id in ctx.train_gt}
    m = evaluate(gt, res, ctx.train.category_ids, ctx.train.classes, mask_ious=(0.5,),
                 box_ious=(), coco=False, class_agnostic=False)
    return m["voc"]["mask"]["0.5"]["mean"]


def is_init_trunk(ctx: Context, r: int):
    """The trunk the IS branch starts from under backbone.share_trunk. Where its Mask R-CNN
    body is the network MIL and SS train (instance.backbone == backbone.name), the round's
    latest MIL/SS trunk: the paper's shared convolutional layers (Fig. 2), which have
    learned the classes from the image labels by then. Otherwise (configs/demo.yaml: a
    ResNet-18 Mask R-CNN beside EfficientNet MIL/SS) the previous round's IS trunk, and
    in round 1 the body's own initialisation."""
    cfg = ctx.cfg
    if not cfg.backbone.share_trunk:
        return None
    if cfg.instance.backbone == cfg.backbone.name:
        return init_trunk(ctx, r)
    return load_torch(ctx, f"round_{r - 1}/is/trunk.pt") if r > 1 else None


def train_is(r: int, ctx: Context, rd: str | None = None):
    """IS branch (Mask R-CNN) on the pseudo instance masks in rd (default round_r)."""
    from wsis_ray.branches import instance

    cfg = ctx.cfg
    rd = rd or f"round_{r}"
    out = instance.fit_instance(cfg, ctx.train.records, ctx.run.uri_of(f"{rd}/pseudo.parquet"),
                                ctx.train.classes, ctx.storage, name=ctx.train_name(f"{rd}-is"),
                                init_trunk=is_init_trunk(ctx, r),
                                checkpoint_uri=ctx.run.uri_of(f"{rd}/is/model.pt"),
                                meta=_meta(ctx, r))
    save_torch(ctx, f"{rd}/is/trunk.pt", out["trunk"])
    return [f"{rd}/is/model.pt", f"{rd}/is/trunk.pt"], {"loss": out["metrics"].get("loss")}


def train_is_full(ctx: Context):
    """Upper bound (paper Table 1, 'FS'): Mask R-CNN on the ground-truth masks."""
    from wsis_ray.branches import instance

    if not ctx.train_gt:
        raise RuntimeError("--supervision full needs ground-truth masks for the training "
                           "images (data.train must be a COCO instances JSON with masks)")
    write_table_atomic(instance.gt_table(ctx.train_gt), ctx.run.uri_of("full/gt.parquet"))
    out = instance.fit_instance(ctx.cfg, ctx.train.records, ctx.run.uri_of("full/gt.parquet"),
                                ctx.train.classes, ctx.storage, name=ctx.train_name("full-is"),
                                checkpoint_uri=ctx.run.uri_of("full/is/model.pt"),
                                meta=_meta(ctx, 0))
    return ["full/is/model.pt", "full/gt.parquet"], {"loss": out["metrics"].get("loss")}


def cam_baseline(ctx: Context):
    """Table 1's CAM row (PRM-style, no MIL/SS/IS training): on val, every peak's
    best-ranked Eq. 4 proposal is an instance, scored by its peak's CAM response; its mask
    is the part of the box the round-0 semantic labels give the peak's class (the whole
    box where they give none). Like the seed figures, val images use their image labels."""
    from wsis_ray import seeds
    from wsis_ray.evaluate import evaluate, format_table

    labelled = replace(ctx.val, records=[x for x in ctx.val.records if x.class_ids])
    for step in seeds.SPLIT_STEPS:  # no-ops where the seed figures already made them
        step(ctx.cfg, labelled, ctx.run, "val")
    props = seeds.read_proposals(ctx.run.uri_of("seeds/val/proposals.parquet"))
    bags = seeds.read_bags(ctx.run.uri_of("seeds/val/bags.parquet"))
    peaks = seeds.read_peaks(ctx.run.uri_of("seeds/val/peaks.parquet"))
    results = []
    for rec in labelled.records:
        label = seeds.read_semantic(ctx.run, rec.image_id, "val")
        for bag in bags.get(rec.image_id, []):
            x1, y1, x2, y2 = props[rec.image_id][0][bag.proposal_indices[0]]
            score = max((p[3] for p in peaks.get(rec.image_id, []) if p[0] == bag.class_id
                         and abs(p[1] - bag.peak[0]) < 1e-3 and abs(p[2] - bag.peak[1]) < 1e-3),
                        default=0.0)
            box = np.zeros(label.shape, bool)
            box[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
            mask = box & (label == bag.class_id + 1)
            results.append({"image_id": rec.image_id,
                            "category_id": int(ctx.train.category_ids[bag.class_id]),
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                            "score": float(score),
                            "segmentation": {"size": list(label.shape),
                                             "counts": encode_mask(mask if mask.any() else box)}})
    write_json(ctx, "baseline_cam/predictions.json", results)
    m = evaluate(ctx.val_gt, [x for x in results if x["image_id"] in ctx.val_gt],
                 ctx.train.category_ids, ctx.train.classes)
    write_json(ctx, "baseline_cam/metrics.json", m)
    ctx.run.write_text("baseline_cam/metrics.txt", format_table(m))
    return ["baseline_cam/predictions.json", "baseline_cam/metrics.json"], dict(m["summary"])


def _meta(ctx: Context, r: int) -> dict:
    return {"category_ids": list(ctx.train.category_ids), "run": ctx.run.uri, "round": r,
            "supervision": ctx.cfg.round.supervision}


def predict(ctx: Context, checkpoint_rel: str, records, min_score: float = 0.0) -> list[dict]:
    """IS predictions scoring >= max(instance.score_threshold, min_score)."""
    from wsis_ray import stages

    cfg = ctx.cfg
    return stages.run_predict_stage(list(records), ctx.run.uri_of(checkpoint_rel),
                                    max(cfg.instance.score_threshold, min_score),
                                    ctx.train.category_ids,
                                    max_actors=max(1, cfg.train.num_workers),
                                    num_gpus=1.0 if cfg.train.use_gpu else 0.0,
                                    cpus_per_actor=cfg.train.cpus_per_worker)


def evaluate_round(rd: str, ctx: Context):
    """Predict the validation images with the round's IS branch and evaluate (mAP^r, mAP^b)."""
    from wsis_ray.evaluate import evaluate, format_table

    results = predict(ctx, f"{rd}/is/model.pt", ctx.val.records)
    write_json(ctx, f"{rd}/predictions.json", results)
    m = evaluate(ctx.val_gt, [x for x in results if x["image_id"] in ctx.val_gt],
                 ctx.train.category_ids, ctx.train.classes)
    write_json(ctx, f"{rd}/metrics.json", m)
    ctx.run.write_text(f"{rd}/metrics.txt", format_table(m))
    return [f"{rd}/predictions.json", f"{rd}/metrics.json"], dict(m["summary"])


def update(r: int, ctx: Context):
    """After round r (paper): the IS boxes become the next round's bags (the top proposals
    by IoU with each box), and the union of the IS masks per class the next semantic labels.
    Only classes in the image's labels are kept; a labelled class without a confident IS
    box keeps its previous bags."""
    from wsis_ray.bags import box_bags
    from wsis_ray.seeds import read_proposals

    cfg, rd = ctx.cfg, f"round_{r}"
    # only boxes >= bag_score_threshold are used: the IS branch skips masks for the rest
    # (its score filter runs before NMS and top-k, so the confident set is the same)
    results = predict(ctx, f"{rd}/is/model.pt", ctx.train.records,
                      min_score=cfg.round.bag_score_threshold)
    by_image: dict[int, list[dict]] = {}
    for x in results:
        by_image.setdefault(x["image_id"], []).append(x)
    index = {c: i for i, c in enumerate(ctx.train.category_ids)}
    props = read_proposals(ctx.run.uri_of("seeds/proposals.parquet"))
    old = {}
    for b in read_table(bags_uri(ctx, r)).to_pylist():
        old.setdefault((b["image_id"], b["class_id"]), []).append(b)
    rows, kept, fallback = [], 0, 0
    for rec in ctx.train.records:
        preds = [x for x in by_image.get(rec.image_id, [])
                 if index[x["category_id"]] in rec.class_ids
                 and x["score"] >= cfg.round.bag_score_threshold]
        masks = [(decode_mask(x["segmentation"]["counts"], rec.height, rec.width),
                  index[x["category_id"]], x["score"]) for x in preds]
        label = next_semantic_label(
            masks, (rec.height, rec.width), rec.class_ids, cfg.round.dropped_foreground,
            functools.partial(read_label_png, ctx, semantic_dir(ctx, r), rec.image_id))
        buf = io.BytesIO()
        Image.fromarray(label).save(buf, format="PNG")
        ctx.run.write_bytes(f"{rd}/semantic/{rec.image_id}.png", buf.getvalue())
        boxes = props.get(rec.image_id, (np.zeros((0, 4), np.float32), None))[0]
        n = 0
        for c in rec.class_ids:
            cp = sorted((x for x in preds if index[x["category_id"]] == c),
                        key=lambda x: -x["score"])[:cfg.round.max_bags_per_class]
            if not cp:
                for b in old.get((rec.image_id, c), []):  # keep the previous bags
                    rows.append(dict(b, bag_id=n))
                    n += 1
                    fallback += 1
                continue
            xyxy = np.array([[x["bbox"][0], x["bbox"][1], x["bbox"][0] + x["bbox"][2],
                              x["bbox"][1] + x["bbox"][3]] for x in cp], np.float32)
            for bag in box_bags(boxes, xyxy, np.full(len(cp), c), cfg.bags.size):
                rows.append({"image_id": rec.image_id, "bag_id": n, "class_id": c,
                             "peak_x": None, "peak_y": None,
                             "source_box": [float(v) for v in bag.source_box],
                             "proposal_indices": bag.proposal_indices.tolist()})
                n += 1
                kept += 1
    write_table_atomic(pa.Table.from_pylist(rows, schema=BAGS_SCHEMA),
                       ctx.run.uri_of(f"{rd}/bags.parquet"))
    return [f"{rd}/bags.parquet", f"{rd}/semantic"], {"bags_from_is": kept,
                                                       "bags_kept_from_before": fallback}


def next_semantic_label(masks: list[tuple[np.ndarray, int, float]], shape: tuple[int, int],
                        class_ids: list[int], dropped_foreground: str,
                        read_prev: Callable[[], np.ndarray]) -> np.ndarray:
    """The next round's semantic label (0 background, c+1 class c, 255 ignore) of shape
    (H, W) from the confident IS masks (mask, class, score) of one image and the round's own
    label, which `read_prev()` reads only when needed (a class without a mask, or "ignore").

    Paper: the union of the IS masks per class; where masks of two classes overlap the
    higher score wins. A labelled class without any confident mask keeps its previous
    labels (as its bags do) instead of turning into background. Pixels the previous label
    called foreground (or ignored) that no mask covers become background under the paper's
    rule (`dropped_foreground` "background") or stay unlabelled ("ignore"): the IS branch
    trained on cropped score maps under-covers objects, so under the paper's rule each
    round's labels lose object pixels (docs/results-history.md)."""
    label = np.zeros(shape, np.uint8)
    best = np.zeros(shape, np.float32)
    for m, c, score in masks:
        m = m & (score > best)
        label[m], best[m] = c + 1, score
    present = {c for _, c, _ in masks}
    missing = [c for c in class_ids if c not in present]
    if not missing and dropped_foreground != "ignore":
        return label
    prev = read_prev()
    for c in missing:
        label[(prev == c + 1) & (label == 0)] = c + 1
    if dropped_foreground == "ignore":
        label[(label == 0) & (prev != 0)] = 255
    return label


def read_label_png(ctx: Context, dir_uri: str, image_id: int) -> np.ndarray:
    from wsis_ray.data.records import resolve_fs

    fs, path = resolve_fs(f"{dir_uri}/{image_id}.png")
    with fs.open_input_stream(path) as f:
        return np.asarray(Image.open(io.BytesIO(f.read())))


# -- final ---------------------------------------------------------------------------------

def finalize(rd: str, ctx: Context):
    """final/: the IS checkpoint Serve loads (with classes and val metrics), exports."""
    from wsis_ray.branches import instance

    model, meta = instance.load_checkpoint(ctx.run.uri_of(f"{rd}/is/model.pt"))
    metrics = json.loads(ctx.run.read_text(f"{rd}/metrics.json"))
    meta = dict(meta, val_metrics=metrics["summary"], source=f"{ctx.run.uri}/{rd}")
    instance.save_checkpoint(ctx.run.uri_of("final/model.pt"), model, meta)
    write_json(ctx, "final/metrics.json", metrics)
    ctx.run.write_bytes("final/predictions_val.json", ctx.run.read_text(
        f"{rd}/predictions.json").encode())
    return ["final/model.pt", "final/metrics.json", "final/predictions_val.json"], \
        {"source": rd, **metrics["summary"]}


def rounds_done(ctx: Context) -> list[tuple[str, dict]]:
    """(dir, val metrics) of every evaluated model: the CAM baseline, the rounds in order,
    then the Table 3 rows and the fully supervised upper bound."""
    steps = ctx.run.manifest()["steps"]
    done = [n.split("/")[0] for n in steps if n.endswith("/eval")]
    order = ["baseline_cam"] + sorted((d for d in done if d.startswith("round_")),
                                      key=lambda d: int(d.split("_")[1]))
    order += [d for d in ABLATIONS if d != "baseline_cam"]
    return [(d, steps[f"{d}/eval"]["metrics"]) for d in order if d in done]


def results_table(ctx: Context) -> str:
    """Per round: val mAP^r at 0.25/0.5/0.7/0.75, mAP^b_0.5 and class-agnostic AP^r_0.5;
    pseudo-box mAP^b_0.5 on the training images before/after CCGR; step times."""
    steps = ctx.run.manifest()["steps"]
    head = ["round", "mAP^r@0.25", "mAP^r@0.5", "mAP^r@0.7", "mAP^r@0.75", "mAP^b@0.5",
            "class-agnostic AP^r@0.5", "pseudo mAP^b before CCGR", "after CCGR",
            "pseudo mAP^r@0.5", "SS val mIoU", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rd, m in rounds_done(ctx):
        cc = steps.get(f"{rd}/ccgr", {}).get("metrics", {})
        ss = steps.get(f"{rd}/ss", {}).get("metrics", {})
        mins = sum((v.get("seconds") or 0) for k, v in steps.items() if k.startswith(rd + "/")) / 60
        vals = [m.get("mAP_r@0.25"), m.get("mAP_r@0.5"), m.get("mAP_r@0.7"), m.get("mAP_r@0.75"),
                m.get("mAP_b@0.5"), m.get("class_agnostic_AP_r@0.5"),
                cc.get("pseudo_box_mAP_b@0.5_before"),
                cc.get("pseudo_box_mAP_b@0.5_after"), cc.get("pseudo_mask_mAP_r@0.5"),
                ss.get("val_mIoU")]
        lines.append("| " + " | ".join([rd] + [_pct(v) for v in vals] + [f"{mins:.1f}"]) + " |")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def write_report(ctx: Context):
    """report.md: the results table, seed figures, and CCGR pictures of a few images."""
    steps = ctx.run.manifest()["steps"]
    parts = [f"# wsis-ray run report\n\nRun directory: `{ctx.run.uri}`\n",
             "## Results (val; pseudo-label figures on the training images)\n",
             results_table(ctx), ""]
    seeds_m = steps.get("seeds/metrics", {}).get("metrics")
    if seeds_m:
        parts += ["## Round-0 seeds (val)\n", "```json", json.dumps(seeds_m, indent=1), "```", ""]
    parts += ["## Step times\n", "| step | seconds |", "|---|---|"]
    parts += [f"| {k} | {v.get('seconds') or 0:.1f} |" for k, v in steps.items()]
    pics = ccgr_pictures(ctx)
    if pics:
        parts += ["", "## CCGR (green: MIL box, blue: refined, dotted: context)\n"]
        parts += [f"![{p}]({p})" for p in pics]
    ctx.run.write_text("report.md", "\n".join(parts) + "\n")
    return ["report.md"] + pics, {"pictures": len(pics)}


def ccgr_pictures(ctx: Context, count: int = 3) -> list[str]:
    """Figure 1/3/4-style pictures of the last round's refinement of one box on each of a
    few training images (written locally by viz, then copied into the run directory)."""
    import tempfile
    from pathlib import Path

    from wsis_ray import viz

    rounds = [rd for rd, _ in rounds_done(ctx) if rd.startswith("round_")]
    if not rounds:
        return []
    rd = rounds[-1]
    r = int(rd.split("_")[1])
    table = read_table(ctx.run.uri_of(f"{rd}/pseudo.parquet")).to_pylist()
    anchors = read_table(ctx.run.uri_of(f"{rd}/boxes.parquet")).to_pylist()
    ids = sorted({p["image_id"] for p in table})[:count]
    score_fn = SSScoreFn(ctx.run.uri_of(f"{rd}/ss/state.pt"), ctx.cfg, ctx.train.num_classes)()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for iid in ids:
            image = load_image(ctx.train.by_id(iid))
            scores = score_fn([image])[0]
            first = next(a for a in anchors if a["image_id"] == iid)
            peaks = [[first["peak_x"], first["peak_y"]]] + [
                [a["peak_x"], a["peak_y"]] for a in anchors
                if a["image_id"] == iid and a["class_id"] == first["class_id"] and a is not first]
            files = viz.ccgr_pictures(image, scores, first["box"], first["class_id"], tmp,
                                      stem=f"ccgr_{iid}",
                                      cfg=round_ccgr_config(ctx, r, ctx.cfg.round.no_mil),
                                      peaks_xy=peaks)
            for path in files.values():
                rel = f"{rd}/pictures/{Path(path).name}"
                ctx.run.write_bytes(rel, Path(path).read_bytes())
                out.append(rel)
    return out
