"""From a DataConfig to labeled / unlabeled / val sets, with generated or user-given manifests."""

import pytest

from core.config import DataConfig, SynthConfig
from core.data import splits
from core.data.sources import prepare_data
from core.errors import BenchError


def _cfg(**kw):
    return DataConfig(synth=SynthConfig(train_images=20, val_images=4, image_size=48, seed=5), ratio=25, **kw)


def test_synthetic_split_is_written_and_reused(tmp_path):
    data = prepare_data(_cfg(), tmp_path)
    assert len(data.labeled.records) == 5 and len(data.unlabeled.records) == 15 and len(data.val.records) == 4
    assert {r.id for r in data.labeled.records}.isdisjoint(r.id for r in data.unlabeled.records)
    # the unlabeled pool keeps its hidden ground truth for pseudo-label statistics
    assert sum(len(r.boxes) for r in data.unlabeled.records) > 0
    (manifest_file,) = (tmp_path / "splits").glob("*.json")
    again = prepare_data(_cfg(), tmp_path)
    assert again.manifest.sha256 == data.manifest.sha256
    assert splits.SplitManifest.load(manifest_file).sha256 == data.manifest.sha256


def test_user_manifest_is_used_and_checked_against_the_data(tmp_path):
    data = prepare_data(_cfg(), tmp_path)
    path = tmp_path / "fold3.json"
    splits.make_split(data.train_pool(), 25, fold=3).save(path)
    chosen = prepare_data(_cfg(split_file=str(path)), tmp_path)
    assert [r.id for r in chosen.labeled.records] == sorted(splits.SplitManifest.load(path).labeled_ids)
    # the same manifest on other data (another generator seed) is refused
    other = DataConfig(synth=SynthConfig(train_images=20, val_images=4, image_size=48, seed=6), split_file=str(path))
    with pytest.raises(BenchError, match="hash"):
        prepare_data(other, tmp_path)

