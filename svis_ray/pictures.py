"""Pictures of tracks that a person can read.

Every object is drawn as a translucent fill with a solid contour in its own colour, so the
object stays visible under its prediction, and carries a label (``#id class score``) placed by a
greedy search that keeps labels off each other and, for small or thin masks, outside the mask
with a leader line. A predicted track keeps one colour across frames; a track matched to a
ground-truth object takes that object's colour, so a ground-truth row drawn above the prediction
row shows at a glance what was found, missed or confused.

    draw_masks           one frame, any masks with colours and labels (the primitive)
    draw_tracks          one frame of tracks (results.json RLEs), coloured by track id
    tracks_picture       rows of frames: per video a ground-truth row, then the prediction row
                         (demo tracks.png, TensorBoard at every evaluation via render_eval_picture)
    pseudo_label_picture a video's pseudo-labels, each marked correct or by its kind of mistake
"""
from __future__ import annotations

import colorsys
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

FONT = cv2.FONT_HERSHEY_SIMPLEX
ALPHA = 0.4  # fill opacity: the object's own texture stays visible under its mask


def colour(i: int) -> tuple[int, int, int]:
    """A distinct RGB colour per id (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


# ----------------------------------------------------------------------------- one frame
def _text_size(text: str, font: float) -> tuple[int, int]:
    (w, h), base = cv2.getTextSize(text, FONT, font, 1)
    return w + 4, h + base + 3  # with a 2-pixel margin


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0, w) * max(0, h)


def main_part(mask: np.ndarray) -> np.ndarray:
    """The largest connected piece of a mask (what its label points at)."""
    n, parts, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return mask if n <= 2 else parts == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _place(mask: np.ndarray, size: tuple[int, int], taken: list[tuple[int, int, int, int]],
           covered: np.ndarray, shape: tuple[int, int]) -> tuple[tuple[int, int, int, int], bool]:
    """Box (x0, y0, x1, y1) for one label and whether it sits on its own mask.

    Inside the mask when the box centred on the mask's (largest piece's) centre lies on it (a
    large object); otherwise the cheapest spot in rings around that piece's bounding box. Cost:
    overlap with labels already placed (avoided above all), then pixels of objects covered, then
    distance from the piece's centre."""
    H, W = shape
    tw, th = size
    ys, xs = np.nonzero(main_part(mask))
    cx, cy = int(xs.mean()), int(ys.mean())
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1

    def box(x: int, y: int) -> tuple[int, int, int, int]:
        x, y = int(np.clip(x, 0, max(0, W - tw))), int(np.clip(y, 0, max(0, H - th)))
        return x, y, x + tw, y + th

    inside = box(cx - tw // 2, cy - th // 2)
    fits = mask[inside[1]:inside[3], inside[0]:inside[2]].mean() >= 0.8
    candidates = [(inside, True)] if fits else []
    for k in range(4):  # rings around the bounding box
        d = 2 + k * (th + 2)
        candidates += [(box(cx - tw // 2, y0 - th - d), False), (box(cx - tw // 2, y1 + d), False),
                       (box(x1 + d, cy - th // 2), False), (box(x0 - tw - d, cy - th // 2), False),
                       (box(x1 + d, y0 - th - d), False), (box(x0 - tw - d, y0 - th - d), False),
                       (box(x1 + d, y1 + d), False), (box(x0 - tw - d, y1 + d), False)]

    def cost(c: tuple[tuple[int, int, int, int], bool]) -> float:
        (bx0, by0, bx1, by1), on_mask = c
        region = covered[by0:by1, bx0:bx1].astype(np.int32) - (mask[by0:by1, bx0:bx1] if on_mask else 0)
        dist = np.hypot((bx0 + bx1) / 2 - cx, (by0 + by1) / 2 - cy)
        return 1e6 * sum(_overlap(c[0], t) for t in taken) + region.clip(0).sum() + 2.0 * dist

    return min(candidates, key=cost)  # ties: the earlier (closer) candidate


def place_labels(masks: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                 taken: list[tuple[int, int, int, int]] | None = None) -> list[tuple[tuple[int, int, int, int], bool]]:
    """Greedy label placement: per mask (bool [H,W], non-empty) a box (x0, y0, x1, y1) of its label's
    size (w, h) and whether it lies on the mask; larger masks choose first, and every box avoids
    the boxes already placed and those in ``taken`` (which is extended)."""
    taken = [] if taken is None else taken
    covered = np.sum(masks, axis=0) if len(masks) else None
    out: list[Any] = [None] * len(masks)
    for i in sorted(range(len(masks)), key=lambda i: -masks[i].sum()):
        out[i] = _place(masks[i], sizes[i], taken, covered, masks[i].shape)
        taken.append(out[i][0])
    return out


def draw_masks(img: np.ndarray, items: Sequence[tuple[np.ndarray, tuple[int, int, int], str]],
               scale: int = 1, caption: str | None = None) -> np.ndarray:
    """``img`` (uint8 RGB [H,W,3]) with each item's mask filled translucently in its colour,
    outlined, and labelled without overlaps. items: (mask bool [H,W], RGB colour, label text;
    "" = no label). ``scale`` enlarges the frame first (nearest), so contours and labels stay
    legible on small frames. ``caption`` is written in the top-left corner. Returns [sH,sW,3]."""
    out = img if scale == 1 else cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    out = out.astype(np.float32)
    masks = [(cv2.resize(m.astype(np.uint8), (out.shape[1], out.shape[0]), interpolation=cv2.INTER_NEAREST)
              .astype(bool), c, t) for m, c, t in items if m is not None and m.any()]
    for m, c, _ in masks:
        out[m] = (1 - ALPHA) * out[m] + ALPHA * np.array(c, np.float32)
    out8 = np.ascontiguousarray(out.clip(0, 255).astype(np.uint8))
    H, W = out8.shape[:2]
    thick = max(1, round(min(H, W) / 120))
    for m, c, _ in masks:
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out8, contours, -1, c, thick, cv2.LINE_8)  # solid: no blending with the frame

    font = max(0.35, min(H, W) / 900)
    taken: list[tuple[int, int, int, int]] = []
    if caption:
        tw, th = _text_size(caption, font)
        taken.append((0, 0, tw, th))
        cv2.rectangle(out8, (0, 0), (tw, th), (0, 0, 0), -1)
        cv2.putText(out8, caption, (2, th - 4), FONT, font, (255, 255, 255), 1, cv2.LINE_AA)
    named = [(m, c, text) for m, c, text in masks if text]
    places = place_labels([m for m, _, _ in named], [_text_size(t, font) for _, _, t in named], taken)
    labels = [(b, on_mask, m, c, text) for (b, on_mask), (m, c, text) in zip(places, named)]
    for (x0, y0, x1, y1), on_mask, m, c, _ in labels:  # leader lines under every label box
        if not on_mask:
            ys, xs = np.nonzero(main_part(m))
            bx, by = (x0 + x1) / 2, (y0 + y1) / 2
            k = int(np.argmin((xs - bx) ** 2 + (ys - by) ** 2))
            end = (int(np.clip(xs[k], x0, x1 - 1)), int(np.clip(ys[k], y0, y1 - 1)))
            cv2.line(out8, end, (int(xs[k]), int(ys[k])), c, 1, cv2.LINE_AA)
    for (x0, y0, x1, y1), _, _, c, text in labels:
        ink = (0, 0, 0) if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 else (255, 255, 255)
        cv2.rectangle(out8, (x0, y0), (x1 - 1, y1 - 1), c, -1)
        cv2.putText(out8, text, (x0 + 2, y1 - 4), FONT, font, ink, 1, cv2.LINE_AA)
    return out8


def decode_rle(rle: dict | None) -> np.ndarray | None:
    return mask_utils.decode(rle).astype(bool) if rle else None


def draw_tracks(img: np.ndarray, tracks: Iterable[tuple[int, str, float | None, dict | None]], scale: int = 1,
                colour_of: Callable[[int], tuple[int, int, int]] = colour, caption: str | None = None) -> np.ndarray:
    """One frame of tracks: (id, class name, score or None for ground truth, this frame's RLE or
    None). Labels read ``#id class score``; ``colour_of(id)`` gives the colour (stable per id)."""
    items = [(decode_rle(rle), colour_of(k), f"#{k} {name} {score:.2f}" if score is not None else name)
             for k, name, score, rle in tracks]
    return draw_masks(img, items, scale=scale, caption=caption)


# ----------------------------------------------------------------------------- rows of frames
def match_tracks(pred: Sequence[Sequence[dict | None]], gt: Sequence[Sequence[dict | None]],
                 min_iou: float = 0.1) -> dict[int, int]:
    """Predicted track index -> ground-truth object index, one to one, by video-level mask IoU
    (intersections and unions summed over frames, as the YouTube-VIS metric does).
    pred, gt: per track, an RLE or None per frame."""
    if not pred or not gt:
        return {}
    iou = np.zeros((len(pred), len(gt)))
    for t in range(len(pred[0])):
        p = [(i, r) for i, r in enumerate(s[t] for s in pred) if r]
        g = [(j, r) for j, r in enumerate(s[t] for s in gt) if r]
        for i, rp in p:
            for j, rg in g:
                iou[i, j] += mask_utils.area(mask_utils.merge([rp, rg], intersect=True))
    area_p = np.array([sum(mask_utils.area(r) for r in s if r) for s in pred], float)
    area_g = np.array([sum(mask_utils.area(r) for r in s if r) for s in gt], float)
    iou = iou / np.maximum(area_p[:, None] + area_g[None] - iou, 1)
    rows, cols = linear_sum_assignment(-iou)
    return {int(i): int(j) for i, j in zip(rows, cols) if iou[i, j] >= min_iou}


def tracks_picture(frames: Callable[[int], np.ndarray], length: int, pred: list[dict[str, Any]],
                   gt: list[dict[str, Any]] | None, max_frames: int = 6, scale: int = 2,
                   title: str = "") -> np.ndarray:
    """One video as rows of frames: the ground-truth row (when ``gt`` is given) above the
    prediction row. frames(t) -> uint8 RGB frame t. pred, gt: ``{"id", "class", "score" (None for
    ground truth), "segmentations": [RLE or None per frame]}``. Matched tracks share colours."""
    match = match_tracks([p["segmentations"] for p in pred], [g["segmentations"] for g in gt]) if gt else {}
    first_free = len(gt or [])

    def pred_colour(k: int) -> tuple[int, int, int]:
        i = next(i for i, p in enumerate(pred) if p["id"] == k)
        return colour(match[i]) if i in match else colour(first_free + i)

    picks = np.linspace(0, length - 1, min(max_frames, length)).round().astype(int)
    rows = []
    for kind, tracks, colour_of in ([("ground truth", gt, colour)] if gt else []) + [("prediction", pred, pred_colour)]:
        tiles = []
        for n, t in enumerate(picks):
            caption = f"{title} {kind} t={t}" if n == 0 else f"t={t}"
            tiles.append(draw_tracks(frames(int(t)), [(k["id"], k["class"], k["score"], k["segmentations"][t])
                                                      for k in tracks], scale, colour_of, caption.strip()))
        rows.append(np.concatenate(tiles, axis=1))
    return stack(rows, gap=2)


def stack(rows: list[np.ndarray], gap: int = 6, fill: int = 255) -> np.ndarray:
    """Images on top of each other, left-aligned, ``gap`` pixels apart."""
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=fill) for r in rows]
    return np.concatenate(padded)[:-gap] if gap else np.concatenate(padded)


def gt_tracks(split: Any, video_id: int) -> list[dict[str, Any]]:
    """A video's ground-truth objects in the picture functions' track form."""
    video = split.video(video_id)
    objects: dict[int, dict[str, Any]] = {}
    for t in range(video["length"]):
        for a in split.annotations_on_frame(video_id, t):
            o = objects.setdefault(a["id"], {"id": len(objects), "class": split.class_names[a["label"]],
                                             "score": None, "segmentations": [None] * video["length"]})
            o["segmentations"][t] = a["rle"]
    return list(objects.values())


def render_eval_picture(split: Any, root: str, records: list[dict[str, Any]], videos: int = 3,
                        max_frames: int = 6, min_score: float = 0.3, scale: int = 2) -> np.ndarray:
    """An evaluation's picture (uint8 RGB [H,W,3]): for the first ``videos`` videos of ``split``
    (a YTVIS with annotations), the ground-truth row above the row of the predicted tracks in
    ``records`` (results.json form) with score >= ``min_score``. Written as the demo's tracks.png
    and, at every evaluation, to TensorBoard (``eval/tracks``)."""
    from svis_ray.data.ingest import read_bytes, resolve
    from svis_ray.data.ytvis import decode_frame

    pictures = []
    for video in split.videos[:videos]:
        mine = sorted((r for r in records if r["video_id"] == video["id"] and r["score"] >= min_score),
                      key=lambda r: -r["score"])
        pred = [{"id": k, "class": split.class_names[split.cat_to_idx[r["category_id"]]], "score": r["score"],
                 "segmentations": r["segmentations"]} for k, r in enumerate(mine)]
        paths = [resolve(root, "JPEGImages/" + name) for name in video["file_names"]]

        def frame(t: int, paths: list[str] = paths) -> np.ndarray:
            return decode_frame(read_bytes(paths[t]), source=paths[t])

        gt = gt_tracks(split, video["id"]) if split.has_annotations else None
        pictures.append(tracks_picture(frame, video["length"], pred, gt, max_frames, scale, f"video {video['id']}"))
    return stack(pictures, gap=8)


def write_png(path: Any, img: np.ndarray) -> Any:
    """Write uint8 RGB ``img`` as a PNG, atomically."""
    from svis_ray.io import write_bytes

    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    write_bytes(path, buf.tobytes())  # a local path or a URI
    return path


# ----------------------------------------------------------------------------- pseudo-labels
# Verdict of a pseudo-label against the frame's full annotation (svis-ray pseudo-quality) -> colour.
GT_COLOUR = (255, 255, 255)  # the gallery's ground truth: neutral, so it never reads as a verdict
VERDICT_COLOURS = {"correct": (40, 200, 60), "duplicate": (200, 60, 255), "wrong_class": (255, 200, 0),
                   "poor_mask": (255, 120, 0), "background": (230, 30, 30)}


def pseudo_label_picture(frames: list[tuple[int, np.ndarray, list[tuple[np.ndarray, str]],
                                            list[tuple[np.ndarray, str, float, bool, str]]]],
                         title: str, scale: int = 2) -> np.ndarray:
    """One video's pseudo-labels, each marked by its verdict, under the frames' ground truth.

    frames: (t, image uint8 RGB [H,W,3], ground truth [(mask bool [H,W], class)], pseudo-labels
    [(mask, class, score, anchored, verdict)]); verdicts are ``VERDICT_COLOURS`` keys. Columns are
    frames; the top row is the ground truth (never seen in training, drawn in white), the bottom
    row the pseudo-labels, coloured by verdict and labelled ``class score verdict`` (``A`` =
    anchored)."""
    gt_row, pl_row = [], []
    for n, (t, image, gt, labels) in enumerate(frames):
        first = f"{title} ground truth t={t}" if n == 0 else f"t={t}"
        gt_row.append(draw_masks(image, [(m, GT_COLOUR, name) for m, name in gt], scale, first))
        items = [(m, VERDICT_COLOURS.get(v, (128, 128, 128)),
                  f"{name} {score:.2f}{' A' if anchored else ''} {v.replace('_', ' ')}")
                 for m, name, score, anchored, v in labels]
        pl_row.append(draw_masks(image, items, scale, "pseudo-labels" if n == 0 else None))
    return stack([legend(sum(r.shape[1] for r in gt_row)), np.concatenate(gt_row, axis=1),
                  np.concatenate(pl_row, axis=1)], gap=2)


def legend(width: int) -> np.ndarray:
    """A strip naming the verdict colours."""
    strip = np.full((18, max(width, 1), 3), 255, np.uint8)
    x = 4
    for name, c in VERDICT_COLOURS.items():
        cv2.rectangle(strip, (x, 4), (x + 10, 14), c, -1)
        cv2.putText(strip, name.replace("_", " "), (x + 14, 13), FONT, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        x += 24 + _text_size(name, 0.38)[0]
    cv2.putText(strip, "A = anchored", (x, 13), FONT, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


class PseudoLabelGallery:
    """``svis-ray pseudo-quality --render DIR``: collects the frames ``pseudo_quality`` scores
    (its ``on_frame``) and writes one picture per video, ``DIR/video_<id>.png``, of up to
    ``frames`` of its unlabelled frames (``pseudo_label_picture``)."""

    def __init__(self, out_dir: Any, class_names: list[str], frames: int = 6, scale: int = 2) -> None:
        self.out_dir, self.class_names, self.frames, self.scale = out_dir, class_names, frames, scale
        self.video: int | None = None
        self.seen: list[tuple] = []
        self.written: list[Any] = []

    def __call__(self, video_id: int, t: int, image: np.ndarray, gt_masks: np.ndarray, gt_labels: np.ndarray,
                 pseudo: Any, kinds: np.ndarray) -> None:
        if video_id != self.video:
            self.flush()
            self.video = video_id
        names = self.class_names
        gt = [(m, names[c]) for m, c in zip(gt_masks, gt_labels)]
        labels = [(m, names[c], float(s), bool(a), str(k))
                  for m, c, s, a, k in zip(pseudo.masks, pseudo.labels, pseudo.scores, pseudo.anchored, kinds)]
        self.seen.append((t, image, gt, labels))

    def flush(self) -> None:
        """Write the current video's picture."""
        if self.seen:
            keep = np.linspace(0, len(self.seen) - 1, min(self.frames, len(self.seen))).round().astype(int)
            from pathlib import Path

            path = Path(self.out_dir) / f"video_{self.video}.png"
            self.written.append(write_png(path, pseudo_label_picture([self.seen[i] for i in keep],
                                                                     f"video {self.video}", self.scale)))
        self.seen = []
