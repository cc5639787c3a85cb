"""Video inference on an annotated split: frames -> MinVIS tracks -> results.json records -> AP.

Used for periodic held-out evaluation inside training (rank 0) and for the final metrics.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from svis_ray.data.ingest import read_bytes, resolve
from svis_ray.data.transforms import resize_image, resized_shape
from svis_ray.data.ytvis import YTVIS, decode_frame
from svis_ray.eval import evaluate
from svis_ray.tracking import track_video, tracks_to_results


def video_frames(split: YTVIS, video: dict[str, Any], root: str, min_size: int,
                 max_size: int) -> Iterator[np.ndarray]:
    """Decode and resize a video's frames lazily (long videos never sit in memory whole)."""
    shape = resized_shape(video["height"], video["width"], min_size, max_size)
    for name in video["file_names"]:
        path = resolve(root, "JPEGImages/" + name)
        yield resize_image(decode_frame(read_bytes(path), source=path), shape)


def predict_split(model: torch.nn.Module, split: YTVIS, root: str, min_size: int, max_size: int,
                  window: int = 30, topk: int = 10, tracker: str = "minvis") -> list[dict[str, Any]]:
    """results.json records for every video of ``split`` (category ids mapped back to the dataset's)."""
    records: list[dict[str, Any]] = []
    for video in split.videos:
        tracks = track_video(model, video_frames(split, video, root, min_size, max_size), window=window,
                             topk=topk, out_size=(video["height"], video["width"]), tracker=tracker)
        records += tracks_to_results(tracks, video["id"], split.idx_to_cat)
    return records


def evaluate_split(model: torch.nn.Module, split: YTVIS, root: str, min_size: int, max_size: int,
                   window: int = 30, topk: int = 10, tracker: str = "minvis"
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, records) of ``model`` on an annotated split, tracked with ``tracker``."""
    was_training = model.training
    records = predict_split(model, split, root, min_size, max_size, window=window, topk=topk, tracker=tracker)
    model.train(was_training)
    return evaluate(split.to_dict(), records), records
