"""``svis-ray predict``: a trained checkpoint -> tracks for a YTVIS split, a frame folder or a video file.

The checkpoint is an svis-ray one (``best.pt``) or an official MinVIS / Mask2Former-VIS R50
``model_final.pth``; the latter names no classes, so its class names come from the YTVIS JSON's
categories (the counts must match). A ``.onnx`` file (``svis-ray export``) is run by onnxruntime
instead of PyTorch (``load_frame_model``); everything after the per-frame model is the same. Tracks are linked with the checkpoint's tracker (MinVIS's
own for an official checkpoint) unless ``tracker`` says otherwise.

A YTVIS JSON (e.g. the valid/test split, no annotations needed) runs as Ray Data batch inference:
one row per video through an actor pool of ``Predictor``s, each loading the checkpoint once and
tracking one video per call with the windowed MinVIS tracker, so a long video never sits in
memory whole. A single frame folder or video file runs in this process. Outputs (all written
atomically) go to ``out_dir``: ``results.json`` (YouTube-VIS / CodaLab format; each video's
records are spooled to the out folder as they arrive and assembled at the end), optionally
``submission.zip``, ``<name>.tracks.json`` for a folder or file, and overlay videos with ``render``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cv2
import numpy as np
import ray
import torch

from svis_ray.console import log_file_for
from svis_ray.data.ingest import read_bytes, resolve
from svis_ray.data.transforms import resize_image, resized_shape
from svis_ray.data.ytvis import YTVIS, decode_frame
from svis_ray.errors import SvisError
from svis_ray.eval.results import ResultSpool
from svis_ray.inference import video_frames
from svis_ray import io as svis_io
from svis_ray.io import atomic_path, write_json
from svis_ray.model import load_model
from svis_ray.pictures import colour, draw_tracks, gt_tracks, match_tracks
from svis_ray.teacher import teacher_device
from svis_ray.tracking import TRACKERS, track_video, tracks_to_results

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 360, 1333  # the training config's test sizes by default
DEFAULT_FPS = 6.0  # YouTube-VIS frames are sampled at 6 fps


# ----------------------------------------------------------------------------- drawing
def render_video(frames: Iterable[np.ndarray], tracks: list[dict[str, Any]], out: Path, fps: float,
                 min_score: float, gt: list[dict[str, Any]] | None = None) -> int:
    """Write an mp4 of ``frames`` (original size, RGB) with the tracks drawn; returns the frame count.
    Frames with a side under 360 pixels are enlarged ``360 // short side`` times (nearest).

    tracks: ``{"id", "class", "score", "segmentations": [RLE or None per frame]}``. With ``gt``
    (the same form, score None), each frame shows the ground truth above the prediction, and a
    track matched to an object takes its colour.
    """
    shown = [t for t in tracks if t["score"] >= min_score]
    match = match_tracks([t["segmentations"] for t in shown], [g["segmentations"] for g in gt]) if gt else {}
    index = {t["id"]: i for i, t in enumerate(shown)}

    def pred_colour(k: int) -> tuple[int, int, int]:
        i = index[k]
        return colour(match[i]) if i in match else colour(len(gt or []) + i)

    def draw(img: np.ndarray, t: int) -> np.ndarray:
        scale = max(1, 360 // min(img.shape[:2]))  # small frames are enlarged, so labels stay legible
        drawn = draw_tracks(img, [(k["id"], k["class"], k["score"], k["segmentations"][t]) for k in shown],
                            scale, pred_colour, caption="prediction" if gt else None)
        if not gt:
            return drawn
        truth = draw_tracks(img, [(g["id"], g["class"], None, g["segmentations"][t]) for g in gt],
                            scale, caption="ground truth")
        return np.concatenate([truth, drawn])

    n = 0
    with atomic_path(out) as tmp:
        # VideoWriter picks the container from the file extension, so the temp file needs ".mp4".
        staging = tmp.with_name(tmp.name + ".mp4")
        writer = None
        try:
            for t, img in enumerate(frames):
                drawn = draw(img, t)
                if writer is None:
                    size = (drawn.shape[1], drawn.shape[0])
                    writer = cv2.VideoWriter(str(staging), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                    if not writer.isOpened():
                        raise SvisError(f"{out}: cannot write an mp4 video (OpenCV has no mp4v encoder?)")
                writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                n += 1
            if writer is not None:
                writer.release()
                writer = None
                os.replace(staging, tmp)
        finally:
            if writer is not None:
                writer.release()
            staging.unlink(missing_ok=True)
    return n


# ----------------------------------------------------------------------------- inputs
def _natural_key(p: Path) -> list[Any]:
    # frame_2 before frame_10, whatever the zero-padding
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]


@dataclass
class Clip:
    """One video given as a folder of frame images or a video file (original size ``height x width``)."""

    path: Path
    height: int
    width: int
    fps: float

    def frames(self) -> Iterator[np.ndarray]:
        """Decode the frames lazily, uint8 RGB at the original size."""
        if self.path.is_dir():
            for p in _frame_files(self.path):
                img = decode_frame(p)
                if img.shape[:2] != (self.height, self.width):
                    raise SvisError(f"{self.path}: frames differ in size: the first is {self.height}x{self.width}, "
                                    f"{p.name} is {img.shape[0]}x{img.shape[1]}")
                yield img
            return
        cap = _open_video(self.path)
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()


def _frame_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS), key=_natural_key)
    if not files:
        raise SvisError(f"{folder}: no frame images ({', '.join(IMAGE_EXTS)}) in the folder")
    return files


def _open_video(path: Path) -> cv2.VideoCapture:
    # FFmpeg reads this once, when OpenCV first uses it: keep its own messages off stderr, since
    # an unreadable file becomes one SvisError line instead.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SvisError(f"{path}: cannot open the video file (unreadable, empty or unsupported codec)")
    return cap


def open_clip(path: Path, fps: float | None) -> Clip:
    """Probe a frame folder or video file (size from its first frame); ``SvisError`` if it has no frames."""
    if path.is_dir():
        first = decode_frame(_frame_files(path)[0])
        return Clip(path, first.shape[0], first.shape[1], fps or DEFAULT_FPS)
    cap = _open_video(path)
    try:
        ok, bgr = cap.read()
        rate = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    if not ok:
        raise SvisError(f"{path}: the video file has no decodable frames")
    return Clip(path, bgr.shape[0], bgr.shape[1], rate if rate > 0 else fps or DEFAULT_FPS)


def _inference_size(info: dict[str, Any], min_size: int | None, max_size: int | None) -> tuple[int, int]:
    """Arguments first, then the sizes the training run stored in the checkpoint, then MinVIS' defaults."""
    extra = info.get("extra", {})
    short = min_size or int(extra.get("min_size_test", DEFAULT_MIN_SIZE))
    longest = max_size or int(extra.get("max_size_test", DEFAULT_MAX_SIZE))
    return short, max(short, longest)


