"""The built-in synthetic demo dataset, in the YouTube-VIS 2019 layout.

``make_demo_data(out)`` writes ``out/JPEGImages/<video>/<t:05d>.jpg``, ``out/train.json`` and
``out/val.json`` (held-out videos, full annotations, ids disjoint from train's). Six object
categories differ in shape, colour family and texture. Each video has a textured, slowly
panning background and 1-4 objects that move, rotate, tilt out of the image plane, grow or
shrink (up to ~1.7x between the middle and the ends of a video), enter and leave the frame and
occlude each other (fixed depth order). Appearance changes over a video as in real footage
(object hue and brightness, texture phase, scene lighting, motion blur in half the videos), so
the one labelled middle frame does not show all a class can look like.
Masks are the visible pixels; an instance out of frame or fully occluded is null on that frame.

Everything is drawn relative to the frame size and from generators seeded by
(seed, split, video index): the same arguments give byte-identical JSON and JPEG files, and
frames are written video by video (nothing is held beyond one video's annotations).
"""
from __future__ import annotations

import colorsys
import json
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from svis_ray.errors import SvisError
from svis_ray.io import write_json

DEFAULT_VIDEOS = 96
DEFAULT_VAL_VIDEOS = 16
DEFAULT_FRAMES = 12
DEFAULT_SIZE = (96, 128)  # H x W
JPEG_QUALITY = 90
DESCRIPTION = "svis-ray synthetic demo dataset"  # marks a folder make_demo_data may overwrite

# (name, hue in degrees): each shape has its own colour family and texture (see _texture).
CATEGORIES = [("disk", 0), ("square", 220), ("triangle", 120), ("star", 50), ("ring", 285), ("cross", 180)]


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape membership in object coordinates (unit circumradius: everything within rho <= 1)."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "disk":
        return rho <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.7
    if shape == "triangle":  # three half-planes, inradius 0.5
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.5 for a in np.radians([90, 210, 330])], axis=0)
    if shape == "star":
        return rho <= 0.4 + 0.6 * ((1 + np.cos(5 * phi)) / 2) ** 2
    if shape == "ring":
        return (rho >= 0.55) & (rho <= 1.0)
    if shape == "cross":
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.92))
    raise ValueError(shape)


