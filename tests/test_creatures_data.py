"""The second demo family (svis_ray/data/creatures.py) and the family switch of demo-data."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from svis_ray.data.creatures import DEFAULT_SIZE, make_creatures_data
from svis_ray.data.families import FAMILIES, generators, make_family_data
from svis_ray.data.ytvis import YTVIS, check_data, decode_frame
from svis_ray.errors import SvisError


@pytest.fixture(scope="module")
def creatures(tmp_path_factory):
    """20 train + 2 val videos of 6-12 frames at the family's 80x144 (about 3 s to make)."""
    root = tmp_path_factory.mktemp("creatures")
    make_creatures_data(root, videos=20, val_videos=2, frames=12, seed=0)
    return root


def test_check_data_passes_and_frames_are_the_familys_size(creatures):
    for split, videos in (("train", 20), ("val", 2)):
        s = check_data(creatures, creatures / f"{split}.json")
        assert s["videos"] == videos and s["categories"] == 5
    data = json.loads((creatures / "train.json").read_text())
    assert DEFAULT_SIZE == (80, 144) and DEFAULT_SIZE != (96, 128) and DEFAULT_SIZE[0] != DEFAULT_SIZE[1]
    assert {(v["height"], v["width"]) for v in data["videos"]} == {DEFAULT_SIZE}
    assert decode_frame(creatures / "JPEGImages" / data["videos"][0]["file_names"][0]).shape == (80, 144, 3)
    assert data["info"]["family"] == "creatures"


def test_video_lengths_vary_within_the_bounds(creatures):
    lengths = [v["length"] for v in json.loads((creatures / "train.json").read_text())["videos"]]
    assert min(lengths) >= 6 and max(lengths) <= 12 and len(set(lengths)) >= 4
    full = json.loads((creatures / "val.json").read_text())
    assert all(len(v["file_names"]) == v["length"] for v in full["videos"])


def test_null_segmentations_and_empty_videos(creatures):
    ds = YTVIS.load(creatures / "train.json")
    per_video = [len(ds.annotations(v["id"])) for v in ds.videos]
    assert 0 in per_video and max(per_video) <= 4  # some videos have no object at all
    anns = [a for v in ds.videos for a in ds.annotations(v["id"])]
    # objects absent on some frames (out of the frame, behind the frond or dived), each seen once at least
    assert sum(any(s is None for s in a["segmentations"]) for a in anns) >= len(anns) // 4
    assert all(any(s is not None for s in a["segmentations"]) for a in anns)
    # an absence in the middle of a track: it leaves and comes back
    def gap_inside(segs):
        seen = [t for t, s in enumerate(segs) if s is not None]
        return seen[-1] - seen[0] + 1 > len(seen)
    assert any(gap_inside(a["segmentations"]) for a in anns)
    for v in ds.videos:
        for t in range(v["length"]):
            assert ds.targets(v["id"], t)["masks"].sum(0).max(initial=0) <= 1  # visible pixels only


def test_masks_areas_and_boxes_agree(creatures):
    data = json.loads((creatures / "val.json").read_text())
    for a in data["annotations"]:
        for seg, area, box in zip(a["segmentations"], a["areas"], a["bboxes"]):
            assert (seg is None) == (area is None) == (box is None)
            if seg is not None:
                assert area == mask_utils.decode(seg).sum() >= 4
                assert box == [float(x) for x in mask_utils.toBbox(seg)]


def test_objects_deform_and_change_colour(creatures):
    """Mask shape (IoU of the first and last mask, each centred on its box) and mean colour change."""
    ds = YTVIS.load(creatures / "train.json")
    ious, colours = [], []
    for v in ds.videos:
        paths = ds.frame_paths(v["id"], creatures)
        for a in ds.annotations(v["id"]):
            seen = [t for t, s in enumerate(a["segmentations"]) if s is not None]
            if len(seen) < 2:
                continue
            masks = [mask_utils.decode(a["segmentations"][t]) > 0 for t in (seen[0], seen[-1])]
            crops = []
            for m in masks:
                ys, xs = np.nonzero(m)
                c = np.zeros((80, 80), bool)
                ys, xs = ys - ys.min(), xs - xs.min()
                keep = (ys < 80) & (xs < 80)
                c[ys[keep], xs[keep]] = True
                crops.append(c)
            ious.append((crops[0] & crops[1]).sum() / (crops[0] | crops[1]).sum())
            colours.append(np.abs(decode_frame(paths[seen[0]])[masks[0]].mean(0)
                                  - decode_frame(paths[seen[-1]])[masks[1]].mean(0)).max())
    assert np.median(ious) < 0.7 and np.median(colours) > 15


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    kwargs = dict(videos=2, val_videos=1, frames=7, size=(40, 72))
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_creatures_data(tmp_path / name, seed=seed, **kwargs)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "c" / "train.json").read_bytes()


def test_families_replace_each_others_folders_but_nothing_else(tmp_path):
    assert set(generators()) == set(FAMILIES)
    make_family_data("shapes", tmp_path / "a", videos=1, val_videos=1, frames=2, size=(32, 32))
    s = make_family_data("creatures", tmp_path / "a", videos=1, val_videos=1, frames=6, size=(32, 48))
    assert s["size"] == (32, 48) and json.loads((tmp_path / "a" / "train.json").read_text())["info"]["family"] == "creatures"
    make_family_data("shapes", tmp_path / "a", videos=1, val_videos=1, frames=2, size=(32, 32))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(SvisError, match="holds no svis-ray demo dataset"):
        make_family_data("creatures", tmp_path / "mine")
    with pytest.raises(SvisError, match="unknown demo family 'textures'"):
        make_family_data("textures", tmp_path / "x")
    with pytest.raises(SvisError, match="at least 32x32"):
        make_creatures_data(tmp_path / "y", size=(24, 64))


def test_demo_data_command_writes_the_family(tmp_path, capsys):
    from svis_ray.cli import main

    assert main(["demo-data", "--out", str(tmp_path / "d"), "--videos", "2", "--val-videos", "1",
                 "--frames", "8", "--family", "creatures"]) == 0
    out = capsys.readouterr().out
    assert "creatures family" in out and "of 80x144" in out
    assert check_data(tmp_path / "d", tmp_path / "d" / "train.json")["videos"] == 2
