import json

import numpy as np
import pytest
from PIL import Image

from core.data.check import check_dataset, format_summary
from core.data.coco import load_coco, load_image, to_coco_dict
from core.errors import BenchError

CATS = [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]


def _one_image(ann_overrides=None, image_overrides=None):
    im = {"id": 5, "file_name": "x.png", "width": 100, "height": 80, **(image_overrides or {})}
    ann = {"id": 77, "image_id": 5, "category_id": 7, "bbox": [10, 10, 20, 20], "iscrowd": 0, **(ann_overrides or {})}
    return [im], [ann]


def test_valid_file_mapping_crowd_empty_area_and_clipping(mini_coco):
    path, img_dir = mini_coco
    ds = load_coco(path, img_dir)
    # records sorted by id, empty image kept
    assert [r.id for r in ds.records] == [10, 20, 30, 40, 50]
    # non-contiguous ids 3,1,10 -> labels in ascending id order
    assert ds.categories == [{"id": 1, "name": "c1"}, {"id": 3, "name": "c3"}, {"id": 10, "name": "c10"}]
    by = ds.by_id()
    assert by[10].labels.tolist() == [2]  # category 10
    np.testing.assert_array_equal(by[10].boxes, [[10, 20, 40, 60]])
    assert by[10].boxes.dtype == np.float32
    assert len(by[20].boxes) == 0 and ds.stats["images_without_boxes"] == 1
    # crowd kept and flagged
    assert by[40].iscrowd.tolist() == [True] and ds.stats["crowd"] == 1
    # clipping: [90,70,20,20] in 100x80 -> (90,70,100,80); [-5,10,15,10] -> (0,10,10,20)
    np.testing.assert_array_equal(by[50].boxes, [[90, 70, 100, 80], [0, 10, 10, 20]])
    assert ds.stats["clipped_boxes"] == 2
    # missing area computed from the box (10x10), given areas kept
    assert ds.stats["computed_areas"] == 1 and ds.stats["areas"][2] == 100.0 and ds.stats["areas"][1] == 1000.0
    assert by[50].ann_ids.tolist() == [4, 5]
    # ... and on the records, where evaluation's size bins read them
    areas = {int(a): float(v) for r in ds.records for a, v in zip(r.ann_ids, r.object_areas())}
    assert areas[1] == 1000.0 and areas[2] == 100.0


def test_to_coco_dict_round_trip(mini_coco):
    path, img_dir = mini_coco
    ds = load_coco(path, img_dir)
    d = to_coco_dict(ds)
    assert {c["id"] for c in d["categories"]} == {1, 3, 10}
    a1 = next(a for a in d["annotations"] if a["id"] == 1)
    assert a1 == {"id": 1, "image_id": 10, "category_id": 10, "bbox": [10.0, 20.0, 30.0, 40.0],
                  "area": 1000.0, "iscrowd": 0}
    assert next(a for a in d["annotations"] if a["id"] == 3)["iscrowd"] == 1
    assert sorted(im["file_name"] for im in d["images"]) == sorted(f"im{i}.png" for i in (10, 20, 30, 40, 50))
    # reading the written dict back gives identical records
    (path.parent / "round.json").write_text(json.dumps(d))
    ds2 = load_coco(path.parent / "round.json", img_dir)
    for r1, r2 in zip(ds.records, ds2.records):
        np.testing.assert_array_equal(r1.boxes, r2.boxes)
        np.testing.assert_array_equal(r1.labels, r2.labels)


