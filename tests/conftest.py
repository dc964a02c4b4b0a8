"""Shared fixtures: a tiny configuration of the demo preset that trains in seconds on a CPU."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # never a user's server from tests
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = [
    "data.synth.train_images=24", "data.synth.val_images=6", "data.synth.image_size=64",
    "data.aug.short_sizes=[64]", "data.aug.max_size=96", "data.aug.test_size=64",
    "model.arch=tiny", "model.weights=none", "model.trainable_layers=3", "model.fpn_channels=16", "model.representation_size=32",
    "model.rpn_pre_nms_top_n_train=100", "model.rpn_post_nms_top_n_train=50",
    "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=50",
    "model.roi_batch_size_per_image=16", "model.detections_per_img=20",
    "solver.max_iter=6", "solver.ims_per_batch_labeled=2", "solver.ims_per_batch_unlabeled=2",
    "solver.checkpoint_period=3", "solver.warmup_iters=2", "solver.steps=[5]", "solver.log_period=2",
    "semi.burn_in=2", "data.ratio=25",
]


@pytest.fixture
def tiny():
    """`load_config`-ready overrides for a 6-iteration run on 24 synthetic 64 px images."""
    return list(TINY)


@pytest.fixture(autouse=True)
def _mlflow_uri_stays_in_its_test(monkeypatch):
    """`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in os.environ: without this, a
    test's store would become every later test's (and their workers')."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
