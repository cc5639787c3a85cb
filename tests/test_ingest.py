"""Ingest pieces without Ray: clip sampling, decode/transform, collate, URI roots, bad frames, and
the scheduling-loop throttle (its use on the training stream is tested in test_pipeline.py)."""
import json
import shutil

import numpy as np
import pytest
import torch

from svis_ray.data.collate import ClipCollate
from svis_ray.data import ingest
from svis_ray.data.ingest import DecodeConfig, IdleThrottle, clip_rows, decode_clip, load_split
from svis_ray.data.sparsify import sparsify
from svis_ray.errors import SvisError


@pytest.fixture()
def sparse(demo_root, tmp_path):
    sparsify(str(demo_root / "train.json"), str(tmp_path / "train_1frame.json"), strategy="middle")
    return load_split(str(demo_root), str(tmp_path / "train_1frame.json"))


def test_clip_rows_one_labelled_frame_plus_unlabelled(sparse, demo_root):
    rows = clip_rows(sparse, str(demo_root), num_clips=20, frames_per_clip=3, seed=0)
    assert len(rows) == 20
    for row in rows:
        video = sparse.video(row["video_id"])
        gt = json.loads(row["gt_json"])
        labelled = [t for t, g in zip(row["frame_idx"], gt) if g is not None]
        assert labelled == [video["length"] // 2]  # the middle frame carries the ground truth
        assert len(set(row["frame_idx"])) == 3 and row["frame_idx"] == sorted(row["frame_idx"])
    # every video is visited once per pass, and the schedule resumes exactly
    assert sorted(r["video_id"] for r in rows[:8]) == sorted(v["id"] for v in sparse.videos)
    assert clip_rows(sparse, str(demo_root), 20, 3, seed=0, first_clip=13) == rows[13:]
    assert clip_rows(sparse, str(demo_root), 20, 3, seed=1) != rows


def test_clip_rows_max_gap_keeps_unlabelled_frames_near_the_labelled_one(sparse, demo_root):
    rows = clip_rows(sparse, str(demo_root), num_clips=40, frames_per_clip=3, seed=0, max_gap=2)
    offsets = set()
    for row in rows:
        middle = sparse.video(row["video_id"])["length"] // 2
        assert middle in row["frame_idx"] and len(set(row["frame_idx"])) == 3
        offsets |= {t - middle for t in row["frame_idx"]}
    assert offsets == {-2, -1, 0, 1, 2}  # the whole window is used, nothing beyond it
    # gap 0 = any frame: the unrestricted schedule reaches farther
    far = clip_rows(sparse, str(demo_root), num_clips=40, frames_per_clip=3, seed=0)
    assert max(abs(t - sparse.video(r["video_id"])["length"] // 2) for r in far for t in r["frame_idx"]) > 2


def test_negative_max_gap_is_a_config_error():
    from svis_ray.config import load_config

    with pytest.raises(SvisError, match="data.unlabelled_max_gap must be >= 0"):
        load_config(None, ["data.unlabelled_max_gap=-1"])


def decode_cfg(**kw):
    args = dict(min_sizes=(64,), max_size=1000, flip=False, on_bad_frame="fail", seed=0)
    args.update(kw)
    return DecodeConfig(**args)


def test_decode_clip_resizes_frames_and_masks_together(sparse, demo_root):
    row = clip_rows(sparse, str(demo_root), 1, 3, seed=0)[0]
    out = decode_clip(row, decode_cfg())
    assert out["image"].shape == (3, 64, 85, 3) and out["image"].dtype == np.uint8
    assert out["labelled"].tolist().count(True) == 1
    slot = int(np.flatnonzero(out["labelled"])[0])
    assert (out["gt_frame"] == slot).all() and out["gt_masks"].shape[1:] == (64, 85)
    flipped = decode_clip(row, decode_cfg(flip=True, seed=3))
    same = decode_clip(row, decode_cfg(flip=False, seed=3))
    if not np.array_equal(flipped["image"], same["image"]):  # flip drawn for this seed
        assert np.array_equal(flipped["image"], same["image"][:, :, ::-1])
        assert np.array_equal(flipped["gt_masks"], same["gt_masks"][:, :, ::-1])


def test_collate_pads_to_32_and_splits_targets(sparse, demo_root):
    rows = [decode_clip(r, decode_cfg()) for r in clip_rows(sparse, str(demo_root), 2, 3, seed=0)]
    batch = {}
    for k in rows[0]:  # what Ray Data hands over: ragged columns as object arrays of arrays
        if np.ndim(rows[0][k]) == 0:
            batch[k] = np.array([r[k] for r in rows])
        else:
            batch[k] = np.empty(len(rows), dtype=object)
            for i, r in enumerate(rows):
                batch[k][i] = r[k]
    images, targets, stats = ClipCollate()(batch)
    assert images.shape == (6, 3, 64, 96) and images.dtype == torch.uint8
    labelled = [t for t in targets if not t["pseudo"]]
    assert len(labelled) == 2 and all(t["masks"].shape[1:] == (64, 96) for t in labelled)
    assert all(t["labels"] is None for t in targets if t["pseudo"])  # no teacher: online mode
    assert stats["clips"] == 2 and stats["bad_frames"] == 0


def test_bad_frame_fails_with_path_or_is_skipped_and_counted(sparse, demo_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(demo_root / "JPEGImages", root / "JPEGImages")
    row = clip_rows(sparse, str(root), 1, 3, seed=0)[0]
    bad = row["paths"][0]
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(SvisError, match=bad.replace("/", ".")):
        decode_clip(row, decode_cfg())
    out = decode_clip(row, decode_cfg(on_bad_frame="skip"))
    assert out["bad_frames"] == 1 and out["image"].shape[0] == 2


def test_uri_root_is_read_through_pyarrow_fs(demo_root, tmp_path):
    sparsify(str(demo_root / "train.json"), str(tmp_path / "t.json"), strategy="middle")
    uri = "file://" + str(demo_root)
    split = load_split(uri, str(tmp_path / "t.json"))
    row = clip_rows(split, uri, 1, 3, seed=0)[0]
    assert row["paths"][0].startswith("file://")
    assert decode_clip(row, decode_cfg())["image"].shape[0] == 3
    with pytest.raises(SvisError, match="missing.json: file not found"):
        load_split(uri, "missing.json")


def test_idle_throttle_backs_off_while_steps_return_at_once(monkeypatch):
    slept = []
    monkeypatch.setattr(ingest.time, "sleep", slept.append)
    throttle = IdleThrottle()
    for _ in range(7):  # steps that returned at once: 1, 2, 4, 8, 16 ms, then the cap
        throttle.on_execution_step(None)
    assert slept == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016, 0.02, 0.02])
    throttle._last -= 1.0  # a step that waited on tasks for a second: no sleep, and a reset
    throttle.on_execution_step(None)
    assert len(slept) == 7
    throttle.on_execution_step(None)
    assert slept[-1] == pytest.approx(0.001)
    for _ in range(5000):  # a long backpressured stretch (~100 s of 20 ms sleeps) stays at the cap
        throttle.on_execution_step(None)
    assert slept[-1] == pytest.approx(0.02)
