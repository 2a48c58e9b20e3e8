import json

import numpy as np
import pytest

from wsis_ray.config import ConfigError, load_config
from wsis_ray.run import RunDir, RunDirError


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("round:\n  rounds: 5\nccgr:\n  iterations: 50\n")
    cfg = load_config(p, ["ccgr.context_scale=2", "ss.bins=[1, 2]", "round.no_ccgr=true"])
    assert cfg.round.rounds == 5
    assert cfg.ccgr.iterations == 50
    assert cfg.ccgr.context_scale == 2.0 and isinstance(cfg.ccgr.context_scale, float)
    assert cfg.ss.bins == [1, 2]
    assert cfg.round.no_ccgr is True


def test_exponent_floats_without_a_dot(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; a float field takes it as the number (file and CLI)."""
    (tmp_path / "c.yaml").write_text("mil:\n  lr: 1e-3\n")
    cfg = load_config(tmp_path / "c.yaml", ["ss.lr=2E-4"])
    assert cfg.mil.lr == 1e-3 and cfg.ss.lr == 2e-4
    with pytest.raises(ConfigError):
        load_config(None, ["mil.lr=fast"])


@pytest.mark.parametrize("override", ["ccgr.iteratons=3", "nosuch.x=1", "ccgr.iterations=abc",
                                      "round.dropped_foreground=drop", "round.supervision=box"])
def test_bad_keys_and_types_are_errors(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_commit_then_tamper_is_not_done(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    assert not run.is_done("a")
    run.write_text("a/out.txt", "hello")
    run.commit("a", ["a/out.txt"], {"x": 1})
    assert run.is_done("a")
    assert run.metrics("a") == {"x": 1}
    run.write_text("a/out.txt", "changed")
    assert not run.is_done("a")
    assert json.loads(run.read_text("manifest.json"))["steps"]["a"]["metrics"] == {"x": 1}


def test_commit_refuses_missing_artefact(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(RunDirError):
        run.commit("a", ["a/missing.parquet"])


def test_other_config_is_refused(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.check_config(load_config())
    run.check_config(load_config())  # same config: fine
    with pytest.raises(RunDirError, match="different config"):
        run.check_config(load_config(None, ["round.rounds=7"]))
    run.check_config(load_config(None, ["round.rounds=7"]), force=True)


def test_run_started_before_a_field_existed_continues_without_force(tmp_path):
    """A code update that adds a config field with a default must not refuse to resume a
    run directory whose config.yaml predates the field; a field the code no longer knows
    still makes it a different config."""
    run = RunDir(str(tmp_path / "run"))
    run.check_config(load_config())
    text = run.read_text("config.yaml")
    assert "  output_stride: 16\n" in text
    run.write_text("config.yaml", text.replace("  output_stride: 16\n", ""))
    run.check_config(load_config())  # the missing field reads as its default
    with pytest.raises(RunDirError, match="different config"):
        run.check_config(load_config(None, ["ss.output_stride=8"]))
    run.write_text("config.yaml", text.replace("  output_stride: 16\n", "  old_knob: 1\n"))
    with pytest.raises(RunDirError, match="different config"):
        run.check_config(load_config())


def test_train_name_follows_config_and_inputs(tmp_path):
    """A resumed step finds its Ray Train checkpoint only when nothing upstream changed."""
    run = RunDir(str(tmp_path / "run"))
    run.check_config(load_config())
    first = run.train_name("round_1-is")
    assert first == run.train_name("round_1-is") and first.startswith("round_1-is-")
    run.write_text("round_1/pseudo.parquet", "labels")
    run.commit("round_1/ccgr", ["round_1/pseudo.parquet"])
    after_ccgr = run.train_name("round_1-is")
    assert after_ccgr != first
    run.write_text("round_1/pseudo.parquet", "other labels")  # recomputed upstream
    run.commit("round_1/ccgr", ["round_1/pseudo.parquet"])
    assert run.train_name("round_1-is") not in (first, after_ccgr)
    recomputed = run.train_name("round_1-is")
    run.check_config(load_config(None, ["instance.steps=7"]), force=True)
    assert run.train_name("round_1-is") != recomputed


def test_commit_drops_the_committed_steps_ray_train_checkpoints(tmp_path):
    """A committed training step's Ray Train checkpoints are deleted (its artefact holds the
    model); an unfinished step's stay, so a killed run still resumes from them."""
    run = RunDir(str(tmp_path / "run"))
    run.check_config(load_config())
    storage = tmp_path / "ray_train"
    other = storage / "someone-elses-run" / "checkpoint_1"
    other.mkdir(parents=True)
    name = run.train_name("round_1-mil", str(storage))
    (storage / name / "checkpoint_2").mkdir(parents=True)
    (storage / name / "checkpoint_2" / "state.pt").write_bytes(b"x" * 1000)
    assert (storage / name).exists()  # training, not yet committed
    run.write_text("round_1/mil/state.pt", "model")
    run.commit("round_1/mil", ["round_1/mil/state.pt"])
    assert not (storage / name).exists()
    assert other.exists()  # not this step's
    unrecorded = run.train_name("round_1-ss")  # no storage given: nothing to drop
    (storage / unrecorded).mkdir()
    run.write_text("round_1/ss/state.pt", "model")
    run.commit("round_1/ss", ["round_1/ss/state.pt"])
    assert (storage / unrecorded).exists()


