import json
from pathlib import Path

import pytest
from PIL import Image

from core.data.coco import load_coco
from core.data.splits import (SplitManifest, check_manifest, dataset_hash, image_folder_dataset, import_stac,
                               import_ubteacher, make_setting_split, make_split, parse_stac_name)
from core.data.types import DetectionDataset, ImageRecord
from core.errors import BenchError


def toy(n=100, start=1000, step=7, name="toy") -> DetectionDataset:
    recs = [ImageRecord(id=start + step * i, file=Path(f"/x/{i}.png"), width=50, height=40,
                        boxes=[[1, 2, 3 + i % 5, 4]], labels=[i % 3], iscrowd=[False], ann_ids=[i])
            for i in range(n)]
    return DetectionDataset(name=name, records=recs, categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"},
                                                                 {"id": 5, "name": "c"}])


def test_make_split_deterministic_exact_counts():
    ds = toy()
    a, b = make_split(ds, 10, 1), make_split(ds, 10, 1)
    assert a.labeled_ids == b.labeled_ids and a.sha256 == b.sha256
    assert len(a.labeled_ids) == 10 and len(a.unlabeled_ids) == 90
    assert sorted(a.labeled_ids + a.unlabeled_ids) == sorted(r.id for r in ds.records)
    assert a.labeled_ids == sorted(a.labeled_ids)
    c = make_split(ds, 10, 2)
    assert c.labeled_ids != a.labeled_ids and c.sha256 != a.sha256
    assert make_split(ds, 5, 1).labeled_ids != make_split(ds, 10, 1).labeled_ids[:5]
    assert len(make_split(ds, 1, 1).labeled_ids) == 1
    assert len(make_split(ds, 0.5, 3).labeled_ids) == 1  # max(1, int(0.5))
    assert len(make_split(ds, 29, 1).labeled_ids) == 29  # float-safe count (0.29*100 = 28.999...)
    full = make_split(ds, 100, 1)
    assert len(full.labeled_ids) == 100 and full.unlabeled_ids == []
    # the order of records does not matter: ids are sorted first
    shuffled = DetectionDataset(ds.name, ds.records[::-1], ds.categories)
    assert make_split(shuffled, 10, 1).labeled_ids == a.labeled_ids
    with pytest.raises(BenchError, match="fold 0 must be an integer >= 1"):
        make_split(ds, 10, 0)
    with pytest.raises(BenchError, match=r"ratio 0 % is outside \(0, 100\]"):
        make_split(ds, 0, 1)


def test_nested_splits_keep_the_smaller_ratios_images():
    ds = toy()
    small, large = make_split(ds, 15, 1, nested=True), make_split(ds, 30, 1, nested=True)
    assert len(small.labeled_ids) == 15 and len(large.labeled_ids) == 30
    assert set(small.labeled_ids) < set(large.labeled_ids)  # independent draws share ~4.5 of 15
    assert make_split(ds, 15, 1, nested=True).sha256 == small.sha256 and small.source == "lsm-bench:nested"
    assert set(make_split(ds, 15, 2, nested=True).labeled_ids) != set(small.labeled_ids)
    assert make_split(ds, 15, 1).labeled_ids != small.labeled_ids  # the default draw is unchanged
    # the config field leaves the keys of independent draws as they were, and a nested cell is apart
    from core.config import load_config

    plain, nested = load_config("demo"), load_config("demo", ["data.nested_splits=true"])
    assert "nested_splits" not in plain.key_dict()["data"] and nested.key() != plain.key()


def test_manifest_save_load_and_tamper(tmp_path):
    m = make_split(toy(), 5, 3)
    p = m.save(tmp_path / "splits" / "m.json")
    back = SplitManifest.load(p)
    assert back == m and back.sha256 == m.sha256
    assert not list((tmp_path / "splits").glob(".*"))  # no temp file left
    doc = json.loads(p.read_text())
    doc["labeled_ids"][0] = doc["unlabeled_ids"][0]
    p.write_text(json.dumps(doc))
    with pytest.raises(BenchError, match=r"m\.json was modified after it was written.*bench data split"):
        SplitManifest.load(p)
    p.write_text("{")
    with pytest.raises(BenchError, match="is not valid JSON"):
        SplitManifest.load(p)


def test_check_manifest_refuses_other_data():
    ds = toy()
    m = make_split(ds, 10, 1)
    check_manifest(m, ds)  # same data: fine
    other = toy()
    other.records[3].boxes[0, 2] += 1.0  # one box differs
    h_other = dataset_hash(other)
    assert h_other != m.data_hash
    with pytest.raises(BenchError) as e:
        check_manifest(m, other)
    assert m.data_hash[:12] in str(e.value) and h_other[:12] in str(e.value) and "bench data split" in str(e.value)
    forged = SplitManifest(**{**m.__dict__, "labeled_ids": [1, 2]})
    with pytest.raises(BenchError, match=r"names 2 image id\(s\) not in toy \(e\.g\. \[1, 2\]\)"):
        check_manifest(forged, ds)


def test_dataset_hash_ignores_folder_but_not_content():
    a = toy()
    b = toy()
    for r in b.records:
        r.file = Path("/elsewhere") / r.file.name
    assert dataset_hash(a) == dataset_hash(b)
    b.records[0].labels[0] = 2 if b.records[0].labels[0] != 2 else 1
    assert dataset_hash(a) != dataset_hash(b)


