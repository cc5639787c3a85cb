"""Collate for the training stream: ragged Ray Data batches of clips -> padded tensors + targets.

Kept apart from ``ingest`` so that Ray Data decode workers never import torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from svis_ray.data.transforms import pad_to_multiple


class ClipCollate(NumpyBatchCollateFn):
    """Numpy batch of clips -> (images uint8 [N,3,H,W] padded to /32, per-frame targets, stats).

    The images stay uint8 (``strong_augment`` and GrabCut work on them); the train step turns them
    into model input with ``svis_ray.model.preprocess(images, [t["size"] for t in targets])``.

    Ragged columns (frame sizes, instance counts) arrive as object arrays of per-clip arrays and
    are unpacked here, frame by frame, into plain tensors. Each target dict holds
    ``labels`` int64 [n], ``masks`` uint8 [n,H,W], ``pseudo`` (bool: targets come from a teacher
    or, with ``labels=None``, must be made by the student itself), ``scores``/``anchored`` for
    pseudo-labels, and ``video_id``/``frame`` for logging.

    ``size_multiple``: frames (and masks) are padded to multiples of it; a compiled model
    (``train.compile``) takes 128, so that few distinct shapes reach it.
    """

    def __init__(self, size_multiple: int = 32) -> None:
        super().__init__()
        self.size_multiple = size_multiple

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[dict], dict[str, Any]]:
        has_pseudo = "ps_masks" in batch
        frames, targets = [], []
        stats = {"bad_frames": float(np.sum(batch["bad_frames"])), "clips": float(len(batch["clip_index"])),
                 "clip_index": [int(i) for i in batch["clip_index"]]}  # which scheduled clips: resume checks
        if has_pseudo:
            stats["teacher_version_min"] = float(np.min(batch["teacher_version"]))
            stats["pseudo_candidates"] = float(np.sum(batch["ps_candidates"]))
            stats["teacher_time_min"] = float(np.min(batch["teacher_time"]))
            stats["teacher_time_max"] = float(np.max(batch["teacher_time"]))
        for c in range(len(batch["clip_index"])):
            image = batch["image"][c]
            for f in range(image.shape[0]):
                frames.append(image[f])
                if batch["labelled"][c][f]:
                    sel = batch["gt_frame"][c] == f
                    targets.append({"labels": batch["gt_labels"][c][sel], "masks": batch["gt_masks"][c][sel],
                                    "pseudo": False})
                elif has_pseudo:
                    sel = batch["ps_frame"][c] == f
                    targets.append({"labels": batch["ps_labels"][c][sel], "masks": batch["ps_masks"][c][sel],
                                    "scores": batch["ps_scores"][c][sel],
                                    "anchored": batch["ps_anchored"][c][sel], "pseudo": True,
                                    "reliability": float(batch["ps_weight"][c]) if "ps_weight" in batch else 1.0,
                                    "teacher_version": int(batch["teacher_version"][c])})
                else:
                    targets.append({"labels": None, "masks": None, "pseudo": True})
                targets[-1]["video_id"] = int(batch["video_id"][c])
                targets[-1]["frame"] = int(batch["frame_idx"][c][f])
        if not frames:
            return torch.zeros(0, 3, 32, 32, dtype=torch.uint8), [], stats
        hp, wp = pad_to_multiple(max(f.shape[0] for f in frames), max(f.shape[1] for f in frames), self.size_multiple)
        images = torch.zeros(len(frames), 3, hp, wp, dtype=torch.uint8)
        for i, (img, tgt) in enumerate(zip(frames, targets)):
            h, w = img.shape[:2]
            images[i, :, :h, :w] = torch.tensor(img).permute(2, 0, 1)  # copies: Ray hands read-only arrays
            if tgt["labels"] is not None:
                padded = torch.zeros(len(tgt["labels"]), hp, wp, dtype=torch.uint8)
                padded[:, :h, :w] = torch.tensor(tgt["masks"])
                tgt["masks"] = padded
                tgt["labels"] = torch.tensor(tgt["labels"], dtype=torch.int64)
            tgt["size"] = (h, w)
        return images, targets, stats
