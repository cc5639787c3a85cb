import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from svis_ray.data.ytvis import YTVIS
from svis_ray.errors import SvisError
from svis_ray.eval import evaluate, evaluate_files
from svis_ray.inference import predict_split
from svis_ray.model import build_model, load_checkpoint, save_checkpoint
from svis_ray.predict import predict

SIZE = {"min_size": 96, "max_size": 128}  # the demo frames' own size: fast on 2 cores


@pytest.fixture(scope="module")
def checkpoint(demo_root, tmp_path_factory):
    """An untrained tiny model with the demo classes (AP ~0, but every format is real)."""
    names = YTVIS.load(demo_root / "val.json").class_names
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, build_model("tiny", len(names)), names, extra={"step": 0})
    return path


def _write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()


def _count_frames(path: Path) -> tuple[int, float, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    n, size = 0, (0, 0)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, size = n + 1, frame.shape[:2]
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return n, fps, size


@pytest.mark.timeout(300)
def test_split_through_actor_pool_matches_in_process_ap(ray_local, demo_root, checkpoint, tmp_path,
                                                        one_torch_thread):
    lines: list[str] = []
    s = predict(checkpoint, demo_root / "val.json", tmp_path, num_actors=2, zip_results=True, render=True,
                log=lines.append, **SIZE)
    assert not s["in_process"] and s["videos"] == 2 and s["frames"] == 20 and s["tracks"] == 20
    assert sum(line.startswith("[") for line in lines) == 2  # one progress line per video

    results = tmp_path / "results.json"
    metrics = evaluate_files(demo_root / "val.json", results)  # validates the file against the split
    split = YTVIS.load(demo_root / "val.json")

    model, _ = load_checkpoint(checkpoint)
    # one_torch_thread: like the actors; the untrained model's mask logits sit near 0.
    # the checkpoint records no tracker: written before it did, so predict uses svis's, as training did
    expected = predict_split(model, split, str(demo_root), window=30, topk=10, tracker="svis", **SIZE)
    assert metrics == evaluate(split.to_dict(), expected)
    got = json.loads(results.read_text())
    assert [(r["video_id"], r["category_id"], r["segmentations"]) for r in got] == \
        [(r["video_id"], r["category_id"], r["segmentations"]) for r in expected]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-5)

    with zipfile.ZipFile(tmp_path / "submission.zip") as z:
        assert z.namelist() == ["results.json"]
        assert json.loads(z.read("results.json")) == got
    for video in split.videos:  # the split is annotated: ground truth above the prediction, enlarged 3x
        s = 360 // min(video["height"], video["width"])
        assert _count_frames(tmp_path / f"{video['id']}.overlay.mp4") == (
            video["length"], 6, (2 * s * video["height"], s * video["width"]))


@pytest.mark.timeout(300)
def test_split_with_a_missing_frame_fails_in_one_line(ray_local, demo_root, checkpoint, tmp_path):
    data = json.loads((demo_root / "val.json").read_text())
    data["videos"][1]["file_names"][3] = "nowhere/00003.jpg"
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(SvisError, match="nowhere/00003.jpg: file not found") as e:
        predict(checkpoint, ann, tmp_path / "out", frame_root=str(demo_root), log=lambda _: None, **SIZE)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.timeout(120)
def test_video_file_is_predicted_and_rendered(demo_root, checkpoint, tmp_path):
    video = YTVIS.load(demo_root / "val.json").videos[0]
    frames = [cv2.imread(str(demo_root / "JPEGImages" / n)) for n in video["file_names"]]
    mp4 = tmp_path / "clip.mp4"
    _write_mp4(mp4, frames, fps=10)
    out = tmp_path / "out"
    s = predict(checkpoint, mp4, out, render=True, render_min_score=0.0, window=4, zip_results=True,
                log=lambda _: None, **SIZE)
    assert s["in_process"] and s["videos"] == 1 and s["frames"] == len(frames)

    n, fps, size = _count_frames(out / "clip.overlay.mp4")
    scale = 360 // min(frames[0].shape[:2])  # frames under 360 px are enlarged, so labels stay legible
    assert (n, fps, size) == (len(frames), 10, (scale * frames[0].shape[0], scale * frames[0].shape[1]))
    tracks = json.loads((out / "clip.tracks.json").read_text())
    assert tracks["frames"] == len(frames) and len(tracks["tracks"]) == 10
    t0 = tracks["tracks"][0]
    assert t0["id"] == 0 and t0["class"] in YTVIS.load(demo_root / "val.json").class_names
    assert len(t0["segmentations"]) == len(frames) and t0["segmentations"][0]["size"] == [96, 128]
    results = json.loads((out / "results.json").read_text())
    assert {r["category_id"] for r in results} <= set(range(1, 7)) and {r["video_id"] for r in results} == {1}
    with zipfile.ZipFile(out / "submission.zip") as z:
        assert z.namelist() == ["results.json"]


