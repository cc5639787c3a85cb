"""``svis-ray demo``: the whole system on the built-in demo data, on a laptop or CI box.

demo data (if missing) -> 1-labelled-frame subset (MinVIS "1%": middle frame) -> semi-supervised
training in local debug mode (2 workers, 2 teacher actors) -> held-out evaluation -> a picture of
the predicted tracks in the run folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from svis_ray.config import load_config
from svis_ray.data.demo import make_demo_data
from svis_ray.data.sparsify import sparsify
from svis_ray.data.ytvis import YTVIS, decode_frame
from svis_ray.eval import format_table
from svis_ray.io import atomic_path, read_json
from svis_ray.predict import draw_tracks

DEBUG_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "debug.yaml"


def render_tracks(root: Path, split: YTVIS, results: list[dict[str, Any]], out_png: Path,
                  videos: int = 3, max_frames: int = 6, min_score: float = 0.3) -> Path:
    """Grid of frames (rows = videos) with each predicted track's mask in its own colour and
    ``#id class score`` written at the mask's centre."""
    rows = []
    for video in split.videos[:videos]:
        tracks = sorted((r for r in results if r["video_id"] == video["id"] and r["score"] >= min_score),
                        key=lambda r: -r["score"])
        picks = np.linspace(0, video["length"] - 1, min(max_frames, video["length"])).round().astype(int)
        tiles = []
        for t in picks:
            img = decode_frame(str(root / "JPEGImages" / video["file_names"][t]))
            tile = draw_tracks(img, [(k, split.class_names[split.cat_to_idx[r["category_id"]]], r["score"],
                                      r["segmentations"][t]) for k, r in enumerate(tracks)], scale=2)
            cv2.putText(tile, f"v{video['id']} t={t}", (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255),
                        1, cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows])
    with atomic_path(out_png) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(buf.tobytes())
    return out_png


def run_demo(out: str = "demo", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the demo into folder ``out`` (data in ``out/data``, run in ``out/run``)."""
    from svis_ray.train import run_training

    base = Path(out)
    data = base / "data"
    if not (data / "train.json").exists():
        s = make_demo_data(str(data))
        print(f"demo data: {s['train_videos']} train + {s['val_videos']} held-out videos in {data}")
    sub = data / "train_1frame.json"
    if not sub.exists():
        s = sparsify(str(data / "train.json"), str(sub), frames_per_video=1, strategy="middle", seed=0)
        print(f"1-frame subset: {s['labelled_frames']} labelled frames of {s['frames']} "
              f"({100 * s['mask_fraction']:.1f}% of masks)")
    cfg = load_config(DEBUG_CONFIG, [f"data.root={data}", f"output.dir={base / 'run'}", *(overrides or [])])
    summary = run_training(cfg)
    run = Path(summary["run_dir"])
    metrics = summary.get("metrics") or read_json(run / "metrics.json", "metrics file")
    print(format_table(metrics))
    val = YTVIS.load(str(data / cfg.data.val_json))
    png = render_tracks(data, val, read_json(run / "results.json", "results file"), run / "tracks.png")
    print(f"run folder: {run} (best.pt, results.json, metrics.json, metrics.csv, tb/, {png.name})")
    return summary
