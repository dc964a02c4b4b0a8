import numpy as np
import pytest
import torch

from core.data.coco import load_coco
from core.data.loader import IterationBatchSampler, collate_views, make_loader, sample_indices
from core.data.synth import generate
from core.data.transforms import ViewSettings
from core.errors import BenchError


def test_sample_indices_is_a_pure_epoch_stream():
    n, bs, seed = 5, 2, 11
    stream = [p for it in range(5) for p in sample_indices(n, bs, seed, it)]  # 10 samples = 2 epochs
    idx = [i for i, _ in stream]
    assert sorted(idx[:5]) == list(range(5)) and sorted(idx[5:10]) == list(range(5))
    assert idx[:5] == np.random.default_rng([seed, 0]).permutation(5).tolist()
    assert idx[5:] == np.random.default_rng([seed, 1]).permutation(5).tolist()
    assert len({s for _, s in stream}) == 10  # every sample its own augmentation seed
    assert sample_indices(n, bs, seed, 3) == stream[6:8]  # iteration 3 = samples 6, 7
    assert sample_indices(n, bs, seed + 1, 0) != stream[:2]
    assert list(IterationBatchSampler(n, bs, seed, 2, 4)) == [stream[4:6], stream[6:8]]
    with pytest.raises(BenchError, match="empty data set"):
        sample_indices(0, 2, 0, 0)


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    path = generate(out, 6, seed=5, image_size=48, workers=1)
    return load_coco(path, out / "images" / "train")


CFG = ViewSettings(short_sizes=(40, 48, 56), max_size=100, flip_prob=0.5)


def _flat(batches):
    return [(it["image_id"], name, v.image, v.boxes) for b in batches for it in b for name, v in it["views"].items()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, na, xa, ba), (ib, nb, xb, bb) in zip(a, b):
        assert ia == ib and na == nb and torch.equal(xa, xb) and torch.equal(ba, bb)


def test_resume_gives_identical_batches(small_ds):
    full = list(make_loader(small_ds, CFG, ("weak", "strong"), batch_size=4, seed=1, start_iter=0, max_iter=5))
    assert len(full) == 5 and all(len(b) == 4 for b in full)
    resumed = list(make_loader(small_ds, CFG, ("weak", "strong"), batch_size=4, seed=1, start_iter=3, max_iter=5))
    _assert_same(_flat(full[3:]), _flat(resumed))
    # worker processes draw the same augmentations (seeds travel with the indices)
    parallel = list(make_loader(small_ds, CFG, ("weak", "strong"), batch_size=4, seed=1, start_iter=3, max_iter=5,
                                num_workers=2))
    _assert_same(_flat(full[3:]), _flat(parallel))
    # the loader feeds exactly the pure sample stream
    assert [it["image_id"] for it in full[2]] == \
        [small_ds.records[i].id for i, _ in sample_indices(len(small_ds.records), 4, 1, 2)]


def test_collate_views(small_ds):
    batch = next(iter(make_loader(small_ds, CFG, ("weak", "strong"), batch_size=3, seed=0, start_iter=0, max_iter=1)))
    images, targets = collate_views(batch, "strong")
    assert len(images) == 3 and images[0].dtype == torch.float32 and images[0].shape[0] == 3
    assert set(targets[0]) == {"boxes", "labels"} and targets[0]["boxes"].shape[1] == 4
    assert targets[0]["labels"].dtype == torch.int64
    assert batch[0]["record"].id == batch[0]["image_id"]
    with pytest.raises(BenchError, match="view 'test' was not built"):
        collate_views(batch, "test")
