"""``svis-ray demo``: the whole system on the built-in demo data, on a laptop or CI box.

demo data (if missing) -> 1-labelled-frame subset (MinVIS "1%": middle frame) -> semi-supervised
training in local debug mode (2 workers, 2 teacher actors) -> held-out evaluation -> a picture of
the ground truth and the predicted tracks in the run folder, and the next command to try.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from svis_ray.config import load_config
from svis_ray.data.demo import make_demo_data
from svis_ray.data.sparsify import sparsify
from svis_ray.data.ytvis import YTVIS
from svis_ray.eval import format_table
from svis_ray.io import read_json
from svis_ray.pictures import render_eval_picture, write_png

DEBUG_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "debug.yaml"


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
    picture = render_eval_picture(val, str(data), read_json(run / "results.json", "results file"))
    write_png(run / "tracks.png", picture)
    print(f"\noutputs in {run}:\n"
          f"  tracks.png      ground truth (top) and predicted tracks of 3 held-out videos\n"
          f"  best.pt         the model (best held-out AP); results.json + metrics.json: its predictions and AP\n"
          f"  metrics.csv     training curves; tb/: TensorBoard (tensorboard --logdir {run / 'tb'})\n"
          f"  ray.log         Ray's worker output\n"
          f"next: svis-ray predict {data / cfg.data.val_json} --checkpoint {run / 'best.pt'} "
          f"--out {base / 'preds'} --render")
    return summary