def _tracker(info: dict[str, Any], tracker: str | None) -> str:
    """The argument, else the tracker recorded in the checkpoint. svis-ray checkpoints written
    before the tracker was recorded produced their results.json with the svis tracker."""
    return tracker or str(info.get("extra", {}).get("tracker", "svis"))


def _check_classes(checkpoint: Path, info: dict[str, Any], split: YTVIS) -> None:
    if info["class_names"] != split.class_names:
        raise SvisError(f"{checkpoint}: checkpoint classes {info['class_names']} do not match the categories "
                        f"of {split.source} {split.class_names}")


def load_frame_model(path: str | os.PathLike, device: torch.device | str, class_names: list[str] | None = None,
                     source: str = "the dataset", precision: str = "fp32", compile: bool = False
                     ) -> tuple[Callable[[torch.Tensor], dict], dict, torch.device]:
    """The per-frame model that ``track_video`` runs -> (model, info, device of its input).

    A ``.onnx`` file becomes a ``deploy.OnnxModel`` (onnxruntime, CUDA provider when present; its
    input stays on the CPU), anything else ``model.load_model(path, device, ...)``. info:
    ``config``, ``class_names``, ``extra`` (test sizes, tracker) from the checkpoint or the ONNX metadata.
    ``precision``/``compile``: how a PyTorch model runs (``accel.FrameModel``; precision applies on CUDA).
    """
    if Path(path).suffix.lower() == ".onnx":
        from svis_ray.deploy import OnnxModel  # onnxruntime only where an ONNX model is run

        onnx_model = OnnxModel(path)
        return onnx_model, onnx_model.info, torch.device("cpu")
    model, info = load_model(path, device, class_names, source)
    if precision != "fp32" or compile:
        from svis_ray.accel import FrameModel

        model = FrameModel(model, precision, compile)
    return model, info, torch.device(device)


