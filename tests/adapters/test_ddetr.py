"""Deformable DETR: the criterion by hand, LSM's reuse of the matching, the strategies' plumbing.

CPU only, no downloads: the model is built from a config (tiny trunk, d_model 32, one encoder and
two decoder layers) with HF_HUB_OFFLINE=1.
"""

import math

import numpy as np
import pytest
import torch

import adapters.models.deformable_detr as dd
from adapters.base import get_adapter
from adapters.engine.solver import build_optimizer
from adapters.stac import PseudoLabels
from core.config import load_config
from core.data.transforms import View
from core.errors import BenchError
from bench.teacher import teacher_config

TINY_DDETR = ["device=cpu", "ddetr.backbone=tiny", "ddetr.backbone_weights=none", "ddetr.trainable_layers=5",
              "ddetr.d_model=32", "ddetr.num_heads=2", "ddetr.encoder_layers=1", "ddetr.decoder_layers=2",
              "ddetr.ffn_dim=32", "ddetr.num_queries=6", "ddetr.dropout=0.0"]
K = 3  # classes


def _cfg(*extra):
    return load_config("demo", TINY_DDETR + list(extra), method="ddetr")


def _adapter(*extra, seed=0):
    torch.manual_seed(seed)
    return get_adapter("ddetr")(_cfg(*extra), K, torch.device("cpu"))


# ----------------------------------------------------------------------------- the criterion by hand
def _focal(x, y, a=0.25):
    p = 1 / (1 + math.exp(-x))
    bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
    p_t = p * y + (1 - p) * (1 - y)
    return (a * y + (1 - a) * (1 - y)) * (1 - p_t) ** 2 * bce


def _class_cost(x, a=0.25):
    p = 1 / (1 + math.exp(-x))
    return a * (1 - p) ** 2 * -math.log(p) - (1 - a) * p ** 2 * -math.log(1 - p)


