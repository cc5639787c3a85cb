"""Geometric transforms shared by training, teachers and inference (numpy + OpenCV).

One transform is drawn per clip and applied to all of its frames and masks, so a teacher that
tracks a clip and the ground truth on the clip's labelled frame live in the same coordinates.
"""
from __future__ import annotations

import cv2
import numpy as np


def resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) scaled so the short side is ``short`` and the long side at most ``max_size``,
    rounded half up (the sizes detectron2's ResizeShortestEdge gives)."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_image(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [h,w,3] (area filter when shrinking, bilinear when growing)."""
    h, w = shape
    if img.shape[:2] == (h, w):
        return img
    interp = cv2.INTER_AREA if h < img.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def resize_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 [N,H,W] -> uint8 [N,h,w] with nearest-neighbour sampling (labels stay binary)."""
    h, w = shape
    if masks.shape[1:] == (h, w):
        return masks
    out = np.zeros((masks.shape[0], h, w), dtype=np.uint8)
    for i, m in enumerate(masks):
        out[i] = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return out


def pad_to_multiple(h: int, w: int, div: int = 32) -> tuple[int, int]:
    return (h + div - 1) // div * div, (w + div - 1) // div * div