def _texture(shape: str, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    """Per-class surface pattern in [0, 1], attached to the object; ``phase`` drifts over the video."""
    rho = np.hypot(u, v)
    if shape == "disk":  # shaded sphere
        return np.clip(1.0 - 0.8 * np.hypot(u + 0.3 * np.cos(phase), v + 0.3 * np.sin(phase)) ** 2, 0, 1)
    if shape == "square":  # checkerboard
        return (np.sin(5 * u + phase) * np.sin(5 * v) > 0).astype(np.float32)
    if shape == "triangle":  # stripes
        return 0.5 + 0.5 * np.sin(10 * u + phase)
    if shape == "star":  # spots
        return (np.cos(9 * u + phase) * np.cos(9 * v) > 0.3).astype(np.float32)
    if shape == "ring":  # concentric bands
        return 0.5 + 0.5 * np.sin(16 * rho + phase)
    return 0.5 + 0.5 * np.sin(8 * (u + v) + phase)  # cross: diagonal stripes


def _rgb(hue_deg: float, sat: float, val: float) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb((hue_deg / 360) % 1.0, sat, val), np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured canvas larger than the frame (the camera pans over it), float32 RGB."""
    kind = rng.integers(3)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # Muted colours, so objects stand out by saturation but backgrounds can share their hues.
    a, b = (0.5 * rng.uniform(30, 225, 3) + 0.5 * rng.uniform(60, 190) for _ in range(2))
    if kind == 0:  # smooth noise
        coarse = rng.random((max(2, h // 14), max(2, w // 14), 1)).astype(np.float32)
        t = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    elif kind == 1:  # stripes at a random angle and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3) * min(h, w)
        t = (0.5 + 0.5 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period))[..., None]
    else:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        proj = xs * np.cos(angle) + ys * np.sin(angle)
        t = ((proj - proj.min()) / (np.ptp(proj) + 1e-6))[..., None]
    canvas = a + (b - a) * np.clip(t, 0, 1)
    return (canvas + rng.normal(0, 6, canvas.shape)).astype(np.float32)


def _objects(rng: np.random.Generator, h: int, w: int) -> list[dict[str, Any]]:
    """Trajectories and appearance of a video's objects, as functions of s = t / (frames - 1)."""
    objs = []
    for _ in range(rng.integers(1, 5)):
        cat = int(rng.integers(len(CATEGORIES)))
        # A straight path through a point well inside the frame, passed at a random time s_in:
        # long paths enter or leave the frame, yet each object is inside it around s_in.
        s_in, anchor = rng.uniform(0, 1), rng.uniform(0.15, 0.85, 2) * (w, h)
        heading = rng.uniform(0, 2 * np.pi)
        travel = rng.uniform(0.2, 1.4) * np.array([np.cos(heading), np.sin(heading)]) * (w, h)
        p0 = anchor - travel * s_in
        objs.append({
            "cat": cat, "p0": p0, "p1": p0 + travel,
            "wobble": rng.uniform(0, 0.06) * min(h, w), "wobble_phase": rng.uniform(0, 2 * np.pi),
            # Scale: up to ~1.7x larger or smaller at the ends of the video than in the middle.
            "radius": rng.uniform(0.12, 0.22) * min(h, w), "growth": rng.choice([-1, 1]) * rng.uniform(0.3, 1.1),
            "angle": rng.uniform(0, 2 * np.pi), "spin": rng.uniform(-np.pi, np.pi),
            # Viewpoint: the object tilts out of the image plane (foreshortened along one axis).
            "tilt": rng.uniform(0, np.pi), "tilt_rate": rng.choice([-1, 1]) * rng.uniform(0.5, 2.0),
            "hue": CATEGORIES[cat][1] + rng.uniform(-12, 12), "hue_drift": rng.uniform(-40, 40),
            "sat": rng.uniform(0.6, 0.95), "bright": rng.uniform(0.45, 1.3, 2),
            "phase": rng.uniform(0, 2 * np.pi), "phase_drift": rng.uniform(-4, 4),
        })
    return objs


def _draw(img: np.ndarray, owner: np.ndarray, index: int, o: dict[str, Any], s: float) -> None:
    """Paint object ``o`` at time ``s`` over ``img`` and mark its pixels in ``owner``."""
    h, w = owner.shape
    direction = o["p1"] - o["p0"]
    normal = np.array([-direction[1], direction[0]]) / (np.hypot(*direction) + 1e-6)
    cx, cy = o["p0"] + direction * s + normal * o["wobble"] * np.sin(2 * np.pi * s + o["wobble_phase"])
    r = min(o["radius"] * np.exp(o["growth"] * (s - 0.5)), 0.45 * min(h, w))
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
    angle = o["angle"] + o["spin"] * s
    u = ((xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)) / r
    squash = 0.5 + 0.5 * abs(np.cos(o["tilt"] + o["tilt_rate"] * s))  # 1 = facing the camera
    v = (-(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)) / (r * squash)
    shape = CATEGORIES[o["cat"]][0]
    inside = _inside(shape, u, v)
    hue, bright = o["hue"] + o["hue_drift"] * s, o["bright"][0] + (o["bright"][1] - o["bright"][0]) * s
    light = _rgb(hue, o["sat"], min(1.0, 0.9 * bright))
    dark = _rgb(hue + 25, 0.6 * o["sat"], 0.5 * bright)
    tex = _texture(shape, u, v, o["phase"] + o["phase_drift"] * s)[..., None]
    img[y0:y1, x0:x1][inside] = (dark + (light - dark) * tex)[inside]
    owner[y0:y1, x0:x1][inside] = index


def _motion_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    length = 2 * int(rng.integers(1, 5) * max(1, min(img.shape[:2]) // 96)) + 1
    kernel = np.zeros((length, length), np.float32)
    angle, c = rng.uniform(0, np.pi), length // 2
    dx, dy = c * np.cos(angle), c * np.sin(angle)
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
    return cv2.filter2D(img, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)


def _write_video(root: Path, name: str, rng: np.random.Generator, frames: int, h: int, w: int
                 ) -> list[dict[str, Any]]:
    """Render one video's frames to ``root/JPEGImages/name``; returns its instance tracks
    (``cat``, ``segmentations``, ``areas``, ``bboxes``), only those visible at least once."""
    pad = round(0.15 * max(h, w))
    canvas = _background(rng, h + 2 * pad, w + 2 * pad)
    pan = rng.integers(0, 2 * pad + 1, (2, 2))  # start and end offsets (y, x)
    objs = _objects(rng, h, w)
    blurry = rng.random() < 0.5
    # Scene lighting changes over the video (clouds, auto-exposure): a gain from start to end.
    gain = rng.uniform(0.6, 1.3, 2)
    tracks = [{"cat": o["cat"], "segmentations": [], "areas": [], "bboxes": []} for o in objs]
    (root / "JPEGImages" / name).mkdir(parents=True)
    for t in range(frames):
        s = t / max(frames - 1, 1)
        oy, ox = np.round(pan[0] + (pan[1] - pan[0]) * s).astype(int)
        img = canvas[oy:oy + h, ox:ox + w].copy()
        owner = np.full((h, w), -1, np.int16)
        for i, o in enumerate(objs):  # list order is the depth order: later objects in front
            _draw(img, owner, i, o, s)
        if blurry and rng.random() < 0.5:
            img = _motion_blur(img, rng)
        light = (gain[0] + (gain[1] - gain[0]) * s) * rng.uniform(0.92, 1.08)
        img = np.clip(img * light + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        path = root / "JPEGImages" / name / f"{t:05d}.jpg"
        if not cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise SvisError(f"{path}: cannot write frame")
        for i, track in enumerate(tracks):
            visible = owner == i
            if not visible.any():
                track["segmentations"].append(None)
                track["areas"].append(None)
                track["bboxes"].append(None)
                continue
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            track["segmentations"].append({"size": [h, w], "counts": rle["counts"].decode("ascii")})
            track["areas"].append(int(mask_utils.area(rle)))
            track["bboxes"].append([float(x) for x in mask_utils.toBbox(rle)])
    return [tr for tr in tracks if any(seg is not None for seg in tr["segmentations"])]


def _is_demo(out: Path) -> bool:
    """Whether ``out`` holds a demo dataset of any family (their descriptions start with ours)."""
    try:
        with open(out / "train.json") as f:
            return str(json.load(f).get("info", {}).get("description", "")).startswith(DESCRIPTION)
    except (OSError, ValueError, AttributeError):
        return False


def prepare_out(out: Path, videos: int, val_videos: int, frames: int, h: int, w: int, seed: int) -> None:
    """Check a generator's arguments and empty ``out`` of an earlier demo dataset (any family);
    ``SvisError`` naming ``out`` for bad arguments or a folder holding anything else."""
    if videos < 1 or val_videos < 1 or frames < 1:
        raise SvisError(f"{out}: need at least 1 train video, 1 val video and 1 frame per video, "
                        f"got {videos}, {val_videos} and {frames}")
    if h < 32 or w < 32:
        raise SvisError(f"{out}: frame size must be at least 32x32, got {h}x{w}")
    if seed < 0:
        raise SvisError(f"{out}: seed must be non-negative, got {seed}")
    if out.exists() and not out.is_dir():
        raise SvisError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not _is_demo(out):
            raise SvisError(f"{out}: folder is not empty and holds no svis-ray demo dataset; "
                            f"refusing to overwrite it")
        for name in ("train.json", "val.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "JPEGImages", ignore_errors=True)


def make_demo_data(out: str | os.PathLike, videos: int | None = None, frames: int | None = None,
                   size: tuple[int, int] | None = None, seed: int = 0, val_videos: int | None = None
                   ) -> dict[str, Any]:
    """Write the demo dataset to ``out`` (defaults: 96 train + 16 val videos of 12 frames, 96x128).

    ``out`` must be empty, missing, or hold a previous demo dataset, whose ``JPEGImages/``,
    ``train.json`` and ``val.json`` are then replaced (other files there are left alone).
    Returns ``train_videos, val_videos, frames, size (H, W), instances`` (train + val) and
    ``categories``.
    """
    out = Path(out)
    videos = DEFAULT_VIDEOS if videos is None else videos
    val_videos = DEFAULT_VAL_VIDEOS if val_videos is None else val_videos
    frames = DEFAULT_FRAMES if frames is None else frames
    h, w = DEFAULT_SIZE if size is None else size
    prepare_out(out, videos, val_videos, frames, h, w, seed)

    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, (name, _) in enumerate(CATEGORIES)]
    next_video, next_ann, instances = 1, 1, 0
    splits = {}
    for split, count in (("train", videos), ("val", val_videos)):
        data: dict[str, Any] = {"info": {"description": DESCRIPTION, "split": split, "seed": seed},
                                "videos": [], "annotations": [], "categories": categories}
        for i in range(count):
            name = f"{split}_{i:05d}"
            # One generator per video: a video never depends on how many others are made.
            rng = np.random.default_rng([seed, split == "val", i])
            tracks = _write_video(out, name, rng, frames, h, w)
            data["videos"].append({"id": next_video, "width": w, "height": h, "length": frames,
                                   "file_names": [f"{name}/{t:05d}.jpg" for t in range(frames)]})
            for tr in tracks:
                data["annotations"].append({"id": next_ann, "video_id": next_video,
                                            "category_id": tr["cat"] + 1, "iscrowd": 0, "height": h, "width": w,
                                            "segmentations": tr["segmentations"], "areas": tr["areas"],
                                            "bboxes": tr["bboxes"]})
                next_ann += 1
            instances += len(tracks)
            next_video += 1
        splits[split] = data
    # train.json last: its presence means the dataset is complete.
    write_json(out / "val.json", splits["val"])
    write_json(out / "train.json", splits["train"])
    return {"train_videos": videos, "val_videos": val_videos, "frames": frames, "size": (h, w),
            "instances": instances, "categories": len(categories)}