def _two_queries():
    """Query 0: the exact box, but class 1 at logit -4; query 1: box 0.02 to the right, class 1 at +4."""
    logits = torch.tensor([[[0.0, -4.0, 0.0], [0.0, 4.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    return logits, boxes, targets


def test_matching_by_hand():
    logits, boxes, targets = _two_queries()
    giou_q1 = 0.036 / 0.044 - 0.0  # intersection 0.18 x 0.2 over union 0.044; the hull equals the union
    cost_q0 = 2 * _class_cost(-4.0) + 5 * 0.0 + 2 * -1.0
    cost_q1 = 2 * _class_cost(4.0) + 5 * 0.02 + 2 * -giou_q1
    assert cost_q1 < cost_q0  # the class term decides (class_cost 2)
    (qi, ti), = dd.SetCriterion().match(logits[0:1], boxes[0:1], targets)
    assert qi.tolist() == [1] and ti.tolist() == [0]
    # without the class cost the exact box wins: the weights are really used
    (qi, _), = dd.SetCriterion(dd.LossWeights(class_cost=0.0)).match(logits, boxes, targets)
    assert qi.tolist() == [0]


def test_losses_by_hand_on_every_layer():
    logits, boxes, targets = _two_queries()
    crit = dd.SetCriterion()
    L = 2  # the same outputs on two decoder layers: each layer adds its own matched loss
    lg, bx = logits[None].repeat(L, 1, 1, 1), boxes[None].repeat(L, 1, 1, 1)
    indices = crit.match_layers(lg, bx, targets)
    out = crit.losses(lg, bx, targets, indices)
    focal = sum(_focal(x, 1.0 if (q, k) == (1, 1) else 0.0) for q, row in enumerate(logits[0].tolist())
                for k, x in enumerate(row))  # summed over queries x classes, / 1 box
    giou = 0.036 / 0.044
    assert float(out["loss_cls"]) == pytest.approx(L * 2 * focal, rel=1e-5)
    assert float(out["loss_bbox"]) == pytest.approx(L * 5 * 0.02, rel=1e-5)
    assert float(out["loss_giou"]) == pytest.approx(L * 2 * (1 - giou), rel=1e-5)


def test_ignored_targets_are_neither_object_nor_background():
    logits, boxes, targets = _two_queries()
    crit = dd.SetCriterion()
    idx = [crit.match(logits, boxes, targets)]
    ignored = crit.losses(logits[None], boxes[None], targets, idx, positive=[torch.tensor([False])])
    # query 1 is matched to an ignored target: only query 0's background terms count, no box loss
    expected = sum(_focal(x, 0.0) for x in logits[0, 0].tolist())
    assert float(ignored["loss_cls"]) == pytest.approx(2 * expected, rel=1e-5)
    assert float(ignored["loss_bbox"]) == 0 and float(ignored["loss_giou"]) == 0


# ----------------------------------------------------------------------------- model
def test_builds_offline_without_network(monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("the model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    ad = _adapter()
    ad.student.eval()
    dets = ad.student([torch.rand(3, 64, 80), torch.rand(3, 48, 64)])
    assert [len(d["scores"]) for d in dets] == [min(100, 6 * K)] * 2  # top-k over (query, class)
    assert dets[1]["boxes"][:, 2].max() <= 64 + 1e-4 and dets[1]["boxes"][:, 3].max() <= 48 + 1e-4


def test_initial_boxes_are_a_tenth_of_the_image_as_the_official_init():
    """Before training every query's box sits on its reference point with w = h = sigmoid(-2)."""
    ad = _adapter()
    ad.student.eval()
    pixel_values, pixel_mask, _ = ad.student.preprocess([torch.rand(3, 64, 64), torch.rand(3, 48, 64)])
    with torch.no_grad():
        boxes = ad.student.decode(pixel_values, pixel_mask).boxes
    torch.testing.assert_close(boxes[..., 2:], torch.full_like(boxes[..., 2:], 1 / (1 + math.exp(2.0))))
    assert ad.student.bbox_embed.layers[-1].bias.tolist() == [0.0, 0.0, -2.0, -2.0]


def test_pseudo_labels_take_the_per_query_argmax():
    logits = torch.tensor([[[3.0, 2.0, -9.0], [-9.0, -9.0, -9.0]]])  # query 0: two classes above 0.5
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    (d,) = dd.per_query_detections(logits, boxes, [(100, 200)], threshold=0.5)
    assert d["labels"].tolist() == [0]  # one box per query: its argmax class
    assert d["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-3.0))])
    assert d["boxes"].tolist() == [pytest.approx([80.0, 30.0, 120.0, 70.0])]


def test_local_weights_load(tmp_path):
    ad = _adapter(seed=1)
    path = tmp_path / "ddetr.pth"
    torch.save(ad.student.state_dict(), path)
    other = _adapter(f"ddetr.weights={path}", seed=2)
    for (n, a), (_, b) in zip(ad.student.state_dict().items(), other.student.state_dict().items()):
        assert torch.equal(a, b), n
    torch.save({"class_embed.weight": torch.zeros(1)}, path)
    with pytest.raises(BenchError, match="does not match this Deformable DETR"):
        _adapter(f"ddetr.weights={path}")
    with pytest.raises(BenchError, match="not found"):
        _adapter(f"ddetr.weights={tmp_path / 'missing.pth'}")


def test_param_group_learning_rates():
    ad = _adapter()
    cfg = ad.cfg
    opt = build_optimizer(ad.param_groups(), cfg.solver)
    assert isinstance(opt, torch.optim.AdamW) and cfg.solver.clip_grad_norm == 0.1
    lr = {g["name"]: g["lr"] for g in opt.param_groups}
    base = cfg.solver.base_lr  # the official ratios: trunk and sampling offsets at a tenth
    assert lr == pytest.approx({"rest": base, "backbone": base / 10, "linear_proj": base / 10})
    # the paper's preset keeps the official recipe; the demo's lr and length are its own (docs/ddetr.md)
    paper = load_config("coco_imagenet", [], method="ddetr").solver
    assert (paper.base_lr, paper.max_iter, paper.steps) == (2e-4, 184800, [147840])
    assert (cfg.solver.base_lr, cfg.solver.max_iter, cfg.solver.steps) == (2e-3, 2800, [2240])
    group_of = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    named = dict(ad.student.named_parameters())
    assert group_of[id(named["transformer.decoder.layers.0.encoder_attn.sampling_offsets.weight"])] == "linear_proj"
    assert group_of[id(named["transformer.reference_points.weight"])] == "linear_proj"
    assert group_of[id(named["transformer.backbone.model.body.0.0.weight"])] == "backbone"
    assert group_of[id(named["class_embed.weight"])] == "rest"
    with pytest.raises(BenchError, match="solver.optimizer=adamw"):
        get_adapter("ddetr")(_cfg("solver.optimizer=sgd"), K, torch.device("cpu"))


# ----------------------------------------------------------------------------- LSM
def _items(n=2, seed=0):
    """Unlabeled items (weak view = the original image) and their stored pseudo-labels."""
    g = torch.Generator().manual_seed(seed)
    items, stored = [], {}
    for i in range(n):
        img = torch.rand(3, 64, 64, generator=g)
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0], [0.0, 30.0, 20.0, 62.0]])
        labels = torch.tensor([0, 1, 2])
        stored[i] = {"boxes": boxes, "labels": labels, "scores": torch.tensor([0.95, 0.6, 0.3])}
        items.append({"image_id": i, "views": {"weak": View(img, boxes.clone(), labels, np.eye(3))}})
    return items, PseudoLabels(stored, score_floor=0.05)


def test_pim_reuses_the_main_matching(monkeypatch):
    ad = _adapter("lsm.enabled=true", "ddetr.strategy=stac")
    items, pseudo = _items()
    ad.attach_pseudo_labels(pseudo)
    calls = []
    real = dd.linear_sum_assignment
    monkeypatch.setattr(dd, "linear_sum_assignment", lambda c: calls.append(c.shape) or real(c))
    seen = []
    real_losses = ad.criterion.losses
    monkeypatch.setattr(ad.criterion, "losses", lambda *a, **k: seen.append(a[3]) or real_losses(*a, **k))
    terms, _ = ad.unlabeled_terms(items)
    # one Hungarian call per image and decoder layer (the main branch's); each sees the boxes above alpha
    assert calls == [(6, 2)] * (2 * 2)
    assert len(seen) == 2 and seen[1] is seen[0]  # PIM got the very indices object of the main branch
    assert {"loss_pim_cls_unsup", "loss_pim_bbox_unsup", "loss_pim_giou_unsup", "loss_sd"} <= set(terms)
    # SD reaches both classifiers (not detached)
    ad.student.zero_grad()
    terms["loss_sd"].backward()
    assert ad.student.class_embed.weight.grad.abs().sum() > 0
    assert ad.student.aux_class_embed.weight.grad.abs().sum() > 0


def test_lsm_off_is_plain_ddetr():
    ad = _adapter("ddetr.strategy=stac")
    items, pseudo = _items()
    ad.attach_pseudo_labels(pseudo)
    torch.manual_seed(5)
    terms, _ = ad.unlabeled_terms(items)
    # the same step by hand: forward, the boxes with score >= t, the plain criterion
    torch.manual_seed(5)
    outs, _, _, sizes = ad.student.forward_train([it["views"]["weak"].image for it in items])
    keep = [pseudo[i]["scores"] >= ad.t for i in range(2)]
    targets = dd.normalize_targets([{k: v[m] for k, v in pseudo[i].items()} for i, m in enumerate(keep)], sizes)
    crit = dd.SetCriterion()
    plain = crit.losses(outs.logits, outs.boxes, targets, crit.match_layers(outs.logits, outs.boxes, targets))
    assert set(terms) == {"loss_cls_unsup", "loss_bbox_unsup", "loss_giou_unsup"}
    for k, v in plain.items():
        assert float(terms[f"{k}_unsup"].detach()) == pytest.approx(float(v.detach()), rel=1e-6)


def test_lsm_with_alpha_at_t_leaves_the_main_branch_unchanged():
    """With alpha = t PIM sees the main branch's boxes only: the main terms equal LSM off's."""
    items, pseudo = _items()
    off = _adapter("ddetr.strategy=stac", seed=3)
    on = _adapter("ddetr.strategy=stac", "lsm.enabled=true", "lsm.alpha=0.7", seed=3)
    for ad in (off, on):
        ad.attach_pseudo_labels(pseudo)
    torch.manual_seed(1)
    t_off, _ = off.unlabeled_terms(items)
    torch.manual_seed(1)
    t_on, _ = on.unlabeled_terms(items)
    for k, v in t_off.items():
        assert float(t_on[k].detach()) == pytest.approx(float(v.detach()), rel=1e-6), k


# ----------------------------------------------------------------------------- strategies and config
def test_pretrain_finetune_phases():
    ad = _adapter("ddetr.strategy=pretrain_finetune", "lsm.enabled=true", "solver.max_iter=10")
    items, pseudo = _items()
    ad.attach_pseudo_labels(pseudo)
    labeled = [{"image_id": 9, "views": {"weak": it["views"]["weak"]}} for it in items]
    pre = ad.training_step(0, {"labeled": labeled, "unlabeled": items}).losses
    fine = ad.training_step(5, {"labeled": labeled, "unlabeled": items}).losses
    assert all(k.endswith("_unsup") or k == "loss_sd" for k in pre) and "loss_pim_cls_unsup" in pre
    assert set(fine) == {"loss_cls_sup", "loss_bbox_sup", "loss_giou_sup"}  # LSM in pre-training only


def test_stac_step_with_lsm_learns_pim_on_labeled_ground_truth():
    ad = _adapter("ddetr.strategy=stac", "lsm.enabled=true")
    items, pseudo = _items()
    ad.attach_pseudo_labels(pseudo)
    labeled = [{"image_id": 9, "views": {"weak": it["views"]["weak"]}} for it in items]  # no scores
    losses = ad.training_step(0, {"labeled": labeled, "unlabeled": items}).losses
    assert {"loss_cls_sup", "loss_pim_cls_sup", "loss_pim_bbox_sup", "loss_cls_unsup", "loss_pim_cls_unsup",
            "loss_sd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_supervised_strategy_needs_no_teacher_and_refuses_lsm():
    cfg = _cfg("ddetr.strategy=supervised")
    assert teacher_config(cfg) is None
    assert get_adapter("ddetr")(cfg, K, torch.device("cpu")).unlabeled_views == ()
    with pytest.raises(BenchError, match="ddetr.strategy=stac or pretrain_finetune"):
        get_adapter("ddetr")(_cfg("ddetr.strategy=supervised", "lsm.enabled=true"), K, torch.device("cpu"))


def test_ddetr_shares_stacs_teacher_cell():
    stac = load_config("demo", ["seed=2", "data.fold=2"], method="stac")
    for strategy in ("stac", "pretrain_finetune"):
        ddetr = load_config("demo", ["seed=2", "data.fold=2", f"ddetr.strategy={strategy}", "lsm.enabled=true"],
                            method="ddetr")
        assert ddetr.solver.optimizer == "adamw"  # the preset's method_defaults.ddetr
        assert teacher_config(ddetr).key() == teacher_config(stac).key()


def test_existing_cell_keys_unchanged():
    """The solver's optimizer field, the ddetr section, lsm.ignore_uncertain, lsm.pim_cls_loss and
    the presets' ddetr defaults must not move the keys of the SGD methods' non-LSM cells (their
    caches). The values are the coco preset's keys after the last intended move (issue #21: aligned
    RoIAlign and the teacher's proposal counts enter every config, STAC's own protocol its rows;
    those cells had new keys anyway through the detector and code versions, bench/keys.py)."""
    assert load_config("coco", [], method="ubteacher").key() == \
        "e08d7440dce35508507608f284e97b0420e9c0b9c7c2c96606270ffbc438dc71"
    assert load_config("coco", [], method="stac").key() == \
        "dcb19c7f651dcfa97c81bc0803a89002d293f6698bf6e6ae6e06fe023054bcbf"
    assert load_config("coco", [], method="supervised").key() == \
        "d2e18071e0319219e24e74a3f6318cfb2be48c69d4c518c7140d0c0da4964b11"
    a = load_config("demo", [], method="ddetr")
    assert "ddetr" in a.key_dict() and a.key() != load_config("demo", ["ddetr.num_queries=7"], method="ddetr").key()
    assert "ddetr" not in load_config("demo", [], method="ubteacher").key_dict()
