"""Sparse-label subsets and held-out splits."""
import json
import subprocess
import sys

import numpy as np
import pytest

from svis_ray.data.sparsify import select_frames, sparsify, split
from svis_ray.data.ytvis import YTVIS
from svis_ray.errors import SvisError

PER_FRAME = ("segmentations", "areas", "bboxes")


def load(path):
    return json.loads(path.read_text())


def present_frames(anns):
    return {t for a in anns for t, seg in enumerate(a["segmentations"]) if seg is not None}


def test_middle_keeps_frame_L_over_2_and_nulls_the_rest(demo_root, tmp_path):
    src, out = demo_root / "train.json", tmp_path / "sparse.json"
    s = sparsify(src, out, frames_per_video=1, strategy="middle")
    full, sparse = load(src), load(out)
    ds = YTVIS.load(out)  # the output is valid YTVIS
    assert sparse["sparse"] == {"strategy": "middle", "frames_per_video": 1, "seed": 0, "source": str(src)}
    for v_full, v in zip(full["videos"], sparse["videos"]):
        assert v["file_names"] == v_full["file_names"] and v["length"] == v_full["length"]
        assert v["labelled_frames"] == [v["length"] // 2] == ds.labelled_frames(v["id"])
    masks = kept = 0
    for a_full, a in zip(full["annotations"], sparse["annotations"]):
        mid = sparse["videos"][a["video_id"] - 1]["length"] // 2
        for key in PER_FRAME:
            assert a[key][mid] == a_full[key][mid]
            assert all(x is None for t, x in enumerate(a[key]) if t != mid)
        masks += sum(seg is not None for seg in a_full["segmentations"])
        kept += a["segmentations"][mid] is not None
    assert s["videos"] == len(full["videos"]) and s["labelled_frames"] == len(full["videos"])
    assert s["frames"] == sum(v["length"] for v in full["videos"])
    assert s["instances"] == len(full["annotations"]) and s["instances_kept"] == kept
    assert (s["masks"], s["masks_kept"]) == (masks, kept) and s["mask_fraction"] == pytest.approx(kept / masks)
    assert s["videos_without_labels"] == 0


def test_random_instance_picks_only_frames_with_an_instance(demo_root, tmp_path):
    data = load(demo_root / "train.json")
    # An extra video with no instance at all keeps no labelled frame.
    data["videos"].append({**data["videos"][0], "id": 999})
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    s = sparsify(src, tmp_path / "out.json", frames_per_video=3, strategy="random-instance", seed=5)
    out = load(tmp_path / "out.json")
    for v in out["videos"]:
        candidates = present_frames(a for a in data["annotations"] if a["video_id"] == v["id"])
        lf = v["labelled_frames"]
        assert lf == sorted(set(lf)) and set(lf) <= candidates and len(lf) == min(3, len(candidates))
    assert out["videos"][-1]["labelled_frames"] == [] and s["videos_without_labels"] == 1
    assert s["labelled_frames"] == sum(len(v["labelled_frames"]) for v in out["videos"])


def test_same_seed_same_output_and_independent_of_video_order(demo_root, tmp_path):
    src = demo_root / "train.json"
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        sparsify(src, tmp_path / f"{name}.json", frames_per_video=2, strategy="random-instance", seed=seed)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    picks = {v["id"]: v["labelled_frames"] for v in load(tmp_path / "a.json")["videos"]}
    assert picks != {v["id"]: v["labelled_frames"] for v in load(tmp_path / "c.json")["videos"]}
    data = load(src)
    data["videos"].reverse()
    (tmp_path / "reversed.json").write_text(json.dumps(data))
    sparsify(tmp_path / "reversed.json", tmp_path / "r.json", frames_per_video=2, strategy="random-instance",
             seed=1)
    assert {v["id"]: v["labelled_frames"] for v in load(tmp_path / "r.json")["videos"]} == picks


def test_frame_selection_rules():
    rng = np.random.default_rng(0)
    assert select_frames(12, 3, "uniform", [], rng) == [2, 6, 10]
    assert select_frames(10, 4, "uniform", [], rng) == [1, 3, 6, 8]
    assert select_frames(7, 1, "uniform", [], rng) == [3] == select_frames(7, 1, "middle", [], rng)
    assert select_frames(10, 3, "middle", [], rng) == [4, 5, 6]
    assert select_frames(4, 3, "middle", [], rng) == [1, 2, 3]
    assert select_frames(3, 5, "middle", [], rng) == [0, 1, 2] == select_frames(3, 5, "uniform", [], rng)
    assert select_frames(9, 2, "random-instance", [4], rng) == [4]


def test_uniform_spacing_on_demo_data(demo_root, tmp_path):
    sparsify(demo_root / "train.json", tmp_path / "u.json", frames_per_video=3, strategy="uniform")
    for v in load(tmp_path / "u.json")["videos"]:
        assert v["labelled_frames"] == [int((i + 0.5) * v["length"] / 3) for i in range(3)]


@pytest.mark.parametrize("kwargs,expected", [
    ({"frames_per_video": 0}, "frames_per_video must be at least 1"),
    ({"strategy": "first"}, "unknown sparsify strategy 'first'"),
])
def test_bad_arguments(demo_root, tmp_path, kwargs, expected):
    with pytest.raises(SvisError, match=expected):
        sparsify(demo_root / "train.json", tmp_path / "out.json", **kwargs)
    assert not (tmp_path / "out.json").exists()


def test_sparse_or_unannotated_input_is_rejected(demo_root, tmp_path):
    sparsify(demo_root / "train.json", tmp_path / "once.json")
    with pytest.raises(SvisError, match=r"once\.json: already a sparse subset"):
        sparsify(tmp_path / "once.json", tmp_path / "twice.json")
    data = load(demo_root / "train.json")
    del data["annotations"]
    (tmp_path / "test.json").write_text(json.dumps(data))
    with pytest.raises(SvisError, match=r"test\.json: has no 'annotations'"):
        sparsify(tmp_path / "test.json", tmp_path / "never.json")
    assert not (tmp_path / "twice.json").exists() and not (tmp_path / "never.json").exists()


def test_cli_sparsify_bad_input_is_one_line_error(demo_root, tmp_path):
    data = load(demo_root / "train.json")
    data["annotations"][0]["segmentations"].pop()
    bad, out = tmp_path / "bad.json", tmp_path / "out.json"
    bad.write_text(json.dumps(data))
    r = subprocess.run([sys.executable, "-m", "svis_ray", "sparsify", str(bad), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"svis-ray: error: {bad}: ") and "segmentations" in lines[0]
    assert "Traceback" not in r.stderr and not out.exists()
    assert list(tmp_path.iterdir()) == [bad]  # no temporary file left behind either


def test_split_is_disjoint_complete_and_deterministic(demo_root, tmp_path):
    src = demo_root / "train.json"
    data = load(src)
    s = split(src, val_fraction=0.25, seed=3, train_out=tmp_path / "t.json", val_out=tmp_path / "v.json")
    train, val = load(tmp_path / "t.json"), load(tmp_path / "v.json")
    n = len(data["videos"])
    assert s == {"train_videos": n - 2, "val_videos": 2}
    train_ids, val_ids = ({v["id"] for v in d["videos"]} for d in (train, val))
    assert not train_ids & val_ids and train_ids | val_ids == {v["id"] for v in data["videos"]}
    for part, ids in ((train, train_ids), (val, val_ids)):
        YTVIS.load(tmp_path / ("t.json" if part is train else "v.json"))
        assert part["categories"] == data["categories"]
        assert part["annotations"] == [a for a in data["annotations"] if a["video_id"] in ids]
    split(src, val_fraction=0.25, seed=3, train_out=tmp_path / "t2.json", val_out=tmp_path / "v2.json")
    assert (tmp_path / "v2.json").read_bytes() == (tmp_path / "v.json").read_bytes()
    split(src, val_fraction=0.25, seed=4, train_out=tmp_path / "t3.json", val_out=tmp_path / "v3.json")
    assert {v["id"] for v in load(tmp_path / "v3.json")["videos"]} != val_ids


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.01, 0.99])
def test_split_needs_a_video_on_each_side(demo_root, tmp_path, fraction):
    with pytest.raises(SvisError):
        split(demo_root / "train.json", val_fraction=fraction, seed=0, train_out=tmp_path / "t.json",
              val_out=tmp_path / "v.json")
    assert list(tmp_path.iterdir()) == []
