import pytest

from core.config import load_config, parse_overrides, with_overrides
from core.errors import BenchError


def test_overrides_are_parsed_as_yaml_and_validated():
    cfg = load_config("demo", ["solver.max_iter=7", "lsm.pim_levels=[p4,p3]", "lsm.enabled=true", "semi.t=0.8"])
    assert cfg.solver.max_iter == 7
    assert cfg.lsm.pim_levels == ["p3", "p4"]  # canonical order
    assert cfg.lsm.enabled is True and cfg.semi.t == 0.8
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("override, message", [
    ("solver.max_itr=5", "unknown config key 'solver.max_itr'"),
    ("solver.max_iter=-1", "invalid value for 'solver.max_iter'"),
    ("solver.max_iter=abc", "invalid value for 'solver.max_iter'"),
    ("lsm.pim_levels=[p5]", "invalid value for 'lsm.pim_levels"),
    ("model.arch=r101", "invalid value for 'model.arch'"),
    ("no_equals_sign", "not of the form key=value"),
])
def test_bad_overrides_are_refused_by_name(override, message):
    with pytest.raises(BenchError, match=message.replace("[", r"\[")):
        load_config("demo", [override])


def test_alpha_above_t_is_refused():
    with pytest.raises(BenchError, match="lsm.alpha"):
        load_config("demo", ["lsm.enabled=true", "lsm.alpha=0.8", "semi.t=0.7"])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(BenchError, match="known presets: coco, coco_additional, coco_imagenet, demo, demo_long, forest, voc"):
        load_config("cocoo")


def test_every_preset_validates():
    for name in ("demo", "demo_long", "coco", "coco_additional", "coco_imagenet", "voc"):
        assert load_config(name).preset == name


def test_key_is_stable_and_changes_with_any_result_field():
    a, b = load_config("demo"), load_config("demo")
    assert a.key() == b.key()
    # fields that do not change the result do not change the key
    assert with_overrides(a, {"device": "cpu", "solver": {"log_period": 3}}).key() == a.key()
    for change in ({"seed": 2}, {"lsm": {"alpha": 0.4}}, {"data": {"ratio": 5}}, {"solver": {"base_lr": 0.03}},
                   {"model": {"cls_loss": "ce"}}, {"method": "ubteacher"}, {"stage": "burn_in"}):
        assert with_overrides(a, change).key() != a.key(), change


def test_ignore_uncertain_enters_the_key_of_lsm_cells_only():
    plain = load_config("demo", ["method=ubteacher"])
    assert plain.lsm.ignore_uncertain is True  # the authors' behaviour by default
    # without LSM the switch is inert: the key dict is what it was before the field existed
    assert "ignore_uncertain" not in plain.key_dict()["lsm"]
    assert with_overrides(plain, {"lsm": {"ignore_uncertain": False}}).key() == plain.key()
    lsm = with_overrides(plain, {"lsm": {"enabled": True}})
    assert lsm.key_dict()["lsm"]["ignore_uncertain"] is True
    assert with_overrides(lsm, {"lsm": {"ignore_uncertain": False}}).key() != lsm.key()


def test_pim_cls_loss_is_ce_and_enters_the_key_of_lsm_cells_only():
    plain = load_config("demo", ["method=ubteacher"])
    assert plain.lsm.pim_cls_loss == "ce"  # the authors' PIM branch, though the demo's host uses focal
    assert with_overrides(plain, {"lsm": {"pim_cls_loss": "host"}}).key() == plain.key()
    lsm = with_overrides(plain, {"lsm": {"enabled": True}})
    assert with_overrides(lsm, {"lsm": {"pim_cls_loss": "host"}}).key() != lsm.key()
    with pytest.raises(BenchError, match=r"^override: invalid value for 'lsm.pim_cls_loss'"):
        with_overrides(lsm, {"lsm": {"pim_cls_loss": "focal"}})


def test_naive_large_area_is_refused_with_lsm_and_outside_ubt_in_one_line():
    with pytest.raises(BenchError, match=r"^preset 'demo': lsm.naive_large_area is Table 5's variant without PIM; "
                                         r"set lsm.enabled=false with it \(or lsm.naive_large_area=false for LSM\)$"):
        load_config("demo", ["method=ubteacher", "lsm.enabled=true", "lsm.naive_large_area=true"])
    with pytest.raises(BenchError, match="not defined for stac; set lsm.naive_large_area=false"):
        load_config("demo", ["method=stac", "lsm.naive_large_area=true"])
    naive = load_config("demo", ["method=ubteacher", "lsm.naive_large_area=true"])
    assert naive.key_dict()["lsm"]["naive_area_pixels"] == "original"  # its threshold's meaning changed
    assert "naive_area_pixels" not in load_config("demo", ["method=ubteacher"]).key_dict()["lsm"]


def test_naive_threshold_is_the_evaluations_large_bound_in_original_pixels():
    for name in ("demo", "demo_long", "forest", "coco", "coco_additional", "coco_imagenet", "voc"):
        cfg = load_config(name)
        assert cfg.lsm.naive_min_area == pytest.approx((96 * cfg.eval.area_scale) ** 2, rel=1e-4), name


def test_a_config_yaml_with_the_flat_ddetr_weights_still_loads_into_the_grouped_ones():
    from core.config import RunConfig

    dump = load_config("demo", [], method="ddetr").model_dump(mode="json")
    d = dump["ddetr"]
    d.pop("matcher_cost"), d.pop("loss_weight")
    d.update(class_cost=3.0, bbox_cost=4.0, giou_cost=1.0, cls_loss_weight=6.0, bbox_loss_weight=7.0, giou_loss_weight=8.0)
    cfg = RunConfig.model_validate(dump)
    assert cfg.ddetr.matcher_cost.model_dump() == {"cls": 3.0, "bbox": 4.0, "giou": 1.0}
    assert cfg.ddetr.loss_weight.model_dump() == {"cls": 6.0, "bbox": 7.0, "giou": 8.0}
