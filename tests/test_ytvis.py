"""YTVIS loading, validation, targets, frame decoding and check_data."""
import copy
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from svis_ray.data.demo import make_demo_data
from svis_ray.data.ytvis import YTVIS, check_data, decode_frame
from svis_ray.errors import SvisError

H, W = 8, 10


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": r["counts"].decode("ascii")}


def box_mask(x0, y0, x1, y1, h=H, w=W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def uncompressed(mask: np.ndarray) -> dict:
    """Uncompressed RLE: run lengths of the column-major pixel sequence, starting with zeros."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def dataset() -> dict:
    """Two 3-frame videos, categories with non-contiguous ids (7 listed before 3)."""
    return {
        "videos": [{"id": 10, "width": W, "height": H, "length": 3, "file_names": ["a/0.jpg", "a/1.jpg", "a/2.jpg"]},
                   {"id": 20, "width": W, "height": H, "length": 3, "file_names": ["b/0.jpg", "b/1.jpg", "b/2.jpg"]}],
        "annotations": [
            {"id": 1, "video_id": 10, "category_id": 7, "iscrowd": 0,
             "segmentations": [rle(box_mask(1, 2, 4, 5)), None, rle(box_mask(0, 0, 2, 2))],
             "areas": [9, None, 4], "bboxes": [[1, 2, 3, 3], None, [0, 0, 2, 2]]},
            {"id": 2, "video_id": 10, "category_id": 3, "iscrowd": 0,
             "segmentations": [None, None, rle(box_mask(5, 5, 10, 8))]},
            {"id": 3, "video_id": 20, "category_id": 3, "iscrowd": 1,
             "segmentations": [rle(box_mask(0, 0, 10, 8)), None, None]},
        ],
        "categories": [{"id": 7, "name": "owl"}, {"id": 3, "name": "cat"}],
    }


def write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_load_maps_categories_and_groups_annotations(tmp_path):
    ds = YTVIS.load(write(tmp_path, dataset()))
    assert ds.cat_to_idx == {3: 0, 7: 1}
    assert ds.idx_to_cat == {0: 3, 1: 7}
    assert ds.class_names == ["cat", "owl"]
    assert [v["id"] for v in ds.videos] == [10, 20]
    assert [a["id"] for a in ds.annotations(10)] == [1, 2]
    assert ds.labelled_frames(20) == [0, 1, 2]
    assert ds.frame_paths(20, tmp_path) == [tmp_path / "JPEGImages" / f"b/{t}.jpg" for t in range(3)]
    assert ds.to_dict() == dataset()


def test_targets_decode_present_instances(tmp_path):
    ds = YTVIS.load(write(tmp_path, dataset()))
    tg = ds.targets(10, 2)
    assert tg["masks"].dtype == np.uint8 and tg["masks"].shape == (2, H, W)
    np.testing.assert_array_equal(tg["masks"][0], box_mask(0, 0, 2, 2))
    np.testing.assert_array_equal(tg["masks"][1], box_mask(5, 5, 10, 8))
    np.testing.assert_array_equal(tg["boxes"], np.array([[0, 0, 2, 2], [5, 5, 10, 8]], np.float32))
    assert tg["boxes"].dtype == np.float32
    assert tg["labels"].tolist() == [1, 0] and tg["labels"].dtype == np.int64
    assert tg["ids"].tolist() == [1, 2] and tg["iscrowd"].tolist() == [0, 0]
    # annotation 1 is null on frame 1, annotation 2 too: no instance
    empty = ds.targets(10, 1)
    assert empty["masks"].shape == (0, H, W) and empty["boxes"].shape == (0, 4) and empty["labels"].size == 0
    assert ds.targets(20, 0)["iscrowd"].tolist() == [1]


def test_polygon_uncompressed_and_compressed_rle_decode_identically(tmp_path):
    h, w = 37, 53
    polygon = [[5.0, 4.0, 40.0, 9.0, 30.0, 33.0, 8.0, 25.0], [45.0, 2.0, 51.0, 2.0, 48.0, 12.0]]
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, h, w)))
    assert 100 < mask.sum() < h * w
    data = {"videos": [{"id": 1, "width": w, "height": h, "length": 3, "file_names": ["v/0", "v/1", "v/2"]}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 1, "video_id": 1, "category_id": 1,
                             "segmentations": [polygon, uncompressed(mask), rle(mask)]}]}
    ds = YTVIS.load(write(tmp_path, data))
    decoded = [ds.targets(1, t) for t in range(3)]
    for tg in decoded:
        np.testing.assert_array_equal(tg["masks"][0], mask)
        np.testing.assert_array_equal(tg["boxes"], decoded[2]["boxes"])
    assert [a["rle"] for a in ds.annotations_on_frame(1, 0)] == [rle(mask)]


def test_valid_file_without_annotations_loads(tmp_path):
    data = dataset()
    del data["annotations"]
    ds = YTVIS.load(write(tmp_path, data))
    assert not ds.has_annotations and ds.annotations(10) == [] and ds.targets(10, 0)["masks"].shape == (0, H, W)


def test_compressed_rle_check_accepts_pycocotools_output_and_rejects_damage(tmp_path):
    # Large masks exercise multi-char runs and negative run differences.
    rng = np.random.default_rng(0)
    h, w = 720, 1280
    masks = []
    for _ in range(4):
        m = np.zeros((h, w), np.uint8)
        cv2.ellipse(m, (int(rng.integers(0, w)), int(rng.integers(0, h))), (int(rng.integers(5, 400)),
                    int(rng.integers(5, 300))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        masks.append(m)
    masks += [np.zeros((h, w), np.uint8), np.ones((h, w), np.uint8)]
    data = {"videos": [{"id": 1, "width": w, "height": h, "length": len(masks),
                        "file_names": [f"v/{t}" for t in range(len(masks))]}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 5, "video_id": 1, "category_id": 1, "segmentations": [rle(m) for m in masks]}]}
    YTVIS(data, source="big.json")
    good = data["annotations"][0]["segmentations"][0]["counts"]
    for damaged in (good[:-2], good + "1", good[:len(good) // 2], "", good[:-1] + "~"):
        bad = copy.deepcopy(data)
        bad["annotations"][0]["segmentations"][0]["counts"] = damaged
        with pytest.raises(SvisError, match=r"^big\.json: video 1: annotation 5: frame 0: "):
            YTVIS(bad, source="big.json")


def _set(path, value):
    """Mutation setting data[path...] = value."""
    def mutate(d):
        *keys, last = path
        for k in keys:
            d = d[k]
        d[last] = value
    return mutate


BAD_INPUTS = [
    ("missing videos", lambda d: d.pop("videos"), "missing top-level key 'videos'"),
    ("annotations not a list", _set(["annotations"], {}), "'annotations' must be a list"),
    ("duplicate video id", _set(["videos", 1, "id"], 10), "duplicate video id 10"),
    ("duplicate annotation id", _set(["annotations", 2, "id"], 1), "duplicate annotation id 1"),
    ("duplicate category id", _set(["categories", 1, "id"], 7), "duplicate category id 7"),
    ("unknown video", _set(["annotations", 1, "video_id"], 99), "annotation 2: unknown video_id 99"),
    ("unknown category", _set(["annotations", 1, "category_id"], 5),
     "video 10: annotation 2: unknown category_id 5"),
    ("segmentations count", lambda d: d["annotations"][0]["segmentations"].pop(),
     "video 10: annotation 1: segmentations has 2 entries, expected 3 (the video length)"),
    ("areas count", lambda d: d["annotations"][0]["areas"].append(None), "areas has 4 entries, expected 3"),
    ("bboxes count", lambda d: d["annotations"][0]["bboxes"].pop(), "bboxes has 2 entries, expected 3"),
    ("file_names count", lambda d: d["videos"][1]["file_names"].pop(),
     "video 20: file_names has 2 entries, expected 3"),
    ("rle size", _set(["annotations", 0, "segmentations", 2], rle(np.zeros((H, W + 1)))),
     "video 10: annotation 1: frame 2: RLE size [8, 11] differs from the video size [8, 10]"),
    ("rle garbage", _set(["annotations", 0, "segmentations", 0, "counts"], "not an rle!"),
     "frame 0: malformed compressed RLE"),
    ("uncompressed rle total", _set(["annotations", 2, "segmentations", 0], {"size": [H, W], "counts": [3, 5]}),
     "video 20: annotation 3: frame 0: RLE counts cover 8 pixels, expected 80"),
    ("odd polygon", _set(["annotations", 1, "segmentations", 0], [[1.0, 2.0, 3.0, 4.0, 5.0]]), "polygon must be"),
    ("bad bbox", _set(["annotations", 0, "bboxes", 0], [1, 2, 3]), "frame 0: bbox must be [x, y, w, h]"),
    ("iscrowd", _set(["annotations", 0, "iscrowd"], 2), "'iscrowd' must be 0 or 1"),
    ("zero length", _set(["videos", 0, "length"], 0), "video 10: 'length' must be a positive integer"),
    ("labelled frames", _set(["videos", 0, "labelled_frames"], [1, 3]), "video 10: 'labelled_frames' must be"),
]


@pytest.mark.parametrize("mutate,expected", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_file_and_problem(tmp_path, mutate, expected):
    data = dataset()
    mutate(data)
    path = write(tmp_path, data, "bad.json")
    with pytest.raises(SvisError) as err:
        YTVIS.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg


@pytest.mark.parametrize("text", ['{"videos": [', "[]", "\xff"])
def test_malformed_json_is_one_line_error(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(SvisError, match=r"^" + str(path) + r": [^\n]+$"):
        YTVIS.load(path)


def test_decode_frame_returns_rgb_and_rejects_bad_data(tmp_path):
    bgr = np.zeros((6, 7, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), bgr)
    rgb = decode_frame(path)
    assert rgb.shape == (6, 7, 3) and rgb.dtype == np.uint8 and rgb[..., 0].min() == 255 and rgb[..., 2].max() == 0
    np.testing.assert_array_equal(decode_frame(path.read_bytes(), source="s3://b/red.png"), rgb)
    with pytest.raises(SvisError, match=r"^s3://b/x\.jpg: not a decodable image$"):
        decode_frame(b"\xff\xd8 not really a jpeg", source="s3://b/x.jpg")
    with pytest.raises(SvisError, match=r"^<bytes>: not a decodable image$"):
        decode_frame(b"")
    with pytest.raises(SvisError, match=r"missing\.jpg: frame file missing$"):
        decode_frame(tmp_path / "missing.jpg")


@pytest.fixture
def small_data(tmp_path):
    make_demo_data(tmp_path / "d", videos=2, val_videos=1, frames=3, seed=1)
    return tmp_path / "d"


def test_check_data_passes_on_good_data(small_data):
    s = check_data(small_data, small_data / "train.json", workers=2)
    ds = YTVIS.load(small_data / "train.json")
    assert s == {"videos": 2, "frames": 6, "annotations": len(ds.to_dict()["annotations"]), "categories": 6}


def _first_frame(root):
    return root / "JPEGImages" / YTVIS.load(root / "train.json").videos[1]["file_names"][1]


@pytest.mark.parametrize("damage,expected", [
    (lambda p: p.unlink(), "frame file missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a decodable image"),
    (lambda p: cv2.imwrite(str(p), np.zeros((96, 127, 3), np.uint8)),
     "frame is 96x127, the video's size is 96x128"),
])
def test_check_data_reports_bad_frame(small_data, damage, expected):
    frame = _first_frame(small_data)
    damage(frame)
    with pytest.raises(SvisError) as err:
        check_data(small_data, small_data / "train.json", workers=2)
    assert str(err.value) == f"{frame}: {expected}"


def test_cli_check_data_corrupt_jpeg_is_one_line_error(small_data):
    frame = _first_frame(small_data)
    frame.write_bytes(frame.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "svis_ray", "check-data", str(small_data),
                        str(small_data / "train.json")], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svis-ray: error:") and str(frame) in lines[0]
    assert "Traceback" not in r.stderr


def _one_string_total(counts: str) -> int | None:
    """The reference: one string at a time (as the loader checked them before it batched them)."""
    if not counts or not counts.isascii():
        return None
    c = np.frombuffer(counts.encode("ascii"), np.uint8).astype(np.int64) - 48
    if c.min() < 0 or c.max() > 63 or c[-1] & 0x20:
        return None
    last = (c & 0x20) == 0
    run = np.concatenate([[0], np.cumsum(last)[:-1]])
    start = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = 5 * (np.arange(c.size) - start[run])
    if shift.max() > 55:
        return None
    x = np.add.reduceat((c & 0x1F) << shift, start)
    end = np.flatnonzero(last)
    negative = (c[end] & 0x10) != 0
    x[negative] -= np.int64(1) << (shift[end][negative] + 5)
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    return None if runs.min() < 0 else int(runs.sum())


def test_rle_strings_checked_together_match_one_at_a_time():
    from svis_ray.data.ytvis import _rle_string_totals

    rng = np.random.default_rng(0)
    strings = []
    for i in range(120):
        h, w = [(720, 1280), (8, 10), (1, 1), (50, 3)][i % 4]
        m = np.zeros((h, w), np.uint8)
        if i % 5:
            cv2.ellipse(m, (int(rng.integers(0, w)), int(rng.integers(0, h))), (int(rng.integers(1, 400)),
                        int(rng.integers(1, 300))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        s = rle(m)["counts"]
        damaged = [s[:-2], s + "1", s[:len(s) // 2], "", s[:-1] + "~", "".join(rng.permutation(list(s)))]
        strings += [s, damaged[i % len(damaged)]]
    strings += ["\u00e9x", "o" * 15 + "0", "O" * 12 + "1", "0", "P", "?" * 20 + "1"]  # a 75-bit run, etc.
    expected = [_one_string_total(s) for s in strings]
    assert 0 < sum(e is None for e in expected) < len(strings)
    assert _rle_string_totals(strings) == expected
    for _ in range(20):  # any mix: a bad string never spoils its neighbours
        pick = rng.permutation(len(strings))[:int(rng.integers(1, 30))]
        assert _rle_string_totals([strings[i] for i in pick]) == [expected[i] for i in pick]
