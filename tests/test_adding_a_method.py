"""docs/adding-a-method.md, followed to the letter: a toy method in this one file trains as a cell.

The toy is plain self-training: after a supervised burn-in, the EMA teacher's detections above
`semi.t` on the weak unlabeled views are the student's targets on the same views. The harness
learns of it only from its `MethodSpec`: its burn-in cell, its key and its config come out of the
spec, and the worker trains it like any built-in method.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapters.base import MeanTeacherAdapter, StepOutput, batch_to_device, register
from adapters.engine.mean_teacher import MeanTeacherHook, filter_pseudo_labels
from core import methods
from core.config import load_config
from core.errors import BenchError
from core.methods import MethodSpec

NAME = "toy_selftrain"
SPEC = MethodSpec(NAME, module=__name__, code_version=1, upstream="burn_in")


# --- step 1 of the guide: the adapter -------------------------------------------------------
@register(NAME)
class ToySelfTraining(MeanTeacherAdapter):
    labeled_views = ("weak",)
    unlabeled_views = ("weak",)

    def hooks(self) -> list:
        return [MeanTeacherHook(self.teacher, self.student, self.cfg.semi.burn_in, self.cfg.semi.ema_keep_rate)]

    def eval_models(self) -> dict:
        return {"teacher": self.teacher}

    def training_step(self, iteration: int, batch: dict) -> StepOutput:
        losses, _, _ = self.supervised_terms(batch)
        if iteration < self.cfg.semi.burn_in:
            return StepOutput(losses)
        images_u, _ = batch_to_device(batch["unlabeled"], "weak", self.device)
        with torch.no_grad():
            self.teacher.eval()
            pseudo = filter_pseudo_labels(self.teacher.detect(images_u), self.cfg.semi.t)
        unsup = self.student.train_forward(images_u, pseudo).losses
        losses.update({f"{k}_unsup": self.cfg.semi.lambda_u * v for k, v in unsup.items()})
        return StepOutput(losses, {"pl_boxes_per_img": sum(len(p["boxes"]) for p in pseudo) / len(pseudo)})


# --- step 2 of the guide: the spec entry ----------------------------------------------------
@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.METHODS, NAME, SPEC)  # in a real method: register_method in core/methods.py
    return load_config("demo", ["solver.max_iter=4", "semi.burn_in=2", "semi.t=0.05", *_tiny()], method=NAME)


def _tiny():
    from tests.conftest import TINY

    return [o for o in TINY if not o.startswith(("solver.max_iter", "semi.burn_in", "solver.steps"))]


def test_the_toy_method_trains_as_a_cell_with_its_own_burn_in(toy, tmp_path):
    from bench.burn_in import burn_in_config
    from bench.worker import run_cell
    from core.paths import run_dir

    burn_in = burn_in_config(toy)  # upstream="burn_in": the harness plans a shared burn-in cell
    assert burn_in is not None and burn_in.stage == "burn_in" and burn_in.method == NAME
    first = run_cell(burn_in, tmp_path, track=False, progress=False)
    result = run_cell(toy, tmp_path, start_from=run_dir(tmp_path, first["key"]), track=False, progress=False)
    assert result["method"] == NAME and result["primary_model"] == "teacher"
    assert result["burn_in_from"] == first["key"]  # it started from its burn-in cell
    assert set(result["metrics"]["teacher"]) >= {"AP", "AP50"}


def test_the_spec_is_what_the_harness_reads(toy, tmp_path, monkeypatch):
    from bench.keys import cell_key
    from core.data.sources import prepare_data

    data = prepare_data(toy.data, tmp_path)
    key = cell_key(toy, data)
    # a new code version is a new key: old cells are not reused after a change of results
    monkeypatch.setitem(methods.METHODS, NAME, dataclasses.replace(SPEC, code_version=2))
    assert cell_key(toy, data) != key
    # every other method's settings stay out of its key (it has no section of its own)
    assert not methods.method_sections() & set(toy.key_dict())


def test_an_unregistered_method_is_refused_by_name():
    with pytest.raises(BenchError, match=f"unknown method '{NAME}'; known methods: supervised, ubteacher"):
        methods.method_spec(NAME)
