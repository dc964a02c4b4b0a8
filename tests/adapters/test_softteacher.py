"""Soft Teacher (+ LSM) on hand-checkable cases and the tiny configuration."""

import importlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adapters.base as base
from adapters.engine.checkpoint import rng_state, set_rng_state
from adapters.engine.mean_teacher import SoftTeacherEMAHook, ema_momentum
from adapters.engine.trainer import StopTraining
from adapters.student_view import student_view
from adapters.models.faster_rcnn import build_faster_rcnn
from bench.burn_in import burn_in_config
from core.config import SoftTeacherConfig, load_config
from core.data.sources import prepare_data
from core.data.transforms import relative_matrix, transform_boxes
from core.data.types import ImageRecord
from core.paths import run_dir
from bench.worker import batch_stream, run_cell, seed_everything
from tests.adapters.test_faster_rcnn import tiny_cfg
from tests.adapters.test_ubteacher import _first_batch
from tests.conftest import TINY
from tests.test_worker import StopAfter
from tests.adapters.teacher_proposals import count_teacher_proposals, with_teacher_proposals

st = importlib.import_module("adapters.softteacher")

# Thresholds an untrained tiny teacher (scores ~1/11) passes, so that every loss term is exercised.
LOW = SoftTeacherConfig(initial_score_thr=0.05, rpn_thr=0.05, reg_unc_thr=1.0)
# canonical_scale 8 puts the tiny images' RoIs on P3+, where PIM has a shifted source.
TINY_ST = TINY + ["model.canonical_scale=8"]


# ----------------------------------------------------------------------------- pure pieces
def test_soft_background_weights_and_normalisation_by_hand():
    K = 2  # classes 0, 1; background = 2
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
    labels = torch.tensor([0, 2, 2, 2])  # one foreground RoI, three background
    bg_prob = torch.tensor([0.3, 0.8, 0.1, 0.5])  # the teacher's (fg RoI's value is ignored)
    w = st.soft_weights(labels, bg_prob, K)
    assert w.tolist() == pytest.approx([1.0, 0.8, 0.1, 0.5])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 2)), -math.log(math.e / (math.e + 2)), math.log(3),
          -math.log(math.exp(2) / (math.exp(2) + math.e + 1))]
    expected = (ce[0] + 0.8 * ce[1] + 0.1 * ce[2] + 0.5 * ce[3]) / 2.4  # / (1 + 0.8 + 0.1 + 0.5)
    assert st.soft_cls_loss(logits, labels, w).item() == pytest.approx(expected, rel=1e-6)
    # weights summing below 1 are not blown up: the divisor is max(sum w, 1)
    small = torch.tensor([0.0, 0.2, 0.1, 0.1])
    assert st.soft_cls_loss(logits, labels, small).item() == pytest.approx(0.2 * ce[1] + 0.1 * ce[2] + 0.1 * ce[3])


def test_box_uncertainty_by_hand_and_the_regression_filter():
    # box 0: x1 jitters +-1 around 10 (std of [9, 11] = sqrt(2)), side 20 -> (sqrt(2)/20) / 4
    # box 1: every coordinate moves by +-2 on a 10x10 box -> sqrt(8)/10 on average
    refined = torch.tensor([[[9.0, 0, 30, 20], [-2, -2, 8, 8]],
                            [[11.0, 0, 30, 20], [2, 2, 12, 12]]])
    unc = st.relative_uncertainty(refined)
    assert unc.tolist() == pytest.approx([math.sqrt(2) / 20 / 4, math.sqrt(8) / 10], rel=1e-6)
    # x1 and x2 move by 0.2 (std 0.2 / sqrt(2)) on a box of side 0.5, clamped to 1
    assert st.relative_uncertainty(torch.tensor([[[0.0, 0, 0.5, 0.5]], [[0.2, 0, 0.7, 0.5]]])).item() == \
        pytest.approx(2 * (0.2 / math.sqrt(2)) / 4, rel=1e-5)

    pseudo = [{"boxes": torch.zeros(5, 4), "labels": torch.arange(5),
               "scores": torch.tensor([0.95, 0.92, 0.7, 0.4, 0.91]),
               "unc": torch.tensor([0.01, 0.03, 0.019, 0.001, 0.02])}]
    sets = st.split_pseudo_labels(pseudo, initial_thr=0.5, rpn_thr=0.9, cls_thr=0.9, reg_unc_thr=0.02)
    assert sets["rpn"][0]["labels"].tolist() == [0, 1, 4]
    assert sets["cls"][0]["labels"].tolist() == [0, 1, 4]
    # reg: unc < 0.02 strictly, among boxes above the 0.5 pre-filter; the score does not matter beyond it
    assert sets["reg"][0]["labels"].tolist() == [0, 2]


