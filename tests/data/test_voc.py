from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data.check import check_dataset
from core.data.coco import to_coco_dict
from core.data.voc import VOC_CLASSES, load_voc
from core.errors import BenchError


def _obj(name, box, difficult=0):
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def _xml(w, h, objects):
    return (f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            + "".join(objects) + "</annotation>")


def make_voc(root: Path, entries: dict[str, tuple[int, int, list[str]]], image_set="trainval") -> Path:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for stem, (w, h, objs) in entries.items():
        (root / "Annotations" / f"{stem}.xml").write_text(_xml(w, h, objs))
        Image.new("RGB", (w, h), (50, 60, 70)).save(root / "JPEGImages" / f"{stem}.jpg")
    (root / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(entries) + "\n")
    return root


@pytest.fixture
def voc_root(tmp_path):
    return make_voc(tmp_path / "VOC2007", {
        "2008_000002": (60, 50, [_obj("car", (5, 6, 20, 30))]),
        "000005": (100, 80, [_obj("dog", (1, 1, 50, 40)), _obj("person", (10, 20, 30, 60), difficult=1)]),
    })


def test_load_voc_conversion(voc_root):
    ds = load_voc(voc_root)
    assert [r.id for r in ds.records] == [5, 2008000002]
    assert ds.stats["stems"] == {5: "000005", 2008000002: "2008_000002"}
    assert ds.categories[0] == {"id": 1, "name": "aeroplane"} and ds.categories[-1] == {"id": 20, "name": "tvmonitor"}
    r5, r2 = ds.records
    # 1-based inclusive -> x1-1, y1-1, keep x2, y2 (detectron2)
    np.testing.assert_array_equal(r5.boxes, [[0, 0, 50, 40], [9, 19, 30, 60]])
    assert r5.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert r5.iscrowd.tolist() == [False, True]  # difficult -> ignore region
    np.testing.assert_array_equal(r2.boxes, [[4, 5, 20, 30]])
    assert (r5.width, r5.height) == (100, 80) and r5.file.name == "000005.jpg"
    assert ds.stats["difficult"] == 1 and ds.stats["id_scheme"] == "stem"
    coco = to_coco_dict(ds)
    assert [a["category_id"] for a in coco["annotations"]] == [12, 15, 7]  # dog, person, car (1-based)
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 1, 0]
    assert len({a["id"] for a in coco["annotations"]}) == 3


def test_non_numeric_stems_use_index_ids(tmp_path):
    root = make_voc(tmp_path / "custom", {"b_img": (10, 10, []), "a_img": (10, 10, [])})
    ds = load_voc(root)
    assert [r.id for r in ds.records] == [1, 2] and ds.stats["stems"] == {1: "b_img", 2: "a_img"}
    assert ds.stats["id_scheme"] == "index"


def test_voc_errors(tmp_path, voc_root):
    with pytest.raises(BenchError, match=r"ImageSets/Main/test\.txt does not exist"):
        load_voc(voc_root, image_set="test")
    (voc_root / "Annotations" / "000005.xml").write_text("<annotation><size>")
    with pytest.raises(BenchError, match=r"000005\.xml: malformed XML for image 000005"):
        load_voc(voc_root)
    bad = make_voc(tmp_path / "b1", {"000001": (50, 50, [_obj("unicorn", (1, 1, 5, 5))])})
    with pytest.raises(BenchError, match=r"object 0 \(unicorn\) of image 000001 has unknown class name 'unicorn'"):
        load_voc(bad)
    bad = make_voc(tmp_path / "b2", {"000001": (50, 50, [_obj("cat", (1, 1, 5, 5)), _obj("cat", (10, 10, 4, 20))])})
    with pytest.raises(BenchError, match=r"000001\.xml: object 1 \(cat\) of image 000001 has empty or inverted box"):
        load_voc(bad)
    bad = make_voc(tmp_path / "b3", {"000001": (50, 50, [])})
    (bad / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(BenchError, match=r"image 000001 listed in .* does not exist"):
        load_voc(bad)


def test_check_voc_root(voc_root):
    s = check_dataset(voc_root)
    assert s["format"] == "voc" and s["images"] == 2 and s["crowd"] == 1
    assert s["boxes_per_class"]["dog"] == 1 and s["boxes_per_class"]["car"] == 1
    assert any("class(es) without any box" in p for p in s["problems"])


@pytest.mark.parametrize("box, message", [
    (("nan", 1, 5, 5), "has non-finite <xmin> 'nan'"),
    ((1, 1, "inf", 5), "has non-finite <xmax> 'inf'"),
    ((1, 1, 5, "1e400"), "has non-finite <ymax> '1e400'"),
])
def test_non_finite_coordinates_are_refused(tmp_path, box, message):
    """float() reads them, and a NaN box would reach the loss; inf was clipped to the image's side."""
    root = make_voc(tmp_path / "v", {"000001": (50, 50, [_obj("cat", box)])})
    with pytest.raises(BenchError, match=rf"000001\.xml: object 0 \(cat\) of image 000001 {message}"):
        load_voc(root)


def test_a_non_finite_size_and_a_difficult_flag_other_than_0_or_1_are_refused(tmp_path):
    root = make_voc(tmp_path / "v", {"000001": (50, 50, [_obj("cat", (1, 1, 5, 5), difficult="yes")])})
    with pytest.raises(BenchError, match=r"object 0 \(cat\) of image 000001 has <difficult> 'yes'; it must be 0 or 1"):
        load_voc(root)
    (root / "Annotations" / "000001.xml").write_text(_xml("nan", 50, []))
    with pytest.raises(BenchError, match=r"<size> has non-finite <width> 'nan'"):
        load_voc(root)


def test_numeric_stems_beyond_64_bits_use_index_ids(tmp_path):
    root = make_voc(tmp_path / "v", {"9" * 19: (10, 10, []), "000005": (10, 10, [])})
    ds = load_voc(root)
    assert [r.id for r in ds.records] == [1, 2] and ds.stats["id_scheme"] == "index"