# ----------------------------------------------------------------------------- Ray Data actor
class Predictor:
    """Ray Data actor for ``map_batches``: loads the checkpoint once, then tracks one video per row.

    Input columns ``index``, ``video_id``; output ``index``, ``records`` (JSON list of results.json
    records), ``frames``, ``seconds`` and ``error`` (an SvisError message, "" if none), so the
    driver can report a bad frame as one line instead of a Ray traceback.
    """

    def __init__(self, checkpoint: str, split: YTVIS, root: str, min_size: int, max_size: int,
                 window: int, topk: int, tracker: str, precision: str = "fp32", compile: bool = False):
        self.model, _, self.device = load_frame_model(checkpoint, teacher_device(), split.class_names,
                                                      str(split.source), precision, compile)
        self.split, self.root = split, root
        self.min_size, self.max_size, self.window, self.topk = min_size, max_size, window, topk
        self.tracker = tracker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"index": [], "records": [], "frames": [], "seconds": [], "error": []}
        for index, video_id in zip(batch["index"], batch["video_id"]):
            start = time.perf_counter()
            video = self.split.video(int(video_id))
            frames = video_frames(self.split, video, self.root, self.min_size, self.max_size)
            try:
                tracks = track_video(self.model, frames, window=self.window, topk=self.topk,
                                     out_size=(video["height"], video["width"]), device=self.device,
                                     tracker=self.tracker)
                records, error = tracks_to_results(tracks, video["id"], self.split.idx_to_cat), ""
            except SvisError as e:
                records, error = [], str(e)
            out["index"].append(int(index))
            out["records"].append(json.dumps(records))
            out["frames"].append(video["length"])
            out["seconds"].append(time.perf_counter() - start)
            out["error"].append(error)
        return {k: np.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- predict
def _check_args(num_actors: int, gpus_per_actor: float, window: int, topk: int, min_size: int | None,
                max_size: int | None, fps: float | None, tracker: str | None) -> None:
    problems = [(num_actors < 1, f"actors must be at least 1, got {num_actors}"),
                (gpus_per_actor < 0, f"gpus per actor must be >= 0, got {gpus_per_actor}"),
                (window < 1, f"window must be at least 1 frame, got {window}"),
                (topk < 1, f"topk must be at least 1, got {topk}"),
                (min_size is not None and min_size < 1, f"min size must be positive, got {min_size}"),
                (max_size is not None and max_size < 1, f"max size must be positive, got {max_size}"),
                (fps is not None and fps <= 0, f"fps must be positive, got {fps}"),
                (tracker is not None and tracker not in TRACKERS,
                 f"tracker must be one of {', '.join(TRACKERS)}, got {tracker!r}")]
    for bad, msg in problems:
        if bad:
            raise SvisError(f"predict: {msg}")


def _track_list(records: list[dict[str, Any]], name_of: Callable[[int], str]) -> list[dict[str, Any]]:
    """results.json records of one video -> tracks with id (rank, best first), class name, score, RLEs."""
    return [{"id": k, "class": name_of(r["category_id"]), "category_id": r["category_id"], "score": r["score"],
             "segmentations": r["segmentations"]} for k, r in enumerate(records)]


@dataclass
class _Run:
    """What one input produced: the summary so far, and per output name the video's original
    frames (re-decoded for rendering) and its tracks (read back from the spool when rendered).
    The results.json records are in the ``ResultSpool`` the run wrote to."""

    summary: dict[str, Any]
    videos: dict[str, tuple[Callable[[], Iterator[np.ndarray]], Callable[[], list[dict[str, Any]]]]]
    fps: float
    gt: Callable[[str], list[dict[str, Any]] | None] = lambda name: None  # per output name, when annotated


def _write_zip(out_dir: Path, results: Path) -> Path:
    path = out_dir / "submission.zip"
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(results, arcname="results.json")  # CodaLab wants it at the archive root
    return path


def predict(checkpoint: str | os.PathLike, input: str | os.PathLike, out_dir: str | os.PathLike, *,
            frame_root: str | None = None, zip_results: bool = False, render: bool = False,
            num_actors: int = 1, gpus_per_actor: float = 0.0, min_size: int | None = None,
            max_size: int | None = None, window: int = 30, topk: int = 10, fps: float | None = None,
            render_min_score: float = 0.3, tracker: str | None = None, precision: str = "fp32",
            compile: bool = False, log: Callable[[str], None] = partial(print, flush=True)) -> dict[str, Any]:
    """Predict tracks for ``input`` (YTVIS JSON, frame folder or video file) into ``out_dir``.

    ``checkpoint``: an svis-ray or official checkpoint, or a ``.onnx`` export (``load_frame_model``).
    ``frame_root``: dataset folder holding ``JPEGImages/`` for a JSON (default: the JSON's folder).
    ``fps``: frame rate of rendered frame folders and splits (video files keep their own rate).
    ``tracker``: "minvis" or "svis" (``tracking.TRACKERS``); default: the checkpoint's.
    ``precision`` (fp32 / tf32 / bf16 / fp16, on CUDA) and ``compile``: ``svis_ray.accel``.
    Prints a line per video through ``log``; returns the summary: input, videos, frames, seconds (all
    of it), predict_seconds (tracking, with actor start-up), frames_per_s (over predict_seconds),
    tracks, confident_tracks (score >= render_min_score), tracker, in_process, outputs (paths written).
    """
    _check_args(num_actors, gpus_per_actor, window, topk, min_size, max_size, fps, tracker)
    # A URI checkpoint stays a string (Path would make s3://b of it s3:/b); a URI out_dir is
    # written to a local staging folder and uploaded whole at the end.
    ckpt = str(checkpoint) if svis_io.is_uri(checkpoint) else Path(checkpoint)
    src = Path(input)
    remote = str(out_dir) if svis_io.is_uri(out_dir) else None
    staging = tempfile.TemporaryDirectory(prefix="svis-ray-predict-") if remote else None
    try:
        summary = _predict(ckpt, src, Path(staging.name) if staging else Path(out_dir), frame_root, zip_results,
                           render, num_actors, gpus_per_actor, min_size, max_size, window, topk, fps,
                           render_min_score, tracker, precision, compile, log)
        if staging:
            svis_io.copy_tree(staging.name, remote)
            summary["outputs"] = [svis_io.join(remote, os.path.relpath(p, staging.name)) for p in summary["outputs"]]
    finally:
        if staging:
            staging.cleanup()
    return summary


def _predict(ckpt: Path | str, src: Path, out: Path, frame_root: str | None, zip_results: bool, render: bool,
             num_actors: int, gpus_per_actor: float, min_size: int | None, max_size: int | None, window: int,
             topk: int, fps: float | None, render_min_score: float, tracker: str | None, precision: str,
             compile: bool, log: Callable[[str], None]) -> dict[str, Any]:
    if not src.exists():
        raise SvisError(f"{src}: input not found")
    is_json = src.is_file() and src.suffix.lower() == ".json"
    if not (is_json or src.is_dir() or src.suffix.lower() in VIDEO_EXTS):
        raise SvisError(f"{src}: not a YTVIS JSON, a frame folder or a video file ({', '.join(VIDEO_EXTS)})")
    start = time.perf_counter()
    results = ResultSpool(out)
    try:
        if is_json:
            run = _predict_split(ckpt, src, out, frame_root or str(src.parent), num_actors, gpus_per_actor,
                                 min_size, max_size, window, topk, fps, tracker, log, results, precision,
                                 compile)
        else:
            run = _predict_clip(ckpt, src, out, min_size, max_size, window, topk, fps, tracker, log, results,
                                precision, compile)
        summary = run.summary
        outputs = summary["outputs"]
        outputs.insert(0, str(out / "results.json"))
        results.write(out / "results.json")
        if zip_results:
            outputs.append(str(_write_zip(out, out / "results.json")))
        if render:
            for name, (frames, tracks) in run.videos.items():
                path = out / f"{name}.overlay.mp4"
                render_video(frames(), tracks(), path, run.fps, render_min_score, gt=run.gt(name))
                outputs.append(str(path))
    finally:
        results.close()
    # frames/s over the prediction itself, not Ray start-up or rendering
    busy = summary["predict_seconds"]
    summary.update(seconds=round(time.perf_counter() - start, 3), predict_seconds=round(busy, 3),
                   frames_per_s=round(summary["frames"] / max(busy, 1e-9), 3), tracks=len(results.scores),
                   confident_tracks=sum(score >= render_min_score for score in results.scores))
    return summary


def _predict_split(ckpt: Path, ann: Path, out: Path, root: str, num_actors: int, gpus_per_actor: float,
                   min_size: int | None, max_size: int | None, window: int, topk: int, fps: float | None,
                   tracker: str | None, log: Callable[[str], None], results: ResultSpool,
                   precision: str = "fp32", compile: bool = False) -> _Run:
    """Batch inference over the split's videos; each video's records go to ``results`` as it finishes."""
    from svis_ray.train import ray_init  # Ray Train is heavy; only this path needs a cluster

    full = YTVIS.load(ann)
    _, info, _ = load_frame_model(ckpt, "cpu", full.class_names, str(ann))
    _check_classes(ckpt, info, full)
    if not full.videos:
        raise SvisError(f"{ann}: the file lists no videos")
    short, longest = _inference_size(info, min_size, max_size)
    tracker = _tracker(info, tracker)
    # Actors need only the videos and categories, not the (possibly large) annotations.
    split = YTVIS({"videos": full.videos, "categories": full.categories}, source=ann)
    root = root if "://" in root else str(Path(root).resolve())
    ray_init(log_file_for(out))  # Ray's worker output -> out/ray.log
    rows = [{"index": i, "video_id": v["id"]} for i, v in enumerate(split.videos)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        Predictor, fn_constructor_kwargs={"checkpoint": svis_io.absolute(ckpt), "split": split, "root": root,
                                          "min_size": short, "max_size": longest, "window": window,
                                          "topk": topk, "tracker": tracker, "precision": precision,
                                          "compile": compile},
        compute=ray.data.ActorPoolStrategy(size=num_actors), batch_size=1, num_gpus=gpus_per_actor,
        num_cpus=0 if gpus_per_actor > 0 else 1)  # a GPU actor's CPU share would starve the decoders
    log(f"predict: {len(rows)} videos of {ann} on {num_actors} actor(s) at short side {short} (max {longest}), "
        f"{tracker} tracker")
    start = time.perf_counter()
    frames = done = 0
    for row in ds.iter_rows():
        if row["error"]:
            raise SvisError(str(row["error"]))
        video = split.videos[int(row["index"])]
        records = results.add(int(row["index"]), str(row["records"]))  # on disk now, not kept here
        frames += int(row["frames"])
        done += 1
        best = f", best {records[0]['score']:.2f}" if records else ""
        log(f"[{done}/{len(rows)}] video {video['id']}: {row['frames']} frames in "
            f"{row['seconds']:.1f} s, {len(records)} tracks{best}")

    def name_of(cat: int) -> str:
        return split.class_names[split.cat_to_idx[cat]]

    def original_frames(video: dict[str, Any]) -> Callable[[], Iterator[np.ndarray]]:
        return lambda: (decode_frame(read_bytes(p), source=p)
                        for p in (resolve(root, "JPEGImages/" + n) for n in video["file_names"]))

    def tracks(i: int) -> Callable[[], list[dict[str, Any]]]:
        return lambda: _track_list(results.records(i), name_of)

    videos = {str(v["id"]): (original_frames(v), tracks(i)) for i, v in enumerate(split.videos)}
    summary = {"input": str(ann), "videos": len(rows), "frames": frames, "in_process": False, "outputs": [],
               "predict_seconds": time.perf_counter() - start, "tracker": tracker}

    def gt(name: str) -> list[dict[str, Any]] | None:  # decoded per rendered video, not all at once
        return gt_tracks(full, int(name)) if full.has_annotations else None

    return _Run(summary, videos, fps or DEFAULT_FPS, gt)


def _predict_clip(ckpt: Path, src: Path, out: Path, min_size: int | None, max_size: int | None, window: int,
                  topk: int, fps: float | None, tracker: str | None, log: Callable[[str], None],
                  results: ResultSpool, precision: str = "fp32", compile: bool = False) -> _Run:
    clip = open_clip(src, fps)  # before the checkpoint: a bad input fails at once
    model, info, device = load_frame_model(ckpt, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                           precision=precision, compile=compile)
    short, longest = _inference_size(info, min_size, max_size)
    tracker = _tracker(info, tracker)
    shape = resized_shape(clip.height, clip.width, short, longest)
    where = f"onnxruntime ({', '.join(model.providers)})" if hasattr(model, "providers") else device
    log(f"predict: one video ({src}), in this process on {where}, at {shape[0]}x{shape[1]}, {tracker} tracker")
    start, count = time.perf_counter(), 0

    def resized() -> Iterator[np.ndarray]:
        nonlocal count
        for img in clip.frames():
            count += 1
            yield resize_image(img, shape)

    tracks = track_video(model, resized(), window=window, topk=topk, out_size=(clip.height, clip.width),
                         device=device, tracker=tracker)
    names = info["class_names"]
    # No dataset here: category ids are class index + 1 (YTVIS ids start at 1), the video id is 1.
    records = results.add(0, json.dumps(tracks_to_results(tracks, 1, {i: i + 1 for i in range(len(names))})))
    track_list = _track_list(records, lambda cat: names[cat - 1])
    best = f", best {records[0]['score']:.2f}" if records else ""
    seconds = time.perf_counter() - start
    log(f"[1/1] {src.name}: {count} frames in {seconds:.1f} s, {len(records)} tracks{best}")
    name = src.name if src.is_dir() else src.stem
    tracks_json = out / f"{name}.tracks.json"
    write_json(tracks_json, {"input": str(src), "height": clip.height, "width": clip.width, "frames": count,
                             "fps": clip.fps, "class_names": names, "tracks": track_list})
    summary = {"input": str(src), "videos": 1, "frames": count, "in_process": True, "outputs": [str(tracks_json)],
               "predict_seconds": seconds, "tracker": tracker}
    return _Run(summary, {name: (clip.frames, lambda: track_list)}, clip.fps)
