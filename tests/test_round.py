"""The round job end to end on a tiny demo (real Ray Train and Ray Data paths), and
kill-and-resume: a run SIGKILLed after a step and re-run finishes with the same artefacts."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from wsis_ray.data.records import decode_mask

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny.yaml"


def _job(run_dir, data_dir, address, *extra):
    return [sys.executable, str(ROOT / "jobs" / "round.py"), "--config", str(TINY),
            "--run-dir", str(run_dir), "--data-root", str(data_dir), "--address", address, *extra]


@pytest.fixture(scope="module")
def address(ray_session):
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, address):
    base = tmp_path_factory.mktemp("round")
    proc = subprocess.run(_job(base / "run", base / "data", address), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, proc.stdout


def test_round_end_to_end(full_run):
    base, out = full_run
    run = base / "run"
    manifest = json.loads((run / "manifest.json").read_text())["steps"]
    for step in ["seeds", "round_1/mil", "round_1/ss", "round_1/ccgr", "round_1/is",
                 "round_1/eval", "final", "report"]:
        assert step in manifest, step
    assert "| round_1 |" in out and "mAP^r@0.5" in out
    ss = manifest["round_1/ss"]["metrics"]  # tiny.yaml turns the CRF on
    assert 0 <= ss["val_mIoU_crf"] <= 1
    # Pseudo labels: plain pyarrow, our schema, masks decode to the image size.
    table = pq.read_table(run / "round_1" / "pseudo.parquet")
    assert table.num_rows > 0
    for row in table.to_pylist():
        m = decode_mask(row["rle_counts"], row["height"], row["width"])
        assert m.shape == (row["height"], row["width"])
    coco = json.loads((run / "round_1" / "pseudo_coco.json").read_text())
    assert coco["images"] and coco["categories"]
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert set(metrics["summary"]) >= {"mAP_r@0.25", "mAP_r@0.5", "mAP_r@0.7", "mAP_r@0.75",
                                       "mAP_b@0.5"}
    assert "| round_1 |" in (run / "report.md").read_text()
    assert (run / "round_1" / "pictures" / "fig5_convergence.png").stat().st_size > 0
    from wsis_ray.branches import instance
    model, meta = instance.load_checkpoint(str(run / "final" / "model.pt"))
    assert meta["classes"] and meta["round"] == 1
    # tools reopen a finished run from its stored config
    from wsis_ray import steps
    ctx = steps.Context.of_run_dir(str(run))
    assert ctx.cfg.run_dir == str(run) and ctx.train_gt and ctx.train.records


def test_seed_inputs_name_committed_steps(full_run):
    """Each round-0 step's recorded inputs name steps the run really commits."""
    from wsis_ray import seeds

    base, _ = full_run
    manifest = json.loads((base / "run" / "manifest.json").read_text())["steps"]
    seed_steps = [n for n in manifest if n.startswith("seeds/")]
    assert "seeds/bags" in seed_steps  # tiny.yaml skips the val split's seed figures
    for name in seed_steps:
        assert "inputs" in manifest[name], name
        assert set(seeds._inputs(name)) <= set(manifest), (name, seeds._inputs(name))
    val = [n.replace("seeds/", "seeds/val/") for n in seed_steps]  # the same steps on val
    for name in val + ["seeds/metrics"]:
        assert set(seeds._inputs(name)) <= set(manifest) | set(val), (name, seeds._inputs(name))
    assert manifest["seeds"]["artefacts"]  # the rounds see a recomputed seed