def test_jitter_offsets_scale_with_the_box_sides():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0, 100, 50], [10, 10, 10.5, 10.5]])
    j = st.jitter_boxes(boxes, 20000, 0.06, generator=g)
    assert j.shape == (20000, 2, 4)
    std = (j - boxes).std(0)
    assert std[0].tolist() == pytest.approx([6.0, 3.0, 6.0, 3.0], rel=0.03)  # 0.06 x (w, h, w, h)
    assert std[1].tolist() == pytest.approx([0.06] * 4, rel=0.03)  # sides clamped to >= 1
    assert (j - boxes).mean(0).abs().max() < 0.1


def test_box_mapping_between_views_with_known_coordinates():
    orig = torch.tensor([[10.0, 20, 30, 40]])
    scale2 = np.diag([2.0, 2.0, 1.0])
    flip200 = np.array([[-1.0, 0, 200], [0, 1, 0], [0, 0, 1]])
    teacher_m = flip200 @ scale2  # resize x2 then flip on a 200 px wide view
    student_m = np.array([[1.0, 0, 10], [0, 1, 0], [0, 0, 1]])  # original size, translated +10 px
    in_teacher = transform_boxes(orig, teacher_m)
    assert in_teacher.tolist() == [[140.0, 40.0, 180.0, 80.0]]
    to_student = relative_matrix(teacher_m, student_m)  # T_s @ inv(T_t)
    assert st.map_boxes(in_teacher, to_student, (100, 100)).tolist() == [[20.0, 20.0, 40.0, 40.0]]
    # and back (the soft teacher maps the student's RoIs into the teacher view with the inverse)
    back = st.map_boxes(torch.tensor([[20.0, 20, 40, 40]]), np.linalg.inv(to_student), (200, 200))
    assert back[0].tolist() == pytest.approx([140.0, 40.0, 180.0, 80.0])
    # a 90 degree rotation about (50, 50): the box is the bounding box of the rotated corners
    rot = np.array([[0.0, -1, 100], [1, 0, 0], [0, 0, 1]])
    assert st.map_boxes(torch.tensor([[10.0, 20, 30, 60]]), rot, (100, 100)).tolist() == [[40.0, 10.0, 80.0, 30.0]]
    # pseudo-labels: clipped to the target view, collapsed ones dropped with their fields
    pseudo = [{"boxes": torch.tensor([[140.0, 40, 180, 80], [0, 0, 20, 10]]), "labels": torch.tensor([3, 4]),
               "scores": torch.tensor([0.9, 0.8]), "unc": torch.tensor([0.01, 0.02])}]
    out = st.map_pseudo_labels(pseudo, [to_student], [(30, 35)])[0]
    assert out["boxes"].tolist() == [[20.0, 20.0, 35.0, 30.0]]  # 2nd box lands at x > 35: gone
    assert out["labels"].tolist() == [3] and out["scores"].tolist() == pytest.approx([0.9])
    assert out["unc"].tolist() == pytest.approx([0.01])


def test_student_view_pixels_follow_its_recorded_matrix(tmp_path):
    """A white rectangle lands where the view's matrix says, for every geometric op drawn."""
    arr = np.zeros((48, 64, 3), np.uint8)
    arr[10:26, 20:36] = 255  # box [20, 10, 36, 26] in continuous pixel coordinates
    Image.fromarray(arr).save(tmp_path / "img.png")
    record = ImageRecord(id=1, file=tmp_path / "img.png", width=64, height=48, boxes=[[20, 10, 36, 26]],
                         labels=[3], iscrowd=[False], ann_ids=[1])
    aug = SimpleNamespace(short_sizes=[96], max_size=200, flip_prob=0.5)
    cfg = SoftTeacherConfig()
    ops = set()
    for seed in range(10):
        view = student_view(record, aug, np.random.default_rng(seed), cfg.translate, cfg.rotate, cfg.shear,
                            cfg.geometric, photometric=False)
        assert view.image.shape == (3, 96, 128)
        lin = view.matrix[:2, :2] / 2  # the resize is x2: what is left is flip and the geometric op
        ops.add("flip+shift" if np.allclose(np.abs(lin), np.eye(2)) else "rotate/shear")
        centre = view.matrix @ np.array([28.0, 18.0, 1.0])
        # intensity centroid in a window around it (the grey fill of uncovered borders stays outside);
        # pixel i covers [i, i + 1): a half-pixel convention error would show as 0.5 px
        x0, y0 = int(centre[0]) - 24, int(centre[1]) - 24
        win = view.image[0, y0:y0 + 48, x0:x0 + 48].double()
        ys, xs = torch.meshgrid(torch.arange(48.0, dtype=torch.float64) + y0 + 0.5,
                                torch.arange(48.0, dtype=torch.float64) + x0 + 0.5, indexing="ij")
        assert float((win * xs).sum() / win.sum()) == pytest.approx(centre[0], abs=0.1), seed
        assert float((win * ys).sum() / win.sum()) == pytest.approx(centre[1], abs=0.1), seed
        expected = transform_boxes(torch.tensor([[20.0, 10, 36, 26]]), view.matrix)[0]
        assert view.boxes[0].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
        assert view.labels.tolist() == [3]
    assert ops == {"flip+shift", "rotate/shear"}