def test_invalid_json(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"images": [}')
    with pytest.raises(BenchError, match=r"broken\.json: invalid JSON at line 1"):
        load_coco(p, tmp_path)


@pytest.mark.parametrize("bbox,kind", [([10, 10, 0, 5], "zero"), ([10, 10, -3, 5], "negative")])
def test_bad_box_size(coco_writer, bbox, kind):
    path, img_dir = coco_writer(*_one_image({"bbox": bbox}), CATS)
    with pytest.raises(BenchError) as e:
        load_coco(path, img_dir)
    msg = str(e.value)
    assert "instances_mini.json" in msg and "annotation 77" in msg and "image 5" in msg and f"{kind}-size" in msg
    assert "\n" not in msg


def test_box_entirely_outside(coco_writer):
    path, img_dir = coco_writer(*_one_image({"bbox": [120, 10, 5, 5]}), CATS)
    with pytest.raises(BenchError, match=r"annotation 77 \(image 5\).*entirely outside the 100x80 image"):
        load_coco(path, img_dir)


def test_unknown_category(coco_writer):
    path, img_dir = coco_writer(*_one_image({"category_id": 99}), CATS)
    with pytest.raises(BenchError, match=r"annotation 77 \(image 5\) has unknown category id 99 \(known: \[1, 7\]\)"):
        load_coco(path, img_dir)


def test_missing_image_file(coco_writer):
    images, anns = _one_image()
    images.append({"id": 6, "file_name": "gone.png", "width": 10, "height": 10})
    path, img_dir = coco_writer(images, anns, CATS, make_files=False)
    (img_dir / "x.png").write_bytes(b"")  # present (not decoded at load time)
    with pytest.raises(BenchError, match=r"image 6 file .*gone\.png does not exist; point data.root"):
        load_coco(path, img_dir)
    assert len(load_coco(path, img_dir, check_images=False).records) == 2


def test_duplicate_image_id_and_missing_keys(coco_writer):
    images, anns = _one_image()
    images.append(dict(images[0], file_name="y.png"))
    path, img_dir = coco_writer(images, anns, CATS)
    with pytest.raises(BenchError, match=r"duplicate image id 5 \(x\.png and y\.png\)"):
        load_coco(path, img_dir)
    images, anns = _one_image()
    del anns[0]["bbox"]
    path, img_dir = coco_writer(images, anns, CATS)
    with pytest.raises(BenchError, match=r"annotation 77 lacks required key\(s\) bbox"):
        load_coco(path, img_dir)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(BenchError, match="top level lacks required key.*categories"):
        load_coco(path, img_dir)


def test_annotation_for_unknown_image(coco_writer):
    path, img_dir = coco_writer(*_one_image({"image_id": 9}), CATS)
    with pytest.raises(BenchError, match=r"annotation 77 \(image 9\) refers to an image id that is not in 'images'"):
        load_coco(path, img_dir)


def test_load_image_modes(tmp_path):
    Image.new("L", (4, 3), 100).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 3), (200, 10, 20, 0)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (4, 3), (0, 0, 0, 0)).save(tmp_path / "cmyk.tif")
    Image.new("P", (4, 3), 0).save(tmp_path / "pal.png")
    Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    expected = {"gray.png": (100, 100, 100), "rgba.png": (200, 10, 20), "cmyk.tif": (255, 255, 255),
                "pal.png": (0, 0, 0), "g16.png": (255, 255, 255)}
    for name, px in expected.items():
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (4, 3), name
        assert im.getpixel((1, 1)) == px, name
    with pytest.raises(BenchError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(BenchError, match=r"cannot decode image .*bad\.png"):
        load_image(tmp_path / "bad.png")


def test_check_dataset_summary(tmp_path):
    root = tmp_path / "ds"
    (root / "annotations").mkdir(parents=True)
    (root / "images" / "val").mkdir(parents=True)
    images = [{"id": 1, "file_name": "a.png", "width": 200, "height": 200},
              {"id": 2, "file_name": "b.png", "width": 200, "height": 200},
              {"id": 3, "file_name": "c.png", "width": 200, "height": 200}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},  # small 100
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 50, 50], "iscrowd": 0},  # medium 2500
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 150, 150], "iscrowd": 0},  # large
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [190, 0, 20, 20], "iscrowd": 1}]  # crowd, clipped
    (root / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    Image.new("RGB", (200, 200)).save(root / "images" / "val" / "a.png")
    Image.new("RGB", (100, 200)).save(root / "images" / "val" / "b.png")  # size mismatch; c.png missing
    s = check_dataset(root / "annotations" / "instances_val.json")
    assert s["images"] == 3 and s["images_without_boxes"] == 1
    assert s["boxes_per_class"] == {"a": 1, "b": 2}
    assert s["area"] == {"small": 1, "medium": 1, "large": 1}
    assert s["crowd"] == 1 and s["clipped_boxes"] == 1
    text = "\n".join(s["problems"])
    assert "1 image file(s) missing" in text and "image 3" in text
    assert "image 2: file 100x200 vs annotation 200x200" in text
    out = format_summary(s)
    assert "images: 3 (1 without boxes)" in out and "small 1 (33.3%), medium 1 (33.3%), large 1 (33.3%)" in out
    # the demo's scaled bounds (eval.area_scale 0.2: 6.4^2 and 19.2^2): the 10 px box is medium
    scaled = check_dataset(root / "annotations" / "instances_val.json", area_scale=0.2)
    assert scaled["area"] == {"small": 0, "medium": 1, "large": 2}
    assert "thresholds 6.4^2, 19.2^2, COCO's scaled by 0.2" in format_summary(scaled)
    elsewhere = tmp_path / "elsewhere" / "instances_val.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text((root / "annotations" / "instances_val.json").read_text())
    with pytest.raises(BenchError, match="no image folder found .*pass the image folder explicitly"):
        check_dataset(elsewhere)
    assert check_dataset(elsewhere, image_dir=root / "images" / "val")["images"] == 3
