"""The "creatures" demo family: a second synthetic YouTube-VIS dataset with other statistics.

The default family (``svis_ray/data/demo.py``, "shapes") draws rigid geometric shapes in flat
colour families with crisp edges, in 12-frame 96x128 videos, every video with 1-4 objects. The
recipe defaults were tuned there. This family was designed separately so that a default which
only fits that generator shows up as one:

* five soft-bodied classes that *deform* over a video (a worm undulates, a jellyfish pulses, a
  starfish curls its arms, an amoeba changes its outline, a beetle swings its legs), each with
  its own body texture, seen at varying scale;
* appearance drifting over the video: hue drifts by up to +-50 degrees, brightness and texture
  phase change, the scene lighting changes; classes' colour ranges overlap, so colour alone
  does not give the class;
* a hand-held camera: it pans and zooms (0.8-1.25x) over a textured ground with unlabelled
  pebbles in the objects' colours; in a third of the videos an unlabelled frond passes in front
  of the objects;
* variable video lengths (6-36 frames by default, as in YouTube-VIS), 0-4 objects a video (about
  one video in 16 is empty), objects that leave the frame and come back or dive out of sight
  for part of the video (null segmentations on those frames);
* wide 16:9-like frames, 80x144 (H x W) by default.

Deterministic by seed: every video draws from a generator seeded by (seed, split, index), so
the same arguments give byte-identical JSON and JPEG files. Masks are the visible pixels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from svis_ray.data.demo import DESCRIPTION, JPEG_QUALITY, _rgb, prepare_out
from svis_ray.errors import SvisError
from svis_ray.io import write_json

FAMILY = "creatures"
FAMILY_DESCRIPTION = f"{DESCRIPTION} ({FAMILY} family)"
DEFAULT_VIDEOS = 96
DEFAULT_VAL_VIDEOS = 16
DEFAULT_MAX_FRAMES = 36
MIN_FRAMES = 6
DEFAULT_SIZE = (80, 144)  # H x W
EMPTY_VIDEO_RATE = 1 / 16

# (name, hue in degrees, hue spread): the spreads overlap, so colour alone does not give the class.
CATEGORIES = [("worm", 20, 35), ("jellyfish", 300, 40), ("starfish", 40, 35), ("amoeba", 150, 45),
              ("beetle", 240, 40)]


def _body(kind: str, u: np.ndarray, v: np.ndarray, o: dict[str, Any], s: float) -> np.ndarray:
    """Body membership in object coordinates (everything within radius ~1.2), deformed at time s."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    d = o["deform"]
    if kind == "worm":  # a tapered band along an undulating spine
        spine = 0.35 * np.sin(2.6 * u + d["phase"] + 2 * np.pi * d["rate"] * s)
        half = 0.3 * np.sqrt(np.clip(1 - u ** 2, 0, 1)) + 0.04
        return (np.abs(u) <= 1.1) & (np.abs(v - spine) <= half)
    if kind == "jellyfish":  # a pulsing bell over three wavy tentacles
        pulse = 1 + 0.18 * np.sin(2 * np.pi * d["rate"] * s + d["phase"])
        bell = (v <= 0.15) & (np.hypot(u / (0.85 * pulse), (v + 0.1) / (0.75 / pulse)) <= 1)
        wave = 0.12 * np.sin(7 * v - 2 * np.pi * d["rate"] * s)
        tentacles = (v > 0.1) & (v < 1.05) & np.any([np.abs(u - x - wave) <= 0.07 for x in (-0.45, 0, 0.45)], axis=0)
        return bell | tentacles
    if kind == "starfish":  # five arms that curl and uncurl
        curl = d["amp"] * np.sin(2 * np.pi * d["rate"] * s + d["phase"])
        arms = np.cos(5 * (phi - curl * rho))
        return rho <= 0.3 + 0.75 * np.clip(arms, 0, 1) ** 1.5
    if kind == "amoeba":  # an outline of drifting low-frequency harmonics
        r = 0.85 + sum(a * np.cos(k * phi + p + 2 * np.pi * w * s) for k, a, p, w in d["harmonics"])
        return rho <= r
    if kind == "beetle":  # an oval shell, a head, and six legs that swing
        shell = np.hypot(u / 0.8, v / 0.55) <= 1
        head = np.hypot(u - 0.85, v) <= 0.28
        swing = 0.25 * np.sin(2 * np.pi * d["rate"] * s + d["phase"])
        legs = np.zeros_like(shell)
        for i, x in enumerate((-0.45, 0.0, 0.45)):
            for side in (-1, 1):
                tilt = swing * (1 if (i + (side > 0)) % 2 else -1)
                along = side * v - 0.45
                legs |= (along >= 0) & (along <= 0.5) & (np.abs(u - x - tilt * along * 2) <= 0.07)
        return shell | head | legs
    raise ValueError(kind)


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, phase: float, noise: np.ndarray) -> np.ndarray:
    """Per-class body pattern in [0, 1], attached to the body (``noise``: the object's own [H,W] field)."""
    rho = np.hypot(u, v)
    if kind == "worm":  # rings along the body
        return 0.5 + 0.5 * np.sin(11 * u + phase)
    if kind == "jellyfish":  # translucent: bright rim, dim centre, mottled
        return np.clip(0.35 + 0.6 * rho + 0.3 * (noise - 0.5), 0, 1)
    if kind == "starfish":  # dots
        return (np.sin(12 * u + phase) * np.sin(12 * v) > 0.25).astype(np.float32) * 0.8 + 0.2 * noise
    if kind == "amoeba":  # blotches: the object's own noise, thresholded softly
        return np.clip(2.5 * (noise - 0.5) + 0.5 + 0.2 * np.sin(phase), 0, 1)
    shell = np.hypot(u / 0.8, v / 0.55) <= 1  # beetle: a dark seam and bands across the shell
    return np.where(shell & (np.abs(v) > 0.06), 0.6 + 0.4 * np.sin(8 * u + phase), 0.1).astype(np.float32)


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    coarse = rng.random((max(2, h // cells), max(2, w // cells))).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _ground(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """The world the camera films, float32 RGB [h,w,3]: two octaves of coloured noise and
    unlabelled pebbles whose colours may match the creatures'."""
    base = _rgb(rng.uniform(0, 360), rng.uniform(0.15, 0.45), rng.uniform(0.35, 0.7))
    other = _rgb(rng.uniform(0, 360), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.75))
    t = np.clip(0.6 * _value_noise(rng, h, w, 18) + 0.4 * _value_noise(rng, h, w, 5), 0, 1)[..., None]
    canvas = base + (other - base) * t
    for _ in range(rng.integers(4, 12)):
        colour = tuple(float(c) for c in _rgb(rng.uniform(0, 360), rng.uniform(0.2, 0.7), rng.uniform(0.3, 0.9)))
        centre = (int(rng.integers(w)), int(rng.integers(h)))
        axes = (int(rng.integers(2, max(3, h // 10))), int(rng.integers(2, max(3, h // 10))))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    return (canvas + rng.normal(0, 5, canvas.shape)).astype(np.float32)


def _creatures(rng: np.random.Generator, h: int, w: int, pad: int) -> list[dict[str, Any]]:
    """A video's creatures: paths in world coordinates (the ground, ``pad`` pixels around the
    camera's rest position), deformation, appearance and when they dive out of sight."""
    count = 0 if rng.random() < EMPTY_VIDEO_RATE else int(rng.integers(1, 5))
    objs = []
    for _ in range(count):
        cat = int(rng.integers(len(CATEGORIES)))
        kind, hue, spread = CATEGORIES[cat]
        anchor = (rng.uniform(0.2, 0.8, 2) * (w, h)) + pad
        heading = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(heading), np.sin(heading)])
        if rng.random() < 0.5:  # wanders across, maybe out of the frame
            path = {"kind": "line", "travel": rng.uniform(0.1, 0.9) * w * direction, "s_in": rng.uniform(0, 1)}
        else:  # swims to and fro: leaves the frame and comes back when the swing is wide
            path = {"kind": "swing", "amp": rng.uniform(0.15, 0.75) * w * direction,
                    "cycles": rng.uniform(0.5, 1.5), "phase": rng.uniform(0, 2 * np.pi)}
        dive = None
        if rng.random() < 0.3:  # out of sight for a stretch of the video (s in [a, b))
            a = rng.uniform(0.1, 0.7)
            dive = (a, a + rng.uniform(0.12, 0.3))
        objs.append({
            "cat": cat, "kind": kind, "anchor": anchor, "path": path, "dive": dive,
            "radius": rng.uniform(0.17, 0.3) * h, "growth": rng.uniform(-0.5, 0.5),
            "angle": rng.uniform(0, 2 * np.pi), "spin": rng.uniform(-2, 2),
            "deform": {"phase": rng.uniform(0, 2 * np.pi), "rate": rng.uniform(0.6, 2.0),
                       "amp": rng.uniform(0.5, 1.2),
                       "harmonics": [(k, rng.uniform(0.06, 0.2), rng.uniform(0, 2 * np.pi), rng.uniform(-1, 1))
                                     for k in (2, 3, 5)]},
            "hue": hue + rng.uniform(-spread, spread), "hue_drift": rng.uniform(-50, 50),
            "sat": rng.uniform(0.45, 0.9), "bright": rng.uniform(0.5, 1.1, 2),
            "phase": rng.uniform(0, 2 * np.pi), "phase_drift": rng.uniform(-5, 5),
            "noise": _value_noise(rng, 48, 48, 8),
        })
    return objs


def _position(o: dict[str, Any], s: float) -> np.ndarray:
    p = o["path"]
    if p["kind"] == "line":
        return o["anchor"] + p["travel"] * (s - p["s_in"])
    return o["anchor"] + p["amp"] * np.sin(2 * np.pi * p["cycles"] * s + p["phase"])


def _draw(img: np.ndarray, owner: np.ndarray, index: int, o: dict[str, Any], s: float,
          camera: tuple[float, float, float]) -> None:
    """Paint creature ``o`` at time ``s`` as the camera (world x, y of the frame's centre, zoom)
    films it, and mark its pixels in ``owner``."""
    if o["dive"] and o["dive"][0] <= s < o["dive"][1]:
        return
    h, w = owner.shape
    cam_x, cam_y, zoom = camera
    wx, wy = _position(o, s)
    cx, cy = (wx - cam_x) * zoom + w / 2, (wy - cam_y) * zoom + h / 2
    r = o["radius"] * np.exp(o["growth"] * (s - 0.5)) * zoom
    reach = 1.25 * r
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, w)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, h)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    angle = o["angle"] + o["spin"] * s
    u = ((xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)) / r
    v = (-(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)) / r
    inside = _body(o["kind"], u, v, o, s)
    if not inside.any():
        return
    # The object's own noise field, sampled in body coordinates (it moves and turns with the body).
    n = o["noise"]
    iu = np.clip(((u + 1.25) / 2.5 * (n.shape[1] - 1)).astype(int), 0, n.shape[1] - 1)
    iv = np.clip(((v + 1.25) / 2.5 * (n.shape[0] - 1)).astype(int), 0, n.shape[0] - 1)
    tex = _pattern(o["kind"], u, v, o["phase"] + o["phase_drift"] * s, n[iv, iu])[..., None]
    hue = o["hue"] + o["hue_drift"] * s
    bright = o["bright"][0] + (o["bright"][1] - o["bright"][0]) * s
    light = _rgb(hue, o["sat"], min(1.0, 0.95 * bright))
    dark = _rgb(hue - 30, min(1.0, 1.1 * o["sat"]), 0.4 * bright)
    img[y0:y1, x0:x1][inside] = (dark + (light - dark) * tex)[inside]
    owner[y0:y1, x0:x1][inside] = index


def _frond(rng: np.random.Generator, h: int, w: int) -> dict[str, Any] | None:
    """An unlabelled plant stalk in front of the creatures (a third of the videos)."""
    if rng.random() >= 1 / 3:
        return None
    return {"x": rng.uniform(0.1, 0.9) * w, "drift": rng.uniform(-0.5, 0.5) * w, "width": rng.uniform(0.03, 0.07) * w,
            "sway": rng.uniform(0.02, 0.08) * w, "colour": _rgb(rng.uniform(70, 140), rng.uniform(0.4, 0.8), 0.45)}


def _draw_frond(img: np.ndarray, owner: np.ndarray, f: dict[str, Any], s: float) -> None:
    h, w = owner.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    centre = f["x"] + f["drift"] * s + f["sway"] * np.sin(ys / h * 3 + 4 * s)
    stalk = np.abs(xs - centre) <= f["width"] * (0.6 + 0.4 * ys / h)
    img[stalk] = f["colour"] * (0.8 + 0.2 * np.sin(ys[stalk] / 3))[:, None]
    owner[stalk] = -1


def _write_video(root: Path, name: str, rng: np.random.Generator, frames: int, h: int, w: int
                 ) -> list[dict[str, Any]]:
    """Render one video to ``root/JPEGImages/name``; returns the tracks visible at least once."""
    pad = round(0.35 * max(h, w))
    ground = _ground(rng, h + 2 * pad, w + 2 * pad)
    objs = _creatures(rng, h, w, pad)
    frond = _frond(rng, h, w)
    # Camera: the frame's centre in world coordinates and a zoom, at the start and end (a pan),
    # plus a shake; the world is big enough that a zoomed-out frame stays inside it.
    rest = np.array([w / 2 + pad, h / 2 + pad])
    start, end = rest + rng.uniform(-0.3, 0.3, (2, 2)) * pad
    zooms = rng.uniform(0.8, 1.25, 2)
    shake = rng.uniform(0, 0.02) * w
    gain = rng.uniform(0.65, 1.25, 2)
    tracks = [{"cat": o["cat"], "segmentations": [], "areas": [], "bboxes": []} for o in objs]
    (root / "JPEGImages" / name).mkdir(parents=True)
    for t in range(frames):
        s = t / max(frames - 1, 1)
        cam_x, cam_y = start + (end - start) * s + rng.normal(0, shake + 1e-6, 2)
        zoom = zooms[0] + (zooms[1] - zooms[0]) * s
        # frame pixel (x, y) shows world point ((x - w/2) / zoom + cam_x, (y - h/2) / zoom + cam_y)
        warp = np.array([[1 / zoom, 0, cam_x - w / 2 / zoom], [0, 1 / zoom, cam_y - h / 2 / zoom]], np.float32)
        img = cv2.warpAffine(ground, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT)
        owner = np.full((h, w), -1, np.int16)
        for i, o in enumerate(objs):  # list order is the depth order
            _draw(img, owner, i, o, s, (cam_x, cam_y, zoom))
        if frond:
            _draw_frond(img, owner, frond, s)
        light = (gain[0] + (gain[1] - gain[0]) * s) * rng.uniform(0.94, 1.06)
        img = np.clip(img * light + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        path = root / "JPEGImages" / name / f"{t:05d}.jpg"
        if not cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise SvisError(f"{path}: cannot write frame")
        for i, track in enumerate(tracks):
            visible = owner == i
            if visible.sum() < 4:  # a sliver at the frame's edge or around the frond is no object
                track["segmentations"].append(None)
                track["areas"].append(None)
                track["bboxes"].append(None)
                continue
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            track["segmentations"].append({"size": [h, w], "counts": rle["counts"].decode("ascii")})
            track["areas"].append(int(mask_utils.area(rle)))
            track["bboxes"].append([float(x) for x in mask_utils.toBbox(rle)])
    return [tr for tr in tracks if any(seg is not None for seg in tr["segmentations"])]


def make_creatures_data(out: str | os.PathLike, videos: int | None = None, frames: int | None = None,
                        size: tuple[int, int] | None = None, seed: int = 0, val_videos: int | None = None
                        ) -> dict[str, Any]:
    """Write the creatures family to ``out`` (defaults: 96 train + 16 val videos of 6-36 frames,
    80x144); ``frames`` is the longest video (lengths are drawn from ``[min(6, frames), frames]``).

    ``out`` must be empty, missing, or hold an earlier demo dataset of any family (replaced).
    Returns ``train_videos, val_videos, frames`` (the longest), ``size`` (H, W), ``instances``,
    ``categories``, ``total_frames`` and ``empty_videos``.
    """
    out = Path(out)
    videos = DEFAULT_VIDEOS if videos is None else videos
    val_videos = DEFAULT_VAL_VIDEOS if val_videos is None else val_videos
    frames = DEFAULT_MAX_FRAMES if frames is None else frames
    h, w = DEFAULT_SIZE if size is None else size
    prepare_out(out, videos, val_videos, frames, h, w, seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "creature"} for i, (name, _, _) in enumerate(CATEGORIES)]
    next_video, next_ann, instances, total_frames, empty = 1, 1, 0, 0, 0
    splits = {}
    for split, count in (("train", videos), ("val", val_videos)):
        data: dict[str, Any] = {"info": {"description": FAMILY_DESCRIPTION, "family": FAMILY, "split": split,
                                         "seed": seed}, "videos": [], "annotations": [], "categories": categories}
        for i in range(count):
            name = f"{split}_{i:05d}"
            # One generator per video (the family's name in the seed: another family's video
            # with the same index shares nothing with this one).
            rng = np.random.default_rng([seed, split == "val", i, 0xC8EA])
            length = int(rng.integers(min(MIN_FRAMES, frames), frames + 1))
            tracks = _write_video(out, name, rng, length, h, w)
            data["videos"].append({"id": next_video, "width": w, "height": h, "length": length,
                                   "file_names": [f"{name}/{t:05d}.jpg" for t in range(length)]})
            for tr in tracks:
                data["annotations"].append({"id": next_ann, "video_id": next_video,
                                            "category_id": tr["cat"] + 1, "iscrowd": 0, "height": h, "width": w,
                                            "segmentations": tr["segmentations"], "areas": tr["areas"],
                                            "bboxes": tr["bboxes"]})
                next_ann += 1
            instances += len(tracks)
            total_frames += length
            empty += not tracks
            next_video += 1
        splits[split] = data
    write_json(out / "val.json", splits["val"])
    write_json(out / "train.json", splits["train"])  # last: its presence means the dataset is complete
    return {"train_videos": videos, "val_videos": val_videos, "frames": frames, "size": (h, w),
            "instances": instances, "categories": len(categories), "total_frames": total_frames,
            "empty_videos": empty}
