"""CCGR pictures (Figures 1, 3, 4 analogs) and the `python -m wsis_ray.viz ccgr` CLI."""
import json

import numpy as np
import pytest

from wsis_ray import viz
from wsis_ray.config import CCGRConfig

PNG = b"\x89PNG\r\n\x1a\n"


def test_ccgr_pictures_demo(tmp_path):
    image, scores, box = viz.demo_example()
    paths = viz.ccgr_pictures(image, scores, box, 0, tmp_path, stem="demo",
                              cfg=CCGRConfig(iterations=80))
    assert set(paths) == {"boxes", "context", "trajectory"}
    for p in paths.values():
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000


def test_cli_with_score_file_and_peaks(tmp_path):
    _, scores, box = viz.demo_example()
    np.save(tmp_path / "s.npy", scores)
    (tmp_path / "peaks.json").write_text(json.dumps([[50.5, 64.5], [130.5, 36.5]]))
    out = tmp_path / "out"
    assert viz.main(["ccgr", "--out", str(out), "--scores", str(tmp_path / "s.npy"),
                     "--box", *map(str, box), "--class", "0",
                     "--peaks", str(tmp_path / "peaks.json"), "--iterations", "40"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ccgr_fig1.png", "ccgr_fig3.png",
                                                      "ccgr_fig4.png"]
    with pytest.raises(SystemExit):
        viz.main(["ccgr", "--out", str(out), "--scores", str(tmp_path / "s.npy")])


def test_figure_convergence(tmp_path):
    p = viz.figure_convergence([0, 40, 80], [0.2, 0.3, 0.35], tmp_path / "fig5.png")
    assert p.read_bytes()[:8] == PNG