def test_rerun_skips_everything(full_run, address):
    base, _ = full_run
    proc = subprocess.run(_job(base / "run", base / "data", address), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[start]" not in proc.stdout and proc.stdout.count("[skip]") == 8


def test_other_config_is_refused(full_run, address):
    base, _ = full_run
    proc = subprocess.run(_job(base / "run", base / "data", address, "--set", "ccgr.iterations=7"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "different config" in proc.stderr


def _uncommit_from(ref: Path, run: Path, step: str) -> None:
    """Make `run` a copy of the finished run `ref` whose manifest ends before `step`: the
    directory a run killed before committing `step` leaves, without spending the suite's
    time on the seeds and the round's first steps twice. The uncommitted steps' artefacts
    are deleted, so only a rerun of those steps can bring them back."""
    shutil.copytree(ref, run)
    manifest = json.loads((run / "manifest.json").read_text())
    names = list(manifest["steps"])
    for name in names[names.index(step):]:
        for rel in manifest["steps"].pop(name)["artefacts"]:
            shutil.rmtree(run / rel) if (run / rel).is_dir() else (run / rel).unlink()
    (run / "manifest.json").write_text(json.dumps(manifest))
    config = (run / "config.yaml").read_text()  # the stored config names its run directory
    assert f"run_dir: {ref}\n" in config
    (run / "config.yaml").write_text(config.replace(f"run_dir: {ref}\n", f"run_dir: {run}\n"))
    assert not any((run / "ray_train").iterdir())  # a commit deletes its step's checkpoints


def test_kill_and_resume_gives_same_artefacts(full_run, tmp_path, address):
    base, _ = full_run
    run = tmp_path / "run"
    _uncommit_from(base / "run", run, "round_1/ccgr")
    cmd = _job(run, base / "data", address)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = False
    for line in proc.stdout:
        if line.startswith("[done] round_1/ccgr"):
            os.killpg(proc.pid, signal.SIGKILL)  # mid-run, no chance to clean up
            killed = True
            break
    proc.wait(timeout=60)
    assert killed
    assert not (run / "final" / "model.pt").exists()
    done = json.loads((run / "manifest.json").read_text())["steps"]
    assert "round_1/ccgr" in done and "round_1/is" not in done
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[skip] round_1/ccgr" in resumed.stdout and "[start] round_1/is" in resumed.stdout
    ref = base / "run"
    for rel in ["round_1/pseudo.parquet"]:
        a = pq.read_table(ref / rel).sort_by([("image_id", "ascending"), ("class_id", "ascending")])
        b = pq.read_table(run / rel).sort_by([("image_id", "ascending"), ("class_id", "ascending")])
        assert a.equals(b), rel
    sa = torch.load(ref / "final" / "model.pt", weights_only=False)
    sb = torch.load(run / "final" / "model.pt", weights_only=False)
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k
    ma = json.loads((ref / "final" / "metrics.json").read_text())["summary"]
    mb = json.loads((run / "final" / "metrics.json").read_text())["summary"]
    assert ma == mb


def test_update_makes_next_round_inputs(full_run, ray_session):
    """After a round (paper): IS boxes -> next bags (top proposals by IoU), union of IS masks
    per class -> next semantic labels; only the image's labelled classes survive."""
    import pyarrow.parquet as pq
    from PIL import Image

    from wsis_ray import steps
    from wsis_ray.config import load_config
    from wsis_ray.run import RunDir

    base, _ = full_run
    cfg = load_config(TINY, [f"run_dir={base / 'run'}", f"data.root={base / 'data'}",
                             "round.bag_score_threshold=0.0"])
    ctx = steps.Context.open(cfg, RunDir(cfg.run_dir))
    artefacts, metrics = steps.update(1, ctx)
    bags = pq.read_table(base / "run" / "round_1" / "bags.parquet").to_pylist()
    labels = {r.image_id: set(r.class_ids) for r in ctx.train.records}
    assert bags and metrics["bags_from_is"] + metrics["bags_kept_from_before"] == len(bags)
    for b in bags:
        assert b["class_id"] in labels[b["image_id"]]
        assert 0 < len(b["proposal_indices"]) <= cfg.bags.size
    for rec in ctx.train.records:
        sem = np.asarray(Image.open(base / "run" / "round_1" / "semantic" / f"{rec.image_id}.png"))
        assert sem.shape == (rec.height, rec.width)
        assert set(np.unique(sem)) <= {0} | {c + 1 for c in rec.class_ids}

    # With no confident IS box at all, every class keeps its bags and its semantic labels.
    cfg = load_config(TINY, [f"run_dir={base / 'run'}", f"data.root={base / 'data'}",
                             "round.bag_score_threshold=1.01"])
    ctx = steps.Context.open(cfg, RunDir(cfg.run_dir))
    _, metrics = steps.update(1, ctx)
    assert metrics["bags_from_is"] == 0
    assert pq.read_table(base / "run" / "round_1" / "bags.parquet").num_rows == \
        pq.read_table(base / "run" / "seeds" / "bags.parquet").num_rows
    for rec in ctx.train.records:
        now = np.asarray(Image.open(base / "run" / "round_1" / "semantic" / f"{rec.image_id}.png"))
        seed = np.asarray(Image.open(base / "run" / "seeds" / "semantic" / f"{rec.image_id}.png"))
        fg = np.isin(seed, [c + 1 for c in rec.class_ids])
        assert np.array_equal(now[fg], seed[fg])


def test_ablation_rows(full_run, ray_session):
    """round.ablations: the CAM baseline, Table 3's round-1 rows and the fully supervised
    upper bound run as steps of the same run directory and land in the results table."""
    import pyarrow.parquet as pq

    from wsis_ray import steps
    from wsis_ray.config import load_config
    from wsis_ray.run import RunDir

    base, _ = full_run
    run = base / "run"
    cfg = load_config(TINY, [f"run_dir={run}", f"data.root={base / 'data'}",
                             "round.ablations=true"])
    names = [n for n, _ in steps.plan(cfg)]
    # right after round 1, whose boxes and SS branch they reuse; before any later round
    assert names.index("round_1/eval") < names.index("baseline_cam/eval") \
        < names.index("full/eval") < names.index("final")
    cfg3 = load_config(TINY, [f"run_dir={run}", "round.ablations=true", "round.rounds=2"])
    names3 = [n for n, _ in steps.plan(cfg3)]
    assert names3.index("full/eval") < names3.index("round_1/update") < names3.index("round_2/mil")
    ctx = steps.Context.open(cfg, RunDir(cfg.run_dir))
    for name, fn in steps.ablation_steps():
        steps.run_step(ctx, name, fn)
    manifest = json.loads((run / "manifest.json").read_text())["steps"]
    for d in steps.ABLATIONS:
        assert f"{d}/eval" in manifest and "mAP_r@0.5" in manifest[f"{d}/eval"]["metrics"], d

    # CAM baseline: one instance per val bag, its mask inside its box.
    bags = pq.read_table(run / "seeds" / "val" / "bags.parquet").num_rows
    preds = json.loads((run / "baseline_cam" / "predictions.json").read_text())
    assert len(preds) == bags > 0
    for p in preds:
        x, y, w, h = p["bbox"]
        m = decode_mask(p["segmentation"]["counts"], *p["segmentation"]["size"])
        ys, xs = np.nonzero(m)
        assert m.any() and xs.min() >= int(x) and xs.max() < np.ceil(x + w) + 1
        assert ys.min() >= int(y) and ys.max() < np.ceil(y + h) + 1

    # Det. without CCGR: exactly the round's MIL boxes, unrefined.
    mil = pq.read_table(run / "round_1" / "boxes.parquet").to_pylist()
    plain = pq.read_table(run / "table3_no_ccgr" / "pseudo.parquet").to_pylist()
    assert sorted(map(tuple, (r["box"] for r in mil))) == \
        sorted(map(tuple, (r["box_after"] for r in plain)))
    assert {r["stop_reason"] for r in plain} == {"disabled"}
    # no Det.: boxes from the SS masks, also unrefined.
    assert all(r["box_after"] == r["box_before"]
               for r in pq.read_table(run / "table3_no_det" / "pseudo.parquet").to_pylist())

    rows = [line.split("|")[1].strip() for line in steps.results_table(ctx).splitlines()[2:]]
    assert rows == ["baseline_cam", "round_1", "table3_no_det", "table3_no_ccgr", "full"]
    # round 1's SS maps were computed once (no Det.'s boxes need every image) and kept for
    # the Table 3 steps after it, under a name that changes with the SS state
    cache = Path(steps.maps_cache(ctx, 1))
    assert cache.parent == run / "round_1" / "ss"
    assert len(list(cache.glob("*.npy"))) == len(ctx.train.records)


def test_select_stage_matches_plain_loop(full_run, ray_session):
    """MIL box selection on Ray Data gives the plain loop's boxes (same model, same bags)."""
    from wsis_ray import stages
    from wsis_ray.branches import mil
    from wsis_ray.config import load_config
    from wsis_ray.data.datasets import load_train_dataset

    base, _ = full_run
    run = base / "run"
    cfg = load_config(TINY, [f"run_dir={run}", f"data.root={base / 'data'}"])
    ds = load_train_dataset(cfg.data)
    props, bags = str(run / "seeds" / "proposals.parquet"), str(run / "seeds" / "bags.parquet")
    state = str(run / "round_1" / "mil" / "state.pt")
    model = mil.load_model(torch.load(state, weights_only=False)["model"], cfg.backbone, cfg.mil,
                           ds.num_classes)
    plain = mil.select_all(model, ds.records, props, bags, cfg.mil.image_size)
    from dataclasses import asdict
    staged = stages.run_select_stage(ds.records, mil.read_mil_inputs(props, bags), state,
                                     asdict(cfg.backbone), asdict(cfg.mil), ds.num_classes,
                                     max_actors=1)
    key = lambda r: (r["image_id"], r["bag_id"])  # noqa: E731
    plain = sorted(plain, key=key)
    assert plain and [key(r) for r in plain] == [key(r) for r in staged]
    for a, b in zip(plain, staged):
        assert a["class_id"] == b["class_id"]
        np.testing.assert_allclose(a["box"], b["box"], atol=1e-4)
        assert abs(a["score"] - b["score"]) < 1e-4
