"""Sparse-label subsets (K labelled frames per video) and held-out splits of a YTVIS file.

A sparse file keeps every video whole (``file_names``/``length`` unchanged, so the unlabelled
frames stay available for pseudo-labelling) and sets ``segmentations``/``bboxes``/``areas`` to
null on the frames that are not selected. The selection is recorded: each video gets
``"labelled_frames": [sorted indices]`` and the file gets
``"sparse": {"strategy", "frames_per_video", "seed", "source"}``.

Strategies, for a video of length L and K frames (all frames when K >= L):
  * ``middle``: MinVIS's "1%" setting (``SAMPLING_FRAME_RATIO`` rounding to one frame), the
    frame L//2; for K > 1, the K consecutive frames centred on L//2, shifted to fit the video.
  * ``random-instance``: Sparse-MinVIS's choice, K random frames among those where at least one
    instance is present (fewer if the video has fewer; none for a video without instances).
  * ``uniform``: the centres of K equal bins, floor((i + 0.5) * L / K); K = 1 gives L//2.
  * ``suggested``: exactly the frames a ``svis-ray suggest-frames`` file names per video
    (``frames``), as annotators labelling those frames would give; every video of the input must
    be named, with frames inside the video.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from svis_ray.data.ytvis import YTVIS
from svis_ray.errors import SvisError
from svis_ray.io import atomic_path, write_json

STRATEGIES = ("middle", "random-instance", "uniform")  # rules; "suggested" takes ``frames``
PER_FRAME_KEYS = ("segmentations", "bboxes", "areas")


def select_frames(length: int, k: int, strategy: str, candidates: list[int],
                  rng: np.random.Generator) -> list[int]:
    """Sorted frame indices for one video. ``candidates``: frames with an instance (random-instance)."""
    if strategy == "random-instance":
        picked = rng.choice(candidates, size=min(k, len(candidates)), replace=False) if candidates else []
        return sorted(int(t) for t in picked)
    if k >= length:
        return list(range(length))
    if strategy == "middle":
        first = min(max(length // 2 - k // 2, 0), length - k)
        return list(range(first, first + k))
    return [int((i + 0.5) * length / k) for i in range(k)]


def check_frames(ds: YTVIS, frames: dict[int, list[int]], source: str) -> None:
    """SvisError (one line, naming ``source``) unless ``frames`` names exactly ``ds``'s videos, each
    with distinct frames inside the video."""
    ids = {v["id"] for v in ds.videos}
    unknown = sorted(set(frames) - ids)
    if unknown:
        raise SvisError(f"{source}: video id(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not in "
                        f"{ds.source} ({len(unknown)} unknown)")
    missing = sorted(ids - set(frames))
    if missing:
        raise SvisError(f"{source}: names no frames for video id(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                        f"of {ds.source} ({len(missing)} missing)")
    for v in ds.videos:
        ts = frames[v["id"]]
        if len(ts) > v["length"]:
            raise SvisError(f"{source}: video {v['id']}: {len(ts)} frames asked of a video of {v['length']}")
        if any(t >= v["length"] for t in ts):
            raise SvisError(f"{source}: video {v['id']}: frame {max(ts)} is past its {v['length']} frames")


def sparsify(in_path: str | os.PathLike, out_path: str | os.PathLike, frames_per_video: int = 1,
             strategy: str = "middle", seed: int = 0, frames: dict[int, list[int]] | None = None,
             frames_source: str = "--frames-from") -> dict[str, Any]:
    """Write the K-labelled-frames-per-video subset of ``in_path`` to ``out_path`` (atomically).

    ``frames`` (video id -> frame indices, e.g. ``suggest.load_frames``; ``frames_source`` names
    it in errors): keep exactly those frames (strategy ``suggested``; ``frames_per_video`` is then
    the most frames any video keeps).

    Deterministic for a seed: each video draws from a generator seeded by (seed, video id), so
    the choice does not depend on the order of the videos. Returns the summary
    ``videos, frames, labelled_frames, instances, instances_kept, masks, masks_kept,
    mask_fraction, videos_without_labels`` (an instance is kept if it is present on at least
    one labelled frame; the others are still written, all null).
    """
    if frames is not None:
        strategy = "suggested"
    elif strategy not in STRATEGIES:
        raise SvisError(f"unknown sparsify strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if frames_per_video < 1:
        raise SvisError(f"frames_per_video must be at least 1, got {frames_per_video}")
    if seed < 0:
        raise SvisError(f"seed must be non-negative, got {seed}")
    ds = YTVIS.load(in_path)
    if not ds.has_annotations:
        raise SvisError(f"{in_path}: has no 'annotations' (a valid/test file?); nothing to sparsify")
    if any("labelled_frames" in v for v in ds.videos):
        raise SvisError(f"{in_path}: already a sparse subset ('labelled_frames' present); "
                        f"sparsify the fully annotated file instead")
    if frames is not None:
        check_frames(ds, frames, frames_source)
        frames_per_video = max((len(ts) for ts in frames.values()), default=0)

    s = {"videos": len(ds.videos), "frames": 0, "labelled_frames": 0, "instances": 0, "instances_kept": 0,
         "masks": 0, "masks_kept": 0, "videos_without_labels": 0}
    videos, annotations = [], []
    for video in ds.videos:
        anns = ds.annotations(video["id"])
        present = sorted({t for a in anns for t, seg in enumerate(a["segmentations"]) if seg is not None})
        keep = sorted(frames[video["id"]]) if frames is not None else select_frames(
            video["length"], frames_per_video, strategy, present, np.random.default_rng([seed, video["id"]]))
        videos.append({**video, "labelled_frames": keep})
        s["frames"] += video["length"]
        s["labelled_frames"] += len(keep)
        s["videos_without_labels"] += not keep
        chosen = set(keep)
        for a in anns:
            masks = {t for t, seg in enumerate(a["segmentations"]) if seg is not None}
            s["instances"] += 1
            s["instances_kept"] += bool(masks & chosen)
            s["masks"] += len(masks)
            s["masks_kept"] += len(masks & chosen)
            sparse = dict(a)
            for key in PER_FRAME_KEYS:
                if key in a:
                    sparse[key] = [x if t in chosen else None for t, x in enumerate(a[key])]
            annotations.append(sparse)
    # Annotations go out grouped by video (file order of videos); everything else is copied.
    out = {**ds.to_dict(), "videos": videos, "annotations": annotations}
    out["sparse"] = {"strategy": strategy, "frames_per_video": frames_per_video, "seed": seed,
                     "source": str(in_path)}
    if frames is not None:
        out["sparse"]["frames_from"] = frames_source
    write_json(out_path, out)
    s["mask_fraction"] = s["masks_kept"] / s["masks"] if s["masks"] else 0.0
    return s


def split(in_path: str | os.PathLike, val_fraction: float, seed: int, train_out: str | os.PathLike,
          val_out: str | os.PathLike) -> dict[str, int]:
    """Hold out ``round(val_fraction * videos)`` random videos (deterministic per seed).

    Both outputs are YTVIS files with all categories, their videos (input order) and those
    videos' annotations; any other top-level keys are copied. Neither file is written unless
    both can be.
    """
    if not 0 < val_fraction < 1:
        raise SvisError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if os.path.abspath(train_out) == os.path.abspath(val_out):
        raise SvisError(f"{train_out}: the train and validation outputs must be different files")
    ds = YTVIS.load(in_path)
    n = len(ds.videos)
    n_val = round(val_fraction * n)
    if not 1 <= n_val <= n - 1:
        raise SvisError(f"{in_path}: val_fraction {val_fraction} of {n} videos gives {n_val} validation "
                        f"videos; both splits need at least one")
    ids = sorted(v["id"] for v in ds.videos)
    val_ids = {ids[i] for i in np.random.default_rng(seed).permutation(n)[:n_val]}
    data = ds.to_dict()
    parts = []
    for in_val in (False, True):
        part = {k: v for k, v in data.items() if k not in ("videos", "annotations")}
        part["videos"] = [v for v in data["videos"] if (v["id"] in val_ids) == in_val]
        if "annotations" in data:
            part["annotations"] = [a for a in data["annotations"] if (a["video_id"] in val_ids) == in_val]
        parts.append(part)
    # Both files are complete before either is renamed into place.
    with atomic_path(train_out) as train_tmp, atomic_path(val_out) as val_tmp:
        for tmp, part in ((train_tmp, parts[0]), (val_tmp, parts[1])):
            with open(tmp, "w") as f:
                json.dump(part, f)
    return {"train_videos": len(parts[0]["videos"]), "val_videos": len(parts[1]["videos"])}
