"""From a `DataConfig` to the three data sets a run needs: labeled, unlabeled, validation.

Each setting of the paper (README of shared/paper) maps to readers + a split manifest:
- coco_standard: `ratio`% of train2017 labeled (fold = split seed), the rest unlabeled.
- coco_additional: all of train2017 labeled; unlabeled = `data.unlabeled` (e.g. unlabeled2017).
- voc: VOC2007 trainval labeled, VOC2012 trainval unlabeled, VOC2007 test for evaluation.
- coco_imagenet: train2017 labeled; unlabeled = an image folder or a list file (`data.unlabeled`).
The synthetic demo set behaves like coco_standard, and so does `forest` (DeepForest's aerial tiles,
core/data/forest.py: its train tiles are split by ratio, its val tiles are a held-out region).
Unlabeled images keep their hidden ground truth where the source has one (synthetic, forest, COCO
train2017): training never reads it, the pseudo-label statistics (precision/recall by size) do.
The manifest is written to BENCH_HOME/splits/ so the same labeled image ids are reused by every run
and can be inspected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.data import coco, forest, splits, synth, voc
from core.data.types import DetectionDataset
from core.errors import BenchError


@dataclass
class SemiData:
    labeled: DetectionDataset
    unlabeled: DetectionDataset
    val: DetectionDataset
    manifest: splits.SplitManifest

    @property
    def num_classes(self) -> int:
        return self.labeled.num_classes

    def train_pool(self) -> DetectionDataset:
        """Labeled + unlabeled images as one data set (id order): what a split divides."""
        records = sorted(self.labeled.records + self.unlabeled.records, key=lambda r: r.id)
        return DetectionDataset(self.labeled.name, records, self.labeled.categories, self.labeled.annotation_file)


def _require_boxes(ds: DetectionDataset, what: str) -> DetectionDataset:
    """A training or validation set without a single (non-crowd) box trains and scores nothing: AP
    0.00 would be cached as a result."""
    if not any((~r.iscrowd).any() for r in ds.records):
        source = ds.annotation_file or ds.name
        raise BenchError(f"{source}: the {what} set has {len(ds.records)} images and no annotated box; "
                         "a detector cannot learn or be scored on it: add annotations or point at another set")
    return ds


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise BenchError(f"{what} not found at {path}; {fix}")
    return path


_LOADED: dict[tuple, DetectionDataset] = {}


def _load_coco(ann: Path, image_dir: Path, name: str) -> DetectionDataset:
    """`coco.load_coco`, read once per process while the file is unchanged: planning a table
    prepares the same data for every (ratio, fold) and must not parse it each time."""
    st = Path(ann).stat()
    key = (str(Path(ann).resolve()), st.st_mtime_ns, st.st_size, str(image_dir), name)
    if key not in _LOADED:
        _LOADED[key] = coco.load_coco(ann, image_dir, name=name)
    return _LOADED[key]


def _coco_split(root: Path, split: str) -> DetectionDataset:
    ann = _require(root / "annotations" / f"instances_{split}.json", f"COCO {split} annotations",
                   "set data.root to a COCO directory with annotations/ and image folders")
    return _load_coco(ann, _require(root / split, f"COCO {split} images", "check data.root"), name=f"coco_{split}")


def manifest_name(data_name: str, cfg, data_hash: str) -> str:
    """The stored split manifest's file name under BENCH_HOME/splits (`*` parts make a glob)."""
    nested = "-nested" if cfg.nested_splits else ""
    return f"{data_name}-{cfg.setting}-{cfg.ratio:g}pct-fold{cfg.fold}{nested}-{data_hash}.json"