def test_later_rounds_judge_is_box_anchors_by_the_region_rule(tmp_path):
    """Round 1 (PRM peaks) keeps ccgr.peak_region; a round whose bags come from IS boxes
    (null peak) uses ccgr.anchor_region; --no-mil keeps peak_region."""
    from types import SimpleNamespace

    import pyarrow as pa

    from wsis_ray.data.records import BAGS_SCHEMA, write_table_atomic
    from wsis_ray.steps import round_ccgr_config

    cfg = load_config(None, ["ccgr.peak_region=0.0", "ccgr.anchor_region=0.4"])
    run = RunDir(str(tmp_path / "run"))
    ctx = SimpleNamespace(cfg=cfg, run=run)
    peak = {"image_id": 1, "bag_id": 0, "class_id": 0, "peak_x": 3.0, "peak_y": 4.0,
            "source_box": None, "proposal_indices": [0]}
    from_is = dict(peak, bag_id=1, peak_x=None, peak_y=None, source_box=[0.0, 0.0, 8.0, 8.0])
    write_table_atomic(pa.Table.from_pylist([peak], schema=BAGS_SCHEMA),
                       run.uri_of("round_1/bags.parquet"))
    write_table_atomic(pa.Table.from_pylist([peak, from_is], schema=BAGS_SCHEMA),
                       run.uri_of("round_2/bags.parquet"))
    assert round_ccgr_config(ctx, 1).peak_region == 0.0
    assert round_ccgr_config(ctx, 2).peak_region == 0.0   # round_1's bags: all peaks
    assert round_ccgr_config(ctx, 3).peak_region == 0.4   # round_2's bags: some from IS
    assert round_ccgr_config(ctx, 3, mask_boxes=True).peak_region == 0.0


