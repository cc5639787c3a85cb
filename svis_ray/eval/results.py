"""results.json in the YouTube-VIS CodaLab format: encoding, writing, reading and validation.

A results file is a JSON list of predicted tubes, one record per (video, instance):
``{"video_id", "category_id", "score", "segmentations": [RLE or null per frame]}`` where each RLE is
compressed, ``{"size": [height, width], "counts": str}``, at the video's original resolution.
"""
from __future__ import annotations

import json
import math
import os
from array import array
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from svis_ray.errors import SvisError
from svis_ray import io as svis_io
from svis_ray.io import read_json, write_json

RESULT_KEYS = ("video_id", "category_id", "score", "segmentations")


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Encode a boolean tube ``[T, H, W]`` as one compressed RLE per frame (counts as str)."""
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape [T, H, W], got {masks.shape}")
    # pycocotools wants a Fortran-ordered uint8 [H, W, N] stack
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def write_results(path: str | os.PathLike, records: list[dict]) -> None:
    """Write result records atomically (no partial file if anything fails)."""
    write_json(path, records)


class ResultSpool:
    """results.json built a video at a time: each video's records (their JSON list) go to a spool
    file in the output folder as they arrive, in any order; ``write`` assembles results.json in
    video order by streaming the spool, so no process holds every record. Kept in memory: per
    video an offset, and one float per record (the scores, for the summary)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.spool = svis_io.Spool(svis_io.join(str(out_dir), ".results.spool"))
        self.scores = array("d")

    def add(self, index: int, records_json: str) -> list[dict]:
        """Spool video ``index``'s records (a JSON list); returns them parsed."""
        records = json.loads(records_json)
        self.spool.append(index, records_json.encode("utf-8"))
        self.scores.extend(float(r["score"]) for r in records)
        return records

    def records(self, index: int) -> list[dict]:
        return json.loads(self.spool.read(index))

    def write(self, path: str | os.PathLike) -> None:
        """results.json (atomically): the spooled videos' records in index order."""
        with svis_io.open_output_stream(path) as f:
            f.write(b"[")
            first = True
            for i in sorted(self.spool.keys()):
                items = self.spool.read(i).strip()[1:-1].strip()  # the list's records
                if items:
                    f.write(items if first else b", " + items)
                    first = False
            f.write(b"]")

    def close(self) -> None:
        self.spool.close()


def read_results(path: str | os.PathLike, gt: dict) -> list[dict]:
    """Read and validate a results.json against the ground truth it will be scored on."""
    records = read_json(path, "results file")
    validate_results(records, gt, str(path))
    return records


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_results(records: Any, gt: dict, source: str) -> None:
    """Raise ``SvisError`` naming ``source``, the record index and the problem on the first bad record."""
    if not isinstance(records, list):
        raise SvisError(f"{source}: expected a JSON list of result records, got {type(records).__name__}")
    videos = {v["id"]: v for v in gt["videos"]}
    categories = {c["id"] for c in gt["categories"]}
    for i, r in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(r, dict):
            raise SvisError(f"{where}: expected an object, got {type(r).__name__}")
        for key in RESULT_KEYS:
            if key not in r:
                raise SvisError(f"{where}: missing key '{key}'")
        vid, cat, score, segs = (r[k] for k in RESULT_KEYS)
        if not _is_int(vid) or vid not in videos:
            raise SvisError(f"{where}: unknown video_id {vid!r}")
        if not _is_int(cat) or cat not in categories:
            raise SvisError(f"{where}: unknown category_id {cat!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise SvisError(f"{where}: score must be a finite number, got {score!r}")
        video = videos[vid]
        if not isinstance(segs, list) or len(segs) != video["length"]:
            got = f"{len(segs)} frames" if isinstance(segs, list) else type(segs).__name__
            raise SvisError(f"{where}: segmentations must list {video['length']} frames "
                            f"(video {vid}), got {got}")
        size = [video["height"], video["width"]]
        for t, rle in enumerate(segs):
            if rle is None:
                continue
            if not isinstance(rle, dict) or not isinstance(rle.get("counts"), str) or "size" not in rle:
                raise SvisError(f"{where}: frame {t}: expected a compressed RLE "
                                f'{{"size": [h, w], "counts": str}} or null')
            if rle["size"] != size:
                raise SvisError(f"{where}: frame {t}: mask size {rle['size']!r} differs from "
                                f"video {vid}'s {size} (height, width)")
