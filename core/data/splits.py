"""Labeled/unlabeled split manifests: image ids written to disk, tied to the data they came from.

Published SSOD splits are not reproducible from their generators (random offsets, sampling with
replacement, indices into a filtered list), so a split here is
always a manifest of image *ids* plus a hash of the data set it was drawn from. Training refuses a
manifest whose data hash differs from the data it is applied to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.data.types import DetectionDataset, ImageRecord
from core.errors import BenchError

SETTINGS = ("coco_standard", "coco_additional", "voc", "coco_imagenet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_FIX = "regenerate with `bench data split ...`"


@dataclass
class SplitManifest:
    dataset: str
    setting: str
    ratio: float  # percent labeled (100 for the "all labeled" settings)
    fold: int
    labeled_ids: list[int]
    unlabeled_ids: list[int]
    data_hash: str
    source: str  # how the split was made: "lsm-bench", "ubteacher:<file>", "stac:<file>", ...

    def _canonical(self) -> bytes:
        d = asdict(self)
        d["labeled_ids"] = [int(i) for i in self.labeled_ids]
        d["unlabeled_ids"] = [int(i) for i in self.unlabeled_ids]
        d["ratio"] = float(self.ratio)
        d["fold"] = int(self.fold)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @property
    def sha256(self) -> str:
        """Fingerprint of ids + settings; stored in the file and logged with every run."""
        return hashlib.sha256(self._canonical()).hexdigest()

    def save(self, path: Path) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves a truncated manifest."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = json.loads(self._canonical())
        doc["sha256"] = self.sha256
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path) -> "SplitManifest":
        """Read and verify a manifest; an edited or truncated file is refused."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise BenchError(f"split manifest {path} does not exist; {_FIX}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BenchError(f"split manifest {path} is not valid JSON ({e}); {_FIX}") from None
        fields = ("dataset", "setting", "ratio", "fold", "labeled_ids", "unlabeled_ids", "data_hash", "source")
        missing = [k for k in fields + ("sha256",) if not isinstance(doc, dict) or k not in doc]
        if missing:
            raise BenchError(f"split manifest {path} lacks {', '.join(missing)}; {_FIX}")
        try:
            m = cls(**{k: doc[k] for k in fields})
            actual = m.sha256
        except (TypeError, ValueError) as e:
            raise BenchError(f"split manifest {path} has malformed fields ({e}); {_FIX}") from None
        if actual != doc["sha256"]:
            raise BenchError(f"split manifest {path} was modified after it was written (stored sha256 "
                             f"{str(doc['sha256'])[:12]}, content {actual[:12]}); {_FIX}")
        return m


# ----------------------------------------------------------------------------- hashing


