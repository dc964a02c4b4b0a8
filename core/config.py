"""Run configuration: pydantic models, preset YAML files and `key=value` overrides.

One source of defaults: a preset (``core/presets/<name>.yaml``) is validated by `RunConfig`;
command-line overrides go through the same validation, so a typo in a key or a value of the wrong
type is refused by name instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import BenchError
from core.methods import METHODS, method_sections

PRESET_DIR = Path(__file__).parent / "presets"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Strict):
    """Parameters of the embedded synthetic data set (preset `demo`)."""

    train_images: int = Field(600, ge=4)
    val_images: int = Field(150, ge=2)
    image_size: int = Field(160, ge=32)
    seed: int = 0


class AugConfig(_Strict):
    """Weak (resize + flip) and strong (Unbiased Teacher's photometric) augmentation."""

    short_sizes: list[int] = [640, 672, 704, 736, 768, 800]
    max_size: int = 1333
    flip_prob: float = Field(0.5, ge=0, le=1)
    test_size: int = 800


class DataConfig(_Strict):
    dataset: Literal["synthetic", "coco", "voc", "forest"] = "synthetic"
    setting: Literal["coco_standard", "coco_additional", "voc", "coco_imagenet"] = "coco_standard"
    # data set root (COCO: annotations/ + train2017/ val2017/; VOC: VOCdevkit; forest: a tiled set,
    # default BENCH_HOME/data/forest-v1 from `bench data fetch forest`)
    root: str | None = None
    unlabeled: str | None = None  # extra unlabeled pool: a folder or a list file of image paths
    ratio: float = Field(10.0, gt=0, le=100)  # percent of the training images that keep labels
    fold: int = Field(1, ge=1)
    split_file: str | None = None  # a split manifest to use instead of generating one
    # a fold's labeled images at a larger ratio include those of its smaller ratios (core/data/splits.py)
    nested_splits: bool = False
    synth: SynthConfig = SynthConfig()
    aug: AugConfig = AugConfig()
    num_workers: int = Field(0, ge=0)


class ModelConfig(_Strict):
    """Faster R-CNN with FPN (torchvision parts). `tiny` is the CPU demo detector."""

    arch: Literal["r50_fpn", "mobilenet_v2_fpn", "tiny"] = "r50_fpn"
    weights: str = "none"  # none | imagenet | path to a backbone state_dict
    trainable_layers: int = Field(3, ge=0, le=5)
    fpn_channels: int = 256
    # one anchor size per FPN level, P2-P6
    anchor_sizes: list[PositiveInt] = Field([32, 64, 128, 256, 512], min_length=5, max_length=5)
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = Field(0.5, gt=0, le=1)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = Field(0.25, gt=0, le=1)
    representation_size: int = 1024
    pooler_sampling_ratio: int = Field(2, ge=0)  # RoIAlign samples per bin side (detectron2: 0 = adaptive)
    # RoIAlign with the half-pixel offset (detectron2's ROIAlignV2, mmcv's aligned=True), as every
    # original uses; false: the legacy sampling (the detector before version 4, bench/keys.py)
    pooler_aligned: bool = True
    # RoI -> FPN level: floor(canonical_level + log2(sqrt(area) / canonical_scale)); torchvision and
    # detectron2 use 224 / 4 for ImageNet-sized objects; small-image presets scale it down.
    canonical_scale: int = 224
    cls_loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = Field(1.5, ge=0)
    score_thresh: float = Field(0.05, ge=0, le=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    detections_per_img: int = Field(100, ge=1)


class SolverConfig(_Strict):
    # sgd: momentum SGD (every Faster R-CNN method); adamw: Deformable DETR's optimizer (betas
    # 0.9/0.999, `weight_decay` decoupled). Part of a cell's key only when not sgd (key_dict).
    optimizer: Literal["sgd", "adamw"] = "sgd"
    max_iter: int = Field(180_000, ge=1)
    base_lr: float = Field(0.01, gt=0)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = Field(1000, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    steps: list[int] = [179_990, 179_995]
    gamma: float = 0.1
    ims_per_batch_labeled: int = Field(32, ge=1)
    ims_per_batch_unlabeled: int = Field(32, ge=1)
    checkpoint_period: int = Field(5000, ge=1)
    eval_period: int = Field(0, ge=0)  # 0: evaluate only at the end
    log_period: int = Field(20, ge=1)
    amp: bool = True  # used on CUDA only
    clip_grad_norm: float | None = None


class SemiConfig(_Strict):
    """Mean-teacher settings (Unbiased Teacher's names)."""

    burn_in: int = Field(2000, ge=0)
    ema_keep_rate: float = Field(0.9996, ge=0, le=1)
    t: float = Field(0.7, ge=0, le=1)  # pseudo-label threshold of the main branch
    lambda_u: float = Field(4.0, ge=0)
    # which RPN top-n counts the teacher's pseudo-labelling pass uses: `train` (model.rpn_*_train) as
    # the originals of UBT, Soft Teacher and PseCo (their teachers propose with train-time settings
    # while the RoI head runs inference), `test` (model.rpn_*_test) as a plain detection pass
    teacher_proposals: Literal["train", "test"] = "train"


class LSMConfig(_Strict):
    """LSM toggle (paper section 3); see docs/lsm.md for the choices the paper leaves open."""

    enabled: bool = False
    alpha: float = Field(0.5, ge=0, le=1)  # PIM threshold (lower than the main branch's t)
    pim_levels: list[Literal["p2", "p3", "p4"]] = ["p2", "p3", "p4"]
    pim_weight: float = Field(0.5, ge=0)  # authors' code: 0.5 (x lambda_u on pseudo-labels)
    pim_on_labeled: bool = True  # PIM also learns from the labeled batch's ground truth
    sd: bool = True
    sd_weight: float = Field(0.2, ge=0)  # authors' (disabled) distillation term used 0.2
    # F_aux's loss: ce = plain softmax cross-entropy (the authors' PIM branch, whatever the host's RoI
    # loss); host = the host detector's RoI classification loss (UBT's focal, PseCo's sigmoid focal)
    pim_cls_loss: Literal["ce", "host"] = "ce"
    # RoIs matched to pseudo-boxes scored in (alpha, t] are left out of the main branch's RoI
    # classification loss (the authors' code); false trains them as background, as UBT alone does.
    # Part of a cell's key only when LSM is on (key_dict).
    ignore_uncertain: bool = True
    naive_large_area: bool = False  # Table 5 row 2: no PIM, large low-score boxes to the main branch
    # in original-image pixels: 96^2 at COCO scale; small-image presets use (96 * eval.area_scale)^2
    naive_min_area: float = Field(96.0 * 96.0, ge=0)

    @field_validator("pim_levels")
    @classmethod
    def _unique_levels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("pim_levels must not repeat a level")
        return sorted(v)


class SoftTeacherConfig(_Strict):
    """Soft Teacher's own settings (names of the original config). The cls threshold is
    `semi.t`, the unsupervised weight `semi.lambda_u`, the EMA keep rate `semi.ema_keep_rate`."""

    initial_score_thr: float = Field(0.5, ge=0, le=1)  # pseudo_label_initial_score_thr
    rpn_thr: float = Field(0.9, ge=0, le=1)  # rpn_pseudo_threshold
    reg_unc_thr: float = Field(0.02, ge=0)  # reg_pseudo_threshold (relative std)
    jitter_times: int = Field(10, ge=2)  # std needs two samples
    jitter_scale: float = Field(0.06, ge=0)
    ema_warm_up: int = Field(0, ge=0)  # MeanTeacher hook's warm_up
    # the teacher is an EMA of the student from iteration 0, as the original's hook (its burn-in only
    # holds the unlabeled losses at zero); false: a copy of the student at `semi.burn_in`, then the EMA
    ema_from_start: bool = True
    # student view: one geometric op drawn uniformly from these ranges (rand_aug.py)
    geometric: bool = True  # False: the student view has resize + flip only
    translate: float = Field(0.1, ge=0, lt=1)  # fraction of the image side
    rotate: float = Field(30.0, ge=0, le=180)  # degrees
    shear: float = Field(30.0, ge=0, lt=90)  # degrees, x then y


class StacConfig(_Strict):
    """STAC's own settings (the original's names in comments). `semi.*` is not used by STAC."""

    tau: float = Field(0.9, ge=0, le=1)  # TRAIN.CONFIDENCE: pseudo-box score threshold (>=)
    keep_top_box: bool = True  # score >= min(tau, image's top score): every image keeps its top box
    lambda_u: float = Field(2.0, ge=0)  # TRAIN.WU: weight of the unlabeled losses
    average_forwards: bool = True  # the original divides each forward's losses by 2 (two forwards)


class PsecoConfig(_Strict):
    """PseCo's own settings (names of the original's train_cfg). The cls threshold is `semi.t`,
    `unsup_weight` is `semi.lambda_u`, the EMA keep rate `semi.ema_keep_rate`, the start of the
    unsupervised losses (`unsup_start_iter`) `semi.burn_in`."""

    initial_score_thr: float = Field(0.3, ge=0, le=1)  # pseudo_label_initial_score_thr
    rpn_thr: float = Field(0.5, ge=0, le=1)  # rpn_pseudo_threshold
    pla_iou_thr: float = Field(0.4, ge=0, le=1)  # PLA_iou_thres
    pla_candidate_topk: int = Field(12, ge=1)  # PLA_candidate_topk
    msl: bool = True  # use_MSL: the feature-level view 2 (shifted pyramid)
    unsup_warmup: int = Field(2000, ge=0)  # unsup_warmup_iter: linear ramp 0 -> 1 after burn-in
    ema_warm_up: int = Field(0, ge=0)  # MeanTeacher hook's warm_up
    # the teacher is an EMA of the student from iteration 0, as the original's hook (its burn-in only
    # holds the unlabeled losses at zero); false: a copy of the student at `semi.burn_in`, then the EMA
    ema_from_start: bool = True
    # RoI classifier of the main config: sigmoid focal loss; false = `model.cls_loss` (the CE config)
    sigmoid_focal: bool = True
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float = Field(0.25, ge=0, le=1)
    cls_loss_weight: float = Field(10.0, ge=0)
    # student view (Soft Teacher's): one geometric op drawn uniformly from these ranges
    geometric: bool = True
    translate: float = Field(0.1, ge=0, lt=1)
    rotate: float = Field(30.0, ge=0, le=180)
    shear: float = Field(30.0, ge=0, lt=90)


class SetTerms(_Strict):
    """Weights of a DETR's three set-prediction terms (class, L1 box, GIoU): Deformable DETR uses
    the same 2 / 5 / 2 in its matching cost and in its loss."""

    cls: float = Field(2.0, ge=0)
    bbox: float = Field(5.0, ge=0)
    giou: float = Field(2.0, ge=0)


# the flat names of SetTerms' values in configs written before they were grouped
FLAT_SET_TERMS = {f"{old}_cost": ("matcher_cost", term) for old, term in (("class", "cls"), ("bbox", "bbox"), ("giou", "giou"))}
FLAT_SET_TERMS |= {f"{term}_loss_weight": ("loss_weight", term) for term in ("cls", "bbox", "giou")}


class DDETRConfig(_Strict):
    """Deformable DETR (method `ddetr`, adapters/ddetr.py, docs/ddetr.md). The network is HF's
    DeformableDetrModel with a torchvision trunk; matcher and loss weights are the official ones.
    Its optimizer settings are the `solver` section, which presets set for ddetr under
    `method_defaults.ddetr` (AdamW, clip 0.1; lr 2e-4 at the paper's scale)."""

    # supervised: labeled images only (Table 3's Omega); stac: labeled + offline pseudo-labels from
    # the Faster R-CNN teacher cell; pretrain_finetune: pseudo-labeled unlabeled images first, then
    # the labeled ones (Phi). LSM applies where pseudo-labels are learned.
    strategy: Literal["supervised", "stac", "pretrain_finetune"] = "stac"
    backbone: Literal["r50", "mobilenet_v2", "tiny"] = "r50"
    backbone_weights: str = "imagenet"  # none | imagenet | mobilenet_v2_imagenet | path to a trunk state_dict
    weights: str = "none"  # none | path to a full detector state_dict (loaded after the trunk)
    trainable_layers: int = Field(3, ge=0, le=5)  # official: stem + layer1 frozen
    d_model: int = Field(256, ge=32)
    num_heads: int = Field(8, ge=1)
    encoder_layers: int = Field(6, ge=1)
    decoder_layers: int = Field(6, ge=1)
    ffn_dim: int = Field(1024, ge=1)
    n_points: int = Field(4, ge=1)
    num_queries: int = Field(300, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    detections_per_img: int = Field(100, ge=1)
    # the official set_cost_* of the Hungarian matching and *_loss_coef of the loss (HF's differ)
    matcher_cost: SetTerms = SetTerms()
    loss_weight: SetTerms = SetTerms()

    @model_validator(mode="before")
    @classmethod
    def _flat_weights(cls, data: Any) -> Any:
        """Read a run's config.yaml written before the weights were grouped (flat class_cost, ...,
        giou_loss_weight), so older run directories stay readable."""
        if isinstance(data, dict) and FLAT_SET_TERMS.keys() & data.keys():
            data = dict(data)
            for name, (group, term) in FLAT_SET_TERMS.items():
                if name in data:
                    data[group] = {**(data.get(group) or {}), term: data.pop(name)}
        return data
    focal_alpha: float = Field(0.25, ge=0, le=1)
    # learning rates relative to solver.base_lr: trunk 2e-5 / 2e-4, sampling offsets and
    # reference points x 0.1 (official lr_backbone, lr_linear_proj_mult)
    lr_backbone_mult: float = Field(0.1, ge=0)
    lr_linear_proj_mult: float = Field(0.1, ge=0)
    # stac: weight of the pseudo-labeled forward (the paper mixes both data sets: 1)
    lambda_u: float = Field(1.0, ge=0)
    # pretrain_finetune: the first fraction of solver.max_iter pre-trains on pseudo-labels
    pretrain_fraction: float = Field(0.5, gt=0, lt=1)


class MLCConfig(_Strict):
    """The `mlc` config section. Off by default: it adds one student forward per iteration."""

    enabled: bool = False
    weight: float = Field(1.0, ge=0)  # times the host's lambda_u, like the host's own unsup terms
    scale: float = Field(0.5, gt=0, lt=1)  # PseCo's view 2 is 0.5x
    mode: Literal["nearest", "bilinear"] = "nearest"  # PseCo's resize_image interpolates nearest


class EvalConfig(_Strict):
    backend: Literal["faster", "pycocotools"] = "faster"
    evaluate_student: bool = True  # mean-teacher methods: also evaluate the student
    # COCO's small/medium/large bounds (32, 96 px sides, defined on ~640 px images) times this
    # factor; presets with small images scale them so that "large" still means large.
    area_scale: float = Field(1.0, gt=0)


class RunConfig(_Strict):
    method: str = "supervised"
    # burn_in: only the supervised burn-in of a mean-teacher method, a cell shared by every
    # setting that starts from it (bench/burn_in.py)
    stage: Literal["full", "burn_in"] = "full"
    preset: str = "demo"
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    solver: SolverConfig = SolverConfig()
    semi: SemiConfig = SemiConfig()
    lsm: LSMConfig = LSMConfig()
    mlc: MLCConfig = MLCConfig()
    # method sections: part of a cell's key only for their own method (key_dict)
    softteacher: SoftTeacherConfig = SoftTeacherConfig()
    stac: StacConfig = StacConfig()
    pseco: PsecoConfig = PsecoConfig()
    ddetr: DDETRConfig = DDETRConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_thresholds(self) -> "RunConfig":
        if self.lsm.enabled and self.lsm.alpha > self.semi.t:
            raise ValueError(f"lsm.alpha ({self.lsm.alpha}) must not exceed semi.t ({self.semi.t})")
        if self.lsm.naive_large_area and not (self.method in METHODS and METHODS[self.method].naive_large_area):
            raise ValueError(f"lsm.naive_large_area (Table 5's Unbiased Teacher variant) is not defined for "
                             f"{self.method}; set lsm.naive_large_area=false")
        if self.lsm.enabled and self.lsm.naive_large_area:
            raise ValueError("lsm.naive_large_area is Table 5's variant without PIM; set lsm.enabled=false "
                             "with it (or lsm.naive_large_area=false for LSM)")
        return self

    def key_dict(self) -> dict[str, Any]:
        """Everything that changes the result (device and logging periods excluded)."""
        d = self.model_dump(mode="json")
        d.pop("device")
        d["solver"].pop("log_period")
        d["data"].pop("num_workers")
        if d["solver"]["optimizer"] == "sgd":  # added later: cells of the SGD methods keep their keys
            d["solver"].pop("optimizer")
        own = METHODS[self.method].section if self.method in METHODS else None
        for section in method_sections() - {own}:  # other methods' settings do not change this cell
            d.pop(section)
        if not self.mlc.enabled:
            d.pop("mlc")
        if not d["data"]["nested_splits"]:  # added later: cells of independent draws keep their keys
            d["data"].pop("nested_splits")
        if not self.lsm.enabled:  # added later and inert without LSM: other cells keep their keys
            d["lsm"].pop("ignore_uncertain")
            d["lsm"].pop("pim_cls_loss")
        if own in d and not d[own].get("ema_from_start", True):  # added later: copy-at-burn-in cells keep their keys
            d[own].pop("ema_from_start")
        if self.lsm.naive_large_area:  # naive_min_area was once compared in view pixels: new keys
            d["lsm"]["naive_area_pixels"] = "original"
        return d

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.key_dict(), sort_keys=True).encode()).hexdigest()


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _known_keys(path: tuple) -> list[str]:
    """Field names of the config section at `path` (e.g. ("solver",) -> max_iter, base_lr, ...)."""
    model: type[BaseModel] = RunConfig
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    """The first problem of a validation error as one line, prefixed by where the values came from."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        known = _known_keys(first["loc"][:-1])
        return f"{source}: unknown config key '{loc}'; known keys there: {', '.join(known)}"
    if not loc:  # a whole-config rule (RunConfig's validators): its message names the keys
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    return f"{source}: invalid value for '{loc}': {first['msg']} (got {first.get('input')!r})"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=1 c=x` -> nested dict; values parsed as YAML scalars/lists (`[p3,p4]`, `true`, `0.5`)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise BenchError(f"override '{item}' is not of the form key=value (e.g. solver.max_iter=500)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BenchError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(preset: str = "demo", overrides: list[str] | dict | None = None, **fields: Any) -> RunConfig:
    """Preset YAML + overrides (`key=value` strings or a nested dict) + keyword fields, validated."""
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise BenchError(f"unknown preset '{preset}'; known presets: {', '.join(available_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    data["preset"] = preset
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    # `method_defaults.<method>`: the preset's settings for one method (Deformable DETR's AdamW
    # solver), applied under the overrides, so `solver.max_iter=...` still wins.
    by_method = data.pop("method_defaults", None) or {}
    for planning_key in ("table_ratios", "reference_seconds_per_iteration"):  # bench/plan.py's, not a run's
        data.pop(planning_key, None)
    method = fields.get("method") or (overrides or {}).get("method") or data.get("method", "supervised")
    if not isinstance(by_method, dict) or not all(isinstance(v, dict) for v in by_method.values()):
        raise BenchError(f"preset '{preset}': method_defaults must map method names to config sections")
    data = _merge(data, by_method.get(method, {}))
    data = _merge(data, overrides or {})
    data = _merge(data, {k: v for k, v in fields.items() if v is not None})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise BenchError(format_validation_error(err, f"preset '{preset}'")) from None


def preset_planning(preset: str, key: str):
    """A preset's planning entry (`table_ratios`, `reference_seconds_per_iteration`), None if absent."""
    path = PRESET_DIR / f"{preset}.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get(key) if path.exists() else None


def preset_table_ratios(preset: str) -> list[float] | None:
    """The label ratios a table runs on this preset when `--ratios` is not given (None: all)."""
    ratios = preset_planning(preset, "table_ratios")
    return [float(r) for r in ratios] if ratios else None


def with_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    """A copy of `cfg` with nested overrides applied and validated."""
    try:
        return RunConfig.model_validate(_merge(cfg.model_dump(mode="json"), overrides))
    except ValidationError as err:
        raise BenchError(format_validation_error(err, "override")) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
