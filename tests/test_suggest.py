"""suggest-frames (which frames to label), sparsify --frames-from, and bench/budget.py's goal checks."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from svis_ray.cli import main
from svis_ray.errors import SvisError
from svis_ray.suggest import load_frames, pick_by_coverage, pick_by_score, suggest_frames

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, *args):
    """The CLI in this process (a subprocess would spend seconds importing torch and Ray)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_suggest_frames_model_free_writes_k_frames_per_video(demo_root, tmp_path):
    out = tmp_path / "sug.json"
    assert main(["suggest-frames", str(demo_root / "train.json"), "--frame-root", str(demo_root),
                 "--per-video", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    videos = {v["id"]: v for v in json.loads((demo_root / "train.json").read_text())["videos"]}
    assert data["suggest"]["method"] == "colour-coverage" and data["suggest"]["per_video"] == 2
    assert set(map(int, data["videos"])) == set(videos)
    for key, entry in data["videos"].items():
        frames = entry["frames"]
        assert len(frames) == len(set(frames)) == 2 and all(0 <= t < videos[int(key)]["length"] for t in frames)
        assert len(entry["scores"]) == 2 and len(entry["frame_scores"]) == videos[int(key)]["length"]
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(videos)
    for row in rows:
        vid, t = int(row["video_id"]), int(row["frame_index"])
        assert t in data["videos"][row["video_id"]]["frames"]
        assert row["file_name"] == videos[vid]["file_names"][t] and np.isfinite(float(row["score"]))
    # the same input gives the same suggestions (k-means is seeded per video)
    again = tmp_path / "again.json"
    suggest_frames(demo_root / "train.json", str(demo_root), 2, again, log=lambda s: None)
    assert json.loads(again.read_text())["videos"] == data["videos"]


def test_suggest_frames_skips_labelled_frames(demo_root, tmp_path):
    first, more = tmp_path / "first.json", tmp_path / "more.json"
    suggest_frames(demo_root / "train.json", str(demo_root), 1, first, log=lambda s: None)
    suggest_frames(demo_root / "train.json", str(demo_root), 3, more, labelled=first, log=lambda s: None)
    a, b = load_frames(first), load_frames(more)
    assert all(len(b[v]) == 3 and not set(a[v]) & set(b[v]) for v in a)


def test_suggest_frames_errors_are_one_line(demo_root, tmp_path, capsys):
    code, _, err = cli(capsys, "suggest-frames", demo_root / "train.json", "--per-video", 11, "--out", tmp_path / "s.json")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has 10 frames, fewer than --per-video 11" in err and not (tmp_path / "s.json").exists()
    with pytest.raises(SvisError, match="--per-video must be at least 1"):
        suggest_frames(demo_root / "train.json", None, 0, tmp_path / "s.json")
    with pytest.raises(SvisError, match="nope.json: .*not found"):
        suggest_frames(tmp_path / "nope.json", None, 1, tmp_path / "s.json")


def test_greedy_picks():
    # coverage: frame 2 shows both rare clusters; then the frame showing the rest
    present = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 0]], bool)
    weight = np.array([0.1, 2.0, 2.0, 2.0])
    frames, gains, first = pick_by_coverage(present, weight, 2)
    assert frames == [2, 3] and len(first) == 5 and gains[0] == pytest.approx(1.0)
    assert pick_by_coverage(present, weight, 1, labelled=[2])[0] == [3]
    # model scores: the best frame, then the best one far enough from it
    score = np.array([0.0, 1.0, 5.0, 4.9, 0.5, 3.0, 0.1, 0.0])
    assert pick_by_score(score, 2)[0] == [2, 5]
    assert pick_by_score(score, 1, labelled=[2])[0] == [5]


def test_frame_scorer_scores_every_frame_of_a_video(demo_root, tmp_path, one_torch_thread):
    """The Ray Data actor's body, in this process: a tiny checkpoint scores a video's frames."""
    import torch

    from svis_ray.data.ytvis import YTVIS
    from svis_ray.model import build_model, save_checkpoint
    from svis_ray.suggest import FrameScorer

    split = YTVIS.load(demo_root / "train.json")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.pt", build_model("tiny", len(split.class_names)), split.class_names)
    scorer = FrameScorer(str(tmp_path / "tiny.pt"), split, str(demo_root), 64, 96, window=4)
    out = scorer({"index": np.array([0]), "video_id": np.array([split.videos[0]["id"]])})
    assert out["error"].tolist() == [""]
    score = np.array(json.loads(out["scores"][0]))
    assert score.shape == (split.videos[0]["length"],) and np.isfinite(score).all() and (score >= 0).all()
    assert len(set(pick_by_score(score, 3)[0])) == 3


