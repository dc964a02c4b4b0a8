"""Bad data (issue 19, items 8, 10, 11): a malformed or degenerate COCO file is one line naming the
file and exit 2, whatever its content; `bench data check` exits 2 when it lists problems."""

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.data.coco import load_coco
from core.errors import BenchError
from tests.conftest import TINY
from tests.test_errors import cli, one_line

CATS = [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]
IMAGES = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
          {"id": 2, "file_name": "b.png", "width": 64, "height": 48}]
ANNS = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400.0, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [10, 5, 30, 30], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [40, 20, 10, 10], "area": 100, "iscrowd": 1}]


def coco_root(root, split="val2017", doc=None, images=True):
    """A COCO root: annotations/instances_<split>.json and <split>/ with the images."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    if images:
        for im in IMAGES:
            Image.new("RGB", (im["width"], im["height"]), (90, 90, 90)).save(root / split / im["file_name"])
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc if doc is not None else {"images": IMAGES, "annotations": ANNS,
                                                            "categories": CATS}))
    return path


# -- item 8: malformed annotation types --------------------------------------------------------------
def _with(section, index, key, value):
    doc = {"images": copy.deepcopy(IMAGES), "annotations": copy.deepcopy(ANNS), "categories": copy.deepcopy(CATS)}
    doc[section][index][key] = value
    return doc


@pytest.mark.parametrize("doc, message", [
    (_with("annotations", 0, "id", [1]), "annotation id [1] is not an integer id"),
    (_with("annotations", 0, "id", None), "annotation id None is not an integer id"),
    (_with("annotations", 0, "image_id", "1"), "annotation 1's image_id '1' is not an integer id"),
    (_with("annotations", 0, "image_id", [1]), "annotation 1's image_id [1] is not an integer id"),
    (_with("annotations", 0, "category_id", [1]), "annotation 1 (image 1) has category_id [1], not an integer id"),
    (_with("annotations", 0, "category_id", None), "has category_id None, not an integer id"),
    (_with("images", 0, "id", [1]), "image id [1] is not an integer id"),
    (_with("images", 0, "id", "1"), "image id '1' is not an integer id"),
    (_with("images", 0, "file_name", 5), "image 1 has file_name 5, not a file name"),
    (_with("images", 0, "file_name", ["a.png"]), "image 1 has file_name ['a.png'], not a file name"),
    (_with("images", 0, "width", 1e300), "image 1 has size 1e+300x48"),
    (_with("images", 0, "width", 10.5), "image 1 has size 10.5x48"),
    (_with("categories", 0, "id", [1]), "category 'a' has non-integer id [1]"),
    (_with("categories", 0, "name", None), "category 1 has name None, not a non-empty string"),
    (_with("annotations", 0, "iscrowd", "no"), "annotation 1 (image 1) has iscrowd 'no'; it must be 0 or 1"),
    (_with("annotations", 0, "area", -5), "annotation 1 (image 1) has negative area -5"),
    ({"images": IMAGES, "annotations": ANNS, "categories": []}, "'categories' is empty"),
    # JSON integers have no bound; ids live in 64-bit arrays (found by the property test below)
    (_with("annotations", 0, "id", 2 ** 63), "annotation id 9223372036854775808 does not fit in 64 bits"),
    (_with("annotations", 0, "image_id", -2 ** 63 - 1),
     "annotation 1's image_id -9223372036854775809 does not fit in 64 bits"),
    (_with("images", 0, "id", 2 ** 64), "image id 18446744073709551616 does not fit in 64 bits"),
    (_with("categories", 0, "id", 2 ** 63), "category 'a': id 9223372036854775808 does not fit in 64 bits"),
])
def test_malformed_types_are_one_line_naming_the_file(tmp_path, monkeypatch, capsys, doc, message):
    path = coco_root(tmp_path / "coco", doc=doc)
    code, _, err = cli(monkeypatch, capsys, "data", "check", path, home=tmp_path)
    assert code == 2 and one_line(err) and str(path) in err and message in err, err
    with pytest.raises(BenchError, match=str(path)):
        load_coco(path, tmp_path / "coco" / "val2017")


def test_file_names_with_a_newline_stay_on_one_line(tmp_path, monkeypatch, capsys):
    """Found by the property test below: a duplicate image id printed both file names raw."""
    images = copy.deepcopy(IMAGES)
    images[1].update(id=1, file_name="b\n.png")
    path = coco_root(tmp_path / "coco", doc={"images": images, "annotations": ANNS, "categories": CATS})
    code, _, err = cli(monkeypatch, capsys, "data", "check", path, home=tmp_path)
    assert code == 2 and one_line(err) and "duplicate image id 1 (a.png and b\\n.png)" in err, err


def test_ids_at_the_ends_of_the_64_bit_range_are_read(tmp_path):
    doc = _with("annotations", 0, "id", 2 ** 63 - 1)
    doc["annotations"][1]["id"] = -2 ** 63
    path = coco_root(tmp_path / "coco", doc=doc)
    ds = load_coco(path, tmp_path / "coco" / "val2017")
    assert ds.records[0].ann_ids.tolist() == [2 ** 63 - 1]
    assert sorted(ds.records[1].ann_ids.tolist()) == [-2 ** 63, 3]


def test_iscrowd_true_and_1_are_crowd_0_and_false_are_not(tmp_path):
    anns = copy.deepcopy(ANNS)
    anns[0]["iscrowd"], anns[1]["iscrowd"], anns[2]["iscrowd"] = True, False, 1
    path = coco_root(tmp_path, doc={"images": IMAGES, "annotations": anns, "categories": CATS})
    ds = load_coco(path, tmp_path / "val2017")
    assert [r.iscrowd.tolist() for r in ds.records] == [[True], [False, True]]


# A value of any JSON type, the edge numbers included
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 1e308, -1e308, 2 ** 63, 0.5]),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
KEYS = {"images": ["id", "file_name", "width", "height"], "categories": ["id", "name"],
        "annotations": ["id", "image_id", "category_id", "bbox", "area", "iscrowd"]}


@st.composite
def mutated_docs(draw):
    """The valid document with 1 to 3 mutations: a value of another type or range, a key or an
    entry deleted, a section replaced, a bbox coordinate changed."""
    doc = {"images": copy.deepcopy(IMAGES), "annotations": copy.deepcopy(ANNS), "categories": copy.deepcopy(CATS)}
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(KEYS)))
        kind = draw(st.sampled_from(["value", "value", "bbox", "delete key", "delete entry", "section"]))
        entries = doc[section]
        if kind == "section" or not isinstance(entries, list) or not entries:
            doc[section] = draw(st.one_of(VALUES, st.just([]), st.just([1, "x"])))
            continue
        i = draw(st.integers(0, len(entries) - 1))
        if not isinstance(entries[i], dict):
            continue
        key = draw(st.sampled_from(KEYS[section]))
        if kind == "delete entry":
            del entries[i]
        elif kind == "delete key":
            entries[i].pop(key, None)
        elif kind == "bbox" and section == "annotations" and isinstance(entries[i].get("bbox"), list):
            bbox = entries[i]["bbox"]
            if bbox:
                bbox[draw(st.integers(0, len(bbox) - 1))] = draw(VALUES)
        else:
            entries[i][key] = draw(VALUES)
    return doc


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=mutated_docs())
def test_mutated_coco_is_exit_2_with_one_line_or_success(tmp_path_factory, monkeypatch, capsys, doc):
    root = tmp_path_factory.mktemp("coco")
    path = root / "annotations" / "instances_val2017.json"
    if not (root / "val2017").exists():
        coco_root(root)
    path.write_text(json.dumps(doc, allow_nan=True))  # NaN and Infinity as Python's json writes them
    code, out, err = cli(monkeypatch, capsys, "data", "check", path, home=root)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 0:
        assert "problems: none" in out
    else:
        assert code == 2 and str(path) in err and one_line(err), (code, err)
    try:
        ds = load_coco(path, root / "val2017")
    except BenchError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:  # what the reader returns is usable: finite boxes inside their images, known labels
        for r in ds.records:
            assert all(math.isfinite(v) for v in r.boxes.flatten().tolist())
            assert ((r.boxes[:, 2] <= r.width) & (r.boxes[:, 3] <= r.height)).all()
            assert ((r.labels >= 0) & (r.labels < ds.num_classes)).all()


# -- item 10: degenerate data ---------------------------------------------------------------------------
def test_no_boxes_is_refused_before_training(tmp_path, monkeypatch, capsys):
    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        coco_root(root, split, doc={"images": IMAGES, "annotations": [], "categories": CATS})
    code, _, err = cli(monkeypatch, capsys, "train", "--preset", "coco", "--data-root", root, "--no-track", *TINY,
                       home=tmp_path / "store")
    assert code == 2 and one_line(err), err
    assert "instances_train2017.json: the training set has 2 images and no annotated box" in err
    assert not (tmp_path / "store" / "runs").exists()  # no AP 0.00 cached as done
    code, out, err = cli(monkeypatch, capsys, "data", "check", root / "annotations" / "instances_val2017.json",
                         home=tmp_path)
    assert code == 2 and "no annotated box" in out and "1 problem(s) listed above" in err and one_line(err), err


def test_data_check_exits_2_when_it_lists_problems(tmp_path, monkeypatch, capsys):
    path = coco_root(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "data", "check", path, home=tmp_path)
    assert code == 0 and "problems: none" in out, err
    (tmp_path / "val2017" / "b.png").unlink()  # missing
    (tmp_path / "val2017" / "a.png").write_bytes(b"not a png")  # undecodable
    code, out, err = cli(monkeypatch, capsys, "data", "check", path, home=tmp_path)
    assert code == 2 and one_line(err) and f"{path}: 2 problem(s) listed above" in err, err
    assert "1 image file(s) missing" in out and "cannot be decoded" in out


# -- item 11: a COCO root ---------------------------------------------------------------------------------
def test_data_check_on_a_coco_root_checks_each_annotation_file(tmp_path, monkeypatch, capsys):
    coco_root(tmp_path, "train2017")
    coco_root(tmp_path, "val2017")
    code, out, err = cli(monkeypatch, capsys, "data", "check", tmp_path, home=tmp_path)
    assert code == 0, err
    assert out.count("problems: none") == 2 and "instances_train2017" in out and "instances_val2017" in out
    (tmp_path / "val2017" / "a.png").unlink()
    code, out, err = cli(monkeypatch, capsys, "data", "check", tmp_path, home=tmp_path)
    assert code == 2 and one_line(err) and "instances_val2017.json: 1 problem(s)" in err, err
    code, _, err = cli(monkeypatch, capsys, "data", "check", tmp_path / "train2017", home=tmp_path)
    assert code == 2 and "nor a COCO root" in err and one_line(err), err


@pytest.mark.parametrize("args, message", [
    (["--dataset", "synthetic", "--ratio", "0"], "invalid value for 'ratio': Input should be greater than 0 (got 0.0)"),
    (["--dataset", "synthetic", "--ratio", "10", "--fold", "0"], "invalid value for 'fold'"),
    (["--dataset", "nosuch", "--ratio", "10"], "invalid value for 'dataset': Input should be 'synthetic'"),
])
def test_data_split_refuses_bad_options_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    code, _, err = cli(monkeypatch, capsys, "data", "split", *args, home=tmp_path)
    assert code == 2 and one_line(err) and f"bench data split: {message}" in err, err


def test_data_synth_writes_a_readable_set_and_never_overwrites_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "synth"
    code, stdout, err = cli(monkeypatch, capsys, "data", "synth", "--out", out, "--images", "3", "--image-size", "64",
                            home=tmp_path)
    ann = out / "annotations" / "instances_train.json"
    assert code == 0 and str(ann) in stdout, err
    assert len(load_coco(ann, out / "images" / "train").records) == 3
    before = ann.read_bytes()
    code, _, err = cli(monkeypatch, capsys, "data", "synth", "--out", out, "--images", "5", home=tmp_path)
    assert code == 2 and one_line(err) and f"{ann} exists; choose another --out or --split" in err, err
    assert ann.read_bytes() == before
    (tmp_path / "file").write_text("x")
    for args, message in [(["--out", tmp_path / "file"], "is a file; give a directory"),
                          (["--out", tmp_path / "s2", "--split", "../x"], "--split '../x': use letters"),
                          (["--out", tmp_path / "s3", "--images", "0"], "Invalid value for '--images'"),
                          (["--out", tmp_path / "s4", "--seed", "-1"], "Invalid value for '--seed'")]:
        code, _, err = cli(monkeypatch, capsys, "data", "synth", *args, home=tmp_path)
        assert code == 2 and message in err and "internal error" not in err, (args, err)
    assert not (tmp_path / "x").exists()