def dataset_hash(dataset: DetectionDataset) -> str:
    """sha256 over sorted image ids, file names, sizes, boxes, labels and category ids.

    File *names* (not full paths) are hashed so the same data in another directory matches.
    """
    h = hashlib.sha256()
    h.update(json.dumps([c["id"] for c in dataset.categories]).encode())
    for r in sorted(dataset.records, key=lambda r: r.id):
        h.update(f"{r.id}|{Path(r.file).name}|{r.width}|{r.height}|{len(r.labels)}\n".encode())
        h.update(np.ascontiguousarray(r.boxes, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(r.labels, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(r.iscrowd, dtype=bool).tobytes())
    return h.hexdigest()


def combined_hash(labeled: DetectionDataset, unlabeled: DetectionDataset) -> str:
    """Hash of a (labeled, unlabeled) pair of data sets, for the two-source settings."""
    return hashlib.sha256(f"{dataset_hash(labeled)}+{dataset_hash(unlabeled)}".encode()).hexdigest()


# ----------------------------------------------------------------------------- coco_standard


def _count(ratio_percent: float, n: int) -> int:
    # ratio*n/100 plus a tiny epsilon: int(0.29/100*100) would give 28 through float rounding.
    return int(math.floor(ratio_percent * n / 100.0 + 1e-9))


def make_split(dataset: DetectionDataset, ratio_percent: float, fold: int,
               setting: str = "coco_standard", nested: bool = False) -> SplitManifest:
    """Draw ``ratio_percent`` % of the images as labeled, the rest unlabeled, deterministically.

    ``n = max(1, floor(ratio/100 * N))`` ids are drawn WITHOUT replacement from the id-sorted list
    with ``default_rng([fold, round(ratio*1000)])``. STAC/mmdet draw with replacement, so their "10 %"
    is really ~9.5 %; exact counts make ratios comparable across folds and data sets.

    ``nested``: the first n of one permutation per fold (``default_rng([fold])``), so a fold's
    larger ratio keeps every labeled image of its smaller ones. On a pool of a few dozen images,
    independent draws make two ratios differ in *which* images they label as much as in how many;
    nested draws leave the count as the only difference.
    """
    if not (0 < ratio_percent <= 100):
        raise BenchError(f"split ratio {ratio_percent} % is outside (0, 100]; pass e.g. 1, 5 or 10")
    if int(fold) != fold or fold < 1:
        raise BenchError(f"split fold {fold} must be an integer >= 1; pass e.g. --fold 1")
    ids = np.array(sorted(r.id for r in dataset.records), dtype=np.int64)
    if len(ids) == 0:
        raise BenchError(f"data set {dataset.name} has no images to split; check the annotation file")
    n = len(ids) if ratio_percent == 100 else max(1, _count(ratio_percent, len(ids)))
    chosen = np.zeros(len(ids), dtype=bool)
    if nested:
        chosen[np.random.default_rng([int(fold)]).permutation(len(ids))[:n]] = True
    else:
        rng = np.random.default_rng([int(fold), int(round(ratio_percent * 1000))])
        chosen[rng.choice(len(ids), size=n, replace=False)] = True
    return SplitManifest(dataset=dataset.name, setting=setting, ratio=float(ratio_percent), fold=int(fold),
                         labeled_ids=ids[chosen].tolist(), unlabeled_ids=ids[~chosen].tolist(),
                         data_hash=dataset_hash(dataset), source="lsm-bench:nested" if nested else "lsm-bench")


def check_manifest(manifest: SplitManifest, dataset: DetectionDataset,
                   unlabeled: DetectionDataset | None = None) -> None:
    """Refuse a manifest drawn from other data (hash mismatch) or naming ids the data lacks.

    For two-source settings (coco_additional, voc, coco_imagenet) pass the unlabeled data set too.
    """
    actual = dataset_hash(dataset) if unlabeled is None else combined_hash(dataset, unlabeled)
    if actual != manifest.data_hash:
        raise BenchError(f"split manifest ({manifest.setting} {manifest.ratio:g}% fold {manifest.fold}) was made "
                         f"on data with hash {manifest.data_hash[:12]} but {dataset.name} hashes to {actual[:12]}; "
                         f"{_FIX}")
    have = {r.id for r in dataset.records}
    if unlabeled is not None:
        have |= {r.id for r in unlabeled.records}
    missing = [i for i in list(manifest.labeled_ids) + list(manifest.unlabeled_ids) if i not in have]
    if missing:
        raise BenchError(f"split manifest names {len(missing)} image id(s) not in {dataset.name} "
                         f"(e.g. {missing[:5]}); {_FIX}")


# ----------------------------------------------------------------------------- importers


def _filtered_ids(dataset: DetectionDataset) -> list[int]:
    """detectron2's ``filter_empty_annotations`` list: images with >= 1 non-crowd box, sorted by id."""
    return sorted(r.id for r in dataset.records if (~r.iscrowd).any())


def _read_split_json(path: Path, missing: str, fix: str):
    """A split file's JSON, or a BenchError saying it is missing (`missing`) or invalid (+ `fix`)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(missing) from None
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: invalid JSON ({e}); {fix}") from None


def import_ubteacher(seed_file: Path, dataset: DetectionDataset, percent: float, seed: int) -> SplitManifest:
    """Import Unbiased Teacher's ``COCO_supervision.txt`` (JSON: {"1.0": {"0": [idx, ...]}}).

    Indices address the id-sorted list of images with >= 1 non-crowd box (not the raw JSON order);
    the unlabeled set is the rest of that filtered list, as in UBTeacher's ``divide_label_unlabel``.
    """
    seed_file = Path(seed_file)
    doc = _read_split_json(seed_file, f"seed file {seed_file} does not exist; download unbiased-teacher's "
                           "dataseed/COCO_supervision.txt", "use the original dataseed/COCO_supervision.txt")
    if not isinstance(doc, dict):
        raise BenchError(f"{seed_file}: expected a JSON object keyed by percent; use the original seed file")
    key = next((k for k in doc if _same_number(k, percent)), None)
    if key is None:
        raise BenchError(f"{seed_file}: no entry for {percent:g}% (available: {', '.join(doc)}); pick one of those")
    seeds = doc[key]
    if not isinstance(seeds, dict) or str(seed) not in seeds:
        avail = ", ".join(seeds) if isinstance(seeds, dict) else "none"
        raise BenchError(f"{seed_file}: no seed {seed} for {percent:g}% (available: {avail}); pick one of those")
    idx = seeds[str(seed)]
    filtered = _filtered_ids(dataset)
    n = len(filtered)
    expected = {int(float(percent) / 100.0 * n), _count(float(percent), n)}
    if not isinstance(idx, list) or len(idx) not in expected:
        got = len(idx) if isinstance(idx, list) else type(idx).__name__
        raise BenchError(f"{seed_file}: {percent:g}% seed {seed} has {got} indices but {dataset.name} has {n} "
                         f"images with boxes (expected {min(expected)}); the seed file belongs to other data "
                         f"(COCO train2017 has 117266), use the matching annotation file")
    if any(not isinstance(i, int) or i < 0 or i >= n for i in idx) or len(set(idx)) != len(idx):
        raise BenchError(f"{seed_file}: {percent:g}% seed {seed} has duplicate or out-of-range indices "
                         f"(valid: 0..{n - 1}); use the original seed file")
    chosen = set(idx)
    labeled = sorted(filtered[i] for i in chosen)
    unlabeled = [filtered[i] for i in range(n) if i not in chosen]
    return SplitManifest(dataset=dataset.name, setting="coco_standard", ratio=float(percent), fold=int(seed),
                         labeled_ids=labeled, unlabeled_ids=unlabeled, data_hash=dataset_hash(dataset),
                         source=f"ubteacher:{seed_file.name}")


def _same_number(key: str, value: float) -> bool:
    try:
        return math.isclose(float(key), float(value), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return False


_STAC_NAME = re.compile(r"\.(\d+)@(\d+(?:\.\d+)?)(-unlabeled)?\.json$")


def parse_stac_name(name: str) -> tuple[int, float] | None:
    """(fold, percent) from ``instances_train2017.1@10.json`` / mmdet's ``...1@10.0.json``; else None."""
    m = _STAC_NAME.search(name)
    return (int(m.group(1)), float(m.group(2))) if m else None


def import_stac(labeled_json: Path, dataset: DetectionDataset) -> SplitManifest:
    """Import a STAC / mmdet ``instances_train2017.{fold}@{pct}.json``: labeled = its image ids.

    Unlabeled = every other image of ``dataset`` (STAC keeps empty images in both parts). When the
    file name does not follow the convention, fold is 0 and the ratio is the actual percentage.
    """
    labeled_json = Path(labeled_json)
    if (match := _STAC_NAME.search(labeled_json.name)) and match.group(3):
        raise BenchError(f"{labeled_json.name} is the unlabeled half of a STAC split; pass the labeled file "
                         f"{labeled_json.name.replace('-unlabeled', '')}")
    doc = _read_split_json(labeled_json, f"STAC split file {labeled_json} does not exist; check the path "
                           "(semi_anns/ or annotations/semi_supervised/)", "regenerate the STAC split file")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise BenchError(f"{labeled_json}: no 'images' list; pass a COCO-format STAC split file")
    try:
        labeled = sorted({int(im["id"]) for im in doc["images"]})
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"{labeled_json}: an image entry lacks an integer 'id'; regenerate the STAC split file") from None
    have = {r.id for r in dataset.records}
    unknown = [i for i in labeled if i not in have]
    if unknown:
        raise BenchError(f"{labeled_json}: {len(unknown)} image id(s) are not in {dataset.name} "
                         f"(e.g. {unknown[:5]}); import it against the annotation file it was made from")
    parsed = parse_stac_name(labeled_json.name)
    fold, ratio = parsed if parsed else (0, round(100.0 * len(labeled) / max(1, len(have)), 6))
    chosen = set(labeled)
    return SplitManifest(dataset=dataset.name, setting="coco_standard", ratio=float(ratio), fold=fold,
                         labeled_ids=labeled, unlabeled_ids=sorted(i for i in have if i not in chosen),
                         data_hash=dataset_hash(dataset), source=f"stac:{labeled_json.name}")


# ----------------------------------------------------------------------------- other settings


def image_folder_dataset(folder_or_listfile: Path, name: str | None = None, id_offset: int = 10**12,
                         categories: list[dict] | None = None, read_sizes: bool = True) -> DetectionDataset:
    """Unlabeled images (a folder, searched recursively, or a text file of paths) as a data set.

    Ids are ``id_offset + 1 ..`` in sorted-path order, so they are deterministic and cannot collide
    with COCO (< 10^7) or VOC (< 2.1*10^9) ids. Boxes are empty. Paths in a list file are relative
    to the list file's folder unless absolute. ``read_sizes=False`` skips the header reads (size 0).
    """
    src = Path(folder_or_listfile)
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    elif src.is_file():
        lines = [ln.strip() for ln in src.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        paths = sorted((Path(ln) if Path(ln).is_absolute() else src.parent / ln) for ln in lines)
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise BenchError(f"{src}: {len(absent)} listed image(s) do not exist (e.g. {absent[0]}); fix the list "
                             "(relative paths are relative to the list file)")
    else:
        raise BenchError(f"unlabeled image source {src} does not exist; pass an image folder or a list file")
    if not paths:
        raise BenchError(f"{src}: no images found (extensions {', '.join(IMAGE_EXTENSIONS[:6])}); check the path")
    records = []
    for k, p in enumerate(paths):
        w = h = 0
        if read_sizes:
            try:
                with Image.open(p) as im:
                    w, h = im.size
            except (UnidentifiedImageError, OSError) as e:
                raise BenchError(f"cannot read image {p} ({e}); delete it or remove it from {src}") from None
        records.append(ImageRecord(id=id_offset + k + 1, file=p, width=w, height=h, boxes=np.zeros((0, 4)),
                                   labels=np.zeros(0), iscrowd=np.zeros(0), ann_ids=np.zeros(0)))
    return DetectionDataset(name=name or src.stem, records=records, categories=list(categories or []),
                            stats={"source": str(src), "id_offset": id_offset})


def make_setting_split(setting: str, labeled: DetectionDataset, unlabeled: DetectionDataset) -> SplitManifest:
    """Two-source settings: every image of ``labeled`` is labeled, every image of ``unlabeled`` is not.

    ``coco_additional``: train2017 + unlabeled2017 (``load_coco`` of the image-info JSON or
    ``image_folder_dataset``); ``voc``: VOC07 trainval + VOC12 trainval; ``coco_imagenet``: train2017 +
    ``image_folder_dataset`` of ImageNet. Overlapping ids would make the two parts ambiguous: refused.
    """
    if setting not in ("coco_additional", "voc", "coco_imagenet"):
        raise BenchError(f"unknown split setting {setting!r}; use coco_additional, voc or coco_imagenet "
                         "(coco_standard splits come from make_split)")
    lab = sorted(r.id for r in labeled.records)
    unl = sorted(r.id for r in unlabeled.records)
    clash = sorted(set(lab) & set(unl))
    if clash:
        raise BenchError(f"{labeled.name} and {unlabeled.name} share {len(clash)} image id(s) (e.g. {clash[:5]}); "
                         "load the unlabeled images with a distinct id_offset")
    return SplitManifest(dataset=f"{labeled.name}+{unlabeled.name}", setting=setting, ratio=100.0, fold=1,
                         labeled_ids=lab, unlabeled_ids=unl, data_hash=combined_hash(labeled, unlabeled),
                         source="lsm-bench")
