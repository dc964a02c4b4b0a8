import pytest

from bench.config import load_config, parse_overrides, with_overrides
from bench.errors import BenchError


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