def test_is_branch_starts_from_the_shared_trunk_when_it_is_the_same_network(tmp_path):
    """The IS branch takes the round's latest MIL/SS trunk (the paper's shared layers) when
    instance.backbone is backbone.name, else the previous round's IS trunk (none in round
    1), and nothing without backbone.share_trunk."""
    from types import SimpleNamespace

    from wsis_ray.steps import is_init_trunk, save_torch

    run = RunDir(str(tmp_path / "run"))
    ctx = SimpleNamespace(cfg=load_config(None, []), run=run)
    for step in ("round_1/mil", "round_1/ss", "round_1/is", "round_2/mil"):
        save_torch(ctx, f"{step}/trunk.pt", {"from": step})
        run.commit(step, [f"{step}/trunk.pt"])
    assert ctx.cfg.instance.backbone == ctx.cfg.backbone.name
    assert is_init_trunk(ctx, 1) == {"from": "round_1/ss"}
    assert is_init_trunk(ctx, 2) == {"from": "round_2/mil"}  # round 2's SS not trained yet
    ctx.cfg = load_config(None, ["instance.backbone=resnet34"])
    assert is_init_trunk(ctx, 1) is None
    assert is_init_trunk(ctx, 2) == {"from": "round_1/is"}
    ctx.cfg = load_config(None, ["backbone.share_trunk=false"])
    assert is_init_trunk(ctx, 2) is None


