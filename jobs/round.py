"""The product's main job: the paper's iterative optimization, end to end.

    python jobs/round.py                       # demo dataset, local Ray, default rounds
    python jobs/round.py --config configs/voc.yaml --run-dir s3://bucket/run
    ray job submit --working-dir . -- python jobs/round.py --config configs/voc.yaml ...

Algorithm (paper, "Iterative optimization and its initialization"):

    seeds:  CAM -> peaks; proposals; AffinityNet -> semantic labels; bags (Eq. 4)
    for r in 1..R:
        MIL (WSDDN) on the bags          -> one box per bag
        SS (FCN + PSP) on semantic labels -> class score maps
        CCGR on the boxes (Eq. 2-3)       -> pseudo instance masks (Parquet)
        IS (Mask R-CNN) on pseudo masks   -> predictions; evaluate on val
        update: bags from IS boxes, semantic labels = union of IS masks per class
    final IS checkpoint -> Ray Serve

Every step is committed to the run directory's manifest when its artefacts are complete; a
re-run of the same command continues after the last committed step.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsis_ray import steps  # noqa: E402
from wsis_ray.config import ConfigError, load_config  # noqa: E402
from wsis_ray.run import RunDir, RunDirError  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: demo)")
    p.add_argument("--run-dir", help="run directory: local path or s3://, gs:// URI")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set ccgr.iterations=100")
    p.add_argument("--rounds", type=int, help="number of rounds (round.rounds)")
    p.add_argument("--no-ccgr", action="store_true", help="crop MIL boxes directly (ablation)")
    p.add_argument("--no-mil", action="store_true",
                   help="boxes from connected components of the class masks (Table 3, row 1)")
    p.add_argument("--supervision", choices=["image", "full"],
                   help="full: Mask R-CNN on ground-truth masks (the upper bound)")
    p.add_argument("--data-format", choices=["demo", "jsonl", "coco", "voc"])
    p.add_argument("--data-root", help="images root / dataset root")
    p.add_argument("--train", help="training labels: JSONL file, COCO json or VOC list name")
    p.add_argument("--val", help="validation ground truth: COCO json or VOC list name")
    p.add_argument("--classes", help="class list file (JSONL format)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="proceed without invalid records; their list goes to the run dir")
    p.add_argument("--force", action="store_true",
                   help="continue a run directory made with another config")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    args, extra = p.parse_known_args(argv)
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, extra


def overrides_from(args: argparse.Namespace, extra: list[str]) -> list[str]:
    out = list(args.set) + list(extra)
    flags = {"run_dir": args.run_dir, "round.rounds": args.rounds,
             "round.supervision": args.supervision, "data.format": args.data_format,
             "data.root": args.data_root, "data.train": args.train, "data.val": args.val,
             "data.classes": args.classes}
    out += [f"{k}={v}" for k, v in flags.items() if v is not None]
    for flag, key in ((args.no_ccgr, "round.no_ccgr"), (args.no_mil, "round.no_mil"),
                      (args.skip_invalid, "data.skip_invalid")):
        if flag:
            out.append(f"{key}=true")
    return out


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides_from(args, extra))
        run = RunDir(cfg.run_dir)
        run.check_config(cfg, force=args.force)
    except (ConfigError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps.init_ray(args.address, cfg)
    ctx = steps.Context.open(cfg, run)
    plan = steps.plan(cfg)
    for i, (name, fn) in enumerate(plan):
        steps.run_step(ctx, name, fn, remaining=[n for n, _ in plan[i + 1:]],
                       inputs=steps.inputs_of(plan, i))
    print(steps.results_table(ctx))
    print(f"\nrun directory: {run.uri}\nreport: {run.uri}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