def _manifest(cfg, train: DetectionDataset, home: Path) -> splits.SplitManifest:
    if cfg.split_file:
        manifest = splits.SplitManifest.load(Path(cfg.split_file))
        splits.check_manifest(manifest, train)
        return manifest
    manifest = splits.make_split(train, cfg.ratio, cfg.fold, setting=cfg.setting, nested=cfg.nested_splits)
    path = Path(home) / "splits" / manifest_name(train.name, cfg, manifest.data_hash[:8])
    if path.exists():
        stored = splits.SplitManifest.load(path)
        if stored.sha256 != manifest.sha256:
            raise BenchError(f"split manifest {path} differs from the one generated now; delete it to regenerate")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest.save(path)
    return manifest


def prepare_data(cfg, home: Path) -> SemiData:
    """Load the data sets named by `cfg` (a DataConfig) and split them."""
    if cfg.dataset == "synthetic":
        s = cfg.synth
        paths = synth.ensure_demo_data(home, seed=s.seed, train_images=s.train_images,
                                       val_images=s.val_images, image_size=s.image_size)
        root = Path(paths["root"])
        train = _require_boxes(_load_coco(Path(paths["train"]), root / "images" / "train", name="synthetic_train"),
                               "training")
        val = _require_boxes(_load_coco(Path(paths["val"]), root / "images" / "val", name="synthetic_val"),
                             "validation")
        manifest = _manifest(cfg, train, home)
        return SemiData(train.subset(manifest.labeled_ids), train.subset(manifest.unlabeled_ids), val, manifest)

    if cfg.dataset == "forest":
        if cfg.setting != "coco_standard":
            raise BenchError("data.dataset=forest splits its train tiles by data.ratio: use "
                             f"data.setting=coco_standard (got {cfg.setting})")
        root = Path(cfg.root) if cfg.root else forest.default_root(home)
        files = forest.dataset_files(root, home)
        train = _require_boxes(_load_coco(files["train"], files["train_images"], name="forest_train"), "training")
        val = _require_boxes(_load_coco(files["val"], files["val_images"], name="forest_val"), "validation")
        forest.check_hashes(root, home, train, val)
        manifest = _manifest(cfg, train, home)
        return SemiData(train.subset(manifest.labeled_ids), train.subset(manifest.unlabeled_ids), val, manifest)

    if cfg.root is None:
        raise BenchError(f"data.root is required for data.dataset={cfg.dataset}; pass --data-root DIR or data.root=DIR")
    root = Path(cfg.root)
    if cfg.dataset == "coco":
        train = _require_boxes(_coco_split(root, "train2017"), "training")
        val = _require_boxes(_coco_split(root, "val2017"), "validation")
        if cfg.setting == "coco_standard":
            manifest = _manifest(cfg, train, home)
            return SemiData(train.subset(manifest.labeled_ids), train.subset(manifest.unlabeled_ids), val, manifest)
        if cfg.setting in ("coco_additional", "coco_imagenet"):
            if not cfg.unlabeled:
                raise BenchError(f"setting {cfg.setting} needs data.unlabeled=<image folder or list file>")
            unlabeled = splits.image_folder_dataset(Path(cfg.unlabeled), train.categories)
            manifest = splits.make_setting_split(cfg.setting, train, unlabeled)
            return SemiData(train, unlabeled, val, manifest)
        raise BenchError(f"setting {cfg.setting} does not apply to COCO; use coco_standard, coco_additional or coco_imagenet")

    # VOC: root holds VOC2007/ and VOC2012/ (a VOCdevkit directory)
    if cfg.setting != "voc":
        raise BenchError(f"data.dataset=voc needs data.setting=voc (got {cfg.setting})")
    voc07 = _require(root / "VOC2007", "VOC2007", "set data.root to a VOCdevkit directory")
    voc12 = _require(root / "VOC2012", "VOC2012", "set data.root to a VOCdevkit directory")
    labeled = _require_boxes(voc.load_voc(voc07, "trainval", name="voc07_trainval"), "training")
    unlabeled = voc.load_voc(voc12, "trainval", name="voc12_trainval")
    val = _require_boxes(voc.load_voc(voc07, "test", name="voc07_test"), "validation")
    manifest = splits.make_setting_split("voc", labeled, unlabeled)
    return SemiData(labeled, unlabeled, val, manifest)
