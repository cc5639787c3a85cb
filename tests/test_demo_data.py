"""The synthetic demo dataset."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from svis_ray.data.demo import make_demo_data
from svis_ray.data.ytvis import YTVIS, check_data, decode_frame
from svis_ray.errors import SvisError


def load(path):
    return json.loads(path.read_text())


def test_layout_and_check_data(demo_root):
    train, val = load(demo_root / "train.json"), load(demo_root / "val.json")
    assert (len(train["videos"]), len(val["videos"])) == (8, 2)
    assert [c["id"] for c in train["categories"]] == [1, 2, 3, 4, 5, 6]
    assert len({c["name"] for c in train["categories"]}) == 6 and val["categories"] == train["categories"]
    for data in (train, val):
        for v in data["videos"]:
            assert (v["height"], v["width"], v["length"]) == (96, 128, 10)
            assert v["file_names"] == [f"{v['file_names'][0].split('/')[0]}/{t:05d}.jpg" for t in range(10)]
            assert all((demo_root / "JPEGImages" / name).is_file() for name in v["file_names"])
        assert all(a["iscrowd"] == 0 for a in data["annotations"])
    assert check_data(demo_root, demo_root / "train.json")["frames"] == 80
    assert check_data(demo_root, demo_root / "val.json")["frames"] == 20
    assert decode_frame(demo_root / "JPEGImages" / train["videos"][0]["file_names"][0]).shape == (96, 128, 3)


def test_val_ids_are_disjoint_from_train(demo_root):
    train, val = load(demo_root / "train.json"), load(demo_root / "val.json")
    for key in ("videos", "annotations"):
        assert not {x["id"] for x in train[key]} & {x["id"] for x in val[key]}
    names = {n.split("/")[0] for d in (train, val) for v in d["videos"] for n in v["file_names"]}
    assert len(names) == 10


def test_masks_areas_and_boxes_agree_and_instances_do_not_overlap(demo_root):
    ds = YTVIS.load(demo_root / "train.json")
    for v in ds.videos:
        for a in ds.annotations(v["id"]):
            for seg, area, box in zip(a["segmentations"], a["areas"], a["bboxes"]):
                assert (seg is None) == (area is None) == (box is None)
                if seg is not None:
                    m = mask_utils.decode(seg)
                    ys, xs = np.nonzero(m)
                    assert area == m.sum() > 0
                    assert box == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        for t in range(v["length"]):
            # Masks are the visible pixels: an occluded part belongs to the instance in front only.
            assert ds.targets(v["id"], t)["masks"].sum(0).max(initial=0) <= 1


def test_instances_enter_and_leave(demo_root):
    data = load(demo_root / "train.json")
    anns = data["annotations"]
    # Some tracks are absent on some frames; every track is visible at least once.
    assert any(None in a["segmentations"] for a in anns)
    assert all(any(s is not None for s in a["segmentations"]) for a in anns)
    per_video = [sum(a["video_id"] == v["id"] for a in anns) for v in data["videos"]]
    assert min(per_video) >= 1 and max(per_video) <= 4 and len(set(per_video)) > 1


def test_object_appearance_drifts_over_a_video(demo_root):
    ds = YTVIS.load(demo_root / "train.json")
    changes = []
    for v in ds.videos:
        paths = ds.frame_paths(v["id"], demo_root)
        for a in ds.annotations(v["id"]):
            seen = [t for t, seg in enumerate(a["segmentations"]) if seg is not None]
            first, last = (decode_frame(paths[t])[mask_utils.decode(a["segmentations"][t]) > 0].mean(0)
                           for t in (seen[0], seen[-1]))
            changes.append(np.abs(first - last).max())
    # Mean colour of the visible pixels, first vs last frame seen: most objects look different.
    assert np.median(changes) > 15


def test_same_seed_gives_identical_files(tmp_path):
    kwargs = dict(videos=2, val_videos=1, frames=4, size=(48, 64))
    make_demo_data(tmp_path / "a", seed=7, **kwargs)
    make_demo_data(tmp_path / "b", seed=7, **kwargs)
    make_demo_data(tmp_path / "c", seed=8, **kwargs)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 3 * 4
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "c" / "train.json").read_bytes()


def test_overwrites_a_demo_dataset_but_nothing_else(tmp_path):
    make_demo_data(tmp_path / "a", videos=1, val_videos=1, frames=3, size=(32, 32))
    first = (tmp_path / "a" / "train.json").read_bytes()
    make_demo_data(tmp_path / "a", videos=3, val_videos=1, frames=2, size=(32, 32), seed=1)
    s = make_demo_data(tmp_path / "a", videos=1, val_videos=1, frames=3, size=(32, 32))
    assert s["train_videos"] == 1 and s["size"] == (32, 32)
    assert (tmp_path / "a" / "train.json").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "a" / "JPEGImages").iterdir()) == ["train_00000", "val_00000"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SvisError, match="not empty and holds no svis-ray demo dataset"):
        make_demo_data(tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("kwargs", [{"videos": 0}, {"val_videos": 0}, {"frames": 0}, {"size": (31, 64)}, {"seed": -1}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(SvisError, match=str(tmp_path / "x")):
        make_demo_data(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