def test_round_1_bags_without_source_boxes_read_back_from_parquet(tmp_path):
    """Round-1 bags have no IS box. A null fixed-size list cannot be read back from Parquet
    by pyarrow 21 (apache/arrow#35692; seen on a GPU machine's pyarrow), so `source_box` is a
    plain list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wsis_ray.data.records import BAGS_SCHEMA, read_table, write_table_atomic

    rows = [{"image_id": 1, "bag_id": 0, "class_id": 0, "peak_x": 3.0, "peak_y": 4.0,
             "source_box": None, "proposal_indices": [0]},
            {"image_id": 1, "bag_id": 1, "class_id": 0, "peak_x": None, "peak_y": None,
             "source_box": [0.0, 0.0, 8.0, 8.0], "proposal_indices": [1]}]
    uri = str(tmp_path / "bags.parquet")
    write_table_atomic(pa.Table.from_pylist(rows, schema=BAGS_SCHEMA), uri)
    assert [r["source_box"] for r in read_table(uri).to_pylist()] == [None, [0, 0, 8, 8]]
    stored = pq.read_schema(uri).field("source_box").type
    assert pa.types.is_list(stored) and not pa.types.is_fixed_size_list(stored)


def test_summary_steps_follow_the_steps_they_summarise(tmp_path):
    """`final`/`report` are redone once a step before them was added or recomputed: a
    finished 1-round run continued to 2 rounds must serve round 2, not keep round 1."""
    import time
    from types import SimpleNamespace

    from wsis_ray import steps

    run = RunDir(str(tmp_path / "run"))
    ctx = SimpleNamespace(run=run, started=time.time(), seconds={})
    calls = []

    def step(name, value):
        def fn(_ctx):
            calls.append(name)
            run.write_text(f"{name}/out.txt", value)
            return [f"{name}/out.txt"], {}
        return fn

    def final(_ctx):
        calls.append("final")
        last = max(n for n in run.manifest()["steps"] if n.startswith("round_"))
        run.write_text("final/out.txt", last)
        return ["final/out.txt"], {"source": last}

    def go(plan):
        for i, (name, fn) in enumerate(plan):
            steps.run_step(ctx, name, fn, inputs=steps.inputs_of(plan, i))

    one = [("round_1/eval", step("round_1/eval", "r1")), ("final", final)]
    go(one)
    go(one)  # nothing changed: nothing reruns
    assert calls == ["round_1/eval", "final"]
    go(one[:1] + [("round_2/eval", step("round_2/eval", "r2")), ("final", final)])
    assert calls[2:] == ["round_2/eval", "final"]
    assert run.read_text("final/out.txt") == "round_2/eval"
    # an input recomputed with other content also redoes the summary
    run.write_text("round_2/eval/out.txt", "r2 again")
    run.commit("round_2/eval", ["round_2/eval/out.txt"])
    assert not run.is_done("final", ["round_1/eval", "round_2/eval"])
    assert run.is_done("round_2/eval")  # ordinary steps keep their old rule


def test_a_recomputed_step_redoes_the_steps_that_read_it(tmp_path):
    """An artefact deleted (or changed) after commit is rebuilt on resume; every later step
    of the chain, and the rows and evaluations built on it, follow when the rebuilt content
    differs. A recomputed evaluation redoes only itself and the summaries."""
    import time
    from types import SimpleNamespace

    from wsis_ray import steps

    run = RunDir(str(tmp_path / "run"))
    ctx = SimpleNamespace(run=run, started=time.time(), seconds={})
    calls, version = [], {}

    def step(name):
        def fn(_ctx):
            calls.append(name)
            version[name] = version.get(name, 0) + 1  # a rerun writes other content
            run.write_text(f"{name}/out.txt", f"{name} v{version[name]}")
            return [f"{name}/out.txt"], {}
        return fn

    names = ["seeds", "round_1/mil", "round_1/is", "round_1/eval", "baseline_cam/eval",
             "table3_no_det/boxes", "table3_no_det/is", "round_1/update", "round_2/mil",
             "final"]
    plan = [(n, step(n)) for n in names]

    def go():
        calls.clear()
        for i, (name, fn) in enumerate(plan):
            steps.run_step(ctx, name, fn, inputs=steps.inputs_of(plan, i))
        return list(calls)

    assert go() == names
    assert go() == []
    (tmp_path / "run" / "round_1/is/out.txt").unlink()
    assert go() == ["round_1/is", "round_1/eval", "baseline_cam/eval", "table3_no_det/boxes",
                    "table3_no_det/is", "round_1/update", "round_2/mil", "final"]
    (tmp_path / "run" / "round_1/eval/out.txt").unlink()
    assert go() == ["round_1/eval", "final"]
    (tmp_path / "run" / "table3_no_det/boxes/out.txt").unlink()
    assert go() == ["table3_no_det/boxes", "table3_no_det/is", "final"]
    # a run directory from before inputs were recorded: its artefacts alone decide
    m = run.manifest()
    for name in names[:-1]:
        del m["steps"][name]["inputs"]
    m["steps"]["round_1/mil"]["artefacts"]["round_1/mil/out.txt"] = "stale"
    run.write_text("manifest.json", json.dumps(m))
    assert go() == ["round_1/mil", "final"]


def test_next_semantic_label_keeps_or_ignores_dropped_foreground():
    """Union of the IS masks (higher score wins); a class without a mask keeps its labels;
    previous foreground no mask covers is background (paper) or ignored (255)."""
    from wsis_ray.steps import next_semantic_label

    prev = np.zeros((4, 6), np.uint8)
    prev[:, :3] = 1          # class 0 labelled on the left half
    prev[0, 5] = 2           # class 1, which the IS branch misses entirely
    prev[3, 5] = 255
    a = np.zeros((4, 6), bool)
    a[1:3, 1:3] = True       # class 0's mask covers only part of its previous region
    b = np.zeros((4, 6), bool)
    b[1:3, 2:5] = True       # a class-2 mask overlapping it with a higher score
    masks = [(a, 0, 0.7), (b, 2, 0.9)]
    paper = next_semantic_label(masks, prev.shape, [0, 1, 2], "background", lambda: prev)
    assert paper[1, 1] == 1 and paper[1, 2] == 3 and paper[2, 4] == 3
    assert paper[0, 5] == 2                      # the missed class keeps its labels
    assert paper[0, 0] == 0 and paper[3, 5] == 0  # dropped foreground -> background
    ignore = next_semantic_label(masks, prev.shape, [0, 1, 2], "ignore", lambda: prev)
    assert ignore[0, 0] == 255 and ignore[3, 5] == 255 and ignore[0, 4] == 0
    assert np.array_equal(ignore[(ignore != 255)], paper[(ignore != 255)])
    # the previous label is read only when it is needed
    unread = lambda: pytest.fail("previous label read")  # noqa: E731
    full = next_semantic_label(masks, prev.shape, [0, 2], "background", unread)
    assert np.array_equal(full, np.where(paper == 2, 0, paper))
