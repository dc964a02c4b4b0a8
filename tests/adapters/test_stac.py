"""STAC (+ LSM): the top-box rule, the pseudo-label file, and the student's step on the tiny config.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import adapters.stac as stac
from adapters.engine.checkpoint import rng_state, set_rng_state
from adapters.engine.inference import run_inference
from adapters.lsm import PIM
from adapters.models.faster_rcnn import build_faster_rcnn
from core.config import StacConfig, load_config, with_overrides
from core.data.sources import prepare_data
from core.data.transforms import ViewSettings, View
from core.data.types import DetectionDataset, ImageRecord
from core.errors import BenchError
from bench.worker import batch_stream, seed_everything
from tests.conftest import TINY

# canonical_scale 8 puts the tiny images' RoIs on P3+, where PIM has a shifted source.
TINY_STAC = TINY + ["model.canonical_scale=8"]
MAIN = {f"{k}_{s}" for k in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg") for s in ("sup", "unsup")}


def _target(scores, labels=None):
    n = len(scores)
    return {"boxes": torch.arange(4 * n, dtype=torch.float32).reshape(n, 4) * torch.tensor([1.0, 1, 2, 2]),
            "labels": torch.tensor(labels if labels is not None else list(range(n)), dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32)}


def _hand_dataset(ids=(5, 9), cat_ids=(3, 7)) -> DetectionDataset:
    records = [ImageRecord(id=i, file=Path(f"/none/{i}.png"), width=100, height=80, boxes=np.zeros((0, 4)),
                           labels=[], iscrowd=[], ann_ids=[]) for i in ids]
    return DetectionDataset("hand", records, [{"id": c, "name": f"c{c}"} for c in cat_ids])


# ----------------------------------------------------------------------------- the top-box rule
def test_top_box_rule_by_hand():
    sure = _target([0.95, 0.92, 0.5])
    unsure = _target([0.7, 0.3])
    exactly = _target([0.9, 0.89])
    ties = _target([0.8, 0.8, 0.1])
    empty = _target([])

    def kept(t, keep_top):
        return stac.select_pseudo_labels(t, 0.9, keep_top)["scores"].tolist()

    assert kept(sure, True) == kept(sure, False) == pytest.approx([0.95, 0.92])  # tau decides
    assert kept(unsure, True) == pytest.approx([0.7])  # the top box survives below tau
    assert kept(unsure, False) == []
    assert kept(exactly, False) == pytest.approx([0.9])  # >= tau, as the original
    assert kept(ties, True) == pytest.approx([0.8, 0.8])  # score >= min(tau, top score)
    assert kept(empty, True) == kept(empty, False) == []
    # every field follows the kept scores
    out = stac.select_pseudo_labels(unsure, 0.9, True)
    assert out["labels"].tolist() == [0] and out["boxes"].tolist() == [[0.0, 1.0, 4.0, 6.0]]


def test_boxes_into_a_view_with_known_coordinates():
    # view = resize x2 then flip on a 200 px wide view: x -> 200 - 2x, y -> 2y
    m = np.array([[-1.0, 0, 200], [0, 1, 0], [0, 0, 1]]) @ np.diag([2.0, 2.0, 1.0])
    view = View(image=torch.zeros(3, 160, 200), boxes=torch.zeros(0, 4), labels=torch.zeros(0), matrix=m)
    t = {"boxes": torch.tensor([[10.0, 20, 30, 60], [95, 0, 120, 10], [100, 5, 110, 10]]),
         "labels": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.9, 0.8, 0.7])}
    out = stac.boxes_into_view(t, view)
    # 2nd box: [-40, 0, 10, 20] clipped to [0, 0, 10, 20]; 3rd box lies left of the view: dropped
    assert out["boxes"].tolist() == [[140.0, 40.0, 180.0, 120.0], [0.0, 0.0, 10.0, 20.0]]
    assert out["labels"].tolist() == [1, 2] and out["scores"].tolist() == pytest.approx([0.9, 0.8])


# ----------------------------------------------------------------------------- the pseudo-label file
def test_file_round_trip_and_box_format(tmp_path):
    ds = _hand_dataset()
    dets = [{"image_id": 5, "boxes": torch.tensor([[10.0, 20, 30, 60], [0, 0, 50.5, 40.25]]),
             "labels": torch.tensor([1, 0]), "scores": torch.tensor([0.3, 0.97])},
            {"image_id": 9, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "scores": torch.zeros(0)}]
    coco = stac.detections_to_coco(dets, ds, score_floor=0.05, max_per_image=100)
    assert [im["id"] for im in coco["images"]] == [5, 9]
    anns = coco["annotations"]
    # by descending score; xyxy [10, 20, 30, 60] is COCO [x, y, w, h] = [10, 20, 20, 40]; label 1 -> id 7
    assert [a["bbox"] for a in anns] == [[0.0, 0.0, 50.5, 40.25], [10.0, 20.0, 20.0, 40.0]]
    assert [a["category_id"] for a in anns] == [3, 7]
    assert [a["score"] for a in anns] == pytest.approx([0.97, 0.3])
    assert coco["info"]["score_floor"] == 0.05

    path = tmp_path / "pl" / stac.PSEUDO_LABEL_FILE
    stac.write_pseudo_labels(path, coco)
    assert os.listdir(path.parent) == [stac.PSEUDO_LABEL_FILE]  # no temp file left
    pl = stac.read_pseudo_labels(path, ds)
    assert pl.score_floor == 0.05 and set(pl.targets) == {5, 9}
    assert pl[5]["boxes"].tolist() == [[0.0, 0.0, 50.5, 40.25], [10.0, 20.0, 30.0, 60.0]]
    assert pl[5]["labels"].tolist() == [0, 1] and pl[5]["scores"].tolist() == pytest.approx([0.97, 0.3])
    assert pl[9]["boxes"].shape == (0, 4) and pl[9]["scores"].numel() == 0
    assert stac.xywh_to_xyxy(stac.xyxy_to_xywh([[1.5, 2, 3, 7]])).tolist() == [[1.5, 2.0, 3.0, 7.0]]


def test_bad_pseudo_label_files_are_one_line_bench_errors(tmp_path):
    ds = _hand_dataset()
    good = stac.detections_to_coco([{"image_id": i, "boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([0]),
                                     "scores": torch.tensor([0.5])} for i in (5, 9)], ds, 0.05, 100)

    def err(path) -> str:
        with pytest.raises(BenchError) as e:
            stac.read_pseudo_labels(path, ds)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg
        return msg

    assert "does not exist" in err(tmp_path / "nope.json") and "teacher" in err(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text('{"images": [')
    assert "not valid JSON" in err(tmp_path / "broken.json") and "delete it" in err(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "not a COCO JSON object" in err(tmp_path / "list.json")
    other = dict(good, images=[{"id": 5}, {"id": 11}])
    stac.write_pseudo_labels(tmp_path / "other.json", other)
    msg = err(tmp_path / "other.json")
    assert "do not match the unlabeled split" in msg and "id 9" in msg and "id 11" in msg and "delete it" in msg
    unknown = dict(good, categories=[{"id": 4, "name": "x"}])
    stac.write_pseudo_labels(tmp_path / "cat.json", unknown)
    assert "unknown category" in err(tmp_path / "cat.json")
    box = json.loads(json.dumps(good))
    box["annotations"][0]["bbox"] = [0, 0, -1, 5]
    stac.write_pseudo_labels(tmp_path / "box.json", box)
    assert "width and height > 0" in err(tmp_path / "box.json")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "pl.json"
    stac.write_pseudo_labels(path, {"old": 1})

    def half_dump(obj, f):
        f.write('{"images": [')
        raise OSError("disk full")

    monkeypatch.setattr(stac.json, "dump", half_dump)
    with pytest.raises(OSError):
        stac.write_pseudo_labels(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["pl.json"]


# ----------------------------------------------------------------------------- with the tiny data
@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    home = tmp_path_factory.mktemp("stac")
    cfg = load_config("demo", TINY_STAC, method="stac")
    return cfg, prepare_data(cfg.data, home)


def _gt_pseudo_labels(data) -> "stac.PseudoLabels":
    """Stored detections built from the unlabeled images' hidden boxes: the first true box scores
    0.95, the others 0.6, plus an image-sized box at 0.3 (label 0)."""
    dets = []
    for r in data.unlabeled.records:
        n = len(r.boxes)
        boxes = np.concatenate([r.boxes, [[0, 0, r.width, r.height]]]).astype(np.float32)
        scores = [0.95] + [0.6] * (n - 1) + [0.3]
        dets.append({"image_id": r.id, "boxes": torch.from_numpy(boxes),
                     "labels": torch.from_numpy(np.append(r.labels, 0)), "scores": torch.tensor(scores)})
    coco = stac.detections_to_coco(dets, data.unlabeled, score_floor=0.05, max_per_image=100)
    return stac.parse_pseudo_labels(coco, data.unlabeled)


def _adapter(cfg, data, stac_cfg=None, **lsm):
    cfg = cfg.model_copy(update={"lsm": cfg.lsm.model_copy(update=lsm)})
    seed_everything(cfg.seed)
    adapter = stac.StacAdapter(cfg, data.num_classes, torch.device("cpu"))
    if stac_cfg is not None:
        adapter.stac = stac_cfg
    adapter.attach_pseudo_labels(_gt_pseudo_labels(data))
    return cfg, adapter


def _batch(cfg, adapter, data):
    return next(batch_stream(cfg, adapter, data, 0))


def test_generated_file_holds_every_teacher_detection_of_every_unlabeled_image(setting, tmp_path):
    cfg, data = setting
    torch.manual_seed(0)
    teacher = build_faster_rcnn(cfg.model, data.num_classes)  # untrained: scores ~ 1/11 > 0.05
    aug = ViewSettings(short_sizes=(64,), max_size=96, flip_prob=0.5, strong=False, test_size=64)
    unlabeled = data.unlabeled.subset([r.id for r in data.unlabeled.records[:6]])
    path = tmp_path / stac.PSEUDO_LABEL_FILE
    pl = stac.ensure_pseudo_labels(path, teacher, unlabeled, aug, torch.device("cpu"), batch_size=6)
    coco = json.loads(path.read_text())
    assert [im["id"] for im in coco["images"]] == [r.id for r in unlabeled.records]
    assert coco["info"] == {**coco["info"], "score_floor": 0.05, "max_per_image": 20}
    dets = {d["image_id"]: d for d in run_inference(teacher, unlabeled, aug, torch.device("cpu"), batch_size=6)}
    assert sum(len(d["scores"]) for d in dets.values()) == len(coco["annotations"]) > 0
    for iid, d in dets.items():
        assert len(d["scores"]) <= 20 and (d["scores"] > 0.05).all()
        order = torch.argsort(d["scores"], descending=True, stable=True)
        assert torch.allclose(pl[iid]["boxes"], d["boxes"][order].float(), atol=1e-4)
        assert torch.equal(pl[iid]["labels"], d["labels"][order])
    # the file is a cache: a second call reads it and runs no teacher
    assert stac.ensure_pseudo_labels(path, None, unlabeled, aug, torch.device("cpu")).targets.keys() == pl.targets.keys()


def test_student_starts_from_the_initialisation_not_from_the_teacher(setting):
    cfg, data = setting
    seed_everything(cfg.seed)
    fresh = build_faster_rcnn(cfg.model, data.num_classes)
    teacher = build_faster_rcnn(cfg.model, data.num_classes)  # a different (later) draw: "trained"
    cfg, adapter = _adapter(cfg, data)
    student = adapter.student.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(student[k], v), k
    assert any(not torch.equal(student[k], v) for k, v in teacher.state_dict().items())
    assert list(adapter.state_dict()) == ["student"] and list(adapter.eval_models()) == ["student"]
    assert adapter.unlabeled_start() == 0 and adapter.hooks() == []


def test_main_pseudo_boxes_follow_tau_and_the_top_box_and_land_in_the_strong_view(setting):
    cfg, data = setting
    cfg, adapter = _adapter(cfg, data)
    items = _batch(cfg, adapter, data)["unlabeled"]
    assert items is not None  # unlabeled images from iteration 0 (no burn-in)
    views = adapter.strong_views(items, 0)
    main, alpha, _ = adapter.pseudo_targets(items, views)
    assert all(len(a["scores"]) and (a["scores"] > 0.5).all() for a in alpha)  # logged without LSM too
    for p, v in zip(main, views):
        assert p["scores"].tolist() == pytest.approx([0.95])  # only the 0.95 box passes tau 0.9
        assert p["boxes"][0].tolist() == pytest.approx(v.boxes[0].tolist(), abs=1e-4)  # = its true box, mapped
    again = adapter.strong_views(items, 0)  # a pure function of (seed, iteration, position)
    assert all(torch.equal(a.image, b.image) and np.array_equal(a.matrix, b.matrix) for a, b in zip(views, again))
    assert not all(torch.equal(a.image, b.image) for a, b in zip(views, adapter.strong_views(items, 1)))
    low = StacConfig(tau=0.99)  # nothing passes tau: the top box is kept anyway, or nothing
    adapter.stac = low
    assert [p["scores"].tolist() for p in adapter.pseudo_targets(items, views)[0]] == [pytest.approx([0.95])] * len(items)
    adapter.stac = StacConfig(tau=0.99, keep_top_box=False)
    assert all(len(p["scores"]) == 0 for p in adapter.pseudo_targets(items, views)[0])


def test_step_has_all_four_losses_on_pseudo_labels_weighted_by_lambda_u(setting):
    cfg, data = setting
    cfg = cfg.model_copy(update={"solver": cfg.solver.model_copy(update={"ims_per_batch_labeled": 1,
                                                                          "ims_per_batch_unlabeled": 1})})
    outs = {}
    for name, conf in {"l2": StacConfig(lambda_u=2.0), "l4": StacConfig(lambda_u=4.0),
                       "sum": StacConfig(lambda_u=2.0, average_forwards=False)}.items():
        cfg_a, adapter = _adapter(cfg, data, conf)
        batch = _batch(cfg_a, adapter, data)
        torch.manual_seed(123)  # same RoI / anchor sampling for every variant
        outs[name] = adapter.training_step(0, batch)
    l2, l4, plain = (outs[k].losses for k in ("l2", "l4", "sum"))
    assert set(l2) == MAIN
    assert all(l2[k] > 0 for k in ("loss_rpn_cls_unsup", "loss_rpn_loc_unsup", "loss_cls_unsup", "loss_box_reg_unsup"))
    for k in MAIN:
        if k.endswith("_unsup"):
            assert torch.equal(l4[k], 2 * l2[k]), k  # doubling lambda_u doubles the unsupervised terms
            assert torch.equal(plain[k], 2 * l2[k]), k  # 1/2 lambda_u L_u  vs  lambda_u L_u
        else:
            assert torch.equal(l4[k], l2[k]), k  # ... and leaves the supervised ones alone
            assert torch.equal(plain[k], 2 * l2[k]), k  # 1/2 L_s  vs  L_s
    assert outs["l2"].metrics["pl_count_per_img"] == 1.0 and outs["l2"].metrics["pl_precision"] == 1.0
    sum(l2.values()).backward()


def test_lsm_adds_pim_and_sd_and_alpha_filters_the_stored_scores(setting, monkeypatch):
    cfg, data = setting
    _, plain = _adapter(cfg, data, enabled=False)
    cfg_on, with_lsm = _adapter(cfg, data, enabled=True, alpha=0.5)
    batch = _batch(cfg_on, with_lsm, data)

    views = with_lsm.strong_views(batch["unlabeled"], 0)
    main, pim, candidates = with_lsm.pseudo_targets(batch["unlabeled"], views)
    for v, m, p in zip(views, main, pim):
        n = len(v.boxes)  # the true boxes still in the view (the pseudo-boxes are those boxes)
        assert m["scores"].tolist() == pytest.approx([0.95])  # main branch: STAC's tau
        assert p["scores"].tolist() == pytest.approx([0.95] + [0.6] * (n - 1))  # PIM: > alpha, not the 0.3 box
    for p, c in zip(pim, candidates):  # the ignore region's candidates: PIM's boxes, certain = in tau's set
        assert torch.equal(c["boxes"], p["boxes"]) and c["certain"].tolist() == [True] + [False] * (len(p["boxes"]) - 1)
    with_lsm.lsm = with_lsm.lsm.model_copy(update={"alpha": 0.7})
    assert all(p["scores"].tolist() == pytest.approx([0.95])
               for p in with_lsm.pseudo_targets(batch["unlabeled"], views)[1])
    with_lsm.lsm = with_lsm.lsm.model_copy(update={"alpha": 0.5})

    seen = []
    real = PIM.weighted_terms
    monkeypatch.setattr(PIM, "weighted_terms", lambda self, model, fwd_u, pseudo, *a: seen.append(pseudo)
                        or real(self, model, fwd_u, pseudo, *a))
    state = rng_state()
    out_off = plain.training_step(0, batch)
    set_rng_state(state)
    out_on = with_lsm.training_step(0, batch)
    for k in MAIN - {"loss_cls_unsup"}:  # the main branch is untouched by LSM but for its ignore region
        assert torch.equal(out_off.losses[k], out_on.losses[k]), k
    assert out_on.metrics["lsm_ignored_rois_per_img"] > 0  # RoIs on the 0.6 boxes
    assert not torch.equal(out_off.losses["loss_cls_unsup"], out_on.losses["loss_cls_unsup"])
    with_lsm.lsm = with_lsm.lsm.model_copy(update={"ignore_uncertain": False})
    set_rng_state(state)
    old = with_lsm.training_step(0, batch)
    with_lsm.lsm = with_lsm.lsm.model_copy(update={"ignore_uncertain": True})
    assert torch.equal(old.losses["loss_cls_unsup"], out_off.losses["loss_cls_unsup"])  # off: the old behaviour
    assert set(out_on.losses) - MAIN == {"loss_pim_cls_unsup", "loss_pim_reg_unsup", "loss_sd",
                                         "loss_pim_cls_sup", "loss_pim_reg_sup"}
    assert out_on.losses["loss_pim_cls_unsup"] > 0 and out_on.losses["loss_sd"] > 0  # 0.6 boxes: in (alpha, tau)
    assert [p["scores"].tolist() for p in seen[0]] == [p["scores"].tolist() for p in pim]
    assert with_lsm.pim.t == 0.9  # SD's interval is (alpha, tau)
    assert out_on.metrics["pl_alpha_count_per_img"] > out_on.metrics["pl_count_per_img"]
    sum(out_on.losses.values()).backward()
    aux = with_lsm.student.roi_heads.aux_cls_score.weight.grad
    assert aux is not None and aux.abs().sum() > 0


def test_refusals_name_the_fix(setting):
    cfg, data = setting
    seed_everything(cfg.seed)
    bare = stac.StacAdapter(cfg, data.num_classes, torch.device("cpu"))
    with pytest.raises(BenchError, match="attach_pseudo_labels"):
        bare.training_step(0, _batch(cfg, bare, data))
    on = cfg.model_copy(update={"lsm": cfg.lsm.model_copy(update={"enabled": True, "alpha": 0.5})})
    adapter = stac.StacAdapter(on, data.num_classes, torch.device("cpu"))
    with pytest.raises(BenchError, match="score_thresh"):
        adapter.attach_pseudo_labels(stac.PseudoLabels({}, score_floor=0.6))  # alpha 0.5 below the stored floor
    high = on.model_copy(update={"lsm": on.lsm.model_copy(update={"alpha": 0.95})})
    with pytest.raises(BenchError, match="stac.tau"):
        stac.StacAdapter(high, data.num_classes, torch.device("cpu"))
    with pytest.raises(BenchError, match="naive_large_area"):  # the config's one check (core/config.py)
        with_overrides(on, {"lsm": {"naive_large_area": True}})