def test_ema_warms_up_and_averages_parameters_only():
    assert ema_momentum(0, 0.999) == 0.0  # the first update is a copy
    assert ema_momentum(1, 0.999) == pytest.approx(0.5)
    assert ema_momentum(9, 0.999) == pytest.approx(0.9)
    assert ema_momentum(100_000, 0.999) == 0.999
    assert ema_momentum(1, 0.999, warm_up=1) == pytest.approx(1 / 3)

    torch.manual_seed(0)
    student = build_faster_rcnn(tiny_cfg(), 2)
    teacher = build_faster_rcnn(tiny_cfg(), 2)
    hook = SoftTeacherEMAHook(teacher, student, start=3, keep_rate=0.999)
    hook.trainer = SimpleNamespace(iter=2)
    hook.before_step()  # before the start: nothing
    assert not torch.equal(teacher.roi_heads.box_head.fc6.weight, student.roi_heads.box_head.fc6.weight)
    hook.trainer.iter = 3
    hook.before_step()  # the start: a full copy
    for (k, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), k
    copied = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        for name, b in student.named_buffers():
            if b.dtype.is_floating_point:
                b.add_(1.0)
    hook.trainer.iter = 4  # one step after the copy: momentum 1/2
    hook.before_step()
    params = dict(teacher.named_parameters())
    buffers = dict(teacher.named_buffers())
    assert "backbone.body.body.stem.1.running_mean" in buffers  # the tiny trunk has real BN statistics
    for k, v in teacher.state_dict().items():
        if k in params:
            assert torch.allclose(v, copied[k] + 0.5), k
        else:
            assert torch.equal(v, copied[k]), k  # buffers are not averaged


def test_ema_from_start_averages_through_the_burn_in_without_a_copy():
    """The originals' teacher: momentum 0 at iteration 0 (the clone), then the warm-up EMA counted from
    0; at `start` only `on_copy` runs (LSM's F_aux), the teacher is not replaced by the student."""
    torch.manual_seed(0)
    student = build_faster_rcnn(tiny_cfg(), 2)
    teacher = build_faster_rcnn(tiny_cfg(), 2)
    initial_buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    copies = []
    hook = SoftTeacherEMAHook(teacher, student, start=2, keep_rate=0.999, on_copy=lambda: copies.append(1),
                              from_start=True)
    hook.trainer = SimpleNamespace(iter=0)
    hook.before_step()  # iteration 0: a copy of the parameters
    for (k, a), b in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(a, b), k
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    for it in (1, 2):  # momentum 1/2, then 2/3 (iteration 2 is `start`)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)
        hook.trainer.iter = it
        hook.before_step()
    assert copies == [1]
    # teacher = 2/3 (1/2 t0 + 1/2 (t0 + 1)) + 1/3 (t0 + 2) = t0 + 1, where the student is at t0 + 2
    for k, v in teacher.named_parameters():
        assert torch.allclose(v, before[k] + 1.0, atol=1e-6), k
    for k, v in teacher.named_buffers():
        assert torch.equal(v, initial_buffers[k]), k  # never averaged, never copied


# ----------------------------------------------------------------------------- the adapter
@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    home = tmp_path_factory.mktemp("st")
    cfg = load_config("demo", TINY_ST, method="softteacher")
    return cfg, prepare_data(cfg.data, home)


def _adapter(cfg, data, t=0.06, **lsm):
    cfg = cfg.model_copy(update={"lsm": cfg.lsm.model_copy(update={"alpha": 0.05, **lsm}),
                                 "semi": cfg.semi.model_copy(update={"t": t})})
    seed_everything(cfg.seed)
    adapter = base.ADAPTERS["softteacher"](cfg, data.num_classes, torch.device("cpu"))
    adapter.teacher.load_state_dict(adapter.student.state_dict())
    adapter.teacher.roi_heads.score_thresh = 0.0
    adapter.st = LOW
    return cfg, adapter