@pytest.mark.timeout(120)
def test_frame_folder_input(demo_root, checkpoint, tmp_path):
    video = YTVIS.load(demo_root / "val.json").videos[1]
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, name in enumerate(video["file_names"]):
        shutil.copy(demo_root / "JPEGImages" / name, folder / f"f{t}.jpg")  # f10 must sort after f9
    s = predict(checkpoint, folder, tmp_path / "out", render=True, fps=3, log=lambda _: None, **SIZE)
    assert s["frames"] == video["length"]
    assert _count_frames(tmp_path / "out" / "frames.overlay.mp4")[:2] == (video["length"], 3)
    assert (tmp_path / "out" / "frames.tracks.json").exists()


def test_bad_inputs_name_the_input(demo_root, checkpoint, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 50)
    empty = tmp_path / "empty.mp4"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), 6, (128, 96)).release()  # header, no frames
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    cv2.imwrite(str(mixed / "00000.jpg"), np.zeros((96, 128, 3), np.uint8))
    cv2.imwrite(str(mixed / "00001.jpg"), np.zeros((64, 64, 3), np.uint8))
    no_frames = tmp_path / "no_frames"
    no_frames.mkdir()
    (no_frames / "notes.txt").write_text("x")
    text = tmp_path / "clip.txt"
    text.write_text("x")
    for bad, problem in [(garbage, "cannot open"), (empty, "cannot open"), (mixed, "differ in size"),
                         (no_frames, "no frame images"), (text, "not a YTVIS JSON")]:
        with pytest.raises(SvisError, match=problem) as e:
            predict(checkpoint, bad, tmp_path / "out", log=lambda _: None, **SIZE)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "results.json").exists()

    other = tmp_path / "other.pt"
    save_checkpoint(other, build_model("tiny", 6), [f"c{i}" for i in range(6)])
    with pytest.raises(SvisError, match="do not match the categories of") as e:
        predict(other, demo_root / "val.json", tmp_path / "out", log=lambda _: None)
    assert str(other) in str(e.value) and str(demo_root / "val.json") in str(e.value)


def test_command_error_is_one_line(checkpoint, tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00" * 1000)
    r = subprocess.run([sys.executable, "-m", "svis_ray", "predict", str(bad), "--checkpoint", str(checkpoint),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"svis-ray: error: {bad}: cannot open the video file "
                                             "(unreadable, empty or unsupported codec)"]


def _valid_json(root: Path, categories: int) -> Path:
    """A YouTube-VIS 2019 valid.json-like split (no annotations): one video of two 64x64 frames."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages" / "v0").mkdir(parents=True)
    for t in range(2):
        cv2.imwrite(str(root / "JPEGImages" / "v0" / f"{t:05d}.jpg"), rng.integers(0, 255, (64, 64, 3), np.uint8))
    data = {"videos": [{"id": 5, "width": 64, "height": 64, "length": 2,
                        "file_names": [f"v0/{t:05d}.jpg" for t in range(2)]}],
            "categories": [{"id": i + 1, "name": f"class{i + 1}", "supercategory": "object"} for i in range(categories)]}
    path = root / "valid.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.timeout(300)
def test_official_minvis_pth_to_codalab_zip(ray_local, minvis_pth, tmp_path):
    """A .pth laid out as the official MinVIS YTVIS19 R50 checkpoint -> submission.zip."""
    valid = _valid_json(tmp_path / "valid", 40)
    lines: list[str] = []
    s = predict(minvis_pth, valid, tmp_path / "out", zip_results=True, min_size=64, max_size=64, log=lines.append)
    assert s["tracker"] == "minvis" and "minvis tracker" in lines[0]  # MinVIS's own default
    with zipfile.ZipFile(tmp_path / "out" / "submission.zip") as z:
        assert z.namelist() == ["results.json"]  # at the archive root, as the server expects
        records = json.loads(z.read("results.json"))
    assert len(records) == 10  # MinVIS's top 10
    assert {r["video_id"] for r in records} == {5} and all(1 <= r["category_id"] <= 40 for r in records)
    assert all(len(r["segmentations"]) == 2 and r["segmentations"][0]["size"] == [64, 64] for r in records)
    assert records == json.loads((tmp_path / "out" / "results.json").read_text())


def test_official_checkpoint_needs_the_class_count_of_its_head(minvis_pth, tmp_path):
    valid = _valid_json(tmp_path / "valid", 39)
    with pytest.raises(SvisError, match=r"class head has 40 classes but .*valid.json lists 39 categories"):
        predict(minvis_pth, valid, tmp_path / "out")
    clip = tmp_path / "valid" / "JPEGImages" / "v0"
    with pytest.raises(SvisError, match="names no classes: predict a YTVIS JSON"):
        predict(minvis_pth, clip, tmp_path / "out")
