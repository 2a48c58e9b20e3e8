"""A tiny round-0 seed run through the real Ray Train / Ray Data paths, and its resume."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from wsis_ray import seeds
from wsis_ray.config import load_config
from wsis_ray.data.records import BAGS_SCHEMA, PEAKS_SCHEMA, PROPOSALS_SCHEMA
from wsis_ray.run import RunDir

pytestmark = pytest.mark.ray

TINY = ["data.demo_train_images=6", "data.demo_val_images=3", "data.demo_classes=2",
        "cam.image_size=64", "cam.batch_size=4", "cam.steps=2",
        "affinity.image_size=64", "affinity.batch_size=2", "affinity.steps=2",
        "affinity.walk_iterations=4", "proposals.max_proposals=40",
        "train.num_workers=1", "train.cpus_per_worker=0.5", "train.checkpoint_every=1"]


def test_seed_run_end_to_end_then_resume(ray_session, tmp_path, capsys, monkeypatch):
    run_dir = str(tmp_path / "run")
    args = ["--run-dir", run_dir, "--set", f"data.root={tmp_path / 'demo'}"]
    for o in TINY:
        args += ["--set", o]
    metrics = seeds.main(args)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("peak_recall", "peaks_per_instance", "proposal_recall@0.5",
                "proposal_recall@0.7", "bag_recall", "miou_affinity", "miou_cam"):
        assert key in printed and 0 <= printed[key] <= max(1.0, printed[key])
    assert printed["images"] == metrics["images"] > 0

    run = RunDir(run_dir)
    s = tmp_path / "run" / "seeds"
    assert pq.read_schema(s / "proposals.parquet").equals(PROPOSALS_SCHEMA)
    assert pq.read_schema(s / "peaks.parquet").equals(PEAKS_SCHEMA)
    assert pq.read_schema(s / "bags.parquet").equals(BAGS_SCHEMA)
    assert (s / "cam" / "state.pt").is_file() and (s / "affinity" / "state.pt").is_file()
    props = pq.read_table(s / "proposals.parquet").to_pylist()
    assert len(props) == 6 and all(0 < len(p["boxes"]) <= 40 for p in props)
    pngs = sorted(p.name for p in (s / "semantic").iterdir())
    assert len(pngs) == 6
    label = seeds.read_semantic(run, int(pngs[0][:-4]))
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 255}
    for bag in pq.read_table(s / "bags.parquet").to_pylist():
        n = len(next(p for p in props if p["image_id"] == bag["image_id"])["boxes"])
        assert 0 < len(bag["proposal_indices"]) <= 10
        assert all(0 <= i < n for i in bag["proposal_indices"])

    # a re-run finds every step committed and recomputes nothing
    before = run.manifest()
    import wsis_ray.train as train_mod
    monkeypatch.setattr(train_mod, "fit", lambda *a, **k: pytest.fail("fit called again"))
    again = seeds.main(args)
    assert run.manifest() == before
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == \
        {k: v for k, v in metrics.items() if k != "wall_seconds"}


def test_proposals_step_reuses_its_cache(ray_session, tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path / 'demo'}", "data.demo_train_images=3",
                             "data.demo_val_images=1", "proposals.max_proposals=20"])
    from wsis_ray.data.datasets import load_train_dataset
    dataset = load_train_dataset(cfg.data)
    run = RunDir(str(tmp_path / "run"))
    seeds.compute_proposals(cfg, dataset, run)
    first = seeds.read_proposals(run.uri_of("seeds/proposals.parquet"))
    stamp = run.manifest()["steps"]["seeds/proposals"]["finished"]
    seeds.compute_proposals(cfg, dataset, run)
    assert run.manifest()["steps"]["seeds/proposals"]["finished"] == stamp
    # recomputing from scratch gives the same proposals (deterministic)
    run2 = RunDir(str(tmp_path / "run2"))
    seeds.compute_proposals(cfg, dataset, run2)
    second = seeds.read_proposals(run2.uri_of("seeds/proposals.parquet"))
    assert first.keys() == second.keys()
    for k in first:
        assert np.array_equal(first[k][0], second[k][0])
        assert np.array_equal(first[k][1], second[k][1])
