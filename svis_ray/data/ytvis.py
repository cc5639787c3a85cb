"""YouTube-VIS (2019 / 2021) annotation files: strict loading, validation and per-frame targets.

The format (one JSON per split)::

    {"videos": [{id, width, height, length, file_names: [L paths under JPEGImages/]}],
     "annotations": [{id, video_id, category_id, iscrowd,
                      segmentations: [L x (RLE | polygon | null)], areas: [L], bboxes: [L]}],
     "categories": [{id, name}]}

Valid/test files carry no ``annotations``. A sparse subset written by ``svis_ray.data.sparsify``
adds ``labelled_frames`` to each video. Every problem found while loading raises ``SvisError``
with one line naming the file, the video/annotation and the problem; a file that loads is safe
to decode.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from svis_ray.errors import SvisError
from svis_ray.io import read_json

Segmentation = dict[str, Any] | list[list[float]] | None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rle_string_totals(strings: list[str]) -> list[int | None]:
    """Number of pixels each compressed COCO RLE string covers, None for a malformed one.

    pycocotools trusts its input: a string covering fewer than H*W pixels decodes to
    uninitialised memory and ``merge`` on it can loop forever, so strings are checked here.
    Each run length is packed low bits first in 5-bit groups, one char per group (chr(48 +
    group); bit 0x20: more groups follow, bit 0x10 of the last group: sign); from the fourth
    run on, the string stores the difference to the run two before. All strings go through
    numpy at once (an annotation's, one per frame): one string at a time cost ~30 us each,
    most of the time of loading a large split.
    """
    out: list[int | None] = [None] * len(strings)
    good = np.array([i for i, s in enumerate(strings) if s and s.isascii()], np.int64)
    if not len(good):
        return out
    lens = np.array([len(strings[i]) for i in good], np.int64)
    c = np.frombuffer("".join(strings[i] for i in good).encode("ascii"), np.uint8).astype(np.int64) - 48
    first = np.cumsum(lens) - lens  # first char of each string
    # chars outside the alphabet, or a last char that says more follow (a run crossing into the next string)
    fine = ((np.minimum.reduceat(c, first) >= 0) & (np.maximum.reduceat(c, first) <= 63)
            & ((c[first + lens - 1] & 0x20) == 0))
    if not fine.all():
        c, good, lens = c[np.repeat(fine, lens)], good[fine], lens[fine]
        if not len(good):
            return out
        first = np.cumsum(lens) - lens
    last = (c & 0x20) == 0  # the last char of each run
    run = np.concatenate([[0], np.cumsum(last)[:-1]])  # run index of each char
    start = np.flatnonzero(np.concatenate([[True], last[:-1]]))  # first char of each run
    shift = 5 * (np.arange(c.size) - start[run])
    x = np.add.reduceat((c & 0x1F) << np.minimum(shift, 55), start)  # a longer run marks its string bad
    end = np.flatnonzero(last)
    negative = (c[end] & 0x10) != 0
    x[negative] -= np.int64(1) << (np.minimum(shift[end][negative], 55) + 5)
    # runs[k] = x[k] + runs[k - 2] for k >= 3: cumulative sums over a string's odd and its even (>= 2) runs
    string = np.repeat(np.arange(len(good)), np.diff(np.concatenate([run[first], [len(x)]])))  # of each run
    k = np.arange(len(x)) - run[first][string]
    group = 3 * string + np.where(k == 0, 0, np.where(k % 2 == 1, 1, 2))
    order = np.argsort(group, kind="stable")
    xs = x[order]
    sums = np.cumsum(xs)
    starts = np.flatnonzero(np.concatenate([[True], np.diff(group[order]) != 0]))
    sums -= np.repeat(sums[starts] - xs[starts], np.diff(np.concatenate([starts, [len(xs)]])))
    runs = np.empty_like(x)
    runs[order] = sums
    first_run = run[first]
    ok = (np.maximum.reduceat(shift, first) <= 55) & (np.minimum.reduceat(runs, first_run) >= 0)
    totals = np.add.reduceat(runs, first_run)
    for i, valid, total in zip(good.tolist(), ok.tolist(), totals.tolist()):
        out[i] = total if valid else None
    return out


class YTVIS:
    """A validated YTVIS annotation file.

    Attributes: ``videos`` (list of video dicts, file order), ``categories`` (sorted by id),
    ``cat_to_idx`` / ``idx_to_cat`` (dataset category id <-> contiguous class index),
    ``class_names`` (by class index), ``has_annotations`` (False for valid/test files).
    """

    def __init__(self, data: Any, source: str | os.PathLike = "<ytvis>"):
        self.source = str(source)
        self._data = data
        self._validate_top()
        self.videos: list[dict[str, Any]] = data["videos"]
        self._videos_by_id: dict[int, dict[str, Any]] = {}
        for i, v in enumerate(self.videos):
            self._check_video(v, i)
            if v["id"] in self._videos_by_id:
                raise self._fail(f"duplicate video id {v['id']}")
            self._videos_by_id[v["id"]] = v
        self.categories: list[dict[str, Any]] = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_to_idx: dict[int, int] = {c["id"]: i for i, c in enumerate(self.categories)}
        self.idx_to_cat: dict[int, int] = {i: c for c, i in self.cat_to_idx.items()}
        self.class_names: list[str] = [c["name"] for c in self.categories]
        self.has_annotations = "annotations" in data
        self._anns_by_video: dict[int, list[dict[str, Any]]] = {vid: [] for vid in self._videos_by_id}
        ann_ids: set[int] = set()
        for i, a in enumerate(data.get("annotations", [])):
            self._check_annotation(a, i)
            if a["id"] in ann_ids:
                raise self._fail(f"duplicate annotation id {a['id']}")
            ann_ids.add(a["id"])
            self._anns_by_video[a["video_id"]].append(a)

    @classmethod
    def load(cls, path: str | os.PathLike) -> YTVIS:
        return cls(read_json(path, "YTVIS annotation file"), source=path)

    # ------------------------------------------------------------------------- queries
    def video(self, video_id: int) -> dict[str, Any]:
        try:
            return self._videos_by_id[video_id]
        except KeyError:
            raise SvisError(f"{self.source}: no video with id {video_id}") from None

    def annotations(self, video_id: int) -> list[dict[str, Any]]:
        """The video's annotations (instance tracks), file order."""
        self.video(video_id)
        return self._anns_by_video[video_id]

    def frame_paths(self, video_id: int, root: str | os.PathLike) -> list[Path]:
        return [Path(root) / "JPEGImages" / name for name in self.video(video_id)["file_names"]]

    def labelled_frames(self, video_id: int) -> list[int]:
        """Frames whose annotations are ground truth: the sparse record if any, else every frame."""
        v = self.video(video_id)
        return list(v["labelled_frames"]) if "labelled_frames" in v else list(range(v["length"]))

    def annotations_on_frame(self, video_id: int, t: int) -> list[dict[str, Any]]:
        """Instances present (non-null) on frame ``t`` as JSON-safe dicts:
        ``{"id", "label" (class index), "iscrowd", "rle" (compressed, counts as str)}``."""
        v = self.video(video_id)
        if not 0 <= t < v["length"]:
            raise SvisError(f"{self.source}: video {video_id}: frame {t} out of range (length {v['length']})")
        out = []
        for a in self._anns_by_video[video_id]:
            seg = a["segmentations"][t]
            if seg is None:
                continue
            rle = _to_rle(seg, v["height"], v["width"])
            out.append({"id": a["id"], "label": self.cat_to_idx[a["category_id"]],
                        "iscrowd": int(a.get("iscrowd", 0)),
                        "rle": {"size": [v["height"], v["width"]], "counts": rle["counts"].decode("ascii")}})
        return out

    def targets(self, video_id: int, t: int) -> dict[str, np.ndarray]:
        """Decoded ground truth of frame ``t`` (numpy): masks uint8 [N,H,W], boxes float32 [N,4]
        (x0,y0,x1,y1 pixel extents; zeros for an empty mask), labels int64 [N] (class index),
        ids int64 [N] (annotation ids), iscrowd int64 [N]."""
        v = self.video(video_id)
        anns = self.annotations_on_frame(video_id, t)
        if not anns:
            return {"masks": np.zeros((0, v["height"], v["width"]), np.uint8),
                    "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                    "ids": np.zeros(0, np.int64), "iscrowd": np.zeros(0, np.int64)}
        rles = [a["rle"] for a in anns]
        masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))
        boxes = mask_utils.toBbox(rles).astype(np.float32)
        boxes[:, 2:] += boxes[:, :2]
        return {"masks": masks, "boxes": boxes,
                "labels": np.array([a["label"] for a in anns], np.int64),
                "ids": np.array([a["id"] for a in anns], np.int64),
                "iscrowd": np.array([a["iscrowd"] for a in anns], np.int64)}

    def to_dict(self) -> dict[str, Any]:
        """The file's content (the validated input; JSON-serialisable)."""
        return self._data

    # ------------------------------------------------------------------------- validation
    def _fail(self, msg: str) -> SvisError:
        return SvisError(f"{self.source}: {msg}")

    def _validate_top(self) -> None:
        d = self._data
        if not isinstance(d, dict):
            raise self._fail(f"expected a YTVIS JSON object, got {type(d).__name__}")
        for key in ("videos", "categories"):
            if key not in d:
                raise self._fail(f"missing top-level key '{key}'")
        for key in ("videos", "categories", "annotations"):
            if key in d and not isinstance(d[key], list):
                raise self._fail(f"'{key}' must be a list, got {type(d[key]).__name__}")
        seen: set[int] = set()
        for i, c in enumerate(d["categories"]):
            if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
                raise self._fail(f"categories[{i}] must be an object with an integer 'id' and a string 'name'")
            if c["id"] in seen:
                raise self._fail(f"duplicate category id {c['id']}")
            seen.add(c["id"])

    def _check_video(self, v: Any, i: int) -> None:
        if not isinstance(v, dict) or not _is_int(v.get("id")) or v["id"] < 0:
            raise self._fail(f"videos[{i}] must be an object with a non-negative integer 'id'")
        where = f"video {v['id']}"
        for key in ("width", "height", "length"):
            if not _is_int(v.get(key)) or v[key] < 1:
                raise self._fail(f"{where}: '{key}' must be a positive integer, got {v.get(key)!r}")
        names = v.get("file_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self._fail(f"{where}: 'file_names' must be a list of strings")
        if len(names) != v["length"]:
            raise self._fail(f"{where}: file_names has {len(names)} entries, expected {v['length']} (the video length)")
        if "labelled_frames" in v:
            lf = v["labelled_frames"]
            if (not isinstance(lf, list) or not all(_is_int(t) and 0 <= t < v["length"] for t in lf)
                    or lf != sorted(set(lf))):
                raise self._fail(f"{where}: 'labelled_frames' must be sorted, distinct frame indices "
                                 f"in [0, {v['length']})")

    def _check_annotation(self, a: Any, i: int) -> None:
        if not isinstance(a, dict) or not _is_int(a.get("id")):
            raise self._fail(f"annotations[{i}] must be an object with an integer 'id'")
        aid = a["id"]
        if not _is_int(a.get("video_id")):
            raise self._fail(f"annotation {aid}: 'video_id' must be an integer")
        if a["video_id"] not in self._videos_by_id:
            raise self._fail(f"annotation {aid}: unknown video_id {a['video_id']}")
        v = self._videos_by_id[a["video_id"]]
        where = f"video {v['id']}: annotation {aid}"
        if not _is_int(a.get("category_id")) or a["category_id"] not in self.cat_to_idx:
            raise self._fail(f"{where}: unknown category_id {a.get('category_id')!r}")
        crowd = a.get("iscrowd", 0)
        if not _is_int(crowd) or crowd not in (0, 1):
            raise self._fail(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        for key in ("segmentations", "areas", "bboxes"):
            if key != "segmentations" and key not in a:  # areas and bboxes are optional
                continue
            if not isinstance(a.get(key), list):
                raise self._fail(f"{where}: '{key}' must be a list with one entry per frame")
            if len(a[key]) != v["length"]:
                raise self._fail(f"{where}: {key} has {len(a[key])} entries, expected {v['length']} "
                                 f"(the video length)")
        strings = {t: seg["counts"] for t, seg in enumerate(a["segmentations"])
                   if isinstance(seg, dict) and isinstance(seg.get("counts"), str)}
        totals = dict(zip(strings, _rle_string_totals(list(strings.values()))))
        for t, seg in enumerate(a["segmentations"]):
            problem = _segmentation_problem(seg, v["height"], v["width"], totals.get(t))
            if problem:
                raise self._fail(f"{where}: frame {t}: {problem}")
        for t, area in enumerate(a.get("areas", [])):
            if area is not None and (not _is_number(area) or area < 0):
                raise self._fail(f"{where}: frame {t}: area must be a non-negative number or null, got {area!r}")
        for t, box in enumerate(a.get("bboxes", [])):
            if box is not None and (not isinstance(box, list) or len(box) != 4 or not all(map(_is_number, box))):
                raise self._fail(f"{where}: frame {t}: bbox must be [x, y, w, h] or null, got {box!r}")


def _segmentation_problem(seg: Segmentation, h: int, w: int, string_total: int | None = None) -> str | None:
    """Why ``seg`` is not a valid segmentation of an HxW frame, or None if it is.
    ``string_total``: ``_rle_string_totals`` of its counts string, when already known."""
    if seg is None:
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not isinstance(size, list) or len(size) != 2 or not all(map(_is_int, size)):
            return f"RLE 'size' must be [height, width], got {size!r}"
        if size != [h, w]:
            return f"RLE size {size} differs from the video size [{h}, {w}]"
        if isinstance(counts, str):
            total = string_total if string_total is not None else _rle_string_totals([counts])[0]
            if total is None:
                return "malformed compressed RLE 'counts' string"
        elif isinstance(counts, list) and all(_is_int(n) and n >= 0 for n in counts):
            total = sum(counts)
        else:
            return "RLE 'counts' must be a string or a list of non-negative integers"
        if total != h * w:
            return f"RLE counts cover {total} pixels, expected {h * w} ({h}x{w})"
        return None
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                              and all(map(_is_number, p)) for p in seg):
            return "polygon must be a non-empty list of [x1, y1, x2, y2, x3, y3, ...] lists (use null for absent)"
        return None
    return f"segmentation must be an RLE object, a polygon list or null, got {type(seg).__name__}"


def _to_rle(seg: Segmentation, h: int, w: int) -> dict[str, Any]:
    """A validated segmentation as a compressed pycocotools RLE (counts as bytes)."""
    if isinstance(seg, list):  # polygon parts, unioned
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(seg, h, w)
    return {"size": [h, w], "counts": seg["counts"].encode("ascii")}


# ----------------------------------------------------------------------------- frames
def decode_frame(path_or_bytes: str | os.PathLike | bytes, source: str | os.PathLike | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to uint8 HxWx3 RGB; ``SvisError`` if it cannot be.

    ``source`` names the data in error messages when bytes are given (defaults to the path).
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, name = bytes(path_or_bytes), str(source) if source is not None else "<bytes>"
    else:
        name = str(source if source is not None else path_or_bytes)
        try:
            data = Path(path_or_bytes).read_bytes()
        except FileNotFoundError:
            raise SvisError(f"{name}: frame file missing") from None
        except OSError as e:
            raise SvisError(f"{name}: cannot read frame file: {e.strerror}") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise SvisError(f"{name}: not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _check_frame(path: Path, h: int, w: int) -> None:
    img = decode_frame(path)
    if img.shape[:2] != (h, w):
        raise SvisError(f"{path}: frame is {img.shape[0]}x{img.shape[1]}, the video's size is {h}x{w}")


def check_data(root: str | os.PathLike, ann_path: str | os.PathLike, workers: int = 4) -> dict[str, int]:
    """Validate ``ann_path`` and decode every frame under ``root/JPEGImages``.

    Raises ``SvisError`` for the first bad frame in file order (missing, undecodable, wrong size).
    Returns counts: ``videos, frames, annotations, categories``.
    """
    if workers < 1:
        raise SvisError(f"workers must be at least 1, got {workers}")
    ds = YTVIS.load(ann_path)
    jobs = [(path, v["height"], v["width"]) for v in ds.videos for path in ds.frame_paths(v["id"], root)]
    # cv2.imdecode releases the GIL, so threads decode in parallel; map() re-raises in file order.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(lambda job: _check_frame(*job), jobs):
            pass
    return {"videos": len(ds.videos), "frames": len(jobs),
            "annotations": sum(len(ds.annotations(v["id"])) for v in ds.videos),
            "categories": len(ds.categories)}
