"""Issue acceptance: the `tiny` preset, trained on two demo videos (all frames labelled) with the
plain training step, reaches AP >= 0.9 on those videos with the project's evaluator."""
import os

import pytest
import torch

from svis_ray.data.ytvis import YTVIS, decode_frame
from svis_ray.eval import evaluate
from svis_ray.losses import SetCriterion
from svis_ray.matcher import HungarianMatcher
from svis_ray.model import build_model, preprocess
from svis_ray.optim import build_optimizer, build_scheduler, train_step
from svis_ray.tracking import track_video, tracks_to_results


@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.environ.get("SVIS_SLOW_TESTS"),
                    reason="300 CPU training steps (2-4 min); SVIS_SLOW_TESTS=1 runs it")
def test_tiny_overfits_two_demo_videos(demo_root):
    torch.manual_seed(0)
    full = YTVIS.load(demo_root / "train.json")
    data = full.to_dict()
    keep = {v["id"] for v in data["videos"][:2]}
    data["videos"] = [v for v in data["videos"] if v["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["video_id"] in keep]
    two = YTVIS(data, source="two videos")
    frames, targets = [], []
    for video in two.videos:
        for t, path in enumerate(two.frame_paths(video["id"], demo_root)):
            frames.append(torch.from_numpy(decode_frame(path)).permute(2, 0, 1))
            tg = two.targets(video["id"], t)
            targets.append({"labels": torch.as_tensor(tg["labels"]), "masks": torch.as_tensor(tg["masks"])})
    images = preprocess(torch.stack(frames), [f.shape[1:] for f in frames])  # 96x128: no padding needed
    model = build_model("tiny", len(two.class_names))
    criterion = SetCriterion(len(two.class_names), HungarianMatcher(num_points=2048), num_points=2048)
    steps = 300
    optimizer = build_optimizer(model, lr=1e-3)
    scheduler = build_scheduler(optimizer, steps, milestones=(240,))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=gen)[:8].tolist()
        train_step(model, criterion, optimizer, scheduler, images[idx], [targets[i] for i in idx])
    records = []
    for video in two.videos:
        clip = [decode_frame(p) for p in two.frame_paths(video["id"], demo_root)]
        tracks = track_video(model, clip, window=4, out_size=(video["height"], video["width"]), tracker="svis")
        records += tracks_to_results(tracks, video["id"], two.idx_to_cat)
    metrics = evaluate(two.to_dict(), records)
    print("overfit AP", metrics["AP"])
    assert metrics["AP"] >= 0.9, metrics