def test_import_ubteacher_uses_filtered_id_sorted_list(mini_coco, tmp_path):
    # mini_coco: JSON order 30,10,20,40,50; 20 has no boxes, 40 only a crowd box -> filtered [10, 30, 50]
    ds = load_coco(*mini_coco)
    seed_file = tmp_path / "COCO_supervision.txt"
    seed_file.write_text(json.dumps({"50.0": {"0": [0], "1": [2]}, "10.0": {"1": [0, 1]}}))
    m = import_ubteacher(seed_file, ds, 50, 1)
    assert m.labeled_ids == [50] and m.unlabeled_ids == [10, 30]  # raw-order index 2 would be 20
    assert m.fold == 1 and m.ratio == 50.0 and m.source == "ubteacher:COCO_supervision.txt"
    assert import_ubteacher(seed_file, ds, 50.0, 0).labeled_ids == [10]
    check_manifest(m, ds)
    with pytest.raises(BenchError, match=r"10% seed 1 has 2 indices but instances_mini has 3 images with boxes \(expected 0\)"):
        import_ubteacher(seed_file, ds, 10, 1)
    with pytest.raises(BenchError, match=r"no entry for 5% \(available: 50\.0, 10\.0\)"):
        import_ubteacher(seed_file, ds, 5, 1)
    with pytest.raises(BenchError, match="no seed 7 for 50%"):
        import_ubteacher(seed_file, ds, 50, 7)
    seed_file.write_text(json.dumps({"50.0": {"1": [3]}}))
    with pytest.raises(BenchError, match=r"out-of-range indices \(valid: 0\.\.2\)"):
        import_ubteacher(seed_file, ds, 50, 1)


def test_stac_names_and_import(mini_coco, tmp_path):
    assert parse_stac_name("instances_train2017.1@10.json") == (1, 10.0)
    assert parse_stac_name("instances_train2017.3@10.0.json") == (3, 10.0)
    assert parse_stac_name("instances_train2017.2@0.5-unlabeled.json") == (2, 0.5)
    assert parse_stac_name("instances_train2017.json") is None
    ds = load_coco(*mini_coco)
    f = tmp_path / "instances_train2017.2@5.0.json"
    f.write_text(json.dumps({"images": [{"id": 30}, {"id": 20}], "annotations": [], "categories": []}))
    m = import_stac(f, ds)
    assert (m.fold, m.ratio) == (2, 5.0)
    assert m.labeled_ids == [20, 30] and m.unlabeled_ids == [10, 40, 50]
    custom = tmp_path / "my_labeled.json"
    custom.write_text(f.read_text())
    assert import_stac(custom, ds).ratio == 40.0 and import_stac(custom, ds).fold == 0
    unl = tmp_path / "instances_train2017.2@5.0-unlabeled.json"
    unl.write_text(f.read_text())
    with pytest.raises(BenchError, match=r"unlabeled half .* pass the labeled file instances_train2017\.2@5\.0\.json"):
        import_stac(unl, ds)
    f.write_text(json.dumps({"images": [{"id": 999}]}))
    with pytest.raises(BenchError, match=r"1 image id\(s\) are not in instances_mini \(e\.g\. \[999\]\)"):
        import_stac(f, ds)


def test_setting_splits_and_image_folders(tmp_path):
    folder = tmp_path / "unl"
    (folder / "sub").mkdir(parents=True)
    for name in ("sub/b.png", "a.jpg", "c.PNG"):
        Image.new("RGB", (8, 6)).save(folder / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    (folder / "notes.txt").write_text("x")
    unl = image_folder_dataset(folder, id_offset=500)
    assert [(r.id, r.file.relative_to(folder).as_posix()) for r in unl.records] == \
        [(501, "a.jpg"), (502, "c.PNG"), (503, "sub/b.png")]
    assert all(len(r.boxes) == 0 and (r.width, r.height) == (8, 6) for r in unl.records)
    listfile = tmp_path / "list.txt"
    listfile.write_text("unl/sub/b.png\nunl/a.jpg\n")
    listed = image_folder_dataset(listfile, id_offset=500)
    assert [r.file.name for r in listed.records] == ["a.jpg", "b.png"] and [r.id for r in listed.records] == [501, 502]
    listfile.write_text("unl/missing.png\n")
    with pytest.raises(BenchError, match=r"1 listed image\(s\) do not exist"):
        image_folder_dataset(listfile)

    lab = toy(5, start=1, step=1)
    m = make_setting_split("coco_imagenet", lab, unl)
    assert m.labeled_ids == [1, 2, 3, 4, 5] and m.unlabeled_ids == [501, 502, 503] and m.ratio == 100.0
    check_manifest(m, lab, unl)
    with pytest.raises(BenchError, match="hashes to"):
        check_manifest(m, lab, image_folder_dataset(folder, id_offset=600))
    voc12 = toy(3, start=2008000001, step=1, name="voc12")
    assert make_setting_split("voc", lab, voc12).unlabeled_ids == [2008000001, 2008000002, 2008000003]
    with pytest.raises(BenchError, match=r"share 2 image id\(s\)"):
        make_setting_split("coco_additional", lab, toy(2, start=4, step=1))
    with pytest.raises(BenchError, match="unknown split setting"):
        make_setting_split("coco_standard", lab, unl)