@pytest.mark.parametrize("mode,expected", [("train", 37), ("test", 11)])
def test_teacher_proposals_follow_the_train_time_rpn_settings(setting, mode, expected):
    """The original's teacher proposes with its train-time `rpn_proposal` counts (`semi.teacher_proposals`)."""
    cfg, data = setting
    cfg, adapter = _adapter(with_teacher_proposals(cfg, mode), data)
    counts = count_teacher_proposals(adapter)
    adapter.pseudo_label([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    assert counts == [expected, expected]


def test_burn_in_is_supervised_and_loads_no_unlabeled_images(setting):
    cfg, data = setting
    cfg, adapter = _adapter(cfg, data)
    batch = next(batch_stream(cfg, adapter, data, 0))
    assert batch["unlabeled"] is None
    out = adapter.training_step(0, batch)
    assert set(out.losses) == {"loss_rpn_cls_sup", "loss_rpn_loc_sup", "loss_cls_sup", "loss_box_reg_sup"}
    assert list(adapter.eval_models()) == ["student", "teacher"]  # the original reports the student


def test_lsm_off_gives_the_plain_soft_teacher_losses_and_lsm_on_adds_pim_and_sd(setting):
    cfg, data = setting
    # t = 0.5 puts the untrained teacher's scores (~1/11) inside SD's interval (alpha, t)
    cfg_off, plain = _adapter(cfg, data, t=0.5, enabled=False)
    _, with_lsm = _adapter(cfg, data, t=0.5, enabled=True, ignore_uncertain=False)
    _, ignoring = _adapter(cfg, data, t=0.5, enabled=True)
    batch = _first_batch(cfg_off, plain, data)
    state = rng_state()
    out_off = plain.training_step(cfg.semi.burn_in, batch)
    set_rng_state(state)
    out_on = with_lsm.training_step(cfg.semi.burn_in, batch)
    set_rng_state(state)
    out_ignore = ignoring.training_step(cfg.semi.burn_in, batch)
    main = {f"{k}_{s}" for k in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg") for s in ("sup", "unsup")}
    assert set(out_off.losses) == main  # all four detector losses on pseudo-labels
    for k in main:  # without the ignore region the main branch is untouched by LSM
        assert torch.equal(out_off.losses[k], out_on.losses[k]), k
        if k != "loss_cls_unsup":  # the ignore region changes the soft classification only
            assert torch.equal(out_off.losses[k], out_ignore.losses[k]), k
    assert out_ignore.metrics["lsm_ignored_rois_per_img"] > 0
    assert not torch.equal(out_off.losses["loss_cls_unsup"], out_ignore.losses["loss_cls_unsup"])
    assert out_off.metrics["pl_reg_count_per_img"] > 0 and out_on.metrics["pl_alpha_count_per_img"] > 0
    assert 0 < out_off.metrics["soft_bg_weight_mean"] < 1
    assert set(out_on.losses) - main == {"loss_pim_cls_unsup", "loss_pim_reg_unsup", "loss_sd",
                                         "loss_pim_cls_sup", "loss_pim_reg_sup"}
    assert out_on.losses["loss_pim_cls_unsup"] > 0 and out_on.losses["loss_sd"] > 0
    sum(out_on.losses.values()).backward()
    aux = with_lsm.student.roi_heads.aux_cls_score.weight.grad
    assert aux is not None and aux.abs().sum() > 0
    assert all(p.grad is None for p in with_lsm.teacher.parameters())


def test_background_weights_come_from_the_teacher_on_the_mapped_rois(setting):
    """Teacher sure of background -> plain CE mean; teacher sure of foreground -> fg RoIs only."""
    cfg, data = setting
    cfg, adapter = _adapter(cfg, data)
    items = _first_batch(cfg, adapter, data)["unlabeled"]
    images_t, _ = base.batch_to_device(items, "weak", adapter.device)
    views = adapter.student_views(items, cfg.semi.burn_in)
    to_teacher = [relative_matrix(v, it["views"]["weak"]) for it, v in zip(items, views)]
    truth = [{"boxes": v.boxes, "labels": v.labels, "scores": torch.ones(len(v.boxes))} for v in views]
    none = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    empty = [none] * len(views)
    bg_bias = adapter.teacher.roi_heads.box_predictor.cls_score.bias
    K = data.num_classes
    for bias, reg_set in ((30.0, empty), (-30.0, truth)):
        with torch.no_grad():
            bg_bias[-1] = bias
        teacher_out = adapter.pseudo_label(images_t)
        losses, fwd, w, _ = adapter.student_unsup([v.image for v in views], empty, truth, reg_set, teacher_out,
                                                  to_teacher)
        labels = fwd.samples.labels
        fg = labels < K
        assert fg.any() and (~fg).any()
        ce = F.cross_entropy(fwd.logits, labels, reduction="none")
        if bias > 0:
            assert w.tolist() == pytest.approx([1.0] * len(w))
            assert losses["loss_cls"].item() == pytest.approx(ce.mean().item(), rel=1e-5)
            assert losses["loss_box_reg"].item() == 0.0  # empty regression set
        else:
            assert w[~fg].max() < 1e-6 and w[fg].tolist() == [1.0] * int(fg.sum())
            assert losses["loss_cls"].item() == pytest.approx(ce[fg].sum().item() / max(int(fg.sum()), 1), rel=1e-5)
            assert losses["loss_box_reg"].item() > 0


# ----------------------------------------------------------------------------- end to end
def _e2e_config(monkeypatch):
    low = [f"softteacher.{k}={v}" for k, v in LOW.model_dump().items() if v != SoftTeacherConfig().model_dump()[k]]
    return load_config("demo", TINY_ST + low + ["solver.max_iter=5", "solver.checkpoint_period=2", "semi.t=0.06",
                                          "lsm.enabled=true", "lsm.alpha=0.05"], method="softteacher")


def _final_states(*runs):
    return [torch.load(run_dir(home, r["key"]) / "model_final.pth", weights_only=True) for home, r in runs]


def _assert_same(a, b):
    for model in ("student", "teacher"):
        for k, v in a[model].items():
            assert torch.equal(v, b[model][k]), (model, k)


def test_resumed_run_equals_uninterrupted_run_with_lsm(tmp_path, monkeypatch):
    cfg = _e2e_config(monkeypatch)
    full = run_cell(cfg, tmp_path / "a", track=False, progress=False)
    with pytest.raises(StopTraining):
        run_cell(cfg, tmp_path / "b", track=False, progress=False, extra_hooks=[StopAfter(4)])
    resumed = run_cell(cfg, tmp_path / "b", track=False, progress=False)

    assert full["primary_model"] == "student" and set(full["metrics"]) == {"student", "teacher"}
    _assert_same(*_final_states((tmp_path / "a", full), (tmp_path / "b", resumed)))
    assert json.dumps(resumed["metrics"], sort_keys=True) == json.dumps(full["metrics"], sort_keys=True)
    lines = (run_dir(tmp_path / "a", full["key"]) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    logged = {k for r in rows for k in r}
    assert {"loss_cls_unsup", "loss_box_reg_unsup", "loss_pim_cls_unsup", "pl_box_unc_mean",
            "eval.teacher.AP", "eval.student.AP"} <= logged


@pytest.mark.parametrize("from_start", [False, True])
def test_cell_started_from_the_shared_burn_in_equals_the_cell_trained_alone(tmp_path, monkeypatch, from_start):
    """Soft Teacher + LSM from the burn-in cell (trained without LSM) = trained alone; with the teacher
    averaged from iteration 0, the burn-in hands over (and is diagnosed on) that teacher."""
    cfg = _e2e_config(monkeypatch)
    cfg = cfg.model_copy(update={"softteacher": cfg.softteacher.model_copy(update={"ema_from_start": from_start})})
    alone = run_cell(cfg, tmp_path / "a", track=False, progress=False)
    burn = run_cell(burn_in_config(cfg), tmp_path / "b", track=False, progress=False)
    assert "AP" in burn["burn_in_teacher"]
    shared = run_cell(cfg, tmp_path / "b", start_from=run_dir(tmp_path / "b", burn["key"]), track=False,
                      progress=False)
    assert shared["burn_in_from"] == burn["key"] and alone["burn_in_from"] is None
    _assert_same(*_final_states((tmp_path / "a", alone), (tmp_path / "b", shared)))
    assert json.dumps(shared["metrics"], sort_keys=True) == json.dumps(alone["metrics"], sort_keys=True)


@pytest.mark.parametrize("method", ["softteacher", "pseco", "stac"])
def test_naive_large_area_is_a_ubt_variant_only(tiny, method):
    from core.errors import BenchError

    with pytest.raises(BenchError, match=f"not defined for {method}; set lsm.naive_large_area=false"):
        load_config("demo", tiny + ["lsm.naive_large_area=true"], method=method)