def test_sparsify_frames_from_keeps_exactly_those_frames(demo_root, tmp_path, capsys):
    full = json.loads((demo_root / "train.json").read_text())
    ids = [v["id"] for v in full["videos"]]
    a = {"videos": {str(v): {"frames": [v % 10]} for v in ids}}
    b = {str(v): [9 - v % 10] for v in ids}  # a plain mapping works too
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "sparse.json"
    code, stdout, err = cli(capsys, "sparsify", demo_root / "train.json", out, "--frames-from", tmp_path / "a.json",
                            "--frames-from", tmp_path / "b.json")
    assert code == 0, err
    sparse = json.loads(out.read_text())
    assert sparse["sparse"]["strategy"] == "suggested"
    keep = {v: sorted({v % 10, 9 - v % 10}) for v in ids}
    assert {v["id"]: v["labelled_frames"] for v in sparse["videos"]} == keep
    for a_full, a_sparse in zip(full["annotations"], sparse["annotations"]):
        for t, seg in enumerate(a_sparse["segmentations"]):
            assert seg == (a_full["segmentations"][t] if t in keep[a_full["video_id"]] else None)


@pytest.mark.parametrize("content,expected", [
    ({"videos": {"1": {"frames": [0]}, "999": {"frames": [0]}}}, r"video id\(s\) \[999\] are not in"),
    ({"1": [0]}, r"names no frames for video id\(s\) \[2, 3"),
    ("ALL", "frame 10 is past its 10 frames"),
    ({"videos": {"1": {"frames": "five"}}}, "frames must be a list of non-negative integers"),
    ([1, 2], "expected an object mapping video ids"),
    ("{not json", "malformed JSON"),
])
def test_sparsify_frames_from_errors_are_one_line(demo_root, tmp_path, content, expected):
    ids = [v["id"] for v in json.loads((demo_root / "train.json").read_text())["videos"]]
    path = tmp_path / "sug.json"
    if content == "ALL":
        content = {str(v): [0, 10] for v in ids}
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SvisError, match=expected):
        frames = load_frames(path)
        from svis_ray.data.sparsify import sparsify

        sparsify(demo_root / "train.json", tmp_path / "out.json", frames=frames, frames_source=str(path))
    assert not (tmp_path / "out.json").exists()


def _budget_module():
    spec = importlib.util.spec_from_file_location("bench_budget", ROOT / "bench" / "budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_goal_checks_on_made_up_numbers(capsys):
    budget = _budget_module()

    def runs(aps):
        return budget.summarize({name: {"seeds": {str(s): {k: ap + 0.001 * s for k in budget.KEYS}
                                                  for s in range(3)}} for name, ap in aps.items()})

    good = runs({"svis_ray/middle/1": 0.20, "svis_ray/suggested/1": 0.22, "svis_ray/uniform/2": 0.23,
                 "svis_ray/two_round/2": 0.25, "labelled_only/middle/2": 0.19})
    assert budget.check(good) == 0 and all(budget.goals(good).values())
    missed = runs({"svis_ray/middle/1": 0.20, "svis_ray/suggested/1": 0.205, "svis_ray/uniform/2": 0.23,
                   "svis_ray/two_round/2": 0.25})
    assert budget.check(missed) == 1
    text = capsys.readouterr().out
    assert "FAIL: svis_ray, 1 suggested frame >= 1 middle frame + 1 AP" in text and "NOT MEASURED: svis_ray at K" in text
    partial = runs({"svis_ray/middle/1": 0.20, "svis_ray/suggested/1": 0.30})
    assert budget.check(partial) == 0 and list(budget.goals(partial).values()) == [True, None, None]
    assert budget.parse_budget("4,all,1,2") == [1, 2, 4, "all"]
    with pytest.raises(SvisError, match="--budget"):
        budget.parse_budget("1,zero")
